"""Training on several processes with DistributedDataParallel: `--nproc N` / `nproc=N`.

Rooms: `rank` (one rank's device, DDP and options), `sharding` (each rank's part of the
data), `protocol` (the typed messages ranks send the notebook), `merge` (their records into
one history), `launcher` (forking the ranks from a notebook, watching, stopping, copying
back) and `torchrun` (a script started by torchrun, where each process is a rank).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..tensors import StepFn
from ..training.engine import prepare
from ..training.options import TrainOptions
from ..training.view import View
from .launcher import prepare_distributed, world_size
from .torchrun import RankTraining, torchrun_context


def prepare_training(step_fn: StepFn, options: TrainOptions, views: Sequence[View] = ()) -> Any:
    """The training for these options: one process (engine.Training), --nproc N > 1
    (launcher.DistributedTraining), or this process's rank when torchrun started it
    (torchrun.RankTraining). Each has `.run`, `.execute()` and `.release()`."""
    ranked = torchrun_context()
    if ranked is not None:
        return RankTraining(step_fn, options, views, ranked)
    world = world_size(options.nproc)
    if world == 1:
        return prepare(step_fn, options, views)
    return prepare_distributed(step_fn, options, views, world)
