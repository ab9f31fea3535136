"""The AMP training loop: autocast + GradScaler + accumulation + clipping, as in PyTorch's recipes.

The user supplies one training step (a function returning the loss). The engine runs it for
every batch, does the GradScaler sequence exactly as the "CUDA Automatic Mixed Precision
examples" do (scale, backward, optional unscale_ + clip, step, update), records each step
without host-device synchronisation, and every `refresh_seconds` drains the records into the
Run and tells its observers. It knows nothing of IPython or widgets.
"""
from __future__ import annotations

import contextlib
import gc
import os
import math
import signal
import threading
import time
import warnings
import weakref
from collections.abc import Iterable

import torch

from . import alarms
from .. import precision as precision_policy
from ..precision import SCALER_DEFAULTS
from .checkpoint import load_checkpoint, save_checkpoint
from ..errors import AmpUsageError
from ..tensors import (as_step, batch_size, capture_rng, is_out_of_memory, model_device,
                       restore_rng, seed_everything, to_device, unpack_loss)
from ..views.format import format_bytes
from .run import Run, next_name, register
from .telemetry import StepRecorder, memory_snapshot, reset_peak

MAX_COUNT = 2**31 - 1  # counts feed torch integer arguments; beyond this they overflow
# Scalers persist per (first) optimizer, so re-running a cell continues with the learned scale.
_SCALERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def train(step_fn, **options) -> Run:
    """Train a model with automatic mixed precision; return the Run.

    step_fn(batch) -> loss, or step_fn(batch, step, epoch) -> loss. It may also return a dict
    with "loss" and the names given in `log`. It runs under torch.autocast; the engine does
    backward, GradScaler, clipping, the optimizer and scheduler steps.

    Keyword options (see `prepare`): model, optimizer (one or a list), data, dtype
    ("auto" | "fp16" | "bf16" | "fp32"), epochs (default 1, unlimited when only `steps` is
    given), steps (optimizer steps), accum (micro-batches per optimizer step; the loss is
    divided by it), clip (max grad norm), scheduler, val, scaler or init_scale /
    growth_interval / growth_factor / backoff_factor, seed, log, move, name, progress,
    observers, refresh_seconds, handle_sigint, checkpoint (path) with every (steps; default
    each epoch end), resume (path), config.

    On Ctrl-C the run ends after the current optimizer step with status "interrupted"; an
    exception in step_fn or in the data marks the run "failed" and is re-raised.
    """
    __tracebackhide__ = True
    training = prepare(step_fn, **options)
    training.execute()
    return training.run


