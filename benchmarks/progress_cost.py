"""Cost of one refresh of the terminal progress line: amp_magics' ConsoleReporter vs tqdm (and
rich, when installed), on a real pseudo-terminal, and what each one draws at 80 and 60 columns.

The run is mid-training with a validation loss, fp16's loss scale, skipped steps and minutes of
ETA (the line that wrapped in issue 16), at 2,432 and at 100,000 recorded steps. One refresh is
what the engine does every `refresh_seconds` (0.5 s by default): put the latest numbers in the
line, fit it to the terminal, write it and flush. Per step nothing is written.

    python benchmarks/progress_cost.py                 # microseconds per refresh, median of 5 x 300
    python benchmarks/progress_cost.py --refreshes 2000
"""
from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import statistics
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from amp_magics.training.run import Run
from amp_magics.views.reporter import ConsoleReporter, progress_fields, progress_line


def sample_run(steps: int) -> Run:
    run = Run("run1", device="cpu", precision="fp16", total_steps=128_000, steps_per_epoch=8_000)
    run.history = [{"step": i, "epoch": i // 8_000, "loss": 2.0 / (1 + i / 500), "scale": 65536.0,
                    "skipped": i % 997 == 3, "lr": 1e-3, "time": i / 6.2, "samples": 256}
                   for i in range(steps)]
    run.epoch = steps // 8_000
    run.val_history = [{"epoch": 0, "step": 8_000, "val_loss": 0.04321}]
    run.wall_time = steps / 6.2
    return run


class Terminal:
    """A pseudo-terminal of `columns` x 30 whose output is read (and dropped) by a thread,
    as a terminal emulator would; `stream` is the program's side."""

    def __init__(self, columns: int):
        self.master, slave = pty.openpty()
        self.resize(columns)
        self.stream = open(slave, "w", buffering=1, encoding="utf-8", closefd=True)
        self.tail = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def resize(self, columns: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.tail = (self.tail + data)[-4096:]

    def last_frame(self) -> str:
        """The last line drawn in place: the text after the last carriage return."""
        time.sleep(0.05)  # let the reader catch up
        text = self.tail.decode("utf-8", "replace").rsplit("\r", 1)[-1]
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).rstrip()

    def close(self):
        self.stream.close()
        os.close(self.master)


def old_refresh(run: Run, stream) -> None:
    """The reporter before issue 16: no width, no erase, skipped steps recounted each time."""
    stream.write("\r" + progress_line(run))
    stream.flush()


def extra_fields(run: Run, skipped: int) -> list[str]:
    """The fields a library bar does not compute itself (it has name, count, rate and ETA)."""
    return [text for _, _, text in progress_fields(run, skipped)
            if not text.startswith((run.name, f"{run.precision}/", "step ", "ETA "))
            and not text.endswith("steps/s")]


def tqdm_factory(run: Run, stream):
    from tqdm import tqdm

    bar = tqdm(total=run.total_steps, file=stream, dynamic_ncols=True, mininterval=0,
               miniters=0, desc=f"{run.name} {run.precision}/{run.device}", unit="step",
               smoothing=0)
    bar.start_t -= run.wall_time  # as if it had followed the run from its start
    skipped = sum(r["skipped"] for r in run.history)  # counted incrementally, as ours does

    def refresh(run: Run, stream) -> None:
        bar.n = len(run.history)
        bar.set_postfix_str(", ".join(extra_fields(run, skipped)), refresh=False)
        bar.refresh()
    return refresh, bar.close


def rich_factory(run: Run, stream):
    from rich.console import Console
    from rich.progress import Progress

    # Console(file=...) sizes itself from the process's stdin/stdout terminal, not from `file`
    progress = Progress(*Progress.get_default_columns(), "{task.fields[extra]}",
                        console=Console(file=stream), auto_refresh=False, transient=False,
                        redirect_stdout=False, redirect_stderr=False)
    progress.start()
    task = progress.add_task(f"{run.name} {run.precision}/{run.device}", total=run.total_steps,
                             extra="")
    skipped = sum(r["skipped"] for r in run.history)

    def refresh(run: Run, stream) -> None:
        progress.update(task, completed=len(run.history),
                        extra=" | ".join(extra_fields(run, skipped)))
        progress.refresh()
    return refresh, progress.stop


def amp_factory(run: Run, stream):
    reporter = ConsoleReporter(stream=stream)
    assert reporter.tty and reporter.inline
    return (lambda run, stream: reporter.on_refresh(run)), (lambda: None)


def old_factory(run: Run, stream):
    return old_refresh, (lambda: None)


def measure(factory, run: Run, refreshes: int, rounds: int) -> tuple[float, dict[int, str]]:
    """Median microseconds per refresh, and the frame drawn at 80 and at 60 columns."""
    term = Terminal(80)
    refresh, close = factory(run, term.stream)
    try:
        frames = {}
        for columns in (80, 60):
            term.resize(columns)
            refresh(run, term.stream)
            frames[columns] = term.last_frame()
        term.resize(100)
        for _ in range(50):  # warm up
            refresh(run, term.stream)
        per_round = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(refreshes):
                refresh(run, term.stream)
            per_round.append((time.perf_counter() - t0) / refreshes * 1e6)
        return statistics.median(per_round), frames
    finally:
        close()
        term.close()


def import_ms(module: str) -> float | None:
    """Milliseconds to import `module` in a new interpreter beyond its start (median of 3)."""
    def once(code):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], capture_output=True)
        return (time.perf_counter() - t0) * 1e3 if done.returncode == 0 else None
    base = statistics.median(once("pass") for _ in range(3))
    with_module = [once(f"import {module}") for _ in range(3)]
    if None in with_module:
        return None
    return statistics.median(with_module) - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refreshes", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    variants = [("amp_magics ConsoleReporter", amp_factory, None),
                ("previous reporter (no fit/erase)", old_factory, None),
                ("tqdm", tqdm_factory, "tqdm"),
                ("rich.progress", rich_factory, "rich.progress")]
    versions = {}
    for _, _, module in variants:
        if module:
            try:
                top = __import__(module.split(".")[0])
                versions[module] = getattr(top, "__version__", None) or _dist_version(module)
            except ImportError:
                versions[module] = None
    print(f"Python {sys.version.split()[0]}; " + ", ".join(
        f"{m} {v or 'not installed'}" for m, v in versions.items()))
    print(f"microseconds per refresh, median of {args.rounds} rounds of {args.refreshes}, "
          "on a 100-column pty:")
    print(f"  {'':34} {'2,432 steps':>12} {'100,000 steps':>14} {'import':>9}")
    frames = {}
    for label, factory, module in variants:
        if module and versions[module] is None:
            continue
        costs = []
        for steps in (2_432, 100_000):
            cost, drawn = measure(factory, sample_run(steps), args.refreshes, args.rounds)
            costs.append(cost)
            frames[label] = drawn
        imported = import_ms(module) if module else None
        imported = f"{imported:.0f} ms" if imported is not None else "-"
        print(f"  {label:34} {costs[0]:10.1f}us {costs[1]:12.1f}us {imported:>9}")
    for columns in (80, 60):
        print(f"\nthe line at {columns} columns (100,000 steps):")
        for label, drawn in frames.items():
            line = drawn[columns]
            print(f"  {label:34} [{len(line):3} chars] {line}")


def _dist_version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module.split(".")[0])
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
