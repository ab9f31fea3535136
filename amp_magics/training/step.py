"""One micro-batch and one optimizer step, exactly as PyTorch's "Automatic Mixed Precision
examples" write them: autocast forward, scaled backward, optional unscale_ + clip, step,
update, scheduler. Each step is recorded without a host-device sync.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .. import _torch_compat as private
from ..errors import AmpUsageError
from ..formatting import a_or_an
from ..precision import Precision
from ..tensors import StepFn, batch_only, batch_placer, to_device, unpack_loss
from .routing import routed_to
from .scaler import RealSteps, StepReading
from .telemetry import COMPACT_STEPS, StepRecorder


class AmpStep:
    """Runs the user's step function and the GradScaler sequence; knows nothing of epochs."""

    def __init__(self, step_fn: StepFn, model: torch.nn.Module,
                 optimizers: Sequence[torch.optim.Optimizer], chosen: Precision,
                 scaler: torch.amp.GradScaler | None, device: torch.device, *, accum: int,
                 clip: float | None, scheduler: Any, move: bool, log_names: Sequence[str],
                 sync_timing: bool, keep_batches: bool, skip_aware_scheduler: bool = False,
                 copy_outputs: bool = False):
        self.step_fn = step_fn
        self.batch_only = batch_only(step_fn)  # step_fn(batch), called without as_step's frame
        self.model = model
        self.optimizers = optimizers
        self.chosen = chosen
        self.scaler = scaler
        self.reading = StepReading(scaler, optimizers) if scaler is not None else None
        self.device = device
        self.accum = accum
        self.clip = clip
        self.scheduler = scheduler
        self.plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        # --skip-aware-scheduler: the scheduler advances only after its optimizer really stepped
        self.skip_aware = skip_aware_scheduler
        self.real_steps = (RealSteps([scheduler.optimizer])
                           if skip_aware_scheduler and scaler is not None else None)
        self.scheduler_due = True
        self.first_schedule = True  # a run's first scheduler.step() may follow a skipped step
        # CUDA graphs (torch.compile's reduce-overhead) reuse their outputs' memory at the next
        # replay: a loss kept until the refresh must be a copy then (on the device, no sync)
        self.copy_outputs = copy_outputs
        self.move = move
        self.place = batch_placer(device, move)  # batch -> (batch on the device, its size)
        self.log_names = tuple(log_names)
        self.sync_timing = sync_timing
        self.keep_batches = keep_batches  # --diagnose re-runs the window's batches
        self.recorder = StepRecorder(self.log_names)
        # --clip clips what the optimizers step: only those gradients were unscaled.
        self.stepped = stepped_parameters(model, optimizers)
        # One autocast object reused for every micro-batch.
        self.autocast = chosen.autocast()
        self.window_batches: list = []
        # DDP's recipe for accumulation: no gradient all-reduce until a window's last
        # micro-batch (its no_sync() must cover the forward too)
        ddp = routed_to(model) or model  # the route's, or a torchrun script's own DDP
        distributed = isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        self.no_sync = ddp.no_sync if distributed and accum > 1 else None
        self.deferred = False  # the last micro-batch's gradients were not all-reduced
        # Several processes: called with the step before each backward, where DDP's
        # all-reduce makes a rank wait for the others (the launcher's watch on hung ranks)
        self.arrive: Callable[[int], None] | None = None
        self.micro = 0  # micro-batches in the current accumulation window
        self.in_update = False  # between unscale_/step and update: an exception here is costly
        self.loss_sum = None
        self.log_sums: dict = {}
        self.samples = 0
        self.last_batch_size = 0

    def micro_step(self, batch: Any, step: int, epoch: int, closes_window: bool = True) -> None:
        """One micro-batch: forward and backward; `closes_window` when an optimizer step
        follows it (under DDP, only then are the gradients all-reduced)."""
        __tracebackhide__ = True
        if not closes_window and self.no_sync is not None:
            with self.no_sync():
                self.micro_step(batch, step, epoch)
            self.deferred = True
            return
        self.deferred = False
        if self.micro == 0:
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
        batch, self.last_batch_size = self.place(batch)
        if self.keep_batches:
            if self.micro == 0:
                self.window_batches = []
            self.window_batches.append(batch)
        self.samples += self.last_batch_size
        with self.autocast:
            call = self.batch_only
            out = call(batch) if call is not None else self.step_fn(batch, step, epoch)
            if type(out) is torch.Tensor and not out.is_leaf and not self.log_names:
                loss, logs = out, None  # its shape is checked only if backward fails (below)
            else:
                loss, logs = self.unpack(out, training=True)
            scaled = loss / self.accum if self.accum > 1 else loss
        if self.arrive is not None:
            self.arrive(step)
        try:
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        except RuntimeError:
            problem = self._loss_problem(out) if logs is None else None
            if problem is not None:  # e.g. no grad_fn, or not a scalar: say so plainly
                raise problem from None
            raise
        detached = loss.detach()  # made float at drain; summed in fp32 over a window
        if self.micro == 0:
            self.loss_sum = detached.clone() if self.copy_outputs else detached
            for name in self.log_names:
                self.log_sums[name] = _detached(logs[name], self.copy_outputs)
        else:
            self.loss_sum = self.loss_sum.float() + detached.float()
            for name in self.log_names:
                self.log_sums[name] = self.log_sums[name] + _detached(logs[name])
        self.micro += 1

    def optimizer_step(self, step: int, epoch: int, t0: float) -> tuple[Any, Any, float]:
        """Step every optimizer (through the scaler) and record the step. Returns (scale,
        found_inf, the time it ended). The scheduler steps after, in `step_scheduler`."""
        if self.deferred:  # the data ended before the len() it gave: the ranks would diverge
            raise AmpUsageError(
                "the data ended before its len() said, in the middle of an accumulation window "
                "whose gradients were not yet all-reduced: give data whose len() is exact, or "
                "drop --accum")
        scaler = self.scaler
        self.in_update = True
        grad_norm = None
        if self.clip is not None:
            if scaler is not None:
                for opt in self.optimizers:
                    scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.stepped, self.clip)
        lr = self.optimizers[0].param_groups[0]["lr"]
        if type(lr) is not float:  # a tensor lr is read back at drain, as it was now
            lr = lr.detach().clone() if isinstance(lr, torch.Tensor) else lr
        scale = found_inf = None
        if scaler is not None:
            if self.real_steps is not None:
                self.real_steps.begin()
            for opt in self.optimizers:
                scaler.step(opt)
            if self.real_steps is not None:
                self.scheduler_due = self.real_steps.stepped(scaler, self.scheduler.optimizer)
            scale, found_inf = self.reading.update()
        else:
            for opt in self.optimizers:
                opt.step()
        self.in_update = False
        if self.sync_timing:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        logs = tuple([self.log_sums[n] for n in self.log_names]) if self.log_names else ()
        self.recorder.record((step, epoch, now - t0, self.samples, self.micro, self.loss_sum,
                              scale, found_inf, grad_norm, lr, logs,
                              self.scheduler_due if self.skip_aware else None))
        if len(self.recorder.pending) == COMPACT_STEPS:
            self.recorder.compact()
        self.micro = 0
        self.samples = 0
        return scale, found_inf, now

    def step_scheduler(self) -> bool:
        """The recipe's scheduler.step() after each optimizer step (ReduceLROnPlateau: at
        epoch end, with a loss); with skip_aware_scheduler only after real steps. Returns True
        when torch's false "lr_scheduler.step() before optimizer.step()" warning was held back
        (the loss scaler skipped the scheduler's very first optimizer step)."""
        if self.scheduler is None or self.plateau or not self.scheduler_due:
            return False
        held_back = False
        if self.first_schedule:
            self.first_schedule = False
            held_back = self.scaler is not None and _hold_back_false_warning(
                self.scheduler, self.optimizers)
        self.scheduler.step()
        return held_back

    def close(self) -> None:
        """Remove the hooks this step put on the optimizers."""
        if self.real_steps is not None:
            self.real_steps.close()

    def validate(self, val: Iterable, step: int, epoch: int) -> float | None:
        """The step's mean loss over `val` under no_grad and eval(), every module's mode put
        back afterwards; None when `val` has no batches. One sync, at the end."""
        __tracebackhide__ = True
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        total, batches = None, 0
        try:
            with torch.no_grad():
                for batch in val:
                    if self.move:
                        batch = to_device(batch, self.device)
                    with self.autocast:
                        loss, _ = self.unpack(self.step_fn(batch, step, epoch), training=False)
                    value = loss.detach().float().clone()  # see copy_outputs
                    total = value if total is None else total + value
                    batches += 1
        finally:
            for module, mode in modes:
                module.training = mode
        return None if batches == 0 else (total / batches).item()

    def free_grads(self) -> None:
        """Drop every gradient, as zero_grad(set_to_none=True) does, on the optimizers' and
        the model's parameters."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)

    def abandon(self) -> bool:
        """After an error mid-step: drop its partial gradients and the scaler's step state.
        True when the error came inside the optimizer step (some parameters may have moved)."""
        was_updating, self.in_update = self.in_update, False
        self.micro = 0
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        private.forget_step(self.scaler)  # a fresh unscale_/step is allowed on the next run
        return was_updating

    def _loss_problem(self, out: Any) -> AmpUsageError | None:
        """Why a loss that skipped the checks could not be backpropagated, if it is its fault."""
        try:
            self.unpack(out, training=True)
        except AmpUsageError as problem:
            return problem
        return None

    def unpack(self, out: Any, training: bool) -> tuple[torch.Tensor, dict]:
        __tracebackhide__ = True
        try:
            loss, logs = unpack_loss(out, training=training)
        except AmpUsageError:
            stepped = (p for o in self.optimizers for g in o.param_groups for p in g["params"])
            if training and not any(p.requires_grad for p in stepped):  # the cause, then
                raise AmpUsageError("every parameter the optimizers step is frozen "
                                    "(requires_grad=False), so nothing can train: unfreeze "
                                    "what should, e.g. model[-1].requires_grad_(True)") from None
            raise
        for name in self.log_names:
            if name not in logs:
                raise AmpUsageError(f"--log names {name} but the step never assigned it: "
                                    "assign it in the cell body or drop it from --log")
            value = logs[name]
            scalar = (value.numel() == 1 if isinstance(value, torch.Tensor)
                      else isinstance(value, (int, float)))
            if not scalar:
                shape = (f"a tensor of shape {tuple(value.shape)}"
                         if isinstance(value, torch.Tensor) else a_or_an(type(value).__name__))
                raise AmpUsageError(f"--log {name}: a logged value must be a number or a "
                                    f"one-element tensor, got {shape}")
        return loss, logs


def _hold_back_false_warning(scheduler: Any, optimizers: Sequence[torch.optim.Optimizer]
                             ) -> bool:
    """Before a run's first scheduler.step() after a GradScaler step: torch warns "before
    `optimizer.step()`" on a scheduler's first step when its optimizer's step() never ran,
    which after a skip by the scaler is not the user's mistake. Mark the step as taken, with
    torch's own flag (no warnings filter: those are process-wide, and runs train in threads),
    and return True. A scheduler of an optimizer not trained here keeps its warning."""
    opt = getattr(scheduler, "optimizer", None)
    if not private.first_schedule_would_warn(scheduler) or not any(opt is o for o in optimizers):
        return False
    private.mark_optimizer_stepped(opt)
    return True


def _detached(value: Any, copy: bool = False):
    if isinstance(value, torch.Tensor):
        value = value.detach().float().reshape(())
        return value.clone() if copy else value
    return float(value)


def stepped_parameters(model: torch.nn.Module,
                       optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.nn.Parameter]:
    """The parameters the optimizers step, in the model's order (the order clip_grad_norm_
    sums in, so a model fully covered by its optimizers clips exactly as the recipe does),
    then any the model does not hold."""
    in_optimizers = {id(p): p for opt in optimizers for group in opt.param_groups
                     for p in group["params"]}
    ordered = [p for p in model.parameters() if id(p) in in_optimizers]
    seen = {id(p) for p in ordered}
    return ordered + [p for i, p in in_optimizers.items() if i not in seen]


def untrained_parameters(model: torch.nn.Module,
                         optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.nn.Parameter]:
    """Parameters that require grad but that no optimizer steps."""
    stepped = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in stepped]
