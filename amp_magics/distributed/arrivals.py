"""Which rank keeps the others waiting. Each rank marks where it is each time it reaches a
point where DDP makes it wait for the others: a call of the model through DDP (its forward
broadcasts BatchNorm's buffers from rank 0, rebuilds its buckets once) and each backward (the
gradient all-reduce). A mark is the rank's place: its step, the micro-batch within the step's
accumulation window, and which of the two, as one number that only grows. The ranks whose
place is behind the others' did not reach where those got to (how many marks a rank made
says nothing: it may call the model more often than another).

- `ArrivalBoard` (--nproc): the marks go to memory shared with the notebook process, which
  names the ranks behind once no mark has changed for the collective timeout. A mark is two
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

PLACES = ("forward", "gradient exchange")
_MICRO = 1 << 16  # micro-batches a window may hold, in a place's numbering


def _place(step: int, micro: int, where: int) -> int:
    """Where a rank is, as a number that grows as it trains (0: no mark yet)."""
    return ((step * _MICRO + micro) * 2 + where) + 1


@dataclass(frozen=True)
class Stall:
    """Ranks `late` did not reach step `step`'s `where` (a PLACES name; micro-batch `micro`
    of its accumulation window), where `waiting` had got to."""

    late: tuple[int, ...]
    waiting: tuple[int, ...]
    step: int
    micro: int
    where: str

    def words(self, timeout: float) -> str:
        late = " and ".join(f"rank {r}" for r in self.late)
        waiting = " and ".join(f"rank {r}" for r in self.waiting)
        micro = f" (micro-batch {self.micro})" if self.micro else ""
        return (f"{late} did not reach step {self.step}'s {self.where}{micro} within --timeout "
                f"{timeout:g} s ({waiting} had got there and waited)")


def _stall_of(places: Sequence[int]) -> Stall | None:
    """The ranks behind the furthest place, if any."""
    ahead = max(places)
    late = tuple(r for r, p in enumerate(places) if p < ahead)
    if not late:
        return None
    rest, where = divmod(ahead - 1, 2)
    step, micro = divmod(rest, _MICRO)
    return Stall(late, tuple(r for r, p in enumerate(places) if p == ahead), step, micro,
                 PLACES[where])


def _marks(training: Any, mark: Callable[[int], None]
           ) -> tuple[Callable[[], None], Callable[[int], None]]:
    """`forward()` as a call of the model through DDP begins, `exchange(step)` before each
    backward, each handing `mark` the place."""
    amp = training.amp

    def forward() -> None:
        # training's calls only: validation's (no_grad) may differ in number per rank
        if torch.is_grad_enabled():
            mark(_place(training.step, amp.micro, 0))

    def exchange(step: int) -> None:
        mark(_place(step, amp.micro, 1))
    return forward, exchange


class ArrivalBoard:
    def __init__(self, world: int, context: multiprocessing.context.BaseContext):
        self.counts = context.RawArray("q", world)  # marks made, per rank: did anything move
        self.places = context.RawArray("q", world)  # each rank's latest place
        self.seen: tuple[int, ...] = ()
        self.since = 0.0

    def marker(self, rank: int, training: Any) -> tuple[Callable[[], None],
                                                        Callable[[int], None]]:
        """The rank's `forward()` and `exchange(step)` marks."""
        counts, places = self.counts, self.places

        def mark(place: int) -> None:
            places[rank] = place
            counts[rank] += 1  # one writer per slot
        return _marks(training, mark)

    def stall(self, now: float, timeout: float) -> Stall | None:
        """A stall once no rank has marked anything for `timeout` seconds while the ranks
        stand at different places: those behind did not reach where the others got to."""
        seen = tuple(self.counts)
        if seen != self.seen:
            self.seen, self.since = seen, now
            return None
        return None if now - self.since < timeout else _stall_of(tuple(self.places))


class StoreArrivals:
    """One torchrun rank's marks, and after it gave up waiting, the ranks it waited for."""

    def __init__(self, store: Any, rank: int, world: int, timeout: float):
        self.store, self.rank, self.world, self.timeout = store, rank, world, timeout
        self.place, self.since = 0, time.monotonic()
        # The ranks that waited give up within about a timeout of each other (each one's
        # clock starts as it enters the collective); the late rank never posts.
        self.grace = min(timeout, 30.0)

    def marker(self, training: Any) -> tuple[Callable[[], None], Callable[[int], None]]:
        def mark(place: int) -> None:
            self.place, self.since = place, time.monotonic()
        return _marks(training, mark)

    def stall(self) -> Stall | None:
        """After this rank waited --timeout since its last mark: the ranks behind it."""
        if time.monotonic() - self.since < self.timeout:
            return None
        keys = [f"waited/{r}" for r in range(self.world)]
        try:
            self.store.set(keys[self.rank], str(self.place))
            deadline = time.monotonic() + self.grace
            while not self.store.check(keys) and time.monotonic() < deadline:
                time.sleep(0.05)
            places = [int(self.store.get(k)) if self.store.check([k]) else 0 for k in keys]
        except Exception:  # noqa: BLE001 - the store is gone too: nothing to name
            return None
        return _stall_of(places)
