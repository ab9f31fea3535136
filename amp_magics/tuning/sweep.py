"""Grid sweeps: one run per setting, every run from the same starting state.

Every run starts from the same model, optimizer, scheduler, loss-scaler and RNG state (a
TrainingObjects snapshot), so differences between runs come from the setting alone.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import AmpUsageError
from ..formatting import format_duration, format_setting, records_html
from ..tensors import StepFn
from ..training.engine import prepare
from ..training.objects import TrainingObjects
from ..training.options import TrainOptions
from ..training.run import Run
from ..training.registry import unique_group
from ..training.view import View
from .findings import SMOOTHING, TrialRecord
from .hyperparameters import (ENGINE_KEYS, apply_hyperparameters, check_values, check_ratios,
                              engine_options, parse_value, ratio_notes)


def parse_sweep(spec: str, optimizers: Sequence[torch.optim.Optimizer]) -> list[dict]:
    """"lr=1e-3,1e-2; weight_decay=0,0.01" -> the grid of settings, in order.

    A swept optimizer hyperparameter is set in every param group; groups that differ keep
    their ratios to the first group (refused where the first group's value is 0)."""
    axes = {}
    for part in filter(str.strip, spec.split(";")):
        key, sep, values = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise AmpUsageError(f"--sweep part {part.strip()!r} is not KEY=V1,V2,...: "
                                'write e.g. --sweep "lr=1e-4,3e-4,1e-3"')
        if key in axes:
            raise AmpUsageError(f"--sweep names {key!r} twice")
        raw = [v.strip() for v in values.split(",") if v.strip()]
        if not raw:
            raise AmpUsageError(f"--sweep {key}= has no values: give at least one, e.g. {key}=0.1")
        axes[key] = [parse_value("--sweep", key, v, optimizers[0]) for v in raw]
        if key not in ENGINE_KEYS:
            check_ratios("--sweep", key, optimizers)
    if not axes:
        raise AmpUsageError('--sweep is empty: write e.g. --sweep "lr=1e-4,3e-4,1e-3"')
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes.values())]


@dataclass
class Sweep:
    settings: list[dict]
    runs: list[Run] = field(default_factory=list)
    best: int | None = None  # index into runs
    criterion: str = "final train loss"

    def rows(self) -> list[dict]:
        out = []
        for setting, run in zip(self.settings, self.runs):
            s = run.summary
            out.append({**setting, "run": run.name, "status": run.status,
                        "final loss": s["final_loss"], "best loss": s["best_loss"],
                        "val loss": s["final_val_loss"], "steps/s": s["steps_per_s"],
                        "peak memory": s["peak_memory"], "skipped": s["skipped_steps"]})
        return out

    def to_pandas(self) -> Any:  # a pandas.DataFrame; pandas is an optional dependency
        import pandas as pd

        return pd.DataFrame(self.rows())

    kind = "sweep"

    @property
    def status(self) -> str:
        """running, finished, or how the run that ended it early ended."""
        if self.runs and self.runs[-1].status != "finished":
            return self.runs[-1].status
        return "finished" if len(self.runs) == len(self.settings) else "running"

    @property
    def stop_reason(self) -> str:
        last = self.runs[-1] if self.runs else None
        if last is None or last.status in ("finished", "running"):
            return ""
        return last.error or f"{last.name} {last.status} after {len(last.history)} steps"

    def trial_records(self) -> list[TrialRecord]:
        """Each setting as a search's trial, for the same trials panel: its curve is what the
        sweep ranks by (the validation loss at epoch ends with `val`, else the train loss
        smoothed as a search smooths it), its objective the run's score."""
        states = {"finished": "COMPLETE", "running": "RUNNING"}
        out = []
        for i, (setting, run) in enumerate(zip(self.settings, self.runs)):
            value = score(run)
            out.append(TrialRecord(
                i, setting, states.get(run.status, "FAIL"),
                value if math.isfinite(value) else None, len(run.history),
                "" if run.status in states else (run.error or run.status), _curve(run), run))
        return out

    def progress(self) -> str:
        """ "setting 2 of 6 · best 0.412 (lr=0.01) · ETA 40s", as a search's progress reads."""
        done = [r for r in self.runs if r.done]
        best = (f"best {score(self.runs[self.best]):.4g} "
                f"({setting_label(self.settings[self.best])})" if self.best is not None
                else "best: none yet")
        left = len(self.settings) - len(done)
        eta = (f" · ETA {format_duration(sum(r.wall_time for r in done) / len(done) * left)}"
               if done and left else "")
        return f"setting {len(done)} of {len(self.settings)} · {best}{eta}"

    def _repr_html_(self) -> str:
        return records_html(self.rows(), f"{self.progress()} (best by {self.criterion}, "
                            "highlighted)", self.best)

    def __repr__(self) -> str:
        best = self.runs[self.best].name if self.best is not None else "-"
        return f"<Sweep of {len(self.runs)} runs, best {best} by {self.criterion}>"


