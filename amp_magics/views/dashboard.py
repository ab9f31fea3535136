"""The live view of a run in a notebook: core ipywidgets showing HTML drawn by charts.py.

A View (training/view.py): `on_refresh` runs on the training thread at the engine's refresh
interval, never per step. History is turned into columns incrementally (only the records
added since the last refresh), so a refresh costs the same after 100 or 100,000 steps apart
from charts.py's downsampling. The live widget draws the charts inline; when the run ends, the
widget is replaced in the output by a static HTML snapshot (a display_id update) whose charts
are SVG images with data URIs: it survives saving the notebook and reads without a kernel,
opened untrusted, in nbconvert and on GitHub.
"""
from __future__ import annotations

import math
import threading
import weakref
from array import array
from typing import TYPE_CHECKING

import numpy as np

from ..training import registry
from ..training.run import RATE_WINDOW
from ..training.view import View
from . import charts
from .between_cells import rewrite
from .finder import finding_html
from .run_summary import ended_html, run_html, run_text, summary_rows
from ..formatting import format_number, format_setting

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

    from ..training.run import Run
    from ..tuning.findings import LrFinding



class _Columns:
    """A Run's history, validation and memory samples as growing float arrays."""

    def __init__(self, run: Run):
        self.run = run
        cuda = run.device.startswith("cuda")
        self.memory_labels = (("allocated", "reserved", "peak", "device_used") if cuda
                              else ("rss",))
        if run.ranks > 1:  # --nproc: one line per rank, of what each rank holds
            self.memory_labels = tuple(f"{'allocated' if cuda else 'rss'} rank{r}"
                                       for r in range(run.ranks))
        self.steps, self.loss, self.scale, self.skipped = (array("d") for _ in range(4))
        self.time, self.samples = array("d"), array("d")
        self.val_steps, self.val_loss, self.memory_time = (array("d") for _ in range(3))
        self.memory = {label: array("d") for label in self.memory_labels}
        self._seen = [0, 0, 0]  # history, val_history, memory records consumed
        self._compiling = 0.0  # compile time so far: step times net of it, as Run.rates

    def update(self) -> _Columns:
        run, seen = self.run, self._seen
        history = run.history
        for record in history[seen[0]:]:
            self.steps.append(record["step"])
            self.loss.append(_nan(record["loss"]))
            self._compiling += record.get("compile_s", 0.0)
            self.time.append(_nan(record.get("time")) - self._compiling)
            self.samples.append(record.get("samples") or 0)
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
        memory = {_memory_label(k): _as_numpy(v) for k, v in self.memory.items()}
        return charts.RunTrace(
            name=self.run.name, flags=flags, steps=_as_numpy(self.steps),
            loss=_as_numpy(self.loss),
            scale=_as_numpy(self.scale) if len(self.scale) == len(self.steps) else (),
            skipped=_as_numpy(self.skipped), val_steps=_as_numpy(self.val_steps),
            val_loss=_as_numpy(self.val_loss), memory_time=_as_numpy(self.memory_time),
            memory={k: v for k, v in memory.items() if not np.isnan(v).all()},
            time=_as_numpy(self.time), samples=_as_numpy(self.samples))


def _memory_label(key: str) -> str:
    """"rss" -> "resident (RSS)"; "rss rank1" -> "rank 1 resident (RSS)"."""
    base, _, rank = key.partition(" rank")
    return f"rank {rank} {MEMORY_LABELS[base]}" if rank else MEMORY_LABELS[base]


MEMORY_LABELS = {"allocated": "allocated", "reserved": "reserved", "peak": "peak",
                 "device_used": "device used (NVML)", "rss": "resident (RSS)"}


def _as_numpy(values: array) -> np.ndarray:
    # One memcpy (0.1 ms per 100k steps), not a per-element conversion. A copy, not a view:
    # a live view would make the next append() fail with BufferError.
    return np.array(values, dtype=np.float64)


def _nan(value) -> float:
    return math.nan if value is None else float(value)


_LENGTH = ("epochs", "steps")


def flags_that_differ(run: Run, current: Run) -> str:
    """ "dtype=bf16 lr=0.01 steps=20": how an earlier run trained differently, for the legend:
    its own values (the precision it ran, never "auto"); "no clip" where only the current run
    has a setting (a length is always given by the other one)."""
    mine, theirs = run.settings(), current.settings()
    order = ("dtype", "lr")
    keys = sorted((k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)),
                  key=lambda k: (order.index(k) if k in order else len(order), k))
    return " ".join(f"{k}={format_setting(mine[k])}" if k in mine else f"no {k}"
                    for k in keys if k in mine or k not in _LENGTH)


