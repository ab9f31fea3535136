"""A plain-text progress line for terminals, nohup logs and `--no-plot` cells.

On a terminal one line is redrawn in place at each refresh: fitted to the terminal's width
(asked at every refresh, so it follows a resize; the least useful fields are dropped first) and
cleared to the end of the row, so a shorter line leaves nothing behind. Messages (start,
alarms, the summary and notes) are wrapped at word boundaries to the width. In a notebook
(`--no-plot`, which honours carriage returns) the line is redrawn whole; in a log file a plain
full line is written every `log_every` seconds, never a carriage return.

Why not tqdm or rich (`benchmarks/progress_cost.py` measures them): a refresh costs tens of
microseconds here and with tqdm, about a millisecond with rich, all small beside 0.5 s; what
decides is what they draw. tqdm cuts a line wider than the terminal mid-field ("epoch 13, l")
and writes carriage-return frames into log files (or nothing, with disable=None); rich elides
mid-word ("fp16/c…") and sizes itself from stdout's terminal, not the stream it writes to.
Either would need this module's field dropping and log-file lines on top, for a dependency.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import textwrap
import time
from typing import TYPE_CHECKING

from ..training.run import RATE_WINDOW
from ..training.view import View
from ..formatting import format_bytes, format_duration, format_value

if TYPE_CHECKING:
    from typing import TextIO

    from ..training.run import Run

_CLEAR_TO_END = "\x1b[K"  # erase from the cursor to the end of the row (ECMA-48 EL)
_KEEP = math.inf  # the step count is never dropped


def progress_fields(run: Run, skipped: int | None = None) -> list[tuple[float, str, str]]:
    """The progress line's fields in display order as (rank, separator, text): when the line
    is too wide, the lowest rank goes first. `skipped` saves recounting the history."""
    h = run.history
    fields = [(10, "", run.name), (2, " ", f"{run.precision}/{run.device}")]
    total = f"/{run.total_steps}" if run.total_steps else ""
    fields.append((_KEEP, " | ", f"step {len(h)}{total}"))
    fields.append((1, " | ", f"epoch {run.epoch + 1}"))
    if run.paused_for:
        fields.append((9, " | ", f"paused for {run.paused_for}"))
    if run.compiling:
        fields.append((9, " | ", "compiling (torch.compile)..."))
    if h:
        fields.append((8, " | ", f"loss {h[-1]['loss']:.4g}"))
        if h[-1]["scale"] is not None:
            fields.append((4, " | ", f"scale 2^{_log2(h[-1]['scale'])}"))
        if skipped is None:
            skipped = sum(r["skipped"] for r in h)
        if skipped:
            fields.append((6, " | ", f"{skipped} skipped"))
    if run.val_history:
        fields.append((5, " | ", f"val {run.val_history[-1]['val_loss']:.4g}"))
    _, rate = run.rates(last=RATE_WINDOW)  # less the time spent compiling
    if rate:
        fields.append((3, " | ", f"{rate:.3g} steps/s"))
        if run.total_steps and run.status == "running":
            fields.append((7, " | ", f"ETA {format_duration((run.total_steps - len(h)) / rate)}"))
    return fields


def progress_line(run: Run, width: int | None = None, skipped: int | None = None) -> str:
    """One line of progress; with `width`, at most that many characters: the least useful
    fields (epoch, precision/device, steps/s, scale, val, skipped, ETA, loss) dropped first."""
    fields = progress_fields(run, skipped)
    line = _join(fields)
    while width is not None and len(line) > width and len(fields) > 1:
        fields.remove(min(fields, key=lambda f: f[0]))
        line = _join(fields)
    if width is not None and len(line) > width:
        line = line[:max(width - 1, 0)] + "~" if width > 0 else ""
    return line


def _join(fields) -> str:
    text = "".join(sep + part for _, sep, part in fields)
    return text[3:] if text.startswith(" | ") else text.lstrip()


def end_lines(run: Run) -> list[str]:
    s = run.summary
    lines = [f"{run.name} {run.status}: {s['steps']} steps ({s['skipped_steps']} skipped) in "
             f"{format_duration(s['wall_time'])}, final loss {format_value(s['final_loss'])}, "
             f"best {format_value(s['best_loss'])}, peak memory {format_bytes(s['peak_memory'])}"
             + (f", compiled in {format_duration(s['compile_seconds'])}" if run.compiles else "")]
    lines += [f"note: {n}" for n in run.notes]
    if run.error:
        lines.append(f"error: {run.error}")
    return lines


class ConsoleReporter(View):
    """The run as text: a progress line, alarms as they come, and a summary at the end.

    Writes only at refreshes and at the start and end of a run, never per step.
    """

    def __init__(self, stream: TextIO | None = None, inline: bool | None = None,
                 log_every: float = 10.0):
        self.stream = stream or sys.stderr
        self.tty = _isatty(self.stream)
        self.inline = inline if inline is not None else self.tty
        self.log_every = log_every
        self._last_line = 0.0
        self._alarms_shown = 0
        self._drawn = 0  # characters of the progress line now on screen (0: none)
        self._counted: tuple[int, int] = (0, 0)  # (history id, steps counted) for skipped
        self._skipped = 0

    def on_start(self, run: Run) -> None:
        self._alarms_shown = 0  # one reporter may follow several runs (a sweep)
        self._write_line(f"{run.name}: training on {run.device} in {run.precision} "
                         f"({run.precision_reason})")
        if self.inline and run.compiling:  # the first step may take a while
            self._draw(progress_line(run, self.columns()))

    def on_refresh(self, run: Run) -> None:
        self._show_new_alarms(run)
        if self.inline:
            self._draw(progress_line(run, self.columns(), self._count_skipped(run)))
        elif time.monotonic() - self._last_line >= self.log_every:
            self._write_line(progress_line(run, skipped=self._count_skipped(run)))

    def on_end(self, run: Run) -> None:
        self._show_new_alarms(run)
        for line in end_lines(run):
            self._write_line(line)

    def columns(self) -> int | None:
        """Characters a line may take on this terminal now (one less than its width, so
        that no terminal wraps); None when the stream is not a terminal."""
        if not self.tty:
            return None
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, ValueError, OSError):
            width = 0
        if width <= 0:  # not answered (or a pty nobody sized): $COLUMNS, else 80
            width = shutil.get_terminal_size().columns
        return max(width - 1, 1)

    def _count_skipped(self, run) -> int:
        """Skipped steps, counted incrementally: a refresh costs the same at step 100,000."""
        h = run.history
        key, counted = self._counted
        if key != id(h) or counted > len(h):  # a new run, or a replaced history
            counted, self._skipped = 0, 0
        self._skipped += sum(r["skipped"] for r in h[counted:])
        self._counted = (id(h), len(h))
        return self._skipped

    def _show_new_alarms(self, run):
        for alarm in run.alarms[self._alarms_shown:]:
            self._write_line(f"ALARM: {alarm}", hang=" " * 7)
        self._alarms_shown = len(run.alarms)

    def _draw(self, line):
        if self.tty:
            text = "\r" + line + _CLEAR_TO_END
        else:  # a notebook replaces the row at "\r"; elsewhere blanks cover a longer line
            text = "\r" + line + " " * (self._drawn - len(line))
        self.stream.write(text)
        self.stream.flush()
        self._drawn = len(line)

    def _write_line(self, text, hang=None):
        self._last_line = time.monotonic()
        if hang is None:
            hang = " " * 6 if text.startswith(("note: ", "error:")) else "  "
        if self.tty:
            width = self.columns()
            lines = textwrap.wrap(text, width, subsequent_indent=hang if len(hang) < width else "",
                                  break_on_hyphens=False) or [""]
            text = "\r" + _CLEAR_TO_END + "\n".join(lines)
        elif self.inline:
            text = "\r" + text + " " * (self._drawn - len(text))
        self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = 0


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _log2(x) -> str:
    return f"{math.log2(x):.0f}" if x and x > 0 and math.isfinite(x) else str(x)
