"""`amp_magics.train`: the Python entry point, for notebooks and scripts alike."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional

import torch

from .errors import AmpUsageError
from .training.distributed import prepare_training, torchrun_context, train_under_torchrun
from .training.options import Optimizers, TrainOptions
from .training.run import Run
from .training.view import View


def train(step_fn: Callable[..., Any], *, model: torch.nn.Module, optimizer: Optimizers,
          data: Iterable, dtype: str = "auto", epochs: Optional[int] = None,
          steps: Optional[int] = None, accum: int = 1, clip: Optional[float] = None,
          scheduler: Any = None, skip_aware_scheduler: bool = False,
          val: Optional[Iterable] = None,
          scaler: Optional[torch.amp.GradScaler] = None, init_scale: Optional[float] = None,
          growth_interval: Optional[int] = None, growth_factor: Optional[float] = None,
          backoff_factor: Optional[float] = None, compile: bool = False,
          compile_mode: Optional[str] = None, seed: Optional[int] = None,
          log: Sequence[str] = (), move: bool = True, keep_grads: bool = False,
          name: Optional[str] = None,
          progress: bool = True, observers: Sequence[View] = (),
          refresh_seconds: float = 0.5, handle_sigint: bool = True,
          checkpoint: Optional[str] = None, every: Optional[int] = None,
          resume: Optional[str] = None, diagnose: bool = False,
          config: Optional[Mapping] = None, save: Optional[str] = None,
          nproc: int | str = 1) -> Run:
    """Train a model with automatic mixed precision; return the Run.

    step_fn(batch) -> loss, or step_fn(batch, step, epoch) -> loss. It may also return a dict
    with "loss" and the names given in `log`. It runs under torch.autocast; the engine does
    backward, GradScaler, clipping, the optimizer and scheduler steps, as PyTorch's AMP recipes.

    model, optimizer (one or a list), data (any iterable of batches); dtype "auto" | "fp16" |
    "bf16" | "fp32"; epochs (default 1, unlimited when only `steps` is given); steps (optimizer
    steps); accum (micro-batches per optimizer step, the loss divided by it); clip (max grad
    norm); scheduler; skip_aware_scheduler (the scheduler steps only after optimizer steps the
    loss scaler did not skip: free with ordinary optimizers, one sync per step with fused
    ones); val (evaluated each epoch end); your own scaler, or init_scale /
    growth_interval / growth_factor / backoff_factor; compile (train through
    torch.compile(model), compiled once per model; the model itself stays the plain module) with
    compile_mode ("default", "reduce-overhead", "max-autotune", ...; implies compile); seed; log (other scalars the step
    returns); move (batch tensors to the model's device); keep_grads (keep the last step's
    gradients; by default they are freed when the run ends); name; progress (a text line when no
    observers are given); observers (View objects); refresh_seconds; handle_sigint;
    checkpoint (path) with every (steps; default each epoch end); resume (path); diagnose;
    config (extra entries for the run's config); nproc (processes with DistributedDataParallel,
    or "auto": one per GPU; under torchrun each process trains its rank); save (path: the
    Run's JSON, written when the run ends however it ends, before an error or Ctrl-C goes on to
    the caller).

    On Ctrl-C the run ends after the current optimizer step with status "interrupted" (a
    second Ctrl-C stops at once) and the checkpoint is written. Inside IPython the Run is
    returned; elsewhere (a script) KeyboardInterrupt is then raised with the Run as its `.run`,
    so that the process ends as on any Ctrl-C (exit status 130). An exception in step_fn or in
    the data marks the run "failed" and is re-raised.
    """
    __tracebackhide__ = True
    options = TrainOptions(
        model=model, optimizer=optimizer, data=data, val=val, scheduler=scheduler,
        epochs=epochs, steps=steps, dtype=dtype, scaler=scaler, init_scale=init_scale,
        growth_interval=growth_interval, growth_factor=growth_factor,
        backoff_factor=backoff_factor, accum=accum, clip=clip,
        skip_aware_scheduler=skip_aware_scheduler, compile=compile, compile_mode=compile_mode,
        log=log, seed=seed, move=move,
        keep_grads=keep_grads,
        checkpoint=checkpoint, every=every, resume=resume, name=name,
        refresh_seconds=refresh_seconds, handle_sigint=handle_sigint, diagnose=diagnose,
        nproc=nproc, config=config or {})
    save = _checked_save_path(save)
    views = list(observers)
    if progress and not views:
        from .views.reporter import ConsoleReporter

        views.append(ConsoleReporter())
    ranked = torchrun_context()
    if ranked is not None:  # started by torchrun: this process trains its rank
        return train_under_torchrun(step_fn, options, views, ranked)
    training = prepare_training(step_fn, options, views)
    run = training.run
    try:
        training.execute()
    except BaseException:
        if save is not None:
            _save_quietly(run, save)  # the error that ended the run is what the caller sees
        raise
    if save is not None:
        run.save(save)
    if (run.status == "interrupted" and getattr(run, "stop_reason", None) is not None
            and not _in_ipython()):  # Ctrl-C: engine.py marks it; %amp_stop and Stop do not
        raise _interrupt(run, checkpoint, save) from None
    return run


def _interrupt(run: Run, checkpoint: Optional[str], saved: Optional[str]) -> KeyboardInterrupt:
    """The Ctrl-C that stopped `run`, to go on to a script's caller. KeyboardInterrupt itself,
    not a subclass: only then does an uncaught one end Python as SIGINT does (status 130)."""
    parts = [f"{run.name} interrupted after {len(run.history)} optimizer step(s)"]
    if checkpoint:  # a second Ctrl-C (or one landing mid-step) stops before the save
        parts.append(f"checkpoint {checkpoint} " + (
            "written at the stop" if getattr(run, "stop_reason", None) == "sigint"
            else "not updated at the stop (it came mid-step)"))
    if saved:
        parts.append(f"run saved to {saved}")
    interrupt = KeyboardInterrupt("; ".join(parts))
    interrupt.run = run
    return interrupt


def _in_ipython() -> bool:
    """An IPython shell or Jupyter kernel is running (it is never imported for this)."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    return get_ipython is not None and get_ipython() is not None


def _checked_save_path(save) -> Optional[str]:
    if save is None:
        return None
    path = os.fspath(save)
    if os.path.isdir(path):
        raise AmpUsageError(f"save={path!r} is a folder: give a file in it, e.g. "
                            f"{os.path.join(path, 'run.json')!r}")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):  # missing folders are made when it is written
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise AmpUsageError(f"save={path!r}: cannot write in {existing}")
    return path


def _save_quietly(run: Run, path: str) -> None:
    import warnings

    try:
        run.save(path)
    except Exception as e:
        warnings.warn(f"could not save {run.name} to {path}: {e!r}", RuntimeWarning,
                      stacklevel=3)
