"""What a learning-rate range test found: `LrFinding`, and the rules its suggestions follow.

Plain data and pure functions (the test itself is lr_finder.py): the records of each step,
the suggestions by fastai's four rules on the smoothed loss of the steps that trained, and
`apply()`, which sets one on the optimizers.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import AmpUsageError
from ..formatting import format_duration, short_path
from ..training.options import MAX_COUNT
from .hyperparameters import apply_hyperparameters

SMOOTHING = 0.98  # the exponential moving average's beta, as fastai's recorder
DIVERGED = 4.0  # stop once the smoothed loss exceeds this many times its minimum
MAX_SKIPS_IN_A_ROW = 30  # from 2**16, the scale is 2**-14 by then: fp16 overflows at any scale
MAX_NONFINITE_IN_A_ROW = 3  # skipped steps whose loss itself was inf/NaN: diverged
MIN_STEPS = 5

RULES = {
    "valley": "the middle of the longest stretch over which the smoothed loss keeps falling "
              "(fastai's default)",
    "steep": "where the smoothed loss falls fastest per decade of lr",
    "minimum/10": "a tenth of the lr at the lowest smoothed loss",
    "slide": "walking back from the highest lr, where the slope of the loss curve stops "
             "changing (fastai's slide: 15 steps apart, threshold 0.005)",
}


@dataclass
class LrFinding:
    """What a learning-rate range test found. `records`: one per optimizer step (lr, loss,
    smoothed, skipped); `suggestions`: name -> lr, by the rules in `RULES`."""

    start: float
    end: float
    steps: int
    precision: str = ""
    records: list[dict] = field(default_factory=list)
    suggestions: dict[str, float] = field(default_factory=dict)
    default: str = "valley"
    status: str = "running"  # finished (N steps, or stopped early by its rule), interrupted, failed
    stop_reason: str = ""
    error: str | None = None
    objects: Any = field(default=None, repr=False)  # the TrainingObjects `apply()` sets
    run: Any = field(default=None, repr=False)  # the finder's own Run (not in runs())

    @classmethod
    def new(cls, start: float = 1e-7, end: float = 10.0, steps: int = 100) -> LrFinding:
        """A test to run, its range checked."""
        if not (0 < start < end < math.inf):
            raise AmpUsageError(f"--find-lr {start:g},{end:g}: give 0 < START < END, e.g. "
                                "--find-lr 1e-7,10")
        if isinstance(steps, bool) or not isinstance(steps, int) or \
                not MIN_STEPS <= steps <= MAX_COUNT:
            raise AmpUsageError(f"--find-lr needs --steps N of at least {MIN_STEPS} (default "
                                f"100), got {steps!r}")
        return cls(start, end, steps)

    kind = "find-lr"

    @property
    def suggestion(self) -> float | None:
        return self.suggestions.get(self.default)

    @property
    def answer(self) -> str:
        """The result in a few words, for tables."""
        return f"lr {self.suggestion:.3g} ({self.default})" if self.suggestion else "none"

    @property
    def applied_steps(self) -> int:
        return sum(not r["skipped"] for r in self.records)

    def suggest(self) -> dict[str, float]:
        """The suggestions by the steps trained so far (`suggestions` once the test ended)."""
        trained = [r for r in self.records if r["smoothed"] is not None]
        return suggestions([r["lr"] for r in trained], [r["smoothed"] for r in trained])

    def apply(self, name: str | None = None) -> float:
        """Set the suggested lr (`name`, default: the default rule's) on the optimizers' param
        groups, keeping their ratios to the first group; return it."""
        which = name or self.default
        if which not in self.suggestions:
            raise AmpUsageError(f"no {which!r} suggestion: the finder suggested "
                                f"{', '.join(self.suggestions) or 'nothing'}")
        lr = self.suggestions[which]
        apply_hyperparameters({"lr": lr}, self.objects.optimizers, self.objects.scheduler)
        return lr

    def to_pandas(self) -> Any:  # a pandas.DataFrame; pandas is an optional dependency
        import pandas as pd

        return pd.DataFrame(self.records)

    def lines(self) -> list[str]:
        """The result in words: how it ran, how it ended, each suggestion with its rule."""
        skipped = len(self.records) - self.applied_steps
        out = [f"learning-rate range test, {self.precision}: {self.applied_steps} of "
               f"{self.steps} steps from lr {self.start:.3g} to {self.end:.3g}"
               + (f" ({skipped} skipped by the loss scaler, each tried again)" if skipped
                  else "") + f"; {self.status}: {self.stop_reason}"]
        for name, lr in self.suggestions.items():
            mark = " (suggested)" if name == self.default else ""
            out.append(f"  {name:<10} {lr:.3g}{mark}: {RULES[name]}")
        if not self.suggestions:
            out.append("  no suggestion: too few steps with a finite loss")
        out.append("the model, gradients, optimizers (state and lr), scaler, scheduler, RNG "
                   "and the data's order are as before the finder ran")
        return out

    def __repr__(self) -> str:
        return "\n".join(self.lines())


def lr_schedule(start: float, end: float, steps: int) -> list[float]:
    """lr_k = start * (end / start) ** (k / (steps - 1)), k = 0 .. steps - 1."""
    return [start * (end / start) ** (k / (steps - 1)) for k in range(steps)]


# -- suggestions: fastai's rules, on the smoothed loss of the steps that trained --------------
def suggestions(lrs: Sequence[float], smoothed: Sequence[float]) -> dict[str, float]:
    """name -> lr by each rule of RULES. As fastai, the first tenth of the steps and the last
    five are left out (the smoothing's start, the divergence at the end) when enough remain."""
    n = len(lrs)
    trim = slice(n // 10, n - 5) if n - n // 10 - 5 >= MIN_STEPS else slice(None)
    lrs, losses = list(lrs[trim]), list(smoothed[trim])
    if len(lrs) < 2:
        return {}
    found = {"valley": _valley(lrs, losses), "steep": _steep(lrs, losses),
             "minimum/10": lrs[losses.index(min(losses))] / 10}
    if len(lrs) > 15:
        found["slide"] = _slide(lrs, losses)
    return found


def _valley(lrs: list[float], losses: list[float]) -> float:
    """The longest decreasing subsequence of the losses; the lr at the middle of its first
    half and a half (fastai: start + sections + sections/2, sections = length / 3)."""
    n = len(losses)
    longest = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[end] < longest[i]:
                end, start = i, i - longest[i]
    sections = (end - start) / 3
    return lrs[start + int(sections) + int(sections / 2)]


def _steep(lrs: list[float], losses: list[float]) -> float:
    slopes = [(b - a) / (math.log(y) - math.log(x))
              for a, b, x, y in zip(losses, losses[1:], lrs, lrs[1:])]
    return lrs[slopes.index(min(slopes))]  # the segment's start, as fastai's steep


def _slide(lrs: list[float], losses: list[float], lr_diff: int = 15,
           threshold: float = 0.005) -> float:
    gradient = [losses[1] - losses[0]] + [(losses[i + 1] - losses[i - 1]) / 2
                                          for i in range(1, len(losses) - 1)]
    gradient.append(losses[-1] - losses[-2])
    right, left = len(losses) - 1, len(losses) - 1 - lr_diff
    found = lrs[left]
    while left >= 0 and abs(gradient[right] - gradient[left]) > threshold:
        found = lrs[left]
        right, left = right - 1, left - 1
    return found


# -- the batch-size finder ---------------------------------------------------------------------
FITS, HEADROOM_ONLY, OVER_CAP, OUT_OF_MEMORY, PREDICTED = (
    "fits", "fits, but not with the headroom", "over the cap", "out of memory",
    "not tried: predicted over the cap")


@dataclass
class Trial:
    batch_size: int
    result: str  # one of FITS, HEADROOM_ONLY, OVER_CAP, OUT_OF_MEMORY, PREDICTED
    peak: int | None  # bytes
    samples_per_s: float | None = None


@dataclass
class BatchSizeSearch:
    """The trials of one precision and the largest batch size that fits with the headroom."""

    precision: str
    trials: list[Trial] = field(default_factory=list)
    batch_size: int | None = None
    faster: Trial | None = None  # a smaller batch that trained more samples per second
    capped_by: str = ""  # what stopped the search growing, where memory did not

    @property
    def shown(self) -> str:
        return "none" if self.batch_size is None else str(self.batch_size)

    def note(self) -> str:
        if self.batch_size is None:
            return "no batch size fits"
        notes = [f"capped by {self.capped_by}, not by memory"] if self.capped_by else []
        best = next(t for t in self.trials if t.batch_size == self.batch_size)
        if self.faster is not None and best.samples_per_s and self.faster.samples_per_s:
            notes.append(f"batch {self.faster.batch_size} trained "
                         f"{self.faster.samples_per_s / best.samples_per_s:.2f}x "
                         f"the samples per second of {self.batch_size}")
        return "; ".join(notes)


@dataclass
class BatchSizeFinding:
    """What the batch-size finder found: per precision, its trials and the answer. The
    answer's peak stays under (1 - headroom) x limit."""

    limit: int  # bytes
    limit_source: str  # what the limit is ("CUDA device memory", "--max-memory 2 GiB", ...)
    headroom: float
    memory_method: str
    start: int
    searches: dict[str, BatchSizeSearch] = field(default_factory=dict)
    status: str = "running"
    stop_reason: str = ""
    loader: Any = field(default=None, repr=False)  # the DataLoader re-made with the answer

    kind = "find-batch-size"

    @property
    def precision(self) -> str:
        return ", ".join(self.searches)

    @property
    def batch_size(self) -> int | None:
        return next(iter(self.searches.values())).batch_size if self.searches else None

    @property
    def trials(self) -> list[Trial]:
        return next(iter(self.searches.values())).trials if self.searches else []

    @property
    def answer(self) -> str:
        return ", ".join(f"{p}: {s.shown}" for p, s in self.searches.items()) or "none"

    def rows(self) -> list[dict]:
        return [{"precision": p, "batch size": t.batch_size, "result": t.result,
                 "peak memory": t.peak, "samples/s": t.samples_per_s}
                for p, search in self.searches.items() for t in search.trials]

    def lines(self) -> list[str]:
        out = [f"batch-size finder: the largest batch whose peak memory stays under "
               f"{1 - self.headroom:.0%} of {self.limit_source} ({self.memory_method}); "
               f"{self.status}{': ' + self.stop_reason if self.stop_reason else ''}"]
        for precision, search in self.searches.items():
            tried = ", ".join(f"{t.batch_size} {t.result}" for t in search.trials)
            out.append(f"  {precision}: {search.shown} ({tried})"
                       + (f"; {search.note()}" if search.note() else ""))
        out.append("the model, gradients, optimizers, scaler, scheduler, RNG and the data's "
                   "order are as before the finder ran")
        return out

    def __repr__(self) -> str:
        return "\n".join(self.lines())


# -- searches and sweeps, trial by trial ---------------------------------------------------------
@dataclass
class TrialRecord:
    """One trial of a search (or one setting of a sweep): what it tried and how it ended."""

    number: int
    params: dict
    state: str  # COMPLETE, PRUNED, FAIL (or RUNNING while it trains)
    value: float | None = None  # the objective (None for a trial that diverged)
    steps: int = 0
    reason: str = ""  # why it was pruned or failed
    reports: list = field(default_factory=list)  # (step, value) reported for pruning
    run: Any = field(default=None, repr=False)  # set as soon as its run starts

    def label(self) -> str:
        return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in self.params.items())

    def line(self) -> str:
        value = f" {self.value:.4g}" if self.value is not None else ""
        reason = f" ({self.reason})" if self.reason else ""
        return f"trial {self.number} {self.label()}: {self.state}{value} after {self.steps} steps{reason}"

    def row(self) -> dict:
        return {"trial": self.number, **self.params, "state": self.state,
                "objective": self.value, "steps": self.steps, "reason": self.reason}


class Trials(list):
    """A search's trials, oldest first: a list of TrialRecord with `.to_pandas()`."""

    def rows(self) -> list[dict]:
        return [t.row() for t in self]

    def to_pandas(self) -> Any:  # a pandas.DataFrame; pandas is an optional dependency
        import pandas as pd

        return pd.DataFrame(self.rows())


@dataclass(eq=False)  # one search is one object: a key of the background registry
class Search:
    """What a search (`--search`) found: its trials, the best, and the Optuna study (in its
    journal file with --study: `optuna.load_study` reads it, and so does optuna-dashboard)."""

    objective: str  # what was optimised, in words
    direction: str  # "minimize" or "maximize"
    target: int  # trials to finish (COMPLETE or PRUNED)
    trials: Trials = field(default_factory=Trials)
    status: str = "running"
    stop_reason: str = ""
    setup: str = ""  # sampler, pruner and their settings, in words
    journal: str | None = None  # the study's file, with --study
    study: Any = field(default=None, repr=False)
    name: str = "search"  # its trials' runs are NAME[key=value ...]
    stop_requested: bool = False

    kind = "search"

    def __post_init__(self) -> None:
        self.trials = Trials(self.trials)

    @property
    def done(self) -> bool:
        return self.status != "running"

    def request_stop(self) -> None:
        """End the search after the current optimizer step (thread-safe: Stop, %amp_stop):
        that trial FAIL, "interrupted", tried again first on resume."""
        self.stop_requested = True  # a trial starting now sees it (search.TrialWatch)
        running = [t.run for t in list(self.trials) if t.state == "RUNNING"]
        if running and running[-1] is not None:
            running[-1].request_stop()

    @property
    def finished(self) -> list[TrialRecord]:
        return [t for t in self.trials if t.state in ("COMPLETE", "PRUNED")]

    @property
    def best(self) -> TrialRecord | None:
        done = [t for t in self.trials if t.state == "COMPLETE" and t.value is not None
                and math.isfinite(t.value)]
        pick = min if self.direction == "minimize" else max
        return pick(done, key=lambda t: t.value) if done else None

    @property
    def best_params(self) -> dict | None:
        return self.best.params if self.best else None

    @property
    def best_run(self) -> Any:
        return self.best.run if self.best else None

    @property
    def precision(self) -> str:
        return ", ".join(dict.fromkeys(t.run.precision for t in self.trials if t.run))

    @property
    def answer(self) -> str:
        best = self.best
        return f"{best.value:.4g} ({best.label()})" if best else "none yet"

    def progress(self) -> str:
        """ "trial 7 of 20 · 3 pruned · best 0.412 (lr=3.2e-4) · ETA 2m" """
        pruned = sum(t.state == "PRUNED" for t in self.trials)
        timed = [t.run.wall_time for t in self.trials if t.run is not None and t.run.done]
        left = self.target - len(self.finished)
        eta = (f" · ETA {format_duration(sum(timed) / len(timed) * left)}"
               if timed and left > 0 and self.status == "running" else "")
        return (f"trial {len(self.finished)} of {self.target} · {pruned} pruned · best "
                f"{self.answer}{eta}")

    def rows(self) -> list[dict]:
        return self.trials.rows()

    def to_pandas(self) -> Any:  # a pandas.DataFrame; pandas is an optional dependency
        return self.trials.to_pandas()

    def header(self) -> list[str]:
        """What it optimises and how (sampler, pruner, warm-up), and where the study is kept:
        printed before the first trial."""
        out = [f"search: {self.objective}, {self.direction}d; {self.setup}"]
        if self.journal:
            out.append(f"study kept in {short_path(self.journal)}")
        return out

    def lines(self) -> list[str]:
        out = self.header() + [f"  {t.line()}" for t in self.trials]
        out.append(f"{self.progress()}; {self.status}"
                   + (f": {self.stop_reason}" if self.stop_reason else ""))
        return out

    def __repr__(self) -> str:
        return "\n".join(self.lines())
