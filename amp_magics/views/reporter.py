"""A plain-text progress line for terminals, nohup logs and `--no-plot` cells.

On a terminal (or in a notebook, which honours carriage returns) one line is redrawn in
place at each refresh; in a log file a new line is written every `log_every` seconds.
"""
from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING

from ..training.view import View
from .format import format_bytes, format_duration, format_value

if TYPE_CHECKING:
    from typing import TextIO

    from ..training.run import Run


def progress_line(run: Run) -> str:
    h = run.history
    parts = [f"{run.name} {run.precision}/{run.device}"]
    total = f"/{run.total_steps}" if run.total_steps else ""
    parts.append(f"step {len(h)}{total}")
    parts.append(f"epoch {run.epoch + 1}")
    if run.paused_for:
        parts.append(f"paused for {run.paused_for}")
    if h:
        parts.append(f"loss {h[-1]['loss']:.4g}")
        if h[-1]["scale"] is not None:
            parts.append(f"scale 2^{_log2(h[-1]['scale'])}")
        skipped = sum(r["skipped"] for r in h)
        if skipped:
            parts.append(f"{skipped} skipped")
    if run.val_history:
        parts.append(f"val {run.val_history[-1]['val_loss']:.4g}")
    if run.wall_time > 0 and h:
        rate = len(h) / run.wall_time
        parts.append(f"{rate:.3g} steps/s")
        if run.total_steps and run.status == "running":
            parts.append(f"ETA {format_duration((run.total_steps - len(h)) / rate)}")
    return " | ".join(parts)


def end_lines(run: Run) -> list[str]:
    s = run.summary
    lines = [f"{run.name} {run.status}: {s['steps']} steps ({s['skipped_steps']} skipped) in "
             f"{format_duration(s['wall_time'])}, final loss {format_value(s['final_loss'])}, "
             f"best {format_value(s['best_loss'])}, peak memory {format_bytes(s['peak_memory'])}"]
    lines += [f"note: {n}" for n in run.notes]
    if run.error:
        lines.append(f"error: {run.error}")
    return lines


class ConsoleReporter(View):
    """The run as text: a progress line, alarms as they come, and a summary at the end."""

    def __init__(self, stream: TextIO | None = None, inline: bool | None = None,
                 log_every: float = 10.0):
        self.stream = stream or sys.stderr
        self.inline = inline if inline is not None else _isatty(self.stream)
        self.log_every = log_every
        self._last_line = 0.0
        self._alarms_shown = 0

    def on_start(self, run: Run) -> None:
        self._alarms_shown = 0  # one reporter may follow several runs (a sweep)
        self._write_line(f"{run.name}: training on {run.device} in {run.precision} "
                         f"({run.precision_reason})")

    def on_refresh(self, run: Run) -> None:
        self._show_new_alarms(run)
        if self.inline:
            self.stream.write("\r" + progress_line(run))
            self.stream.flush()
        elif time.monotonic() - self._last_line >= self.log_every:
            self._write_line(progress_line(run))

    def on_end(self, run: Run) -> None:
        self._show_new_alarms(run)
        for line in end_lines(run):
            self._write_line(line)

    def _show_new_alarms(self, run):
        for alarm in run.alarms[self._alarms_shown:]:
            self._write_line(f"ALARM: {alarm}")
        self._alarms_shown = len(run.alarms)

    def _write_line(self, text):
        self._last_line = time.monotonic()
        self.stream.write(("\r" if self.inline else "") + text + "\n")
        self.stream.flush()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _log2(x) -> str:
    return f"{math.log2(x):.0f}" if x and x > 0 and math.isfinite(x) else str(x)