def status_line(run: Run, skipped: int) -> str:
    parts = [run.device, f"{run.precision} ({run.precision_reason})"]
    if run.paused_for:
        parts.insert(0, f"paused for {run.paused_for}")
    if run.compiling:
        parts.insert(0, "compiling the model (torch.compile)...")
    elif run.compiles:
        parts.append(f"compiled in {run.compile_seconds:.1f} s (not in steps/s)")
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
               final: bool, summary: bool | None = None) -> charts.DashboardView:
    """The dashboard's values. Live, the rates are those of the last RATE_WINDOW steps; once
    final, the run's mean, the very numbers of its summary (Run.rates either way).
    `summary` (default: `final`) adds the summary table."""
    h = run.history
    if final:
        samples_per_s, steps_per_s = run.rates()
        window = "mean over the run"
    else:
        samples_per_s, steps_per_s = run.rates(last=RATE_WINDOW)
        window = f"last {RATE_WINDOW} steps" if len(h) > RATE_WINDOW else "since the start"
    eta = None
    if run.total_steps and steps_per_s and not final:
        eta = max(run.total_steps - len(h), 0) / steps_per_s
    epochs = run.config.get("epochs")
    return charts.DashboardView(
        current=columns.trace(), earlier=earlier,
        status=status_line(run, skipped=len(columns.skipped)),
        scaler=run.scaler_settings is not None, step=len(h), total_steps=run.total_steps,
        epoch=run.epoch + 1, epochs=epochs, samples_per_s=samples_per_s,
        steps_per_s=steps_per_s, rate_window=window if h else "",
        lr=h[-1]["lr"] if h else None, elapsed=run.wall_time, eta=eta, alarms=list(run.alarms),
        summary=summary_rows(run) if (final if summary is None else summary) else None)


def overlay_html(runs: Sequence[Run]) -> str:
    """A static picture of several finished runs, in the order given: the first drawn bold
    (the axes follow it), the others faded, runs without a step left out. Charts are SVG
    images: it reads in any saved notebook."""
    first, *others = runs
    columns = _Columns(first).update()
    earlier = [_Columns(r).update().trace(flags_that_differ(r, first)) for r in others
               if r.history]
    view = build_view(first, columns, earlier, final=True)
    view.comparison = True
    return charts.dashboard_html(view)


class Picture:
    """HTML that notebooks display as it is (untrusted too; nbconvert and GitHub show it):
    what amp_magics.plot() and `%amp_runs --plot` return. In a terminal, a few lines of text."""

    def __init__(self, html_text: str, text: str = ""):
        self.html = html_text
        self.text = text

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text or f"<Picture: {len(self.html):,} characters of HTML>"


def overlay_picture(runs: Sequence[Run]) -> Picture:
    """`overlay_html` as an object a notebook displays: what amp_magics.plot() and
    `%amp_runs --plot` return."""
    first, *others = runs
    lines = [f"{len(runs)} run{'s' * (len(runs) != 1)} overlaid; the axes follow {first.name}:",
             f"  {first!r}"]
    for other in others:
        differs = flags_that_differ(other, first)
        how = f"faded{': ' + differs if differs else ''}" if other.history else "no steps: not drawn"
        lines.append(f"  {other!r} ({how})")
    return Picture(overlay_html(runs), "\n".join(lines))


# -- a running run's notice, rewritten when the run ends --------------------------------------
_NOTICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Run -> [DisplayHandle]
_TOLD: weakref.WeakSet = weakref.WeakSet()  # runs whose notices had their last rewrite
_NOTICES_LOCK = threading.Lock()


def display_run(run: Run) -> None:
    """Display a Run (its `_ipython_display_`). A running one gets a display_id, kept until
    `end_notices(run, last=True)` rewrites it with how the run ended: the result of a
    --background cell must not say "started ... Stop it" in the saved notebook once it has
    stopped. A background run that has ended but whose thread has not yet kept its traceback
    (one that fails at once) is still rewritten."""
    from IPython.display import display

    with _NOTICES_LOCK:
        final = run.done and (run in _TOLD or not registry.is_background(run))
    if final:
        display({"text/plain": run_text(run), "text/html": run_html(run)}, raw=True)
        return
    handle = display({"text/plain": repr(run), "text/html": run_html(run)}, raw=True,
                     display_id=True)
    if handle is None:
        return
    with _NOTICES_LOCK:
        told = run in _TOLD  # its thread's last rewrite came meanwhile
        if not told:
            _NOTICES.setdefault(run, []).append(handle)
    if told:
        rewrite(handle, _how_it_ended(run))
    elif run.done and not registry.is_background(run):  # it ended meanwhile, no thread to tell
        end_notices(run)


def _how_it_ended(run: Run) -> dict:
    return {"text/plain": run_text(run), "text/html": ended_html(run)}