def prepare(step_fn, *, model, optimizer, data, dtype="auto", epochs=None, steps=None, accum=1,
            clip=None, scheduler=None, val=None, scaler=None, init_scale=None,
            growth_interval=None, growth_factor=None, backoff_factor=None, seed=None, log=(),
            move=True, name=None, progress=True, observers=(), refresh_seconds=0.5,
            handle_sigint=True, checkpoint=None, every=None, resume=None, sync_timing=False,
            diagnose=False, config=None) -> "Training":
    """Check everything and register the Run, without training yet: `.execute()` trains.

    Bad input raises AmpUsageError before anything changes; `resume` loads its checkpoint
    into the model, optimizers, scaler and scheduler here.
    """
    optimizers = _check_inputs(model, optimizer, data, val, scheduler, scaler)
    epochs, steps, accum, clip = _check_counts(epochs, steps, accum, clip, refresh_seconds)
    if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise AmpUsageError(f"--seed must be a whole number from 0 to 2**64-1, got {seed!r}")
    if every is not None and (checkpoint is None or not isinstance(every, int) or every < 1):
        raise AmpUsageError("--every N needs --checkpoint PATH and a positive number of steps")
    if resume is not None and not os.path.isfile(resume):
        raise AmpUsageError(f"--resume {resume}: no such checkpoint file")
    device = model_device(model)
    chosen = precision_policy.resolve(dtype, device)
    settings = _scaler_settings(init_scale, growth_interval, growth_factor, backoff_factor)
    if scaler is not None and settings:
        raise AmpUsageError("give either your own scaler or scaler settings (init_scale, "
                            "growth_interval, growth_factor, backoff_factor), not both")
    if scaler is None and chosen.needs_scaler:
        scaler = _persistent_scaler(optimizers[0], device.type, {**SCALER_DEFAULTS, **settings})
    elif settings and not chosen.needs_scaler:
        raise AmpUsageError(f"scaler settings only apply with a GradScaler, which is used for "
                            f"fp16; this run uses {chosen.name}. Drop them or use --dtype fp16.")

    per_epoch = _steps_per_epoch(data, accum)
    run = Run(
        name or next_name(),
        config={"dtype": dtype, "epochs": epochs, "steps": steps, "accum": accum, "clip": clip,
                "seed": seed, "lr": optimizers[0].param_groups[0].get("lr"),
                "optimizer": ", ".join(type(o).__name__ for o in optimizers),
                **(config or {})},
        device=str(device), precision=chosen.name, precision_reason=chosen.reason,
        scaler_settings=_describe_scaler(scaler),
        total_steps=_total_steps(epochs, steps, per_epoch), steps_per_epoch=per_epoch,
        model_label=type(model).__name__,
    )
    if chosen.name == "fp16" and device.type == "cpu":
        run.notes.append("fp16 autocast on a CPU is emulated and slow; bf16 or fp32 is faster here")
    resumed = None
    if resume is not None:
        try:
            resumed = load_checkpoint(resume, model=model, optimizers=optimizers, scaler=scaler,
                                      scheduler=scheduler)
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise AmpUsageError(f"--resume {resume}: {e}") from None
        run.history, run.val_history = resumed["history"], resumed["val_history"]
        run.notes.append(f"resumed from {resume} at step {resumed['step']}")
    register(run)
    observers = list(observers)
    if progress and not observers:
        from ..views.reporter import ConsoleReporter

        observers.append(ConsoleReporter())
    return Training(run, as_step(step_fn), model, optimizers, data, chosen, scaler, device,
                    epochs=epochs, steps=steps, accum=accum, clip=clip, scheduler=scheduler,
                    val=val, move=move, log_names=tuple(log), observers=observers,
                    refresh_seconds=refresh_seconds, seed=seed, handle_sigint=handle_sigint,
                    checkpoint_path=checkpoint, every=every, resumed=resumed,
                    sync_timing=sync_timing and device.type == "cuda", diagnose=diagnose)


