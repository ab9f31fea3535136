"""The ranks' records merged into one history: step by step in the notebook process, and in
each rank for its checkpoints and its end (under torchrun there is no notebook process)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist


class RecordMerger:
    """Ranks' records, step by step: once every rank has sent step s, one record with the loss
    averaged over ranks and the samples summed (the rest as rank 0 saw it)."""

    def __init__(self, world: int, log_names: Sequence[str], start: int = 0):
        self.world, self.log_names = world, tuple(log_names)
        self.pending: dict[int, dict[int, dict]] = {}
        self.val_pending: dict[int, dict[int, dict]] = {}
        self.start = start  # the first step the ranks train (a resumed run's are merged)
        self.done_step = start
        self.memory: dict[str, int | None] = {}
        self.ready: list[dict] = []

    def add(self, rank: int, records: list[dict], val_records: list[dict],
            memory: dict) -> list[dict]:
        """Take a rank's new records; return the validation records now complete."""
        for record in records:
            self.pending.setdefault(record["step"], {})[rank] = record
        for record in val_records:
            self.val_pending.setdefault(record["epoch"], {})[rank] = record
        for key, value in memory.items():
            if key not in ("time", "step"):
                self.memory[f"{key} rank{rank}"] = value
        while len(self.pending.get(self.done_step, ())) == self.world:
            self.ready.append(self._merged(self.pending.pop(self.done_step)))
            self.done_step += 1
        complete = []
        for epoch in sorted(e for e, v in self.val_pending.items() if len(v) == self.world):
            by_rank = self.val_pending.pop(epoch)
            merged = dict(by_rank[0])
            merged["val_loss"] = sum(r["val_loss"] for r in by_rank.values()) / self.world
            complete.append(merged)
        return complete

    def settle(self, steps: int) -> list[int]:
        """At the end, when the weights kept are those after `steps` steps: merge the steps
        before it that only some ranks reported (the others ended first) from those ranks;
        what ranks reported beyond it is not in those weights and is dropped. Returns the
        steps merged from fewer than every rank."""
        partial = []
        while self.done_step < steps and self.pending.get(self.done_step):
            self.ready.append(self._merged(self.pending.pop(self.done_step)))
            partial.append(self.done_step)
            self.done_step += 1
        self.pending.clear()
        return partial

    def discard(self) -> int:
        """At the end, when no rank's weights are kept: drop every record not yet drained.
        Returns how many steps some rank had reported training."""
        steps = max([self.done_step, *(step + 1 for step in self.pending)]) - self.start
        self.pending.clear()
        self.val_pending.clear()
        self.ready.clear()
        return steps

    def _merged(self, by_rank: dict[int, dict]) -> dict:
        merged = dict(by_rank[min(by_rank)])
        merged["loss"] = sum(r["loss"] for r in by_rank.values()) / len(by_rank)
        merged["samples"] = sum(r["samples"] for r in by_rank.values())
        for name in self.log_names:
            values = [r.get(name) for r in by_rank.values()]
            if all(v is not None for v in values):
                merged[name] = sum(values) / len(values)
        return merged

    def drain(self) -> list[dict]:
        ready, self.ready = self.ready, []
        return ready

    def sample_memory(self) -> dict:
        """Each rank's memory ("rss rank1"), plus the usual keys as the highest of any rank:
        every rank is one process (on a GPU of its own), and "rss" and "peak" read per process
        everywhere. "rss all ranks" is the sum, named as one."""
        sample = dict(self.memory)
        for key in ("allocated", "reserved", "peak", "device_used", "rss"):
            values = [v for k, v in self.memory.items()
                      if k.rpartition(" rank")[0] == key and v is not None]
            if values:
                sample[key] = max(values)
                if key == "rss":
                    sample["rss all ranks"] = sum(values)
        return sample


class MergedHistory:
    """`merge(history, val_history)` for a rank's Training, a collective that every rank calls
    at the same step (at each checkpoint and at the end): the records it added since the last
    call are gathered from every rank over `group` and merged as the notebook process merges
    them. The records it starts with (a resumed checkpoint's, `start` steps) are merged
    already."""

    def __init__(self, world: int, log_names: Sequence[str], group: Any, start: int,
                 history: list, val_history: list):
        self.world, self.group = world, group
        self.merger = RecordMerger(world, log_names, start)
        self.history, self.val_history = list(history), list(val_history)  # merged so far
        self.taken = (len(history), len(val_history))  # this rank's records merged so far
        self.arrive: Callable[[], None] | None = None  # marks each merge (see arrivals)

    def __call__(self, history: list, val_history: list) -> tuple[list, list]:
        taken, val_taken = self.taken
        self.taken = (len(history), len(val_history))
        gathered: list = [None] * self.world
        if self.arrive is not None:
            self.arrive()
        dist.all_gather_object(gathered, (history[taken:], val_history[val_taken:]),
                               group=self.group)
        for rank, (records, val_records) in enumerate(gathered):
            self.val_history += self.merger.add(rank, records, val_records, {})
        self.history += self.merger.drain()
        return list(self.history), list(self.val_history)

    def mean(self, value: float) -> float:
        """`value` averaged over the ranks, which all call this at the same point: a metric
        every rank must act on alike (ReduceLROnPlateau's), as the merged history shows it."""
        if self.arrive is not None:
            self.arrive()
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total, group=self.group)
        return total.item() / self.world
