"""The AMP training loop: epochs, stopping, validation, refreshes, checkpoints, failures.

`prepare(step_fn, options)` checks and registers a Run; `Training.execute()` drives it. One
micro-batch and one optimizer step are `AmpStep`'s (step.py), exactly as the PyTorch AMP
recipes write them; every `refresh_seconds` the recorded steps are drained into the Run and
its views are told. It knows nothing of IPython or widgets.
"""
from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any


from .. import ownership, precision as precision_policy
from ..errors import AmpUsageError
from ..precision import SCALER_DEFAULTS
from ..tensors import StepFn, as_step, is_out_of_memory, model_device, seed_everything
from . import scaler as scalers
from .checkpoint import load_checkpoint, open_epoch, save_checkpoint
from .compiling import compile_for_run
from .failures import release_memory
from .objects import TrainingObjects
from .options import TrainOptions, data_length
from .registry import next_name, register
from .run import Run
from .step import AmpStep, untrained_parameters
from .telemetry import RunBooks, reset_peak
from .view import View, notify

_END = object()  # the data ran out
FALSE_SCHEDULER_WARNING = (
    "the loss scaler skipped the first optimizer step (inf/NaN gradients at the initial "
    "scale), so PyTorch's warning \"Detected call of lr_scheduler.step() before "
    "optimizer.step()\" would be a false alarm and is not shown. As in PyTorch's recipe, the "
    "schedule still advanced at that step; --skip-aware-scheduler advances it only after "
    "steps that happened")


def prepare(step_fn: StepFn, options: TrainOptions, views: Sequence[View] = (),
            claim: ownership.Claim | None = None, listed: bool = True) -> "Training":
    """Check everything, own the model and register the Run, without training yet:
    `.execute()` trains and then lets the model go.

    Bad input raises AmpUsageError before anything changes, and `ownership.Owned` when another
    run is training the model. A sweep passes its own `claim` for all of its runs. A tool that
    trains only to measure (a finder) passes `listed=False`: its run is not in `runs()`.
    `options.resume` loads its checkpoint into the model, optimizers, scaler and scheduler here.
    """
    step_fn = as_step(step_fn)
    views = checked_views(views)
    objects = TrainingObjects.of(options)
    own = claim is None
    if own:
        claim = objects.claim(options.name or "a run")
    try:
        return _prepare(step_fn, options, objects, views, claim, own, listed)
    except BaseException:
        if own:
            claim.release()
        raise


def checked_views(views: Sequence[View]) -> list[View]:
    for view in views:
        if not isinstance(view, View):
            raise AmpUsageError(f"observers must be amp_magics View objects (subclass "
                                f"amp_magics.View), got {type(view).__name__}")
    return list(views)


def new_run(o: TrainOptions, *, device: str, precision: str, reason: str = "",
            scaler: Any = None, **config: Any) -> Run:
    """The Run these options start (not registered yet): one way for every launcher."""
    return Run(
        o.name or next_name(),
        config={"epochs": o.epoch_limit, "steps": o.steps, "seed": o.seed,
                "lr": o.optimizers[0].param_groups[0].get("lr"),
                "optimizer": ", ".join(type(opt).__name__ for opt in o.optimizers),
                "settings": o.settings(), **config, **o.config},
        device=device, precision=precision, precision_reason=reason,
        scaler_settings=scalers.describe(scaler),
        total_steps=o.total_steps, steps_per_epoch=o.steps_per_epoch,
        model_label=type(o.model).__name__, model=o.model)


