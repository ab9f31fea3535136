"""Each rank's part of the data (the README's --nproc section says which part)."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..errors import AmpUsageError
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
    """Batches r, r+N, r+2N, ... of any iterable (or a sampler's indices, a batch sampler's
    batches), whole rounds of N only, so every rank takes the same number of steps (a rank
    with one batch more would wait forever for the others). `agreed`: each epoch's first
    round is compared across ranks (one collective), since a sampler that draws from torch's
    global RNG agrees only while the ranks draw alike."""

    def __init__(self, data: Iterable, rank: int, world: int, agreed: bool = False):
        self.data, self.rank, self.world, self.agreed = data, rank, world, agreed
        self.notes: list[str] | None = None  # the Run's, told once what was left out
        self.arrive: Callable[[], None] | None = None  # marks the check (see arrivals)

    def __len__(self) -> int:
        return len(self.data) // self.world  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        it = iter(self.data)
        first = True
        while True:
            chunk = list(itertools.islice(it, self.world))
            if first and self.agreed:
                if self.arrive is not None:
                    self.arrive()
                _check_same_round(chunk, self.world)
                first = False
            if len(chunk) < self.world:
                if chunk and self.notes is not None:
                    self.notes.append(
                        f"the last {len(chunk)} batch(es) of the epoch went to no rank: "
                        f"{self.world} ranks take whole rounds of {self.world} batches, so that "
                        "each takes the same number of steps")
                    self.notes = None
                return
            yield chunk[self.rank]


def _check_same_round(chunk: list, world: int) -> None:
    rounds: list = [None] * world
    dist.all_gather_object(rounds, repr(chunk))
    if len(set(rounds)) > 1:
        raise AmpUsageError(
            "the ranks drew different batches from the DataLoader's sampler (it draws from "
            "torch's global random numbers, which the ranks no longer share): give the sampler "
            "its own generator, e.g. generator=torch.Generator().manual_seed(0)")


class EvenStream:
    """A stream that shards itself (an IterableDataset's DataLoader), read in step with the
    other ranks: a batch is trained only when every rank has one, so every rank stops with
    the shortest (a rank with a batch more would wait forever at its gradient exchange).
    Costs one all-reduce of N integers per batch, on the CPU. `notes`, when set (the Run's),
    gets a line for each epoch in which some ranks had batches left."""

    def __init__(self, loader: torch.utils.data.DataLoader, ctx: RankContext):
        self.loader, self.rank, self.world = loader, ctx.rank, ctx.world_size
        self.group = ctx.cpu_group()
        self.notes: list[str] | None = None
        self.arrive: Callable[[], None] | None = None  # marks each check (see arrivals)
        self.epoch = 0

    def __len__(self) -> int:
        raise TypeError("a stream's length per rank is known only as it is read")

    def __iter__(self) -> Iterator:
        have = torch.zeros(self.world, dtype=torch.int64)
        batches, it = 0, iter(self.loader)
        try:
            while True:
                batch = next(it, _END)
                have.zero_()
                have[self.rank] = batch is not _END
                if self.arrive is not None:
                    self.arrive()
                dist.all_reduce(have, group=self.group)
                if not bool(have.all()):
                    self._note_uneven(have.tolist(), batches)
                    return
                batches += 1
                yield batch
        finally:
            self.epoch += 1

    def _note_uneven(self, have: list[int], batches: int) -> None:
        left = [r for r, h in enumerate(have) if h]
        if not left or self.notes is None:
            return
        ended = " and ".join(f"rank {r}" for r, h in enumerate(have) if not h)
        self.notes.append(
            f"epoch {self.epoch}: the stream of {ended} ended after {batches} batches while "
            f"{' and '.join(f'rank {r}' for r in left)} still had some (1 or more each): "
            "every rank stopped there, since each gradient exchange needs every rank, so "
            "those were not trained. Shard the stream evenly to train on all of it.")


_END = object()


def shard(data: Iterable, ctx: RankContext, start_epoch: int = 0,
          training: bool = True) -> Iterable:
    """This rank's part of `data`. A stream as it is (it shards itself; read in step with
    the other ranks when `training`). A DataLoader with the default samplers over a
    DistributedSampler (as the DDP recipe writes it), one over the user's own
    DistributedSampler as it is; any other sampler or batch sampler is kept and its batches
    dealt round-robin. Any other iterable strided."""
    loader = torch.utils.data
    if not isinstance(data, loader.DataLoader):
        return Strided(data, ctx.rank, ctx.world_size)
    if isinstance(data.dataset, loader.IterableDataset):
        return EvenStream(data, ctx) if training else data
    if isinstance(data.sampler, loader.distributed.DistributedSampler):
        return EpochSampled(data, data.sampler, start_epoch)  # sharded by the user already
    default = (type(data.sampler) in (loader.RandomSampler, loader.SequentialSampler)
               and type(data.batch_sampler) is loader.BatchSampler)
    if default:
        sampler = loader.distributed.DistributedSampler(
            data.dataset, num_replicas=ctx.world_size, rank=ctx.rank,
            shuffle=isinstance(data.sampler, loader.RandomSampler), drop_last=data.drop_last)
        return EpochSampled(remade(data, sampler=sampler), sampler, start_epoch)
    if data.batch_sampler is not None:  # the user's sampling, its batches dealt out
        dealt = Strided(data.batch_sampler, ctx.rank, ctx.world_size, agreed=training)
        return remade(data, batch_sampler=dealt, batch_size=1, sampler=None, drop_last=False)
    return remade(data, sampler=Strided(data.sampler, ctx.rank, ctx.world_size,
                                        agreed=training))


def strided_part(data: Iterable) -> Strided | None:
    """The Strided that deals `data` out, if one does (itself, or its loader's sampler)."""
    for part in (data, getattr(data, "batch_sampler", None), getattr(data, "sampler", None)):
        if isinstance(part, Strided):
            return part
    return None


def same_stream_on_every_rank(data: EvenStream, ctx: RankContext) -> bool:
    """Do all ranks read the same first batch of this stream?"""
    try:
        first = next(iter(data.loader))
    except StopIteration:
        first = None
    tensors = list(tensors_in(first))
    mark = float(sum(t.double().sum().item() for t in tensors)) if tensors else 0.0
    marks: list = [None] * ctx.world_size
    dist.all_gather_object(marks, mark)
    return len(set(marks)) == 1
