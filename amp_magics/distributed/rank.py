"""One rank: where it trains, and the options it trains with (its device, DDP, its shard)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from .._torch_compat import plain_module
from ..training.checkpoint import read_checkpoint
from ..training.options import TrainOptions
from ..training.routing import before_each_call, route_through
from .arrivals import Marks
from .merge import MergedHistory
from .sharding import EvenStream, Strided, shard, strided_part

STARTUP_TIMEOUT = 120.0  # seconds for every rank to join the process group


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @classmethod
    def on(cls, rank: int, world_size: int, local_rank: int, cuda: bool) -> RankContext:
        """One GPU per rank with NCCL, or the CPU with gloo."""
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        return cls(rank, world_size, local_rank, device, "nccl" if cuda else "gloo")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def cpu_group(self) -> Any:
        """A process group for small CPU tensors (every rank must ask at the same point):
        the default one with gloo; with NCCL, which reduces only GPU tensors, a gloo group of
        its own, so these checks stay off the GPU. None means the default group."""
        return dist.new_group(backend="gloo") if self.backend != "gloo" else None


def setup_rank(options: TrainOptions, ctx: RankContext) -> tuple[TrainOptions, Callable[[], None]]:
    """The options this rank trains with: the model on its device and called through DDP, the
    optimizers' state on that device, its shard of the data.
    Returns them and the function that undoes the routing and frees DDP (call it before the
    process group is destroyed). A model that is already DDP (a torchrun script's own) is
    used as it is."""
    if isinstance(options.model, DDP):
        release = _nothing_to_undo
    else:
        release = _route_through_ddp(options, ctx)
    # a shuffled shard resumes with the checkpoint's epoch order (only the epoch is read here:
    # the weights stay on disk until the engine loads them)
    start_epoch = (read_checkpoint(options.resume, mmap=True)["epoch"]
                   if options.resume is not None else 0)
    # A rank never stops on a Ctrl-C of its own (a terminal sends one to every process): the
    # ranks stop at a step they agree on, or one would wait forever for the others' gradients
    return dataclasses.replace(
        options, data=shard(options.data, ctx, start_epoch), nproc=1, handle_sigint=False,
        val=shard(options.val, ctx, training=False) if options.val is not None else None
    ), release


def attach_rank(training: Any, rank_options: TrainOptions, ctx: RankContext) -> None:
    """Make a prepared Training one rank of several: what its data has to say (batches left
    out) goes into the run's notes, its history ends merged over every rank, and so is the
    history of each checkpoint, which every rank reaches and rank 0 writes."""
    telling = _dealer(rank_options.data)
    if telling is not None:
        telling.notes = training.run.notes
    run = training.run  # a resumed run starts with the checkpoint's merged history
    training.merge_ranks = MergedHistory(ctx.world_size, rank_options.log, ctx.cpu_group(),
                                         training.step, run.history, run.val_history)
    training.writes_checkpoints = ctx.rank == 0


def mark_arrivals(training: Any, rank_options: TrainOptions, marks: Marks,
                  through_ddp: bool) -> None:
    """Hand a rank's `marks` to each point where it waits for the others (after
    attach_rank): its backwards, its data's checks, its history merges and, `through_ddp`,
    its calls of the model."""
    training.amp.arrive = marks.exchange
    if through_ddp:
        before_each_call(rank_options.model, marks.forward)
    dealer = _dealer(rank_options.data)
    if dealer is not None:
        dealer.arrive = marks.batch
    training.merge_ranks.arrive = marks.merge


def _dealer(data: Any) -> EvenStream | Strided | None:
    """What deals this rank its batches and has something to say or check, if anything."""
    return data if isinstance(data, EvenStream) else strided_part(data)


def _route_through_ddp(options: TrainOptions, ctx: RankContext) -> Callable[[], None]:
    model = plain_module(options.model)
    if ctx.cuda:
        torch.cuda.set_device(ctx.device)
    model.to(ctx.device)  # parameters keep their identity: the optimizers still hold them
    for opt in options.optimizers:
        opt.load_state_dict(opt.state_dict())  # casts the state onto the parameters' device
    ddp = DDP(model, device_ids=[ctx.local_rank] if ctx.cuda else None,
              find_unused_parameters=options.find_unused_parameters,
              static_graph=options.static_graph)
    return route_through(model, ddp)


def _nothing_to_undo() -> None:
    """The script built its DDP and destroys it."""
