"""The text progress line and `status --watch` as a terminal shows them (issue 16).

Scripts run in a real pseudo-terminal whose window size the test sets; what they write is
rendered by pyte, a terminal emulator, and the test reads the screen as a user would: one
progress row, no row wider than the terminal, no leftovers of a longer line, the line
following a resize; Ctrl-C ends the script with exit status 130 after the run's JSON and
checkpoint are written; a log file gets plain lines. Every wait is for a condition.
"""
import fcntl
import io
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time

import pyte  # the `test` extra
import pytest
import torch

from amp_magics.training.run import Run
from amp_magics.views.reporter import ConsoleReporter, progress_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 20 batches an epoch for 1,000 epochs with a sleep in the step: minutes of ETA, a validation
# loss after the first second, and a line longer than 80 columns when nothing is dropped.
SCRIPT = textwrap.dedent("""
    import os, sys, time
    import torch, torch.nn.functional as F
    import amp_magics

    out, epochs = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = [(torch.randn(16, 8), torch.randint(0, 2, (16,))) for _ in range(20)]

    def step(batch):
        time.sleep(0.01)
        x, y = batch
        return F.cross_entropy(model(x), y)

    with open(os.path.join(out, "pid"), "w") as f:
        f.write(str(os.getpid()))
    run = amp_magics.train(step, model=model, optimizer=opt, data=data, val=data[:2],
                           epochs=epochs, dtype="fp32", name="tty", refresh_seconds=0.1,
                           checkpoint=os.path.join(out, "ckpt.pt"),
                           save=os.path.join(out, "run.json"))
    print("returned", run.status)
""")

# Every field the progress line may show; anything else on its row is debris.
FIELD = re.compile(r"tty( fp32/cpu)?|step \d+/20000|epoch \d+|loss [-+.\de]+|val [-+.\de]+|"
                   r"[.\d]+ steps/s|ETA (\d+s|\d+m\d\ds|\d+h\d\dm)|\d+ skipped|scale 2\^\d+")


class Terminal:
    """A child process on a pseudo-terminal of `columns` x `rows`, its output fed to pyte."""

    def __init__(self, argv, columns, rows=40, cwd=None):
        self.master, slave = pty.openpty()
        self.columns = columns
        self._set_size(columns, rows)
        self.screen = pyte.Screen(columns, rows)
        self._feed = pyte.ByteStream(self.screen)
        self.raw = b""
        self.lock = threading.RLock()  # conditions read the screen while holding it
        self._resize_to = None
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                                     env=env, start_new_session=False)
        os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _set_size(self, columns, rows=40):
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the child and everything it started closed the terminal
                return
            if not data:
                return
            with self.lock:
                self.raw += data
                self._feed.feed(data)
                if self._resize_to and data.endswith(b"\x1b[K"):
                    # Right after a redraw, as a user's drag would land between two refreshes:
                    # the terminal (pyte) and the window size change together.
                    columns, self._resize_to = self._resize_to, None
                    self._set_size(columns)
                    self.screen.resize(self.screen.lines, columns)
                    self.columns = columns
                    self.resized_at = len(self.raw)

    def resize(self, columns):
        self._resize_to = columns
        self.wait_for(lambda t: t.columns == columns, "the resize")

    def rows(self):
        with self.lock:
            return [row.rstrip() for row in self.screen.display]

    def wait_for(self, condition, what, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if condition(self):
                    return
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no {what} within {timeout} s; the screen:\n"
                             + "\n".join(self.rows()))

    def finish(self, timeout=60):
        status = self.proc.wait(timeout=timeout)
        self._reader.join(timeout)
        return status

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        os.close(self.master)


def progress_rows(rows):
    return [row for row in rows if " | step " in row or row.startswith("step ")]