class Training:
    """The state of one run; `execute()` drives it and always leaves a consistent Run behind."""

    def __init__(self, run, step, model, optimizers, data, chosen, scaler, device, *, epochs,
                 steps, accum, clip, scheduler, val, move, log_names, observers,
                 refresh_seconds, seed, handle_sigint, checkpoint_path, every, resumed,
                 sync_timing, diagnose):
        self.run = run
        self.step_fn = step
        self.model = model
        self.optimizers = optimizers
        self.data = data
        self.scaler = scaler
        self.device = device
        self.epochs = epochs
        self.max_steps = steps
        self.accum = accum
        self.clip = clip
        self.scheduler = scheduler
        self.plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        self.val = val
        self.move = move
        self.log_names = log_names
        self.observers = observers
        self.refresh_seconds = refresh_seconds
        self.seed = seed
        self.handle_sigint = handle_sigint
        self.recorder = StepRecorder(log_names)
        # One autocast object reused for every micro-batch; fp32 runs with no autocast at all,
        # exactly like the plain fp32 loop.
        self.autocast = chosen.autocast()
        self.sync_timing = sync_timing  # measurements (--compare) only: a sync per step
        self.chosen = chosen
        # --diagnose: a sync per step until the first overflow, which is then re-run with hooks.
        self.diagnose = diagnose
        self.window_batches = []
        self.checkpoint_path = checkpoint_path
        self.every = every
        self.resumed = resumed
        self.step = resumed["step"] if resumed else 0  # optimizer steps done (global on resume)
        self.start_epoch = resumed["epoch"] if resumed else 0
        # Where training stands at the last step boundary: (epoch, batches read, epoch RNG).
        self.position = (self.start_epoch, 0, None)
        self.batches_in_epoch = 0
        self.epoch_rng = None
        self.last_batch_size = 0
        self.micro = 0  # micro-batches in the current accumulation window
        self.in_update = False  # between unscale_/step and update: an exception here is costly
        self.loss_sum = None
        self.log_sums = {}
        self.samples = 0
        self.t0 = 0.0
        self.next_refresh = 0.0
        self.raised_alarms: set = set()

    # -- driver --------------------------------------------------------------------
    def execute(self):
        """Train until done, stopped or failed; re-raise the user's exception after recording."""
        __tracebackhide__ = True
        if self.seed is not None and self.resumed is None:
            seed_everything(self.seed)
        with _stop_on_sigint(self.run, self.handle_sigint):
            self._execute()

    def _execute(self):
        __tracebackhide__ = True
        reset_peak(self.device)
        self.t0 = time.perf_counter()
        self.next_refresh = self.t0 + self.refresh_seconds
        self._notify("on_start")
        error = None
        try:
            self._train()
            status = "interrupted" if self.run.stop_requested else "finished"
            if self.checkpoint_path:
                self._save_checkpoint()
        except KeyboardInterrupt:
            status = "interrupted"
            self._abandon_step()
        except BaseException as e:  # the user's code or data failed: keep what was done
            status, error = "failed", e
            self._abandon_step()
            if is_out_of_memory(e):
                self._release_memory(e)
        self._finish(status, error)
        if error is not None:
            raise error

    def _train(self):
        __tracebackhide__ = True
        epoch = self.start_epoch
        while self.epochs is None or epoch < self.epochs:
            if self._should_stop():
                break
            self.run.epoch = epoch
            if self._train_epoch(epoch) == 0:
                if epoch == 0:
                    raise AmpUsageError("the data produced no batches: check that the "
                                        "DataLoader/iterable is not empty")
                self.run.notes.append(
                    f"the data was exhausted after {epoch} epoch(s): an iterator cannot be "
                    "re-read; pass a DataLoader or a list to train for several epochs")
                break
            val_loss = self._validate(epoch) if self.val is not None else None
            self._refresh()
            if self.plateau:
                self.scheduler.step(val_loss if val_loss is not None else self._epoch_loss(epoch))
            epoch += 1
            self.position = (epoch, 0, None)
            if self.checkpoint_path and self.every is None:
                self._save_checkpoint()

    def _train_epoch(self, epoch) -> int:
        __tracebackhide__ = True
        it = self._epoch_iterator()
        while True:
            if self.micro == 0 and self._should_stop():
                break
            try:
                batch = next(it)
            except StopIteration:
                break
            self.batches_in_epoch += 1
            self._micro_step(batch, epoch)
            if self.micro == self.accum:
                self._optimizer_step(epoch)
        if self.micro:  # a last, shorter accumulation window still gets its optimizer step
            self._optimizer_step(epoch)
        return self.batches_in_epoch

    def _epoch_iterator(self):
        """A fresh iterator over the data; on resume, positioned where the checkpoint was."""
        __tracebackhide__ = True
        resumed, self.resumed = self.resumed, None
        if resumed is None or resumed["batches_in_epoch"] == 0:
            if resumed is not None:
                restore_rng(resumed["rng"])
            self.epoch_rng = capture_rng() if self.checkpoint_path else None
            self.batches_in_epoch = 0
            return iter(self.data)
        # Replay the epoch's start so a shuffled loader yields the same order, skip what was
        # already trained on, then continue from the RNG state at the checkpoint itself.
        self.epoch_rng = resumed["epoch_rng"]
        restore_rng(self.epoch_rng)
        it = iter(self.data)
        for _ in range(resumed["batches_in_epoch"]):
            next(it, None)
        restore_rng(resumed["rng"])
        self.batches_in_epoch = resumed["batches_in_epoch"]
        return it

    def _should_stop(self) -> bool:
        return self.run.stop_requested or (
            self.max_steps is not None and self.step >= self.max_steps)

    # -- one micro-batch and one optimizer step, as in the PyTorch AMP recipes ---------
    def _micro_step(self, batch, epoch):
        __tracebackhide__ = True
        if self.micro == 0:
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
        if self.move:
            batch = to_device(batch, self.device)
        if self.diagnose:
            if self.micro == 0:
                self.window_batches = []
            self.window_batches.append(batch)
        self.last_batch_size = batch_size(batch)
        self.samples += self.last_batch_size
        with self.autocast:
            loss, logs = self._unpack(self.step_fn(batch, self.step, epoch), training=True)
            scaled = loss / self.accum if self.accum > 1 else loss
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        detached = loss.detach().float()
        first = self.micro == 0
        self.loss_sum = detached if first else self.loss_sum + detached
        for name in self.log_names:
            value = _detached(logs[name])
            self.log_sums[name] = value if first else self.log_sums[name] + value
        self.micro += 1

    def _optimizer_step(self, epoch):
        scaler = self.scaler
        self.in_update = True
        grad_norm = None
        if self.clip is not None:
            if scaler is not None:
                for opt in self.optimizers:
                    scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        lr = self.optimizers[0].param_groups[0]["lr"]
        lr = lr.detach().clone() if isinstance(lr, torch.Tensor) else lr
        scale = found_inf = None
        if scaler is not None:
            for opt in self.optimizers:
                scaler.step(opt)
            # Copy before update(): update() mutates the scale and consumes found_inf.
            scale, found_inf = _scale_and_found_inf(scaler, self.optimizers)
            scaler.update()
        else:
            for opt in self.optimizers:
                opt.step()
        if self.scheduler is not None and not self.plateau:
            self.scheduler.step()
        self.in_update = False
        if self.sync_timing:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.recorder.record(step=self.step, epoch=epoch, loss_sum=self.loss_sum,
                             micro=self.micro, scale=scale, found_inf=found_inf,
                             grad_norm=grad_norm, lr=lr, time=now - self.t0,
                             samples=self.samples, logs=self.log_sums)
        if self.diagnose:
            self._diagnose_if_overflowed(scale, found_inf)
        self.step += 1
        self.micro = 0
        self.samples = 0
        self.position = (epoch, self.batches_in_epoch, self.epoch_rng)
        if self.every is not None and self.step % self.every == 0:
            self._save_checkpoint()
        if now >= self.next_refresh:
            self._refresh()

    def _unpack(self, out, training):
        __tracebackhide__ = True
        loss, logs = unpack_loss(out, training=training)
        for name in self.log_names:
            if name not in logs:
                raise AmpUsageError(f"--log names {name} but the step never assigned it: "
                                    "assign it in the cell body or drop it from --log")
            value = logs[name]
            scalar = (value.numel() == 1 if isinstance(value, torch.Tensor)
                      else isinstance(value, (int, float)))
            if not scalar:
                shape = (f"a tensor of shape {tuple(value.shape)}"
                         if isinstance(value, torch.Tensor) else f"a {type(value).__name__}")
                raise AmpUsageError(f"--log {name}: a logged value must be a number or a "
                                    f"one-element tensor, got {shape}")
        return loss, logs

    def _diagnose_if_overflowed(self, scale, found_inf):
        __tracebackhide__ = True
        skipped = found_inf is not None and found_inf.item() > 0
        if not skipped and math.isfinite(self.loss_sum.item()):
            return
        from ..diagnostics.overflow import locate_nonfinite

        self.diagnose = False  # once per run: the first overflow is the informative one
        used_scale = scale.item() if scale is not None else None
        for batch in self.window_batches:
            diagnosis = locate_nonfinite(self.step_fn, self.model, batch, self.chosen,
                                         scale=used_scale)
            if diagnosis.found:
                break
        self.run.diagnosis = diagnosis
        what = "skipped" if skipped else "had a non-finite loss"
        self.run.notes.append(f"--diagnose: step {self.step} {what}. {diagnosis.advice}")

    # -- epoch end -----------------------------------------------------------------
    def _validate(self, epoch):
        __tracebackhide__ = True
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        total, batches = None, 0
        try:
            with torch.no_grad():
                for batch in self.val:
                    if self.move:
                        batch = to_device(batch, self.device)
                    with self.autocast:
                        loss, _ = self._unpack(self.step_fn(batch, self.step, epoch),
                                               training=False)
                    value = loss.detach().float()
                    total = value if total is None else total + value
                    batches += 1
        finally:
            for module, mode in modes:
                module.training = mode
        if batches == 0:
            self.run.notes.append("--val produced no batches: no validation loss")
            return None
        val_loss = (total / batches).item()  # one sync per epoch
        self.run.val_history.append({"epoch": epoch, "step": self.step, "val_loss": val_loss})
        return val_loss

    def _epoch_loss(self, epoch):
        losses = [r["loss"] for r in self.run.history if r["epoch"] == epoch]
        return sum(losses) / len(losses) if losses else math.inf

    # -- refresh and end ---------------------------------------------------------------
    def _drain(self):
        run = self.run
        new = self.recorder.drain()
        run.history.extend(new)
        for kind, message in alarms.check(new, run.history).items():
            if kind not in self.raised_alarms:
                self.raised_alarms.add(kind)
                run.alarms.append(message)

    def _refresh(self):
        now = time.perf_counter()
        self.next_refresh = now + self.refresh_seconds
        self._drain()
        run = self.run
        run.wall_time = now - self.t0
        run.memory.append({"time": run.wall_time, "step": self.step,
                           **memory_snapshot(self.device)})
        self._notify("on_refresh")
        run.refresh_costs.append(time.perf_counter() - now)

    def _save_checkpoint(self):
        self._drain()
        epoch, batches, epoch_rng = self.position
        save_checkpoint(self.checkpoint_path, model=self.model, optimizers=self.optimizers,
                        scaler=self.scaler, scheduler=self.scheduler, step=self.step,
                        epoch=epoch, batches_in_epoch=batches, epoch_rng=epoch_rng,
                        history=self.run.history, val_history=self.run.val_history)

    def _release_memory(self, error):
        """Out of memory: free the failed step's tensors and say what would fit."""
        _clear_user_frames(error.__traceback__)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        snap = memory_snapshot(self.device)
        held = ", ".join(f"{k} {format_bytes(v)}" for k, v in snap.items() if v is not None)
        size = self.last_batch_size
        smaller = (f"a batch of {max(size // 2, 1)} with --accum {self.accum * 2} (the same "
                   f"effective batch of {size * self.accum})" if size > 1 else "a smaller model")
        lower = ("" if self.run.precision in ("bf16", "fp16")
                 else ", or --dtype bf16/fp16 (roughly halves activation memory)")
        self.run.notes.append(f"out of memory at step {self.step} with a batch of {size}; after "
                              f"freeing the step: {held}. Try {smaller}{lower}.")

    def _abandon_step(self):
        """After an error mid-step: drop its partial gradients and the scaler's step state."""
        if self.in_update:
            self.run.notes.append("the error came during the optimizer step: some parameters "
                                  "may have been updated by it")
        self.micro = 0
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        states = getattr(self.scaler, "_per_optimizer_states", None)
        if states is not None:
            states.clear()  # a fresh unscale_/step is allowed on the next run

    def _finish(self, status, error):
        run = self.run
        try:
            self._refresh()
        except Exception as e:  # e.g. the device itself failed: keep the status honest
            run.notes.append(f"could not read the last steps back: {e!r}")
        run.status = status
        if error is not None:
            run.error = f"{type(error).__name__}: {error}"
        if status == "interrupted":
            run.notes.append(f"interrupted after {self.step} optimizer step(s): model, optimizer "
                             "and scaler are as after the last completed step")
        self._notify("on_end")

    def _notify(self, method):
        for observer in list(self.observers):
            callback = getattr(observer, method, None)
            if callback is None:
                continue
            try:
                callback(self.run)
            except Exception as e:  # a broken view must not cost the training run
                self.observers.remove(observer)
                warnings.warn(f"{type(observer).__name__}.{method} failed and was detached: "
                              f"{e!r}", RuntimeWarning, stacklevel=2)


