"""Training on several processes with DistributedDataParallel: `--nproc N` / `nproc=N`.

Rooms: `rank` (one rank's device, DDP and options), `sharding` (each rank's part of the
data), `protocol` (the typed messages ranks send the notebook), `merge` (their records into
one history), `launcher` (forking the ranks from a notebook, watching, stopping, copying
back) and `torchrun` (a script started by torchrun, where each process is a rank).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.nn.parallel import DistributedDataParallel

from ..errors import AmpUsageError
from ..tensors import StepFn
from ..training.engine import prepare
from ..training.options import TrainOptions
from ..training.view import View
from .launcher import prepare_distributed, world_size
from .torchrun import RankTraining, torchrun_context


def check_ddp_options(options: TrainOptions, world: int) -> None:
    """DDP's own options need DDP: several processes, and a model we wrap."""
    given = [flag for flag, on in (("--find-unused-parameters", options.find_unused_parameters),
                                   ("--static-graph", options.static_graph)) if on]
    if not given:
        return
    if world == 1:
        raise AmpUsageError(f"{' and '.join(given)}: DistributedDataParallel's option, for "
                            "several processes: add --nproc N (or run under torchrun), or "
                            "drop it")
    if isinstance(options.model, DistributedDataParallel):
        raise AmpUsageError(f"{' and '.join(given)}: the model is already "
                            "DistributedDataParallel, built by your script: pass "
                            "find_unused_parameters=/static_graph= to it there instead")


def prepare_training(step_fn: StepFn, options: TrainOptions, views: Sequence[View] = ()) -> Any:
    """The training for these options: one process (engine.Training), --nproc N > 1
    (launcher.DistributedTraining), or this process's rank when torchrun started it
    (torchrun.RankTraining). Each has `.run`, `.execute()` and `.release()`."""
    ranked = torchrun_context()
    world = ranked.world_size if ranked is not None else world_size(options.nproc)
    check_ddp_options(options, world)
    if ranked is not None:
        return RankTraining(step_fn, options, views, ranked)
    if world == 1:
        return prepare(step_fn, options, views)
    return prepare_distributed(step_fn, options, views, world)