def end_notices(run: Run, last: bool = False) -> None:
    """Rewrite every running notice of `run` (now ended) with how it ended. The handles are
    kept until the `last` rewrite: a failed background run's traceback is known only once
    its views have ended, and its thread rewrites them again with it."""
    with _NOTICES_LOCK:
        if last:
            handles = _NOTICES.pop(run, [])
            _TOLD.add(run)
        else:
            handles = list(_NOTICES.get(run, []))
    for handle in handles:
        rewrite(handle, _how_it_ended(run))


class Dashboard(View):
    """Live widgets while the run trains; a static snapshot once it ends.

    earlier_runs: finished Runs to draw faded underneath (the same model's earlier runs).
    stoppable: show a Stop button (background runs; in the foreground the kernel is busy,
    so the notebook's interrupt button is the way to stop); `on_stop` is what it calls
    (default: stop the run shown; a background search: stop the search).
    """

    def __init__(self, earlier_runs: Iterable[Run] = (), stoppable: bool = False,
                 max_earlier: int = 5, several: bool = False,
                 on_stop: Callable[[], None] | None = None):
        self.earlier_runs = list(earlier_runs)[-max_earlier:]
        self.stoppable = stoppable
        self.on_stop = on_stop
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
        elif self._columns is None:  # shown before the first trial of a background search
            self._columns = _Columns(run)
        elif self._columns.run is not run:  # the next run of a sweep: the last one fades
            previous = self._columns.update()
            if previous.run.history:  # a run with no step has nothing to draw
                self._earlier.append(previous.trace(flags_that_differ(previous.run, run)))
            self._columns = _Columns(run)

    def show(self, run: Run | None = None) -> None:
        """Display the live widgets. Call from the cell's own thread: output displayed from a
        background thread would land in whichever cell is executing at that moment. Without
        a run (a background search, before its first trial), a line until one starts."""
        import ipywidgets as widgets
        from IPython.display import display

        self._columns = None if run is None else _Columns(run)
        self._earlier = [] if run is None else [
            _Columns(r).update().trace(flags_that_differ(r, run)) for r in self.earlier_runs]
        self._html = widgets.HTML("<p>the first trial is starting...</p>" if run is None
                                  else self._render(run, final=False))
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
        if self.several:  # the next run follows: no summary table, so the cell keeps its height
            self._html.value = self._render(run, final=True, summary=False)
        else:
            self.finish()

    def finish(self) -> None:
        """Replace the live widgets by a static snapshot of the last run."""
        from .reporter import end_lines

        if self._box is None:
            return
        if self._columns is None:  # no trial ever started: nothing to keep
            if self._handle is not None:
                rewrite(self._handle, {"text/html": "", "text/plain": ""})
            self._box.close()
            self._box = None
            return
        run = self._columns.run
        snapshot = self._render(run, final=True, inline=False)
        self._html.value = snapshot
        if self._handle is not None:
            text = "\n".join(end_lines(run) + [f"ALARM: {a}" for a in run.alarms])
            rewrite(self._handle, {"text/html": snapshot, "text/plain": text})
        self._box.close()  # the snapshot replaces the widgets; free their comms
        self._box = None
        end_notices(run)

    def _render(self, run, final, summary=None, inline=True):
        self._columns.update()
        view = build_view(run, self._columns, self._earlier, final, summary)
        return charts.dashboard_html(view, inline=inline)

    def _stop(self):
        (self.on_stop or self._columns.run.request_stop)()
        self._button.disabled = True
        self._button.description = "Stopping…"


class LiveHtml:
    """HTML shown in the cell (call from its own thread), rewritten in place, and removed when
    the result it stands in for is displayed instead."""

    def __init__(self, html: str):
        import ipywidgets as widgets
        from IPython.display import display

        self._html = widgets.HTML(html)
        self._handle = display(self._html, display_id=True)

    def update(self, html: str) -> None:
        self._html.value = html

    def close(self, html: str = "", text: str = "") -> None:
        """Remove it, or with `html` leave that in its place (static: it stays in a saved
        notebook, where the widget would not)."""
        if self._handle is not None:
            rewrite(self._handle, {"text/html": html, "text/plain": text})
            self._html.close()
            self._handle = None


class FinderDashboard(View):
    """The learning-rate finder drawn live; when it ends the picture gives way to the result
    the cell returns (or to the traceback of a step that failed)."""

    def __init__(self, finding: LrFinding):
        self.finding = finding
        self._live: LiveHtml | None = None

    def on_start(self, run: Run) -> None:
        self._live = LiveHtml(finding_html(self.finding, live=True))

    def on_refresh(self, run: Run) -> None:
        self._live.update(finding_html(self.finding, live=True))

    def on_end(self, run: Run) -> None:
        if self._live is not None:
            self._live.close()