# -- helpers -----------------------------------------------------------------------------
def _clear_user_frames(tb) -> None:
    """Drop the locals of the failed step's frames (they hold its activations), keeping the
    traceback printable. Our own frames keep theirs: __tracebackhide__ lives there."""
    while tb is not None:
        if not tb.tb_frame.f_globals.get("__name__", "").startswith(__package__):
            try:
                tb.tb_frame.clear()
            except RuntimeError:  # a frame still executing
                pass
        tb = tb.tb_next






def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().float().reshape(())
    return float(value)


def _scale_and_found_inf(scaler, optimizers):
    scale = getattr(scaler, "_scale", None)
    states = getattr(scaler, "_per_optimizer_states", None)
    if scale is None or states is None or not scaler.is_enabled():
        return None, None
    found = [t for opt in optimizers if id(opt) in states
             for t in states[id(opt)]["found_inf_per_device"].values()]
    return scale.clone(), (sum(found) if found else None)


def scaler_entry(optimizer):
    """The persistent scaler kept for `optimizer` and a copy of its state (None if none)."""
    entry = _SCALERS.get(optimizer)
    return None if entry is None else (entry[0], entry[1], entry[1].state_dict())


def restore_scaler_entry(optimizer, saved) -> None:
    """Put the persistent scaler back as `scaler_entry` found it."""
    if saved is None:
        _SCALERS.pop(optimizer, None)
        return
    key, scaler, state = saved
    scaler.load_state_dict(state)
    _SCALERS[optimizer] = (key, scaler)


