"""The learning-rate range test (`--find-lr`, `amp_magics.find_lr`), AMP-aware.

The k-th applied optimizer step trains with lr_k = START * (END / START) ** (k / (N - 1)),
set on every param group (groups keep their ratios to the first). A step the loss scaler
skips trained nothing, so it does not advance k: the same lr is tried again, and the skipped
step is recorded but never used for a suggestion. The test stops early when the smoothed loss
exceeds 4x its minimum or the loss is not finite. Everything it changed (weights, gradients,
modes, optimizer state and lr, scaler, scheduler, RNG, the data's order generators) is put
back afterwards, however it ends: training after the finder is what it would have been.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import AmpUsageError
from ..formatting import format_value
from ..tensors import StepFn
from ..training.engine import prepare
from ..training.objects import TrainingObjects
from ..training.options import MAX_COUNT, TrainOptions
from ..training.telemetry import FOUND_INF, LOSS_SUM, MICRO
from ..training.view import View
from .findings import (DIVERGED, MAX_NONFINITE_IN_A_ROW, MAX_SKIPS_IN_A_ROW, SMOOTHING,
                       LrFinding, lr_schedule)
from .hyperparameters import check_ratios


def check_finder_options(options: TrainOptions, flag: str = "--find-lr",
                         length: str = "--steps N steps, cycling the data",
                         lengths: tuple[str, ...] = ("epochs",)) -> None:
    """Refuse what a finder cannot honour, before anything changes (`lengths`: the options
    that would say how long it trains, which the finder decides: it runs `length`)."""
    refused = [(name, why) for name, why in (
        ("val", "it trains only"),
        ("checkpoint", "it leaves nothing to checkpoint"), ("resume", "it starts from now"),
        ("diagnose", "it trains only"), *((name, f"it runs {length}") for name in lengths))
        if getattr(options, name) not in (None, False)]
    if refused:
        name, why = refused[0]
        raise AmpUsageError(f"{flag} does not take --{name.replace('_', '-')}: {why}. Drop "
                            "it (everything the finder changes is put back afterwards)")
    if options.nproc not in (1, "1"):
        raise AmpUsageError(f"{flag} runs in this process: drop --nproc (the lr it finds "
                            "holds for the same per-rank batch under --nproc)")


class _Finder:
    """Watches each recorded step: sets the next lr, smooths, decides when to stop."""

    def __init__(self, finding: LrFinding, objects: TrainingObjects):
        self.finding, self.objects = finding, objects
        self.lrs = lr_schedule(finding.start, finding.end, finding.steps)
        first = objects.optimizers[0].param_groups[0]["lr"]
        self.ratios = [[float(g["lr"]) / float(first) if float(first) else 1.0
                        for g in opt.param_groups] for opt in objects.optimizers]
        self.k, self.average, self.best = 0, 0.0, math.inf
        self.skips_in_a_row = self.nonfinite_in_a_row = 0
        self.done = False

    def set_lr(self) -> None:
        lr = self.lrs[self.k]
        for opt, ratios in zip(self.objects.optimizers, self.ratios):
            for group, ratio in zip(opt.param_groups, ratios):
                if hasattr(group["lr"], "fill_"):  # a tensor lr (capturable optimizers)
                    group["lr"].fill_(lr * ratio)
                else:
                    group["lr"] = lr * ratio

    def on_step(self, record: tuple) -> None:
        """One recorded optimizer step (a sync: the finder needs its loss now)."""
        loss = float(record[LOSS_SUM]) / record[MICRO]
        found = record[FOUND_INF]
        skipped = found is not None and float(found) > 0
        entry = {"step": len(self.finding.records), "lr": self.lrs[self.k], "loss": loss,
                 "smoothed": None, "skipped": skipped}
        self.finding.records.append(entry)
        if skipped:  # it trained nothing: the same lr is tried again, on the next batch
            self.skips_in_a_row += 1
            self.nonfinite_in_a_row = 0 if math.isfinite(loss) else self.nonfinite_in_a_row + 1
            if self.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                self._stop(f"the loss was {loss} for {self.nonfinite_in_a_row} steps in a row "
                           f"at lr {entry['lr']:.3g}: diverged, or the forward pass overflows "
                           "fp16")
            elif self.skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
                self._stop(f"the loss scaler skipped {self.skips_in_a_row} steps in a row at "
                           f"lr {entry['lr']:.3g}: the gradients overflow fp16 at any scale")
            return None
        if not math.isfinite(loss):
            return self._stop(f"the loss was {loss} at lr {entry['lr']:.3g}")
        self.skips_in_a_row = self.nonfinite_in_a_row = 0
        self.k += 1
        self.average = SMOOTHING * self.average + (1 - SMOOTHING) * loss
        entry["smoothed"] = smoothed = self.average / (1 - SMOOTHING ** self.k)
        self.best = min(self.best, smoothed)
        if self.k > 1 and self.best > 0 and smoothed > DIVERGED * self.best:
            return self._stop(f"the smoothed loss {format_value(smoothed)} exceeded "
                              f"{DIVERGED:g}x its minimum {format_value(self.best)} at lr "
                              f"{entry['lr']:.3g}")
        if self.k == len(self.lrs):
            return self._stop(f"all {self.k} steps ran")
        self.set_lr()
        return None

    def _stop(self, reason: str) -> None:
        self.finding.stop_reason = reason
        self.done = True


def range_test(step_fn: StepFn, options: TrainOptions, finding: LrFinding,
               views: Sequence[View] = ()) -> LrFinding:
    """Run the range test `finding` describes on `options`' objects, filling it in as it goes
    (views may draw it live), and put the objects back as they were."""
    __tracebackhide__ = True
    check_finder_options(options)
    check_ratios("--find-lr", "lr", options.optimizers)  # the groups keep their lr ratios
    if isinstance(options.data, Iterator):  # its steps would run out, and it stays used up
        raise AmpUsageError(
            f"--find-lr cycles the data and puts it back as it was afterwards: --data is a "
            f"one-shot iterator ({type(options.data).__name__}), which cannot be re-read. "
            "Pass a DataLoader or a list of batches")
    objects = finding.objects = TrainingObjects.of(options)
    with objects.borrowed("find-lr", options.data) as loan:
        finder = _Finder(finding, objects)
        # the lr is the finder's to set: a scheduler is kept (and restored) for apply(), not
        # stepped
        run_options = dataclasses.replace(options, steps=None, epochs=MAX_COUNT, scheduler=None,
                                          skip_aware_scheduler=False,
                                          name=options.name or "find-lr")
        training = prepare(step_fn, run_options, views, loan.claim, listed=False)
        finding.run = training.run
        training.run.total_steps = finding.steps
        finding.precision = training.run.precision
        finder.set_lr()
        record = training.amp.recorder.record
        training.amp.recorder.record = lambda step: (record(step), finder.on_step(step))
        training.stop_check = lambda _: finder.done
        try:
            training.execute()
        finally:
            _ended(finding, training.run)
    finding.suggestions = finding.suggest()
    return finding


def _ended(finding: LrFinding, run: Any) -> None:
    finding.status = run.status
    if run.status == "interrupted":
        finding.stop_reason = f"interrupted after {finding.applied_steps} steps"
    elif run.status == "failed":
        finding.error = run.error
        finding.stop_reason = f"the step failed: {run.error}"
    elif not finding.stop_reason:
        finding.stop_reason = "the data ran out"
