"""Which rank keeps the others waiting. Each rank marks where it is each time it reaches a
point where DDP makes it wait for the others: a call of the model through DDP (its forward
broadcasts BatchNorm's buffers from rank 0, rebuilds its buckets once) and each backward (the
gradient all-reduce). A mark is the rank's place, 2 * step + where, which only grows: the
ranks whose place is behind the others' are the ones that did not arrive where those wait
(how many marks a rank made says nothing: it may call the model more often than another).

- `ArrivalBoard` (--nproc): the marks go to memory shared with the notebook process, which
  names the ranks behind once no mark has changed for the collective timeout. A mark is two
  stores into shared memory: no lock, no message, no collective.
- `StoreArrivals` (torchrun: no notebook process): each rank keeps its mark in its own memory;
  when one of its collectives gives up after --timeout, it posts its place to torchrun's
  store, and the ranks whose place never comes, or comes behind, are the late ones.
"""
from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# what a rank's latest mark was, kept with its step as 2 * step + place (0: none yet)
_FORWARD, _EXCHANGE = 1, 2
PLACES = ("forward", "gradient exchange")


@dataclass(frozen=True)
class Stall:
    """Ranks `late` did not reach step `step`'s `where` (a PLACES name), where `waiting`
    were."""

    late: tuple[int, ...]
    waiting: tuple[int, ...]
    step: int
    where: str


class ArrivalBoard:
    def __init__(self, world: int, context: multiprocessing.context.BaseContext):
        self.counts = context.RawArray("q", world)  # marks made, per rank
        self.places = context.RawArray("q", world)  # each rank's latest: 2 * step + place
        self.seen: tuple[int, ...] = ()
        self.since = 0.0

    def marker(self, rank: int, training: Any) -> tuple[Callable[[], None],
                                                        Callable[[int], None]]:
        """The rank's marks: `forward()` as a call of the model through DDP begins (at the
        step `training.step`), `exchange(step)` before each backward."""
        counts, places = self.counts, self.places

        def forward() -> None:
            # training's calls only: validation's (no_grad) may differ in number per rank
            if torch.is_grad_enabled():
                places[rank] = 2 * training.step + _FORWARD
                counts[rank] += 1  # one writer per slot

        def exchange(step: int) -> None:
            places[rank] = 2 * step + _EXCHANGE
            counts[rank] += 1
        return forward, exchange

    def stall(self, now: float, timeout: float) -> Stall | None:
        """A stall once no rank has marked anything for `timeout` seconds while the ranks
        stand at different places: those behind did not arrive where the others wait. The
        counts only tell that nothing moved; the places say who is behind (a rank may call
        the model more often than another, e.g. to print a prediction)."""
        seen = tuple(self.counts)
        if seen != self.seen:
            self.seen, self.since = seen, now
            return None
        return None if now - self.since < timeout else _stall_of(tuple(self.places))


class StoreArrivals:
    """One torchrun rank's marks, and after an error the ranks it waited for."""

    GRACE = 2.0  # seconds the ranks that waited give each other to post: they gave up together

    def __init__(self, store: Any, rank: int, world: int, timeout: float):
        self.store, self.rank, self.world, self.timeout = store, rank, world, timeout
        self.place, self.since = 0, time.monotonic()

    def marker(self, training: Any) -> tuple[Callable[[], None], Callable[[int], None]]:
        """`forward()` and `exchange(step)`, as ArrivalBoard.marker's."""
        def forward() -> None:
            if torch.is_grad_enabled():
                self.place, self.since = 2 * training.step + _FORWARD, time.monotonic()

        def exchange(step: int) -> None:
            self.place, self.since = 2 * step + _EXCHANGE, time.monotonic()
        return forward, exchange

    def stall(self) -> Stall | None:
        """After an error: when this rank had waited --timeout since its last mark (so a
        collective gave up, rather than its own step failing), the ranks behind it."""
        if time.monotonic() - self.since < self.timeout:
            return None
        keys = [f"waited/{r}" for r in range(self.world)]
        try:
            self.store.set(keys[self.rank], str(self.place))
            deadline = time.monotonic() + self.GRACE
            while not self.store.check(keys) and time.monotonic() < deadline:
                time.sleep(0.05)
            places = [int(self.store.get(k)) if self.store.check([k]) else 0 for k in keys]
        except Exception:  # noqa: BLE001 - the store is gone too: nothing to name
            return None
        return _stall_of(places)


def _stall_of(places: Sequence[int]) -> Stall | None:
    """The ranks behind the furthest place, if any."""
    ahead = max(places)
    late = tuple(r for r, p in enumerate(places) if p < ahead)
    if not late:
        return None
    step, place = divmod(ahead - 1, 2)
    return Stall(late, tuple(r for r, p in enumerate(places) if p == ahead), step,
                 PLACES[place])
