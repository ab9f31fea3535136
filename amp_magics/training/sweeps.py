"""Sweeps and precision showdowns: several runs from one captured starting state.

Every run starts from the same model, optimizer, scheduler, loss-scaler and RNG state, so
differences between runs come from the setting alone. No IPython, no widgets.
"""
from __future__ import annotations

import copy
import html
import itertools
import math
import statistics
from dataclasses import dataclass, field

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import scaler as scalers
from .. import ownership
from .engine import prepare
from .options import TrainOptions
from .view import View
from ..errors import AmpUsageError
from ..precision import CHOICES, resolve
from ..tensors import capture_rng, model_device, restore_rng
from ..views.format import format_percent, format_setting, records_html
from .run import unique_group

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ..tensors import StepFn
    from .run import Run

ENGINE_KEYS = {"accum": int, "clip": float, "init_scale": float, "dtype": str}


# -- parsing ------------------------------------------------------------------------------
def parse_sweep(spec: str, optimizers: Sequence[torch.optim.Optimizer],
                number: Callable[[str], float] = float) -> list[dict]:
    """"lr=1e-3,1e-2; weight_decay=0,0.01" -> the grid of settings, in order.

    A swept optimizer hyperparameter is set in every param group; groups that differ keep
    their ratios to the first group (refused where the first group's value is 0)."""
    optimizer = optimizers[0]
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
        axes[key] = [_parse_value(key, v, optimizer, number) for v in raw]
        if key not in ENGINE_KEYS:
            _check_ratios(key, optimizers)
    if not axes:
        raise AmpUsageError('--sweep is empty: write e.g. --sweep "lr=1e-4,3e-4,1e-3"')
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes.values())]


def _parse_value(key, text, optimizer, number):
    hyper = optimizer.param_groups[0]
    if key == "dtype":
        if text not in CHOICES:
            raise AmpUsageError(f"--sweep dtype={text}: choose from {', '.join(CHOICES)}")
        return text
    if key in ENGINE_KEYS:
        kind = ENGINE_KEYS[key]
    elif key in hyper and isinstance(hyper[key], (int, float)) and not isinstance(hyper[key], bool):
        kind = float
    else:
        tunable = sorted(k for k, v in hyper.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise AmpUsageError(f"--sweep cannot set {key!r}: use an optimizer hyperparameter of "
                            f"{type(optimizer).__name__} ({', '.join(tunable)}) or one of "
                            f"{', '.join(sorted(ENGINE_KEYS))}")
    try:
        value = number(text)
    except ValueError:
        raise AmpUsageError(f"--sweep {key}={text}: not a number") from None
    if kind is int:
        if value != int(value):
            raise AmpUsageError(f"--sweep {key}={text}: must be a whole number")
        value = int(value)
    return value


def parse_compare(spec: str, device: str | torch.device) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if len(names) < 2:
        raise AmpUsageError("--compare needs at least two precisions, e.g. --compare fp32,bf16")
    for name in names:
        if name not in ("fp32", "fp16", "bf16"):
            raise AmpUsageError(f"--compare {name}: choose from fp32, fp16, bf16")
        resolve(name, device)  # a dtype the device lacks raises PrecisionError here
    if len(set(names)) != len(names):
        raise AmpUsageError("--compare names a precision twice")
    return names


# -- the shared starting state ----------------------------------------------------------------
class StartingState:
    """Model, optimizers, scheduler, persistent scaler and RNG, as they were at capture."""

    def __init__(self, model: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer],
                 scheduler: Any = None):
        self.model, self.optimizers, self.scheduler = model, list(optimizers), scheduler
        self.model_state = _clone(model.state_dict())
        self.optimizer_states = [copy.deepcopy(o.state_dict()) for o in self.optimizers]
        self.scheduler_state = copy.deepcopy(scheduler.state_dict()) if scheduler else None
        self.scaler_state = scalers.snapshot(self.optimizers[0])
        self.rng = capture_rng()

    def restore(self) -> None:
        self.model.load_state_dict(self.model_state)
        for opt, state in zip(self.optimizers, self.optimizer_states):
            opt.load_state_dict(copy.deepcopy(state))
            opt.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(copy.deepcopy(self.scheduler_state))
        scalers.restore(self.optimizers[0], self.scaler_state)
        restore_rng(self.rng)


def _clone(state):
    return {k: v.detach().clone() for k, v in state.items()}


def _group_values(key: str, optimizers: Sequence[torch.optim.Optimizer]) -> list:
    return [group[key] for opt in optimizers for group in opt.param_groups]