def assert_clean_progress_row(rows, columns):
    found = progress_rows(rows)
    assert len(found) == 1, "\n".join(rows)
    row = found[0]
    assert len(row) < columns, row
    for field in row.split(" | "):
        assert FIELD.fullmatch(field), f"debris or an unknown field {field!r} in {row!r}"
    return row


def drawn_lines(raw: bytes) -> list[str]:
    """Each in-place redraw: the text between a carriage return and the erase to the row's end."""
    return re.findall(r"\r([^\r\n\x1b]*)\x1b\[K", raw.decode("utf-8", "replace"))


def step_of(row):
    return int(re.search(r"step (\d+)/", row).group(1))


def test_progress_line_in_a_terminal_fits_follows_a_resize_and_ctrl_c_exits_130(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    # sh reports the exit status as a shell user sees it: 130 = 128 + SIGINT
    term = Terminal(["sh", "-c", f'"{sys.executable}" train.py "$0" 1000; echo "exit status $?"',
                     str(tmp_path)], columns=80, cwd=str(tmp_path))
    try:
        # 80 columns: a validation loss and minutes of ETA, all on one row of at most 79
        term.wait_for(lambda t: len(progress_rows(t.rows())) > 1 or any(
            "val " in r and re.search(r"ETA \d+m", r) for r in progress_rows(t.rows())),
            "progress row with val and ETA")  # (or a second row: a wrapped line fails at once)
        first = assert_clean_progress_row(term.rows(), 80)
        term.wait_for(lambda t: any(step_of(r) > step_of(first) + 10
                                    for r in progress_rows(t.rows())), "later refresh")
        assert_clean_progress_row(term.rows(), 80)
        assert all(len(line) < 80 for line in drawn_lines(term.raw))
        assert "tty: training on cpu in fp32" in term.rows()[0]

        # the window shrinks to 60 columns: the next refreshes fit 60, nothing left behind
        term.resize(60)
        term.wait_for(lambda t: drawn_lines(t.raw[t.resized_at:]), "redraw after the resize")
        before = step_of(progress_rows(term.rows())[0])
        term.wait_for(lambda t: any(step_of(r) > before + 10 for r in progress_rows(t.rows())),
                      "refresh at 60 columns")
        row = assert_clean_progress_row(term.rows(), 60)
        assert re.search(r"ETA \d+m", row) and "loss " in row, row
        assert all(len(line) < 60 for line in drawn_lines(term.raw[term.resized_at:]))

        # Ctrl-C: a clean stop, the checkpoint and the JSON, then the interrupt goes on: 130
        with open(tmp_path / "pid") as f:
            os.kill(int(f.read()), signal.SIGINT)
        assert term.finish() == 0  # sh itself; it printed the script's status
        rows = term.rows()
        assert "exit status 130" in rows, "\n".join(rows)
        assert not any(r.startswith("returned") for r in rows)  # train() did not return
    finally:
        term.close()
    run = Run.load(tmp_path / "run.json")
    assert run.status == "interrupted" and run.history
    checkpoint = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    assert checkpoint["step"] == len(run.history)  # written at the stop, not an epoch end
    note = next(n for n in run.notes if n.startswith("interrupted after"))
    assert "model and optimizer are as after the last completed step" in note  # no scaler here
    # the summary and the note, wrapped at word boundaries to the 60 columns
    summary = rows.index(next(r for r in rows if r.startswith("tty interrupted:")))
    assert not any(progress_rows(rows)), "\n".join(rows)  # the end lines replaced the row
    note_rows = [rows[summary + 1 + i] for i in range(4)
                 if rows[summary + 1 + i].startswith(("note: ", "      "))]
    assert all(len(r) < 60 for r in rows[summary:summary + 1 + len(note_rows)])
    assert " ".join(r.strip() for r in note_rows) == f"note: {note}"
    assert any("KeyboardInterrupt: tty interrupted after" in r for r in rows)


def test_output_to_a_file_has_plain_full_lines(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    with open(tmp_path / "train.log", "wb") as log:
        done = subprocess.run([sys.executable, str(script), str(tmp_path), "2"], stdout=log,
                              stderr=subprocess.STDOUT, cwd=str(tmp_path), timeout=120)
    text = (tmp_path / "train.log").read_bytes().decode()
    assert done.returncode == 0, text
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0].startswith("tty: training on cpu in fp32")
    assert any(line.startswith("tty finished: 40 steps") and "peak memory" in line
               for line in lines)  # one full line, however long
    assert lines[-1] == "returned finished"


def test_status_watch_shows_a_changing_time_and_stops_on_ctrl_c():
    term = Terminal([sys.executable, "-m", "amp_magics", "status", "--watch", "0.2"],
                    columns=80, cwd=ROOT)
    clock = re.compile(r"Updated (\d\d:\d\d:\d\d), every 0.2 s")
    try:
        term.wait_for(lambda t: clock.match(t.rows()[0]), "first frame")
        first = clock.match(term.rows()[0]).group(1)
        term.wait_for(lambda t: clock.match(t.rows()[0]) and
                      clock.match(t.rows()[0]).group(1) != first, "a later time")
        rows = term.rows()
        assert "Recommendation: --dtype auto picks" in "\n".join(rows)
        assert not any("this process" in r or "resident" in r for r in rows), "\n".join(rows)
        assert all(len(r) <= 80 for r in rows)
        term.proc.send_signal(signal.SIGINT)
        assert term.finish() == 0
        assert b"Traceback" not in term.raw
    finally:
        term.close()


# -- the reporter in-process: fitting and log-file lines ------------------------------------

def sample_run(steps=2432, status="running", rate=6.2):
    run = Run("run1", device="cpu", precision="fp16", total_steps=128_000)
    run.history = [{"step": i, "epoch": 0, "loss": 0.25, "scale": 65536.0, "skipped": i == 3,
                    "lr": 1e-3, "time": (i + 1) / rate, "samples": 256} for i in range(steps)]
    run.val_history = [{"epoch": 0, "step": 2000, "val_loss": 0.5}]
    run.wall_time, run.status = steps / rate, status
    return run


def test_progress_line_drops_the_least_useful_fields_first():
    run = sample_run()
    full = progress_line(run)
    assert full == ("run1 fp16/cpu | step 2432/128000 | epoch 1 | loss 0.25 | scale 2^16 | "
                    "1 skipped | val 0.5 | 6.2 steps/s | ETA 5h37m")
    assert progress_line(run, len(full)) == full
    assert progress_line(run, 100) == ("run1 | step 2432/128000 | loss 0.25 | scale 2^16 | "
                                       "1 skipped | val 0.5 | 6.2 steps/s | ETA 5h37m")
    assert progress_line(run, 79) == ("run1 | step 2432/128000 | loss 0.25 | 1 skipped | "
                                      "val 0.5 | ETA 5h37m")
    assert progress_line(run, 59) == "run1 | step 2432/128000 | loss 0.25 | 1 skipped | ETA 5h37m"
    assert progress_line(run, 40) == "run1 | step 2432/128000 | loss 0.25"
    assert progress_line(run, 16) == "step 2432/128000"
    assert progress_line(run, 10) == "step 2432~"
    assert all(len(progress_line(run, width)) <= width for width in range(0, len(full) + 1))


def test_log_file_lines_are_full_lines_without_carriage_returns():
    stream = io.StringIO()
    reporter = ConsoleReporter(stream=stream, log_every=0)
    run = sample_run()
    assert not reporter.tty and not reporter.inline and reporter.columns() is None
    reporter.on_start(run)
    reporter.on_refresh(run)
    run.status = "finished"
    run.notes.append("a long note " * 20)
    reporter.on_end(run)
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.split("\n")
    assert lines[1] == progress_line(sample_run())  # the whole line, however long
    assert "note: " + "a long note " * 20 in lines


def test_a_shorter_redraw_leaves_nothing_behind_on_a_terminal():
    """The `ETA 7ss` of issue 16: a line that shrinks is erased to the end of the row."""
    master, slave = pty.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    screen = pyte.Screen(200, 24)
    feed = pyte.ByteStream(screen)
    with open(slave, "w", closefd=True) as stream:
        reporter = ConsoleReporter(stream=stream)
        assert reporter.tty and reporter.inline and reporter.columns() == 199
        run = sample_run(rate=150)  # ETA 13m...
        reporter.on_refresh(run)
        run.history = sample_run(127_990, rate=150).history  # ...then ETA 0s, no val field
        run.val_history = []
        reporter.on_refresh(run)
    while True:  # everything written, until the closed side reads as the end (EIO)
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        feed.feed(data)
    os.close(master)
    rows = [row.rstrip() for row in screen.display if row.strip()]
    assert rows == [progress_line(run)]
    assert rows[0].endswith("| ETA 0s")


def test_skipped_steps_are_counted_once():
    reporter = ConsoleReporter(stream=io.StringIO(), inline=True)
    run = sample_run(steps=10)
    assert reporter._count_skipped(run) == 1
    run.history.append({**run.history[0], "skipped": True})
    assert reporter._count_skipped(run) == 2
    run.history = run.history[:2]  # a new history (a resume, or another run of a sweep)
    assert reporter._count_skipped(run) == 0


def test_notebook_inline_redraw_covers_a_longer_line():
    stream = io.StringIO()  # not a terminal: no escape sequences, blanks over the old text
    reporter = ConsoleReporter(stream=stream, inline=True)
    run = sample_run()
    reporter.on_refresh(run)
    long = len(progress_line(run))
    run.val_history = []
    reporter.on_refresh(run)
    last = stream.getvalue().rsplit("\r", 1)[1]
    assert len(last) == long and last.rstrip() == progress_line(run)
    assert "\x1b" not in stream.getvalue()


def test_compile_time_is_shown_apart_and_left_out_of_the_rate():
    from amp_magics.views.dashboard import status_line
    from amp_magics.views.reporter import end_lines

    run = sample_run(rate=100)
    run.compiling = True
    assert "compiling (torch.compile)..." in progress_line(run)
    assert status_line(run, 0).startswith("compiling the model (torch.compile)...")
    run.compiling = False
    for record in run.history[-10:]:  # a step among the last ones recompiled for 14 s...
        record["time"] += 14.0
    run.history[-10]["compile_s"], run.compile_seconds, run.compiles = 14.0, 14.0, 1
    assert run.rates()[1] == pytest.approx(100)  # ...which the rates leave out
    assert "| 100 steps/s |" in progress_line(run)
    assert "compiled in 14.0 s (not in steps/s)" in status_line(run, 0)
    run.status = "finished"
    assert end_lines(run)[0].endswith("compiled in 14s")


def test_the_magic_writes_plain_lines_into_a_file(tmp_path):
    """`ipython notebook.ipynb > log`: IPython's stdout is a file, so no "\r" redraws."""
    import nbformat

    cells = ["%load_ext amp_magics",
             "import torch, torch.nn.functional as F\ntorch.manual_seed(0)\n"
             "model = torch.nn.Linear(8, 3)\n"
             "optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n"
             "train_loader = [(torch.randn(4, 8), torch.randint(0, 3, (4,))) for _ in range(30)]",
             "%%amp_train --dtype fp32 --refresh 0.01 --name tofile\n"
             "x, y = batch\nloss = F.cross_entropy(model(x), y)"]
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells]),
                   tmp_path / "cells.ipynb")
    with open(tmp_path / "cells.log", "wb") as log:
        done = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "cells.ipynb"],
                              stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path),
                              timeout=120)
    text = (tmp_path / "cells.log").read_bytes().decode()
    assert done.returncode == 0, text
    assert "tofile finished: 30 steps" in text and "\r" not in text, repr(text[-600:])