def _prepare(step_fn: StepFn, o: TrainOptions, objects: TrainingObjects, views: list[View],
             claim: ownership.Claim, own: bool, listed: bool) -> "Training":
    device = model_device(o.model)
    chosen = precision_policy.resolve(o.dtype, device)
    objects = objects.with_scaler(_run_scaler(o, chosen, device))
    run = new_run(o, device=str(device), precision=chosen.name, reason=chosen.reason,
                  scaler=objects.scaler)
    run.notes += _start_notes(o, chosen, device)
    resumed = _resume(o.resume, objects, run) if o.resume is not None else None
    if listed:
        register(run)
    claim.run = run
    amp = AmpStep(step_fn, o.model, o.optimizers, chosen, objects.scaler, device,
                  accum=o.accum, clip=o.clip, scheduler=o.scheduler, move=o.move,
                  log_names=o.log, sync_timing=o.sync_timing and device.type == "cuda",
                  keep_batches=o.diagnose, skip_aware_scheduler=o.skip_aware_scheduler,
                  copy_outputs=o.compile_mode in ("reduce-overhead", "max-autotune"))
    return Training(run, amp, o, objects, views, resumed, claim, own)


def _run_scaler(o: TrainOptions, chosen: precision_policy.Precision, device: Any) -> Any:
    """The user's scaler, or the one kept for the first optimizer where fp16 needs one."""
    if o.scaler is None and chosen.needs_scaler:
        return scalers.persistent_scaler(o.optimizers[0], device.type,
                                         {**SCALER_DEFAULTS, **o.scaler_settings})
    chosen.check_scaler_settings(bool(o.scaler_settings))
    return o.scaler


def _start_notes(o: TrainOptions, chosen: precision_policy.Precision, device: Any) -> list[str]:
    notes = []
    idle = untrained_parameters(o.model, o.optimizers)
    if idle:
        notes.append(
            f"{len(idle)} parameter tensor(s) ({sum(p.numel() for p in idle):,} values) require "
            "grad but no optimizer steps them: backward still computes their gradients (time "
            "and memory). Set requires_grad=False on them, or give them to an optimizer.")
    if chosen.name == "fp16" and device.type == "cpu" and precision_policy.cpu_fp16_note():
        notes.append(precision_policy.cpu_fp16_note())  # None where the CPU has native fp16
    return notes


def _resume(path: str, objects: TrainingObjects, run: Run) -> dict:
    try:
        resumed = load_checkpoint(path, objects)
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise AmpUsageError(f"--resume {path}: {e}") from None
    run.history, run.val_history = resumed["history"], resumed["val_history"]
    run.notes.append(f"resumed from {path} at step {resumed['step']}")
    return resumed


def finish_run(run: Run, status: str, error: str | None, views: list[View],
               held: str | None) -> None:
    """Mark how the run ended (`error`: what failed, in a line) and tell its views: one way
    for every launcher. `held` says where the objects stand after an interrupt (None: said
    elsewhere)."""
    run.status = status
    run.error = error
    if status == "interrupted" and held is not None:
        run.notes.append(f"interrupted after {len(run.history)} optimizer step(s){held}")
    notify(views, "on_end", run)


