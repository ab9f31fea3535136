"""The live view of a run in a notebook: core ipywidgets showing HTML drawn by charts.py.

A View (training/view.py): `on_refresh` runs on the training thread at the engine's refresh
interval, never per step. History is turned into columns incrementally (only the records
added since the last refresh), so a refresh costs the same after 100 or 100,000 steps apart
from charts.py's downsampling. When the run ends, the widget is replaced in the output by a
static HTML snapshot (a display_id update), which survives saving the notebook and shows
without a kernel, in nbconvert and on GitHub.
"""
from __future__ import annotations

import math
from array import array
from typing import TYPE_CHECKING

import numpy as np

from ..training.view import View
from . import charts
from .format import format_number

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from ..training.run import Run

RATE_WINDOW = 50  # steps over which samples/s and steps/s are measured


class _Columns:
    """A Run's history, validation and memory samples as growing float arrays."""

    def __init__(self, run: Run):
        self.run = run
        self.memory_labels = (("allocated", "reserved", "peak", "device_used")
                              if run.device.startswith("cuda") else ("rss",))
        self.steps, self.loss, self.scale, self.skipped = (array("d") for _ in range(4))
        self.val_steps, self.val_loss, self.memory_time = (array("d") for _ in range(3))
        self.memory = {label: array("d") for label in self.memory_labels}
        self._seen = [0, 0, 0]  # history, val_history, memory records consumed

    def update(self) -> _Columns:
        run, seen = self.run, self._seen
        history = run.history
        for record in history[seen[0]:]:
            self.steps.append(record["step"])
            self.loss.append(_nan(record["loss"]))
            if record["scale"] is not None:
                self.scale.append(record["scale"])
            if record["skipped"]:
                self.skipped.append(record["step"])
        seen[0] = len(history)
        for record in run.val_history[seen[1]:]:
            self.val_steps.append(record["step"] - 1)  # measured after that many steps
            self.val_loss.append(_nan(record["val_loss"]))
        seen[1] = len(run.val_history)
        for sample in run.memory[seen[2]:]:
            self.memory_time.append(sample["time"])
            for label in self.memory_labels:
                self.memory[label].append(_nan(sample.get(label)))
        seen[2] = len(run.memory)
        return self

    def trace(self, flags: str = "") -> charts.RunTrace:
        memory = {MEMORY_LABELS[k]: _as_numpy(v) for k, v in self.memory.items()}
        return charts.RunTrace(
            name=self.run.name, flags=flags, steps=_as_numpy(self.steps),
            loss=_as_numpy(self.loss),
            scale=_as_numpy(self.scale) if len(self.scale) == len(self.steps) else (),
            skipped=_as_numpy(self.skipped), val_steps=_as_numpy(self.val_steps),
            val_loss=_as_numpy(self.val_loss), memory_time=_as_numpy(self.memory_time),
            memory={k: v for k, v in memory.items() if not np.isnan(v).all()})


MEMORY_LABELS = {"allocated": "allocated", "reserved": "reserved", "peak": "peak",
                 "device_used": "device used (NVML)", "rss": "resident (RSS)"}


def _as_numpy(values: array) -> np.ndarray:
    # One memcpy (0.1 ms per 100k steps), not a per-element conversion. A copy, not a view:
    # a live view would make the next append() fail with BufferError.
    return np.array(values, dtype=np.float64)


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def flags_that_differ(run: Run, current: Run) -> str:
    """ "lr=0.01 dtype=bf16": what an earlier run did differently, for the legend."""
    def settings(r: Run) -> dict:
        return {**r.config.get("flags", {}), "lr": r.config.get("lr"),
                **r.config.get("sweep", {})}
    mine, theirs = settings(run), settings(current)
    ignore = {"output", "name", "resume", "checkpoint", "every"}
    keys = sorted(k for k in mine.keys() | theirs.keys()
                  if k not in ignore and mine.get(k) != theirs.get(k))
    return " ".join(f"{k}={mine.get(k, '-')}" for k in keys)


def status_line(run: Run, skipped: int) -> str:
    parts = [run.device, f"{run.precision} ({run.precision_reason})"]
    if run.paused_for:
        parts.insert(0, f"paused for {run.paused_for}")
    s = run.scaler_settings
    if s:
        parts.append(f"GradScaler init {format_number(s['init_scale'])}, "
                     f"×{s['growth_factor']:g} every {s['growth_interval']} steps, "
                     f"backoff ×{s['backoff_factor']:g}")
        parts.append(f"{skipped} skipped step{'s' * (skipped != 1)}")
    else:
        parts.append("no loss scaling")
    return " · ".join(parts)


