"""Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) there is no parent: each process trains
its rank directly, and only rank 0 reports and saves."""
from __future__ import annotations

import contextlib
import datetime
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
from .rank import RankContext, attach_rank, setup_rank


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
def joined_process_group(ctx: RankContext, timeout: float) -> Iterator[None]:
    """Join torchrun's process group, initialising it when the script has not (its
    collectives then give up after `timeout` seconds)."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(ctx.backend, timeout=datetime.timedelta(seconds=timeout))
    try:
        yield
        if started:  # no rank closes its connections while another still uses them
            dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()


class RankTraining:
    """One torchrun process's rank, trained as `execute()` is called: it joins the process
    group, trains its shard through DDP and leaves the group; rank 0 reports (its `views`).
    `run` is the Run once training has been prepared (None if it failed before)."""

    def __init__(self, step_fn: StepFn, options: TrainOptions, views: Sequence[View],
                 ctx: RankContext):
        if options.compile:
            raise AmpUsageError("compile=True under torchrun is not supported yet: compile "
                                "the model in the script (torch.compile) and pass that")
        self.step_fn, self.options, self.ctx = step_fn, options, ctx
        self.views = list(views) if ctx.rank == 0 else []
        self.run: Run | None = None

    def release(self) -> None:
        """Nothing to let go: the rank claims the model only inside execute()."""

    def execute(self) -> None:
        __tracebackhide__ = True
        with joined_process_group(self.ctx, self.options.timeout):
            rank_options, release = setup_rank(self.options, self.ctx)
            try:
                training = prepare(self.step_fn, rank_options, self.views)
                self.run = training.run
                attach_rank(training, rank_options, self.ctx)
                training.execute()
            finally:
                release()