def _check_ratios(key: str, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    values = _group_values(key, optimizers)
    if len(set(values)) > 1 and values[0] == 0:
        raise AmpUsageError(f"--sweep {key}: the param groups have different values "
                            f"({', '.join(map(str, values))}) and the first is 0, so their "
                            "ratios cannot be kept: give the first group a non-zero value, or "
                            "sweep the groups in your own loop")


def apply_hyperparameters(setting: dict, optimizers: Sequence[torch.optim.Optimizer],
                          scheduler: Any) -> dict[str, list]:
    """Set optimizer hyperparameters (the engine's own keys are passed as options instead).

    Every param group gets the value times its ratio to the first group, so groups that
    differ (a smaller lr for a backbone) keep their proportions. Returns each key's values
    as set, group by group."""
    applied = {}
    for key, value in setting.items():
        if key in ENGINE_KEYS:
            continue
        first = _group_values(key, optimizers)[0]
        for opt in optimizers:
            for group in opt.param_groups:
                group[key] = value if group[key] == first else value * group[key] / first
                if key == "lr" and "initial_lr" in group:
                    group["initial_lr"] = group["lr"]
        applied[key] = _group_values(key, optimizers)
        if key == "lr" and scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [g["lr"] for g in scheduler.optimizer.param_groups]
    return applied


# -- sweeps -------------------------------------------------------------------------------
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

    def _repr_html_(self) -> str:
        return records_html(self.rows(), f"best by {self.criterion} highlighted", self.best)

    def __repr__(self) -> str:
        best = self.runs[self.best].name if self.best is not None else "-"
        return f"<Sweep of {len(self.runs)} runs, best {best} by {self.criterion}>"


def score(run: Run) -> float:
    s = run.summary
    value = s["final_val_loss"] if s["final_val_loss"] is not None else s["final_loss"]
    return value if value is not None and math.isfinite(value) else math.inf


def sweep(step_fn: StepFn, settings: list[dict], options: TrainOptions, views: Sequence[View] = (),
          keep_best: bool = False) -> Sweep:
    """Train once per setting from the same starting state; return the Sweep.

    The model ends in the starting state, or with `keep_best` in the best run's final state
    (best by validation loss when `val` is given, else by final train loss). An exception or
    an interrupt ends the sweep early; the model is restored all the same.
    """
    __tracebackhide__ = True
    model, optimizers, scheduler = options.model, options.optimizers, options.scheduler
    name = unique_group(options.name or "sweep")  # a second sweep's runs: sweep2[...]
    claim = _claim(name, options)
    start = StartingState(model, optimizers, scheduler)
    result = Sweep(settings, criterion="validation loss" if options.val is not None
                   else "final train loss")
    best_state = None
    try:
        for i, setting in enumerate(settings):
            start.restore()
            applied = apply_hyperparameters(setting, optimizers, scheduler)
            label = " ".join(f"{k}={format_setting(v)}" for k, v in setting.items())
            run_options = dataclasses.replace(
                options, name=f"{name}[{label}]",
                config={**options.config, "sweep": setting, "set": applied},
                **{k: v for k, v in setting.items() if k in ENGINE_KEYS})
            training = prepare(step_fn, run_options, views, claim)
            training.run.notes += [
                f"param groups kept their ratios: {key} set to "
                f"{', '.join(f'{v:.4g}' for v in values)}"
                for key, values in applied.items() if len(set(values)) > 1]
            result.runs.append(training.run)
            training.execute()
            if training.run.status != "finished":
                break
            if result.best is None or score(training.run) < score(result.runs[result.best]):
                result.best = i
                if keep_best:
                    best_state = StartingState(model, optimizers, scheduler)
    finally:
        (best_state or start).restore()
        claim.release()
    return result


# -- precision showdown ---------------------------------------------------------------------
@dataclass
class Showdown:
    runs: dict[str, Run]  # precision name -> Run
    warmup: int
    peaks: dict = field(default_factory=dict)  # precision -> bytes above the starting state
    peak_method: str = ""

    @property
    def memory_label(self) -> str:
        """What the memory column measured: not the runs' "peak memory" (the whole process)."""
        return ("peak memory above the start" if self.peak_method.startswith("CUDA")
                else "memory kept for backward")

    def rows(self) -> list[dict]:
        base = self.runs.get("fp32")
        out = []
        for precision, run in self.runs.items():
            out.append({"precision": precision, "median step ms": self.step_ms(run),
                        self.memory_label: self.peaks.get(precision),
                        FINAL_LOSS: final_loss(run),
                        LOSS_GAP: _relative(final_loss(run), final_loss(base))
                        if base is not None else None,
                        "skipped": run.summary["skipped_steps"]})
            if any(r.compiles for r in self.runs.values()):  # --compile: apart from the steps
                out[-1]["compile s"] = run.compile_seconds
        return out

    def step_ms(self, run: Run) -> float | None:
        times = [r["time"] for r in run.history]
        deltas = [b - a for a, b in zip(times, times[1:])][self.warmup:]
        return statistics.median(deltas) * 1e3 if deltas else None

    def verdicts(self) -> list[str]:
        base = self.runs.get("fp32")
        if base is None:
            return []
        base_ms, base_peak = self.step_ms(base), self.peaks.get("fp32")
        lines = []
        for precision, run in self.runs.items():
            if precision == "fp32":
                continue
            parts = []
            ms = self.step_ms(run)
            if ms and base_ms:
                parts.append(speed_words(base_ms, ms))
            peak = self.peaks.get(precision)
            if peak is not None and base_peak:
                change = 1 - peak / base_peak
                parts.append(f"{abs(change):.0%} {'less' if change >= 0 else 'more'} "
                             f"{self.memory_label}")
            gap = _relative(final_loss(run), final_loss(base))
            if gap is not None:
                parts.append(f"final loss within {format_percent(gap)} of fp32"
                             if math.isfinite(gap) else "loss not finite")
            skipped = run.summary["skipped_steps"]
            if skipped:
                parts.append(f"{skipped} skipped step{'s' * (skipped != 1)}")
            lines.append(f"{precision}: " + ", ".join(parts))
        return lines

    def _repr_html_(self) -> str:
        verdict = "".join(f"<li>{html.escape(v)}</li>" for v in self.verdicts())
        caption = f"memory: {self.peak_method}"
        return records_html(self.rows(), caption, byte_columns=(self.memory_label,),
                            formats={LOSS_GAP: format_percent}) + f"<ul>{verdict}</ul>"

    def __repr__(self) -> str:
        return "\n".join(self.verdicts()) or f"<Showdown of {', '.join(self.runs)}>"


FINAL_LOSS = "final loss (mean of last 5)"
LOSS_GAP = "loss gap to fp32"
SAME_SPEED = 0.10  # step times within 10% of fp32's read as "about as fast"


def speed_words(base_ms: float, ms: float) -> str:
    """fp32's median step time against another's, in words: "1.8x faster", or within
    SAME_SPEED "about as fast as fp32 (3% slower)" (a "1x slower" says nothing)."""
    ratio = base_ms / ms
    if abs(ms / base_ms - 1) < SAME_SPEED:
        change = ms / base_ms - 1
        return f"about as fast as fp32 ({abs(change):.0%} {'slower' if change > 0 else 'faster'})"
    return f"{ratio:.2g}x faster" if ratio >= 1 else f"{1 / ratio:.2g}x slower"


def final_loss(run: Run, last: int = 5) -> float | None:
    """Mean of the last few losses: a single step's loss is too noisy to compare."""
    losses = [r["loss"] for r in run.history[-last:]]
    return sum(losses) / len(losses) if losses else None


def _relative(value, reference):
    if value is None or reference is None:
        return None
    if not (math.isfinite(value) and math.isfinite(reference)):
        return math.inf
    return abs(value - reference) / max(abs(reference), 1e-12)


def showdown(step_fn: StepFn, precisions: list[str], options: TrainOptions,
             views: Sequence[View] = ()) -> Showdown:
    """Run `options.steps` optimizer steps in each precision from the same starting state.

    Step times are medians after warm-up (synchronised on CUDA). Memory: on CUDA the allocator
    peak above the starting state over the run; elsewhere the exact bytes one step keeps for
    backward (process RSS is too coarse to compare precisions run one after another).
    """
    __tracebackhide__ = True
    from ..diagnostics.memory import PeakMemory, step_activation_memory

    model, optimizers, steps = options.model, options.optimizers, options.steps
    if steps is None:
        raise AmpUsageError("a precision comparison needs a number of steps, e.g. --steps 50")
    name = unique_group(options.name or "compare")
    claim = _claim(name, options)
    start = StartingState(model, optimizers, options.scheduler)
    result = Showdown({}, warmup=min(5, max(steps // 5, 1)))
    device = model_device(model)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    result.peak_method = ("CUDA allocator peak above the start, exact" if cuda else
                          "memory one step keeps for backward, first batch, exact")
    try:
        if not cuda:
            batch = next(iter(options.data))
            for precision in precisions:
                report = step_activation_memory(step_fn, model, batch, precision)
                result.peaks[precision] = report.steps[-1].saved
        for precision in precisions:
            start.restore()
            run_options = dataclasses.replace(options, dtype=precision, epochs=None,
                                              name=f"{name}[{precision}]", sync_timing=True)
            training = prepare(step_fn, run_options, views, claim)
            result.runs[precision] = training.run
            if cuda:
                meter = PeakMemory(device).start()
                training.execute()
                result.peaks[precision] = meter.stop()["peak"]
            else:
                training.execute()
            if training.run.status != "finished":
                break
    finally:
        start.restore()
        claim.release()
    return result


def _claim(name: str, options: TrainOptions) -> ownership.Claim:
    """Own the model for the whole group of runs: its start is captured and restored too."""
    return ownership.claim(name, ownership.owned_objects(
        options.model, [*options.optimizers, options.scaler, options.scheduler]))
