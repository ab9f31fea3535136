"""Each rank's part of the data (the README's --nproc section says which part)."""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..loaders import remade
from ..tensors import tensors_in

if TYPE_CHECKING:
    from .rank import RankContext


class EpochSampled:
    """A DataLoader re-made over a DistributedSampler; each pass is the next epoch
    (set_epoch, so a shuffled order differs per epoch and agrees across ranks)."""

    def __init__(self, loader: torch.utils.data.DataLoader,
                 sampler: torch.utils.data.distributed.DistributedSampler, epoch: int = 0):
        self.loader, self.sampler, self.epoch = loader, sampler, epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)


class Strided:
    """Batches r, r+N, r+2N, ... of any iterable, whole rounds of N only, so every rank takes
    the same number of steps (a rank with one batch more would wait forever for the others)."""

    def __init__(self, data: Iterable, rank: int, world: int):
        self.data, self.rank, self.world = data, rank, world

    def __len__(self) -> int:
        return len(self.data) // self.world  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        it = iter(self.data)
        while True:
            chunk = list(itertools.islice(it, self.world))
            if len(chunk) < self.world:
                return
            yield chunk[self.rank]


def shard(data: Iterable, ctx: RankContext, start_epoch: int = 0) -> Iterable:
    """This rank's part of `data`: a map-style DataLoader over a DistributedSampler, a stream
    as it is (it shards itself), any other iterable strided."""
    loader = torch.utils.data.DataLoader
    if isinstance(data, loader) and isinstance(data.dataset, torch.utils.data.IterableDataset):
        return data  # a stream shards itself by rank (checked by `same_stream_on_every_rank`)
    if isinstance(data, loader) and data.batch_size is not None:
        shuffle = isinstance(data.sampler, torch.utils.data.RandomSampler)
        sampler = torch.utils.data.distributed.DistributedSampler(
            data.dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
            drop_last=data.drop_last)
        return EpochSampled(remade(data, sampler=sampler), sampler, start_epoch)
    return Strided(data, ctx.rank, ctx.world_size)


def same_stream_on_every_rank(data: Iterable, ctx: RankContext) -> bool:
    """For a DataLoader over an IterableDataset: do all ranks read the same first batch?"""
    try:
        first = next(iter(data))
    except StopIteration:
        first = None
    tensors = list(tensors_in(first))
    mark = float(sum(t.double().sum().item() for t in tensors)) if tensors else 0.0
    marks: list = [None] * ctx.world_size
    dist.all_gather_object(marks, mark)
    return len(set(marks)) == 1