class Training:
    """One run in progress; `execute()` drives it and always leaves a consistent Run behind."""

    def __init__(self, run: Run, amp: AmpStep, options: TrainOptions,
                 objects: TrainingObjects, views: list[View], resumed: dict | None,
                 claim: ownership.Claim, owns_claim: bool):
        self.run = run
        self.amp = amp
        self.options = options
        self.objects = objects  # with the scaler this run uses
        self.views = views
        self.claim = claim
        self.step_lock = claim.step_lock  # held around each optimizer step's work
        self.owns_claim = owns_claim  # released when this run ends (a sweep keeps its own)
        self.diagnose = options.diagnose  # a sync per step until the first overflow
        self.resumed = resumed
        self.step = resumed["step"] if resumed else 0  # optimizer steps done (global on resume)
        self.start_epoch = resumed["epoch"] if resumed else 0
        # Where training stands at the last step boundary: (epoch, batches read, epoch RNG).
        self.position = (self.start_epoch, 0, None)
        self.step_limit = math.inf if options.steps is None else options.steps
        self.batches_in_epoch = 0
        self.epoch_rng = None
        self.books = RunBooks(run, amp.recorder, amp.device, views, options.refresh_seconds)
        # Several processes stop at one step boundary they agree on (distributed.py).
        self.stop_check: Callable[[int], bool] | None = None
        # Several processes (a distributed MergedHistory): (history, val_history) merged over
        # every rank, a collective that each rank calls at the same point: at each checkpoint,
        # and once all of them ended training together (the history is the merged one from
        # then on: None after); `.mean(value)` averages ReduceLROnPlateau's metric
        self.merge_ranks: Any = None
        # a rank other than 0 takes part in each checkpoint's merge without writing it
        self.writes_checkpoints = True
        # the last checkpoint written: (its step, the validation passes it holds)
        self.saved: tuple[int, int] | None = None
        # a forked rank leaves saying where the objects stand to the notebook process
        self.says_where_held = True

    # -- driver --------------------------------------------------------------------------
    def execute(self) -> None:
        """Train until done, stopped or failed; re-raise the user's exception after recording."""
        __tracebackhide__ = True
        try:
            if self.options.seed is not None and self.resumed is None:
                seed_everything(self.options.seed)
            with stop_on_sigint(self.run, self.options.handle_sigint), self._compiled():
                self._execute()
        finally:
            self.release()

    @contextlib.contextmanager
    def _compiled(self) -> Iterator[None]:
        """--compile: the model's calls go through compiled code while it trains."""
        if not self.options.compile:
            yield
            return
        uncompile = compile_for_run(self.options.model, self.options.compile_mode or "default")
        self.run.compiling = True  # shown until the first step has compiled
        try:
            yield
        finally:
            self.run.compiling = False
            uncompile()

    def release(self) -> None:
        """Let the model go (also for a prepared run that will never execute)."""
        self.amp.close()
        if self.owns_claim:
            self.claim.release()

    def _execute(self):
        __tracebackhide__ = True
        reset_peak(self.amp.device)
        self.books.start()
        error, partial = None, False
        try:
            self._train()
            status = "interrupted" if self.run.stop_requested else "finished"
            agreed = self.stop_check is not None  # an interrupt stopped every rank together
            if self.merge_ranks is not None and (status == "finished" or agreed):
                self._adopt_merged_history()
            if self.options.checkpoint and self.saved != (self.step, len(self.run.val_history)):
                with self.step_lock:
                    self._save_checkpoint()
        except KeyboardInterrupt:
            status = "interrupted"
            self.run.stop_reason = "KeyboardInterrupt"  # mid-step: no checkpoint at the stop
            partial = self._abandon_step()
        except BaseException as e:  # the user's code or data failed: keep what was done
            status, error = "failed", e
            partial = self._abandon_step()
            if is_out_of_memory(e):
                self.run.notes.append(release_memory(
                    e, self.amp.device, batch_size=self.amp.last_batch_size,
                    accum=self.options.accum, step=self.step, precision=self.run.precision))
        self._finish(status, error, partial)
        if error is not None:
            raise error

    def _train(self):
        __tracebackhide__ = True
        epochs, epoch = self.options.epoch_limit, self.start_epoch
        while epochs is None or epoch < epochs:
            if self._should_stop():
                break
            self.run.epoch = epoch
            batches, ran_out = self._train_epoch(epoch)
            if batches == 0:
                if epoch == 0:
                    raise AmpUsageError("the data produced no batches: check that the "
                                        "DataLoader/iterable is not empty")
                self.run.notes.append(
                    f"the data was exhausted after {epoch} epoch(s): an iterator cannot be "
                    "re-read; pass a DataLoader or a list to train for several epochs")
                break
            if not ran_out:  # stopped mid-epoch: no epoch end, and a checkpoint resumes here
                break
            with self.step_lock:
                val_loss = self._validate(epoch) if self.options.val is not None else None
                if self.amp.plateau:
                    metric = val_loss if val_loss is not None else self._epoch_loss(epoch)
                    if self.merge_ranks is not None:  # every rank's lr must move alike
                        metric = self.merge_ranks.mean(metric)
                    self.amp.scheduler.step(metric)
                epoch += 1
                self.position = (epoch, 0, None)
                last = epochs is not None and epoch == epochs  # saved once, after training
                if self.options.checkpoint and self.options.every is None and not last:
                    self._save_checkpoint()
            self.books.refresh(self.step)

    def _train_epoch(self, epoch: int) -> tuple[int, bool]:
        """One pass over the data: one optimizer step per window of `accum` batches, each
        under the step lock (taken after the window's first batch is read). Returns the
        batches read and whether the data ran out (else training stopped mid-epoch)."""
        __tracebackhide__ = True
        amp, accum, lock = self.amp, self.options.accum, self.step_lock
        resumed, self.resumed = self.resumed, None
        it, self.epoch_rng, self.batches_in_epoch = open_epoch(
            self.options.data, resumed, keep_rng=bool(self.options.checkpoint))
        # the epoch's last batch closes a window too (unknown for a stream: every batch is
        # then treated as one that may, which under DDP only costs an all-reduce)
        last = data_length(self.options.data) if amp.no_sync is not None else None
        while not self._should_stop():
            batch = next(it, _END)
            if batch is _END:
                return self.batches_in_epoch, True
            # uncontended: taken without waiting; a waiting measurement goes first
            if self.claim.paused_for is not None or not lock.acquire(False):
                self._wait_at_boundary()
            try:
                while True:
                    self.batches_in_epoch += 1
                    amp.micro_step(batch, self.step, epoch, amp.micro + 1 == accum
                                   or last is None or self.batches_in_epoch == last)
                    if amp.micro == accum:
                        break
                    batch = next(it, _END)
                    if batch is _END:  # a last, shorter window still gets its optimizer step
                        break
                now = self._optimizer_step(epoch)
            finally:
                lock.release()
            if now >= self.books.next_refresh:
                self.books.refresh(self.step)
            if batch is _END:
                return self.batches_in_epoch, True
        return self.batches_in_epoch, False

    def _optimizer_step(self, epoch: int) -> float:
        __tracebackhide__ = True
        scale, found_inf, now = self.amp.optimizer_step(self.step, epoch, self.books.t0)
        if self.diagnose:
            self._diagnose_if_overflowed(scale, found_inf)
        self.step += 1  # the update happened and is recorded, whatever the scheduler does
        if self.run.compiling:  # show the compile time as soon as it is known
            self.run.compiling = False
            self.books.next_refresh = now
        self.position = (epoch, self.batches_in_epoch, self.epoch_rng)
        if self.amp.scheduler is not None:
            self._step_scheduler()
        every = self.options.every
        if every is not None and self.step % every == 0:
            self._save_checkpoint()
        return now

    def _step_scheduler(self) -> None:
        try:
            if self.amp.step_scheduler():
                self.run.notes.append(FALSE_SCHEDULER_WARNING)
        except Exception:
            self.run.notes.append(f"the scheduler failed after optimizer step {self.step - 1}: "
                                  "that step updated the model and is in the history")
            raise

    def _wait_at_boundary(self) -> None:
        """A measurement holds the step lock: show why the run pauses, then wait for it."""
        claim = self.claim
        self.run.paused_for = claim.paused_for or "a measurement"
        self.books.refresh(self.step)
        # let it take the lock before this thread asks again (a lock is not fair)
        while claim.paused_for is not None and not claim.held.wait(0.05):
            pass
        self.step_lock.acquire()
        self.run.paused_for = None

    def _should_stop(self) -> bool:
        return (self.run.stop_requested or self.step >= self.step_limit
                or (self.stop_check is not None and self.stop_check(self.step)))

    def _diagnose_if_overflowed(self, scale: Any, found_inf: Any) -> None:
        __tracebackhide__ = True
        from ..diagnostics.overflow import diagnose_window

        amp = self.amp
        found = diagnose_window(amp.step_fn, self.options.model, amp.window_batches, amp.chosen,
                                scale, found_inf, amp.loss_sum)
        if found is not None:  # once per run: the first overflow is the informative one
            self.diagnose = False
            self.run.diagnosis, what = found
            self.run.notes.append(f"--diagnose: step {self.step} {what}. "
                                  f"{self.run.diagnosis.advice}")

    # -- epoch end -----------------------------------------------------------------------
    def _validate(self, epoch: int) -> float | None:
        __tracebackhide__ = True
        with self.books.compiling_expected():  # --compile: eval and no_grad compile anew
            val_loss = self.amp.validate(self.options.val, self.step, epoch)
        if val_loss is None:
            self.run.notes.append("--val produced no batches: no validation loss")
        else:
            self.run.val_history.append({"epoch": epoch, "step": self.step, "val_loss": val_loss})
        return val_loss

    def _epoch_loss(self, epoch: int) -> float:
        losses = [r["loss"] for r in self.run.history if r["epoch"] == epoch]
        return sum(losses) / len(losses) if losses else math.inf

    # -- checkpoints and the end --------------------------------------------------------
    def _save_checkpoint(self) -> None:
        self.books.drain()
        history, val_history = self.run.history, self.run.val_history
        if self.merge_ranks is not None:  # every rank is here, at this same step
            history, val_history = self.merge_ranks(history, val_history)
        if self.writes_checkpoints:
            epoch, batches, epoch_rng = self.position
            save_checkpoint(self.options.checkpoint, self.objects, step=self.step, epoch=epoch,
                            batches_in_epoch=batches, epoch_rng=epoch_rng, history=history,
                            val_history=val_history)
        self.saved = (self.step, len(val_history))

    def _adopt_merged_history(self) -> None:
        """Every rank ended training at the same step: from here on (the final checkpoint,
        the views' end) the history is the one merged over ranks. The views first get this
        rank's own last records (a parent process merges those itself). A checkpoint
        written at this step, before no later validation pass, holds the same merged history:
        it is not written again."""
        self.books.refresh(self.step)
        run = self.run
        run.history, run.val_history = self.merge_ranks(run.history, run.val_history)
        self.merge_ranks = None  # merged: a final checkpoint takes it as it is

    def _abandon_step(self) -> bool:
        """Drop the step an error or an interrupt cut short; True when that came inside the
        optimizer step, which may have updated some parameters already."""
        with self.step_lock:
            return self.amp.abandon()

    def _finish(self, status: str, error: BaseException | None, partial: bool) -> None:
        run = self.run
        if not self.options.keep_grads:  # a model's worth of memory nobody reads any more
            with self.step_lock:
                self.amp.free_grads()
        try:
            self.books.refresh(self.step)
        except Exception as e:  # e.g. the device itself failed: keep the status honest
            run.notes.append(f"could not read the last steps back: {e!r}")
        if partial and status == "failed":
            run.notes.append("the error came during the optimizer step: some parameters may "
                             "have been updated by it")
        held = (f" and during the next one, which may have updated some parameters already: "
                f"the {held_objects(self.objects)} otherwise as after the last completed step"
                if partial else f": {held_objects(self.objects)} as after the last completed step")
        if not self.says_where_held:
            held = None
        finish_run(run, status, None if error is None else f"{type(error).__name__}: {error}",
                   self.views, held)


def held_objects(objects: TrainingObjects) -> str:
    """ "model, optimizer and scaler are": what a stopped run leaves consistent."""
    held = ["model", "optimizers" if len(objects.optimizers) > 1 else "optimizer"]
    held += [name for name, part in (("scaler", objects.scaler), ("scheduler", objects.scheduler))
             if part is not None]
    return f"{', '.join(held[:-1])} and {held[-1]} are"


@contextlib.contextmanager
def stop_on_sigint(run: Run, enabled: bool) -> Iterator[None]:
    """First Ctrl-C: stop after the current optimizer step. A second one interrupts at once."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous) and previous not in (signal.SIG_IGN, signal.SIG_DFL):
        previous = signal.default_int_handler

    def stop_softly(signum, frame):
        run.stop_reason = "sigint"  # a script's train() raises after the clean stop (api.py)
        run.request_stop()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, stop_softly)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
