"""The result of one training run: its history, summary and persistence.

Plain data: no torch tensors are kept here (the engine drains them to floats), so a Run
can be saved as JSON, read back in another process, and compared across runs. How it reads
as HTML is views/run_summary.py's (shown through IPython's formatters, views/display.py).
"""
from __future__ import annotations

import json
import math
import os
import time
import weakref
from typing import TYPE_CHECKING, Any

from ..files import atomic_write
from ..formatting import format_setting, format_value

if TYPE_CHECKING:
    import torch

    from ..diagnostics.overflow import Diagnosis

STATUSES = ("running", "finished", "interrupted", "failed")
RATE_WINDOW = 50  # steps over which live views measure samples/s and steps/s


def _finite(values):
    return [v for v in values if v is not None and math.isfinite(v)]


class Run:
    """One `%%amp_train` / `amp_magics.train` run.

    history: one dict per optimizer step (step, epoch, loss, scale, skipped, lr, time,
    samples, and any logged names); val_history: one dict per epoch with a validation
    pass; memory: samples taken at each refresh (bytes).
    """

    def __init__(self, name: str, *, config: dict | None = None, device: str = "cpu",
                 precision: str = "fp32", precision_reason: str = "",
                 scaler_settings: dict | None = None, total_steps: int | None = None,
                 steps_per_epoch: int | None = None, model_label: str = "",
                 model: torch.nn.Module | None = None):
        self.name = name
        self.config = dict(config or {})
        self.device = device
        self.precision = precision
        self.precision_reason = precision_reason
        self.scaler_settings = scaler_settings
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.model_label = model_label
        self.status = "running"
        self.history: list[dict] = []
        self.val_history: list[dict] = []
        self.memory: list[dict] = []
        self.alarms: list[str] = []
        self.notes: list[str] = []
        self.error: str | None = None  # what failed, in a line
        # a failed %%amp_train run: its traceback as the notebook shows it (our frames left out)
        self.traceback: str | None = None
        self.started = time.time()
        self.wall_time = 0.0
        self.epoch = 0
        self.refresh_costs: list[float] = []  # seconds per refresh: drain, memory, views
        self.paused_for: str | None = None  # what holds it at a step boundary (e.g. "%amp_memory")
        self.ranks = 1  # processes training it (--nproc); memory then has "<key> rank<r>" keys
        self.compiling = False  # --compile: the first step is compiling the model
        self.compile_seconds = 0.0  # time torch.compile spent compiling, not in the rates
        self.compiles = 0  # graphs compiled during the run
        self.recompiles = 0  # of which recompilations (a guard failed)
        self.diagnosis: Diagnosis | None = None  # --diagnose: the Diagnosis of the first bad step
        # Set from other threads (Stop button, %amp_stop, Ctrl-C), read at every step.
        self.stop_requested = False
        # Which model object trained, without keeping it alive: earlier runs of the same
        # model (not of the same variable name) are the ones a dashboard overlays.
        self._model = weakref.ref(model) if model is not None else None

    # -- control -------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the engine to stop after the current optimizer step (thread-safe)."""
        self.stop_requested = True

    @property
    def done(self) -> bool:
        return self.status != "running"

    def same_model(self, model: object) -> bool:
        """Whether this run trained `model` (this very object; False once it is gone, and for
        a loaded run)."""
        return self._model is not None and self._model() is model

    # -- what it ran with and how fast -------------------------------------------------
    def settings(self) -> dict:
        """What this run trained with, for legends: the precision it ran (bf16, never "auto"),
        lr at the start, its length, the other options given, and a sweep's setting."""
        c = self.config
        out = {"dtype": self.precision, "lr": c.get("lr"), "epochs": c.get("epochs"),
               **c.get("settings", {}), **c.get("sweep", {})}
        out["dtype"] = self.precision
        return {k: v for k, v in out.items() if v is not None}

    def flags_text(self) -> str:
        """The options given, as run: "dtype=bf16 steps=20" for a `--compare` run (not
        dtype=auto), a sweep's own setting included; no options that only place things."""
        c = self.config
        given = {**c.get("settings", {}), **c.get("sweep", {}), "dtype": self.precision}
        return " ".join(f"{k}={format_setting(v)}" for k, v in given.items())

    def rates(self, last: int | None = None) -> tuple[float | None, float | None]:
        """(samples/s, steps/s) from the steps' end times: over the last `last` steps, or over
        the whole run, from its start to the end of its last step, less the time spent
        compiling (torch.compile). The one definition every view uses (the dashboard's header,
        its throughput chart, the summary, the progress line)."""
        h = self.history
        first = 0 if last is None else max(len(h) - last, 0)
        if first >= len(h):
            return None, None
        start = h[first - 1]["time"] if first > 0 else 0.0
        span = h[-1]["time"] - start - sum(r.get("compile_s", 0.0) for r in h[first:])
        if not span > 0:
            return None, None
        samples = sum(r.get("samples") or 0 for r in h[first:])
        return samples / span, (len(h) - first) / span

    # -- views ---------------------------------------------------------------------
    @property
    def summary(self) -> dict:
        h = self.history
        losses = _finite(r["loss"] for r in h)
        vals = _finite(r["val_loss"] for r in self.val_history)
        wall = self.wall_time or 0.0
        samples_per_s, steps_per_s = self.rates()
        peaks = [m.get("peak") if m.get("peak") is not None else m.get("rss") for m in self.memory]
        peaks = [p for p in peaks if p is not None]
        return {
            "name": self.name,
            "status": self.status,
            "device": self.device,
            "dtype": self.precision,
            "steps": len(h),
            "skipped_steps": sum(1 for r in h if r["skipped"]),
            "final_loss": h[-1]["loss"] if h else None,
            "best_loss": min(losses) if losses else None,
            "final_val_loss": self.val_history[-1]["val_loss"] if self.val_history else None,
            "best_val_loss": min(vals) if vals else None,
            "final_scale": h[-1]["scale"] if h else None,
            "wall_time": wall,
            "samples_per_s": samples_per_s,
            "steps_per_s": steps_per_s,
            "peak_memory": max(peaks) if peaks else None,
            "compile_seconds": self.compile_seconds,
        }

    def to_pandas(self) -> Any:  # a pandas.DataFrame; pandas is an optional dependency
        """History as a pandas DataFrame (pandas is optional; install it to use this)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("Run.to_pandas() needs pandas: pip install pandas") from e
        return pd.DataFrame(self.history)

    # -- persistence ---------------------------------------------------------------
    _FIELDS = ("name", "config", "device", "precision", "precision_reason", "scaler_settings",
               "total_steps", "steps_per_epoch", "model_label", "status", "history",
               "val_history", "memory", "alarms", "notes", "error", "traceback", "started",
               "wall_time", "epoch", "refresh_costs", "ranks", "compile_seconds", "compiles",
               "recompiles")

    def to_dict(self) -> dict:
        return {field: getattr(self, field) for field in self._FIELDS}

    def save(self, path: str | os.PathLike) -> str:
        """Write the run as JSON, atomically (a crash never leaves a half-written file)."""
        return atomic_write(path, lambda f: json.dump({"amp_magics_run": 1, **self.to_dict()},
                                                      f, default=str), prefix=".amp_run_")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Run":
        with open(path) as f:
            try:
                data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError):
                data = None
        if not isinstance(data, dict) or data.pop("amp_magics_run", None) != 1:
            raise ValueError(f"{path} is not a saved amp_magics Run")
        run = cls(data["name"])
        for field in cls._FIELDS:
            if field in data:
                setattr(run, field, data[field])
        return run

    def rank_peaks(self, key: str) -> dict[int, int]:
        """rank -> the highest of its `key` samples ("rss rank1"), for a --nproc run."""
        peaks: dict[int, int] = {}
        for sample in self.memory:
            for name, value in sample.items():
                base, _, rank = name.rpartition(" rank")
                if base == key and rank.isdigit() and value is not None:
                    peaks[int(rank)] = max(peaks.get(int(rank), 0), value)
        return dict(sorted(peaks.items()))

    def __repr__(self) -> str:
        s = self.summary
        return (f"<Run {self.name!r} {self.status}: {s['steps']} steps, "
                f"loss {format_value(s['final_loss'])}, {self.precision} on {self.device}>")
