"""Which rank keeps the others waiting: each forked rank marks, in memory shared with the
notebook process, each time it reaches a point where DDP makes it wait for the others: a call
of the model through DDP (its forward broadcasts BatchNorm's buffers from rank 0, rebuilds
its buckets once) and each backward (the gradient all-reduce). Every rank makes the same marks
in the same order, so when the counts differ and stay unchanged for the collective timeout,
the ranks that marked fewer are the ones that did not arrive.

A mark is two stores into shared memory: no lock, no message, no collective.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable
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
        places = tuple(self.places)
        if len(set(places)) == 1 or now - self.since < timeout:
            return None
        ahead = max(places)
        step, place = divmod(ahead - 1, 2)
        return Stall(tuple(r for r, p in enumerate(places) if p < ahead),
                     tuple(r for r, p in enumerate(places) if p == ahead), step, PLACES[place])