def build_view(run: Run, columns: _Columns, earlier: list[charts.RunTrace],
               final: bool) -> charts.DashboardView:
    h = run.history
    steps_per_s = samples_per_s = None
    if len(h) >= 2:
        window = h[-RATE_WINDOW - 1:]
        span = window[-1]["time"] - window[0]["time"]
        if span > 0:
            steps_per_s = (len(window) - 1) / span
            samples_per_s = sum(r["samples"] for r in window[1:]) / span
    eta = None
    if run.total_steps and steps_per_s and not final:
        eta = max(run.total_steps - len(h), 0) / steps_per_s
    epochs = run.config.get("epochs")
    return charts.DashboardView(
        current=columns.trace(), earlier=earlier,
        status=status_line(run, skipped=len(columns.skipped)),
        scaler=run.scaler_settings is not None, step=len(h), total_steps=run.total_steps,
        epoch=run.epoch + 1, epochs=epochs, samples_per_s=samples_per_s,
        steps_per_s=steps_per_s, lr=h[-1]["lr"] if h else None, elapsed=run.wall_time,
        eta=eta, alarms=list(run.alarms),
        summary=run.summary_rows() if final else None)


def overlay_html(runs: Sequence[Run]) -> str:
    """A static picture of several runs: the first drawn bold, the others faded."""
    first, *others = runs
    columns = _Columns(first).update()
    earlier = [_Columns(r).update().trace(flags_that_differ(r, first)) for r in others]
    return charts.dashboard_html(build_view(first, columns, earlier, final=True))


class Picture:
    """HTML that notebooks display as it is (nbconvert and GitHub show it too): Run.plot()."""

    def __init__(self, html_text: str):
        self.html = html_text

    def _repr_html_(self) -> str:
        return self.html


def overlay_picture(runs: Sequence[Run]) -> Picture:
    """`overlay_html` as an object a notebook displays: what Run.plot() returns."""
    return Picture(overlay_html(runs))


class Dashboard(View):
    """Live widgets while the run trains; a static snapshot once it ends.

    earlier_runs: finished Runs to draw faded underneath (the same model's earlier runs).
    stoppable: show a Stop button (background runs; in the foreground the kernel is busy,
    so the notebook's interrupt button is the way to stop).
    """

    def __init__(self, earlier_runs: Iterable[Run] = (), stoppable: bool = False,
                 max_earlier: int = 5, several: bool = False):
        self.earlier_runs = list(earlier_runs)[-max_earlier:]
        self.stoppable = stoppable
        self.several = several  # a sweep: each new run joins the plots; finish() ends the view
        self._columns = None
        self._earlier = []
        self._handle = None
        self._html = None
        self._button = None
        self._box = None

    def on_start(self, run: Run) -> None:
        if self._box is None:
            self.show(run)
        elif self._columns.run is not run:  # the next run of a sweep: the last one fades
            previous = self._columns.update()
            self._earlier.append(previous.trace(flags_that_differ(previous.run, run)))
            self._columns = _Columns(run)

    def show(self, run: Run) -> None:
        """Display the live widgets. Call from the cell's own thread: output displayed from a
        background thread would land in whichever cell is executing at that moment."""
        import ipywidgets as widgets
        from IPython.display import display

        self._columns = _Columns(run)
        self._earlier = [_Columns(r).update().trace(flags_that_differ(r, run))
                         for r in self.earlier_runs]
        self._html = widgets.HTML(self._render(run, final=False))
        children = [self._html]
        if self.stoppable:
            self._button = widgets.Button(description="Stop", icon="stop", button_style="warning",
                                          tooltip="stop after the current optimizer step")
            self._button.on_click(lambda _: self._stop())
            children.append(self._button)
        else:
            children.append(widgets.HTML(
                '<span style="opacity:.65;font-size:12px">Interrupt the kernel (■) to stop '
                "after the current step; nothing is lost.</span>"))
        self._box = widgets.VBox(children)
        self._handle = display(self._box, display_id=True)

    def on_refresh(self, run: Run) -> None:
        self._html.value = self._render(run, final=False)

    def on_end(self, run: Run) -> None:
        if self.several:
            self._html.value = self._render(run, final=True)
        else:
            self.finish()

    def finish(self) -> None:
        """Replace the live widgets by a static snapshot of the last run."""
        from .reporter import end_lines

        if self._box is None:
            return
        run = self._columns.run
        snapshot = self._render(run, final=True)
        self._html.value = snapshot
        if self._handle is not None:
            text = "\n".join(end_lines(run) + [f"ALARM: {a}" for a in run.alarms])
            self._handle.update({"text/html": snapshot, "text/plain": text}, raw=True)
        self._box.close()  # the snapshot replaces the widgets; free their comms
        self._box = None

    def _render(self, run, final):
        self._columns.update()
        return charts.dashboard_html(build_view(run, self._columns, self._earlier, final))

    def _stop(self):
        self._columns.run.request_stop()
        self._button.disabled = True
        self._button.description = "Stopping…"
