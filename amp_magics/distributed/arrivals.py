"""Which rank keeps the others waiting. Each rank marks where it is each time it reaches a
point where the others make it wait:

- the points every rank passes alike, one for one in the same order: each backward (the
  gradient all-reduce), each check that every rank has a batch of a stream (or the same
  first round of a sampler), each merge of the history (at a checkpoint, at the end);
- a call of the model through DDP (its forward broadcasts BatchNorm's buffers from rank 0,
  rebuilds its buckets once), which one rank may make more often than another.

A rank's place is how many of the first it has passed, and whether it has called the model
since, as one number that only grows. The ranks whose place is behind the others' did not
reach where those got to: a rank hung in its data, its validation or its step, whatever the
epoch. Each mark also keeps a label (step, micro-batch, which point) for the words.

- `ArrivalBoard` (--nproc): the marks go to memory shared with the notebook process, which
  names the ranks behind once no mark has changed for the collective timeout. A mark is three
  stores into shared memory: no lock, no message, no collective.
- `StoreArrivals` (torchrun: no notebook process): each rank keeps its mark in its own memory;
  when a collective gives up after --timeout, the ranks that waited post their place to
  torchrun's store, and the ranks whose place never comes, or comes behind, are named.
"""
from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

BATCH, FORWARD, EXCHANGE, MERGE = range(4)
PLACES = ("batch check", "forward", "gradient exchange", "history merge")
_MICRO = 1 << 16  # micro-batches a window may hold, in a label's numbering


def _label(step: int, micro: int, where: int) -> int:
    """A mark's step, micro-batch and point as one number (0: no mark yet)."""
    return (step * _MICRO + micro) * len(PLACES) + where + 1


@dataclass(frozen=True)
class Stall:
    """Ranks `late` did not reach where `waiting` had got to: step `step`'s `where` (a
    PLACES name; micro-batch `micro` of its accumulation window), or for a history merge,
    the merge after `step` steps."""

    late: tuple[int, ...]
    waiting: tuple[int, ...]
    step: int
    micro: int
    where: str

    def words(self, timeout: float) -> str:
        late = " and ".join(f"rank {r}" for r in self.late)
        waiting = " and ".join(f"rank {r}" for r in self.waiting)
        micro = f" (micro-batch {self.micro})" if self.micro else ""
        point = (f"the history merge after {self.step} steps" if self.where == PLACES[MERGE]
                 else f"step {self.step}'s {self.where}{micro}")
        return (f"{late} did not reach {point} within --timeout {timeout:g} s ({waiting} had "
                "got there and waited)")


def _stall_of(places: Sequence[int], labels: Sequence[int]) -> Stall | None:
    """The ranks behind the furthest place, if any, at the label of the first rank there."""
    ahead = max(places)
    late = tuple(r for r, p in enumerate(places) if p < ahead)
    if not late:
        return None
    waiting = tuple(r for r, p in enumerate(places) if p == ahead)
    rest, where = divmod(labels[waiting[0]] - 1, len(PLACES))
    step, micro = divmod(rest, _MICRO)
    return Stall(late, waiting, step, micro, PLACES[where])


class Marks:
    """One rank's marks, each handed to `mark(place, label)`: `forward()` as a call of the
    model through DDP begins, `exchange(step)` before each backward, `batch()` before the
    ranks check that each has the next batch, `merge()` before a history merge."""

    def __init__(self, training: Any, mark: Callable[[int, int], None]):
        self.training, self.mark = training, mark
        self.passed = 0  # points every rank passes alike

    def forward(self) -> None:
        # training's calls only: validation's (no_grad) may differ in number per rank; odd:
        # past the last point passed, not yet at the next
        if torch.is_grad_enabled():
            self.mark(self.passed * 2 + 1,
                      _label(self.training.step, self.training.amp.micro, FORWARD))

    def exchange(self, step: int) -> None:
        self._pass(_label(step, self.training.amp.micro, EXCHANGE))

    def batch(self) -> None:
        self._pass(_label(self.training.step, self.training.amp.micro, BATCH))

    def merge(self) -> None:
        self._pass(_label(self.training.step, 0, MERGE))

    def _pass(self, label: int) -> None:
        self.passed += 1
        self.mark(self.passed * 2, label)


class ArrivalBoard:
    def __init__(self, world: int, context: multiprocessing.context.BaseContext):
        self.counts = context.RawArray("q", world)  # marks made, per rank: did anything move
        self.places = context.RawArray("q", world)  # each rank's latest place
        self.labels = context.RawArray("q", world)  # and its label
        self.seen: tuple[int, ...] = ()
        self.since = 0.0

    def marker(self, rank: int, training: Any) -> Marks:
        counts, places, labels = self.counts, self.places, self.labels

        def mark(place: int, label: int) -> None:
            labels[rank] = label  # one writer per slot; the watch reads them after a pause
            places[rank] = place
            counts[rank] += 1
        return Marks(training, mark)

    def stall(self, now: float, timeout: float) -> Stall | None:
        """A stall once no rank has marked anything for `timeout` seconds while the ranks
        stand at different places: those behind did not reach where the others got to."""
        seen = tuple(self.counts)
        if seen != self.seen:
            self.seen, self.since = seen, now
            return None
        if now - self.since < timeout:
            return None
        return _stall_of(tuple(self.places), tuple(self.labels))


class StoreArrivals:
    """One torchrun rank's marks, and after it gave up waiting, the ranks it waited for."""

    def __init__(self, store: Any, rank: int, world: int, timeout: float):
        self.store, self.rank, self.world, self.timeout = store, rank, world, timeout
        self.place, self.label, self.since = 0, 0, time.monotonic()
        # The ranks that waited give up within about a timeout of each other (each one's
        # clock starts as it enters the collective); the late rank never posts.
        self.grace = min(timeout, 30.0)

    def marker(self, training: Any) -> Marks:
        def mark(place: int, label: int) -> None:
            self.place, self.label, self.since = place, label, time.monotonic()
        return Marks(training, mark)

    def stall(self) -> Stall | None:
        """After this rank waited --timeout since its last mark: the ranks behind it."""
        if time.monotonic() - self.since < self.timeout:
            return None
        keys = [f"waited/{r}" for r in range(self.world)]
        try:
            self.store.set(keys[self.rank], f"{self.place} {self.label}")
            deadline = time.monotonic() + self.grace
            while not self.store.check(keys) and time.monotonic() < deadline:
                time.sleep(0.05)
            posted = [self.store.get(k).split() if self.store.check([k]) else (0, 0)
                      for k in keys]
        except Exception:  # noqa: BLE001 - the store is gone too: nothing to name
            return None
        return _stall_of([int(p) for p, _ in posted], [int(label) for _, label in posted])
