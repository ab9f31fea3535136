"""Everything one training run is asked to do, checked once: `TrainOptions`.

`amp_magics.train`, `%%amp_train`, sweeps and the precision showdown all build this one frozen
object; a bad value raises AmpUsageError naming the flag and the fix before anything changes.
Sweeps vary it with `dataclasses.replace`, which checks the new values again.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch

from ..errors import AmpUsageError
from ..precision import CHOICES
from ..tensors import plain_module
from .compiling import MODES

MAX_COUNT = 2**31 - 1  # counts feed torch integer arguments; beyond this they overflow
SCALER_KEYS = ("init_scale", "growth_interval", "growth_factor", "backoff_factor")

Optimizers = Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]]


def as_optimizers(optimizer: Optimizers) -> tuple:
    """One optimizer or several (a list or tuple) -> a tuple."""
    return tuple(optimizer) if isinstance(optimizer, (list, tuple)) else (optimizer,)


@dataclass(frozen=True)
class TrainOptions:
    """One run's settings. Field names are the keyword arguments of `amp_magics.train`."""

    # what to train
    model: torch.nn.Module
    optimizer: Optimizers
    data: Iterable
    val: Optional[Iterable] = None
    scheduler: Any = None
    # how long (epochs defaults to 1, or to unlimited when only steps is given)
    epochs: Optional[int] = None
    steps: Optional[int] = None
    # precision and loss scaling
    dtype: str = "auto"
    scaler: Optional[torch.amp.GradScaler] = None
    init_scale: Optional[float] = None
    growth_interval: Optional[int] = None
    growth_factor: Optional[float] = None
    backoff_factor: Optional[float] = None
    # the step
    accum: int = 1
    clip: Optional[float] = None
    skip_aware_scheduler: bool = False  # the scheduler advances only after real steps
    compile: bool = False  # train through torch.compile(model); the model stays plain
    compile_mode: Optional[str] = None  # torch.compile's mode; giving one implies compile
    log: tuple = ()
    seed: Optional[int] = None
    move: bool = True
    keep_grads: bool = False  # by default a run frees its gradients when it ends
    # checkpoints
    checkpoint: Optional[str] = None
    every: Optional[int] = None
    resume: Optional[str] = None
    # the run and how it is watched
    name: Optional[str] = None
    refresh_seconds: float = 0.5
    handle_sigint: bool = True
    sync_timing: bool = False  # measurements (--compare) only: a sync per step on CUDA
    diagnose: bool = False
    nproc: Union[int, str] = 1  # processes (DistributedDataParallel), or "auto": one per GPU
    config: Mapping = field(default_factory=dict)

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "optimizer", as_optimizers(self.optimizer))
        set_(self, "log", tuple(self.log))
        set_(self, "config", dict(self.config or {}))
        if self.epochs is None and self.steps is None:
            set_(self, "epochs", 1)
        if self.compile_mode is not None:
            set_(self, "compile", True)
        self._check_objects()
        self._check_numbers()
        self._check_files()

    @property
    def optimizers(self) -> tuple:
        return self.optimizer

    @property
    def scaler_settings(self) -> dict:
        """The GradScaler settings given (not the defaults)."""
        return {k: getattr(self, k) for k in SCALER_KEYS if getattr(self, k) is not None}

    # -- checks ----------------------------------------------------------------------------
    def _check_objects(self):
        if not isinstance(self.model, torch.nn.Module):
            raise AmpUsageError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not self.optimizers:
            raise AmpUsageError("give at least one optimizer")
        for opt in self.optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise AmpUsageError(f"optimizer must be a torch.optim.Optimizer, "
                                    f"got {type(opt).__name__}")
        for label, value in (("data", self.data), ("val", self.val)):
            if value is None and label == "val":
                continue
            if isinstance(value, torch.nn.Module):
                raise AmpUsageError(f"{label} is a {type(value).__name__}, a model, not an "
                                    "iterable of batches")
            if not isinstance(value, Iterable):
                raise AmpUsageError(f"{label} must be iterable (a DataLoader, a list of "
                                    f"batches...), got {type(value).__name__}")
            if _length(value) == 0:
                raise AmpUsageError(f"{label} is empty: it has no batches")
        if self.scheduler is not None and not callable(getattr(self.scheduler, "step", None)):
            raise AmpUsageError(f"scheduler must have a step() method (a torch.optim."
                                f"lr_scheduler), got {type(self.scheduler).__name__}")
        if self.skip_aware_scheduler:
            self._check_skip_aware_scheduler()
        if self.compile:
            self._check_compile()
        if self.scaler is not None and not isinstance(self.scaler, torch.amp.GradScaler):
            raise AmpUsageError(f"scaler must be a torch.amp.GradScaler, "
                                f"got {type(self.scaler).__name__}")
        if self.scaler is not None and self.scaler_settings:
            raise AmpUsageError("give either your own scaler or scaler settings (init_scale, "
                                "growth_interval, growth_factor, backoff_factor), not both")
        if self.dtype not in CHOICES:
            raise AmpUsageError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(CHOICES)}")

    def _check_skip_aware_scheduler(self):
        flag = "--skip-aware-scheduler"
        if self.scheduler is None:
            raise AmpUsageError(f"{flag} needs a scheduler: give --scheduler NAME, or drop it")
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise AmpUsageError(f"{flag} does not apply to ReduceLROnPlateau, which steps once "
                                "per epoch with the loss, not after each optimizer step: drop it")
        driven = getattr(self.scheduler, "optimizer", None)
        if not any(driven is opt for opt in self.optimizers):
            raise AmpUsageError(f"{flag}: the scheduler drives an optimizer that is not trained "
                                "here; build the scheduler on one of the run's optimizers")

    def _check_compile(self):
        if self.compile_mode not in (None, *MODES):
            raise AmpUsageError(f"--compile-mode {self.compile_mode!r}: choose one of "
                                f"{', '.join(MODES)}")
        if plain_module(self.model) is not self.model:
            raise AmpUsageError("--compile: the model is already compiled (torch.compile): "
                                "pass the plain module with --compile, or drop --compile")
        if self.nproc != 1:
            raise AmpUsageError("--compile with --nproc is not supported yet: train on one "
                                "process, or compile inside a torchrun script")

    def _check_numbers(self):
        for label in ("epochs", "steps", "accum"):
            value = getattr(self, label)
            if value is not None and (not isinstance(value, int) or not 1 <= value <= MAX_COUNT):
                raise AmpUsageError(f"--{label} must be a positive whole number up to "
                                    f"{MAX_COUNT}, got {value!r}")
        if self.clip is not None and not self.clip >= 0:
            raise AmpUsageError(f"--clip must be a non-negative max gradient norm, got {self.clip!r}")
        if not (self.nproc == "auto" or (isinstance(self.nproc, int) and
                                         not isinstance(self.nproc, bool) and
                                         1 <= self.nproc <= 1024)):
            raise AmpUsageError(f"--nproc must be a number of processes (1 to 1024) or auto, "
                                f"got {self.nproc!r}")
        if not self.refresh_seconds > 0:
            raise AmpUsageError(f"refresh interval must be positive, got {self.refresh_seconds!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            raise AmpUsageError(f"--seed must be a whole number from 0 to 2**64-1, got {self.seed!r}")
        given = self.scaler_settings
        if not 0 < given.get("init_scale", 1) < math.inf:
            raise AmpUsageError("--init-scale must be positive and finite, e.g. 2**14")
        if not 1 <= given.get("growth_interval", 1) <= MAX_COUNT:
            raise AmpUsageError(f"--growth-interval must be a positive number of steps up to "
                                f"{MAX_COUNT}")
        if not 1 < given.get("growth_factor", 2) < math.inf:
            raise AmpUsageError("--growth-factor must be greater than 1, e.g. 2.0")
        if not 0 < given.get("backoff_factor", 0.5) < 1:
            raise AmpUsageError("--backoff-factor must be between 0 and 1, e.g. 0.5")

    def _check_files(self):
        if self.every is not None and (self.checkpoint is None or not isinstance(self.every, int)
                                       or self.every < 1):
            raise AmpUsageError("--every N needs --checkpoint PATH and a positive number of steps")
        if self.resume is not None and not os.path.isfile(self.resume):
            raise AmpUsageError(f"--resume {self.resume}: no such checkpoint file")
        if self.checkpoint is not None:
            path = os.fspath(self.checkpoint)
            folder = os.path.dirname(os.path.abspath(path)) or "."
            if os.path.isdir(path):
                raise AmpUsageError(f"--checkpoint {path} is a folder: give a file in it, e.g. "
                                    f"--checkpoint {os.path.join(path, 'run.pt')}")
            # the folder is made at the first save if missing; an existing one must be writable
            existing = folder
            while not os.path.exists(existing):
                existing = os.path.dirname(existing)
            if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
                raise AmpUsageError(f"--checkpoint {path}: cannot write in {existing}")


def _length(data) -> int | None:
    """len(data), or None for streams: a DataLoader over an IterableDataset has __len__ but
    raises TypeError from it."""
    try:
        return len(data)
    except TypeError:
        return None
