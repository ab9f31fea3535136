"""`amp_magics.train`: the Python entry point, for notebooks and scripts alike."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import torch

from .training.engine import prepare
from .training.options import Optimizers, TrainOptions
from .training.run import Run
from .training.view import View


def train(step_fn: Callable[..., Any], *, model: torch.nn.Module, optimizer: Optimizers,
          data: Iterable, dtype: str = "auto", epochs: Optional[int] = None,
          steps: Optional[int] = None, accum: int = 1, clip: Optional[float] = None,
          scheduler: Any = None, val: Optional[Iterable] = None,
          scaler: Optional[torch.amp.GradScaler] = None, init_scale: Optional[float] = None,
          growth_interval: Optional[int] = None, growth_factor: Optional[float] = None,
          backoff_factor: Optional[float] = None, seed: Optional[int] = None,
          log: Sequence[str] = (), move: bool = True, keep_grads: bool = False,
          name: Optional[str] = None,
          progress: bool = True, observers: Sequence[View] = (),
          refresh_seconds: float = 0.5, handle_sigint: bool = True,
          checkpoint: Optional[str] = None, every: Optional[int] = None,
          resume: Optional[str] = None, diagnose: bool = False,
          config: Optional[Mapping] = None) -> Run:
    """Train a model with automatic mixed precision; return the Run.

    step_fn(batch) -> loss, or step_fn(batch, step, epoch) -> loss. It may also return a dict
    with "loss" and the names given in `log`. It runs under torch.autocast; the engine does
    backward, GradScaler, clipping, the optimizer and scheduler steps, as PyTorch's AMP recipes.

    model, optimizer (one or a list), data (any iterable of batches); dtype "auto" | "fp16" |
    "bf16" | "fp32"; epochs (default 1, unlimited when only `steps` is given); steps (optimizer
    steps); accum (micro-batches per optimizer step, the loss divided by it); clip (max grad
    norm); scheduler; val (evaluated each epoch end); your own scaler, or init_scale /
    growth_interval / growth_factor / backoff_factor; seed; log (other scalars the step
    returns); move (batch tensors to the model's device); keep_grads (keep the last step's
    gradients; by default they are freed when the run ends); name; progress (a text line when no
    observers are given); observers (View objects); refresh_seconds; handle_sigint;
    checkpoint (path) with every (steps; default each epoch end); resume (path); diagnose;
    config (extra entries for the run's config).

    On Ctrl-C the run ends after the current optimizer step with status "interrupted"; an
    exception in step_fn or in the data marks the run "failed" and is re-raised.
    """
    __tracebackhide__ = True
    options = TrainOptions(
        model=model, optimizer=optimizer, data=data, val=val, scheduler=scheduler,
        epochs=epochs, steps=steps, dtype=dtype, scaler=scaler, init_scale=init_scale,
        growth_interval=growth_interval, growth_factor=growth_factor,
        backoff_factor=backoff_factor, accum=accum, clip=clip, log=log, seed=seed, move=move,
        keep_grads=keep_grads,
        checkpoint=checkpoint, every=every, resume=resume, name=name,
        refresh_seconds=refresh_seconds, handle_sigint=handle_sigint, diagnose=diagnose,
        config=config or {})
    views = list(observers)
    if progress and not views:
        from .views.reporter import ConsoleReporter

        views.append(ConsoleReporter())
    training = prepare(step_fn, options, views)
    training.execute()
    return training.run