def _curve(run: Run) -> list[tuple[int, float]]:
    if run.val_history:
        return [(v["step"], v["val_loss"]) for v in run.val_history]
    points, average, applied = [], 0.0, 0
    for r in run.history:
        if r["skipped"] or r["loss"] is None or not math.isfinite(r["loss"]):
            continue  # as a search's reports: never a step the loss scaler skipped
        applied += 1
        average = SMOOTHING * average + (1 - SMOOTHING) * r["loss"]
        points.append((r["step"], average / (1 - SMOOTHING ** applied)))
    return points


def score(run: Run) -> float:
    s = run.summary
    value = s["final_val_loss"] if s["final_val_loss"] is not None else s["final_loss"]
    return value if value is not None and math.isfinite(value) else math.inf


def setting_label(setting: dict) -> str:
    return " ".join(f"{k}={format_setting(v)}" for k, v in setting.items())


def sweep(step_fn: StepFn, settings: list[dict], options: TrainOptions, views: Sequence[View] = (),
          keep_best: bool = False, on_run: Callable[[Sweep], None] | None = None) -> Sweep:
    """Train once per setting from the same starting state; return the Sweep.

    The model ends in the starting state, or with `keep_best` in the best run's final state
    (best by validation loss when `val` is given, else by final train loss). An exception or
    an interrupt ends the sweep early; the model is restored all the same.
    """
    __tracebackhide__ = True
    check_values("--sweep", options, {k: [s[k] for s in settings] for k in settings[0]})
    objects = TrainingObjects.of(options)
    name = unique_group(options.name or "sweep")  # a second sweep's runs: sweep2[...]
    result = Sweep(settings, criterion="validation loss" if options.val is not None
                   else "final train loss")
    with objects.borrowed(name, options.data) as loan:
        for i, setting in enumerate(settings):
            loan.start.restore()
            run = train_setting(step_fn, setting, options, views, loan.claim, name)
            result.runs.append(run)
            if run.status == "finished" and (result.best is None
                                             or score(run) < score(result.runs[result.best])):
                result.best = i
                if keep_best:
                    loan.returned = objects.snapshot(options.data)
            if on_run is not None:  # the one that ended it early too: the panel says so
                on_run(result)
            if run.status != "finished":
                break
    return result


def train_setting(step_fn: StepFn, setting: dict, options: TrainOptions, views: Sequence[View],
                  claim: Any, name: str, watch: Callable[[Any], None] | None = None) -> Run:
    """One run with `setting` applied, as a sweep (and a search) trains each: its optimizer
    hyperparameters set on every group (ratios kept), its engine options passed, the run
    named `name[key=value ...]`. `watch(training)` may hook into the prepared run."""
    __tracebackhide__ = True
    applied = apply_hyperparameters(setting, options.optimizers, options.scheduler)
    run_options = dataclasses.replace(
        options, name=f"{name}[{setting_label(setting)}]",
        config={**options.config, "sweep": setting, "set": applied}, **engine_options(setting))
    training = prepare(step_fn, run_options, views, claim)
    training.run.notes += ratio_notes(applied)
    if watch is not None:
        watch(training)
    training.execute()
    return training.run