def _persistent_scaler(optimizer, device_type, settings):
    key = (device_type, tuple(sorted(settings.items())))
    entry = _SCALERS.get(optimizer)
    if entry is not None and entry[0] == key:
        return entry[1]
    scaler = torch.amp.GradScaler(device_type, **settings)
    _SCALERS[optimizer] = (key, scaler)
    return scaler


def _scaler_settings(init_scale, growth_interval, growth_factor, backoff_factor) -> dict:
    given = {"init_scale": init_scale, "growth_interval": growth_interval,
             "growth_factor": growth_factor, "backoff_factor": backoff_factor}
    given = {k: v for k, v in given.items() if v is not None}
    if not 0 < given.get("init_scale", 1) < math.inf:
        raise AmpUsageError("--init-scale must be positive and finite, e.g. 2**14")
    if not 1 <= given.get("growth_interval", 1) <= MAX_COUNT:
        raise AmpUsageError(f"--growth-interval must be a positive number of steps up to "
                            f"{MAX_COUNT}")
    if not 1 < given.get("growth_factor", 2) < math.inf:
        raise AmpUsageError("--growth-factor must be greater than 1, e.g. 2.0")
    if not 0 < given.get("backoff_factor", 0.5) < 1:
        raise AmpUsageError("--backoff-factor must be between 0 and 1, e.g. 0.5")
    return given


