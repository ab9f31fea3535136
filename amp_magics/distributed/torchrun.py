"""Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) there is no parent: each process trains
its rank directly, and only rank 0 reports and saves."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from ..errors import AmpUsageError
from ..tensors import StepFn
from ..training.engine import prepare
from ..training.options import TrainOptions
from ..training.run import Run
from ..training.view import View
from .rank import RankContext, setup_rank


def torchrun_command(script: str, world: int) -> str:
    return f"torchrun --standalone --nproc-per-node {world} {script}"


def torchrun_context() -> RankContext | None:
    """This process's rank when it was started by torchrun (WORLD_SIZE > 1), else None."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    return RankContext.on(rank, size, local, torch.cuda.is_available())


@contextlib.contextmanager
def joined_process_group(ctx: RankContext) -> Iterator[None]:
    """Join torchrun's process group, initialising it when the script has not."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(ctx.backend)
    try:
        yield
        if started:  # no rank closes its connections while another still uses them
            dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()


def train_under_torchrun(step_fn: StepFn, options: TrainOptions, views: Sequence[View],
                         ctx: RankContext) -> Run:
    """Each torchrun process trains its rank; rank 0 reports and saves."""
    __tracebackhide__ = True
    if options.compile:
        raise AmpUsageError("compile=True under torchrun is not supported yet: compile the "
                            "model in the script (torch.compile) and pass that")
    with joined_process_group(ctx):
        rank_options, release = setup_rank(options, ctx)
        try:
            training = prepare(step_fn, rank_options, list(views) if ctx.rank == 0 else [])
            training.execute()
        finally:
            release()
    return training.run
