"""What forked ranks tell the notebook process: typed messages over one queue.

A rank sends `Hello` once it knows how it trains, `Records` at each refresh and at its end,
`Output` for each line it prints, `Failure` with its traceback when it raises, and `Ended`
last. The notebook process hands each message to its handler for that type; a message of a
type it has no handler for is a `ProtocolError`, never silently dropped.
"""
from __future__ import annotations

import io
import queue as queue_module
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..training.run import Run
from ..training.view import View


class ProtocolError(RuntimeError):
    """A rank sent a message the notebook process does not know how to handle."""


@dataclass(frozen=True)
class Hello:
    rank: int
    precision: str
    precision_reason: str
    scaler_settings: dict | None
    total_steps: int | None
    steps_per_epoch: int | None


@dataclass(frozen=True)
class Records:
    rank: int
    history: list
    val_history: list
    notes: list
    alarms: list
    memory: dict
    epoch: int


@dataclass(frozen=True)
class Output:
    rank: int
    line: str


@dataclass(frozen=True)
class Failure:
    rank: int
    traceback: str  # as the notebook shows it: the cell's lines, our frames left out


@dataclass(frozen=True)
class Ended:
    rank: int
    status: str
    error: str | None


def receive(channel: Any, handlers: Mapping[type, Callable[[Any], None]]) -> None:
    """Hand every message waiting in `channel` to the handler for its type."""
    while True:
        try:
            message = channel.get_nowait()
        except (queue_module.Empty, EOFError, OSError, ValueError):
            return
        handler = handlers.get(type(message))
        if handler is None:
            raise ProtocolError(f"rank {getattr(message, 'rank', '?')} sent a "
                                f"{type(message).__name__} message, which has no handler")
        handler(message)


class RankRelay(View):
    """A rank's view: sends its new records, memory, notes and end to the notebook process."""

    def __init__(self, channel: Any, rank: int):
        self.channel, self.rank = channel, rank
        self.sent = [0, 0, 0, 0]  # history, val_history, notes, alarms

    def _send_new(self, run: Run) -> None:
        seen = self.sent
        self.sent = [len(run.history), len(run.val_history), len(run.notes), len(run.alarms)]
        self.channel.put(Records(self.rank, run.history[seen[0]:], run.val_history[seen[1]:],
                                 run.notes[seen[2]:], run.alarms[seen[3]:],
                                 run.memory[-1] if run.memory else {}, run.epoch))

    def on_start(self, run: Run) -> None:
        # a resumed run's history: the notebook process read it from the checkpoint
        self.sent[:2] = [len(run.history), len(run.val_history)]
        self.channel.put(Hello(self.rank, run.precision, run.precision_reason,
                               run.scaler_settings, run.total_steps, run.steps_per_epoch))

    def on_refresh(self, run: Run) -> None:
        self._send_new(run)

    def on_end(self, run: Run) -> None:
        self._send_new(run)
        self.channel.put(Ended(self.rank, run.status, run.error))


class ChannelWriter(io.TextIOBase):
    """A rank's stdout/stderr: lines go to the notebook, which prints them as `[rankN] ...`."""

    def __init__(self, channel: Any, rank: int):
        self.channel, self.rank, self.buffer_ = channel, rank, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buffer_ += text
        *lines, self.buffer_ = self.buffer_.split("\n")
        for line in lines:
            self.channel.put(Output(self.rank, line))
        return len(text)

    def flush(self) -> None:
        if self.buffer_:
            self.channel.put(Output(self.rank, self.buffer_))
            self.buffer_ = ""


def user_traceback(error: BaseException) -> str:
    """The traceback as the notebook shows it: our own frames (marked with
    __tracebackhide__) left out, the cell's lines as IPython cached them."""
    tb, kept = error.__traceback__, []
    for summary in traceback.extract_tb(error.__traceback__):
        if not tb.tb_frame.f_locals.get("__tracebackhide__"):
            kept.append(summary)
        tb = tb.tb_next
    text = "".join(traceback.format_list(kept))
    return f"Traceback (most recent call last):\n{text}" + "".join(
        traceback.format_exception_only(type(error), error))