def _describe_scaler(scaler):
    if scaler is None:
        return None
    return {"init_scale": scaler.get_scale() if scaler.is_enabled() else None,
            "growth_factor": scaler.get_growth_factor(),
            "backoff_factor": scaler.get_backoff_factor(),
            "growth_interval": scaler.get_growth_interval(), "enabled": scaler.is_enabled()}



def as_optimizers(optimizer) -> list:
    """One optimizer or several (a list or tuple) -> a list."""
    return list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]


def _check_inputs(model, optimizer, data, val, scheduler, scaler):
    if not isinstance(model, torch.nn.Module):
        raise AmpUsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    optimizers = as_optimizers(optimizer)
    if not optimizers:
        raise AmpUsageError("give at least one optimizer")
    for opt in optimizers:
        if not isinstance(opt, torch.optim.Optimizer):
            raise AmpUsageError(f"optimizer must be a torch.optim.Optimizer, "
                                f"got {type(opt).__name__}")
    for label, value in (("data", data), ("val", val)):
        if value is None and label == "val":
            continue
        if isinstance(value, torch.nn.Module):
            raise AmpUsageError(f"{label} is a {type(value).__name__}, a model, not an iterable "
                                "of batches")
        if not isinstance(value, Iterable):
            raise AmpUsageError(f"{label} must be iterable (a DataLoader, a list of batches...), "
                                f"got {type(value).__name__}")
        if hasattr(value, "__len__") and len(value) == 0:
            raise AmpUsageError(f"{label} is empty: it has no batches")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise AmpUsageError(f"scheduler must have a step() method (a torch.optim.lr_scheduler), "
                            f"got {type(scheduler).__name__}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise AmpUsageError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    return optimizers


def _check_counts(epochs, steps, accum, clip, refresh_seconds):
    for label, value in (("epochs", epochs), ("steps", steps), ("accum", accum)):
        if value is not None and (not isinstance(value, int) or not 1 <= value <= MAX_COUNT):
            raise AmpUsageError(f"--{label} must be a positive whole number up to {MAX_COUNT}, "
                                f"got {value!r}")
    if clip is not None and not clip >= 0:
        raise AmpUsageError(f"--clip must be a non-negative max gradient norm, got {clip!r}")
    if not refresh_seconds > 0:
        raise AmpUsageError(f"refresh interval must be positive, got {refresh_seconds!r}")
    if epochs is None and steps is None:
        epochs = 1
    return epochs, steps, accum, clip



def _steps_per_epoch(data, accum):
    try:
        return math.ceil(len(data) / accum)
    except TypeError:
        return None


def _total_steps(epochs, steps, per_epoch):
    by_epochs = epochs * per_epoch if epochs is not None and per_epoch is not None else None
    candidates = [n for n in (steps, by_epochs) if n is not None]
    return min(candidates) if candidates else None


@contextlib.contextmanager
def _stop_on_sigint(run, enabled):
    """First Ctrl-C: stop after the current optimizer step. A second one interrupts at once."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous) and previous not in (signal.SIG_IGN, signal.SIG_DFL):
        previous = signal.default_int_handler

    def stop_softly(signum, frame):
        run.request_stop()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, stop_softly)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
