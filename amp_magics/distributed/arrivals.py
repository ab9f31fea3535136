"""Which rank keeps the others waiting: each forked rank marks, in memory shared with the
notebook process, each time it reaches a gradient exchange (the backward where DDP's
all-reduce waits for every rank). When the marks differ and stay unchanged for the
collective timeout, the ranks that marked fewer are the ones that did not arrive.

A mark is two stores into shared memory: no lock, no message, no collective.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass


@dataclass(frozen=True)
class Stall:
    """Ranks `late` did not reach step `step`'s gradient exchange, where `waiting` were."""

    late: tuple[int, ...]
    waiting: tuple[int, ...]
    step: int


class ArrivalBoard:
    def __init__(self, world: int, context: multiprocessing.context.BaseContext):
        self.counts = context.RawArray("q", world)  # gradient exchanges reached, per rank
        self.steps = context.RawArray("q", world)  # the step of each rank's latest one
        self.seen: tuple[int, ...] = ()
        self.since = 0.0

    def marker(self, rank: int):
        """The rank's `arrive(step)`, called before each backward."""
        counts, steps = self.counts, self.steps

        def arrive(step: int) -> None:
            steps[rank] = step
            counts[rank] += 1  # one writer per slot
        return arrive

    def stall(self, now: float, timeout: float) -> Stall | None:
        """A stall once the ranks' marks have differed, unchanged, for `timeout` seconds."""
        seen = tuple(self.counts)
        if seen != self.seen:
            self.seen, self.since = seen, now
            return None
        if len(set(seen)) == 1 or now - self.since < timeout:
            return None
        ahead = max(seen)
        waiting = tuple(r for r, c in enumerate(seen) if c == ahead)
        return Stall(tuple(r for r, c in enumerate(seen) if c < ahead), waiting,
                     self.steps[waiting[0]])
