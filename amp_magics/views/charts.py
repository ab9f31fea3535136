"""The training dashboard as SVG and HTML strings: data in, markup out.

Pure functions with no IPython, widget or torch dependency, so the same markup serves the live
widget and the static snapshot left in the saved notebook.

Every chart is a standalone SVG document. What stays in a saved notebook (the snapshot at the
end of a run, `Run.plot()` pictures) places each one as `<img src="data:image/svg+xml;base64,
...">`: notebooks opened untrusted (any notebook a colleague sends) sanitise inline `<svg>`
away, but keep images, as nbconvert's HTML and GitHub's viewer do. An SVG inside an <img>
inherits no text colour, so charts use fixed colours chosen to read on light and dark
backgrounds: mid-luminance greys for text and axes (about 4.3:1 against white and against
JupyterLab's dark background) and a mid-luminance palette. The live widget places the same SVG
inline (no image decode per refresh, so no flicker). Charts have a fixed pixel size and never
grow past it, so chart text stays at 11 px however wide the page is.

Cost is bounded whatever the run length: every series is reduced to about `max_points` points
before drawing. Columns may be lists or numpy arrays; pass arrays (and keep them for finished
runs), since turning a list into an array costs ~3.5 ms per 100,000 values, on every render.
"""
from __future__ import annotations

import base64
import colorsys
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..formatting import (BYTE_UNITS, escape as _e, format_duration, format_number,
                     summary_table_html)

if TYPE_CHECKING:
    from collections.abc import Callable

# Paul Tol's "vibrant" scheme (its blue lightened, its grey replaced by olive, which the axes'
# grey cannot be mistaken for): colour-blind safe and mid-luminance, so it reads on light and
# dark themes.
PALETTE = ("#1E88E5", "#EE7733", "#009988", "#EE3377", "#33BBEE", "#999933")
ALERT = "#CC3311"  # skipped steps and non-finite values; no run gets this colour
INK = "#777777"  # text and axes: 4.5:1 on white, 4.2:1 on JupyterLab's dark #111111
# Earlier runs: translucent and thinner than the current run, yet at least 2.4:1 against
# JupyterLab's dark background for every palette colour (0.35 left them at 1.5:1, barely seen).
FADED_OPACITY = 0.6
MAX_POINTS = 1000
SMOOTH_POINTS = 200  # for slow lines (smoothed loss, memory): fewer points, same look
CHART_WIDTH, CHART_HEIGHT = 360, 240  # pixels: charts shrink to fit, never grow

_DASHES = {"line": None, "faint": None, "dashed": "6 3", "dotted": "1.5 3", "dashdot": "7 3 1.5 3",
           "markers": "2 3", "hollow": None}  # hollow: open circles at the points, no line
STYLES = tuple(_DASHES)
_MEMORY_STYLES = ("line", "dashed", "dotted", "dashdot")
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
_TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
               43200, 86400)


# --- data reduction ---------------------------------------------------------------------------

def _floats(values) -> np.ndarray:
    # None becomes NaN: a missing value is drawn like a non-finite one, never dropped.
    return np.asarray(values, dtype=float)


def downsample(xs: Sequence[float], ys: Sequence[float | None],
               max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` (and at least 5) points of (xs, ys) that look the same when drawn.

    Keeps the first and last points and, per bucket of consecutive points, the finite minimum and
    maximum (so spikes and the global extremes survive) and the first non-finite value (None, NaN
    or inf: so a NaN loss stays visible). xs must be ascending.
    """
    x, y = _floats(xs), _floats(ys)
    n = len(y)
    if len(x) != n:
        raise ValueError(f"xs and ys differ in length: {len(x)} != {n}")
    if n <= max_points:
        return x, y
    finite = np.isfinite(y)
    all_finite = bool(finite.all())
    width = -(-n // max(1, (max_points - 2) // (2 if all_finite else 3)))
    full = n - n % width  # whole buckets are a reshaped view (no copy); the remainder is one more

    def pick(values: np.ndarray, arg: Callable[..., Any]) -> np.ndarray:
        """Index of arg (np.argmin / np.argmax) in each bucket."""
        found = [arg(values[:full].reshape(-1, width), axis=1) + np.arange(0, full, width)]
        if full < n:
            found.append([arg(values[full:]) + full])
        return np.concatenate(found)

    if all_finite:
        picks = [pick(y, np.argmin), pick(y, np.argmax)]
    else:  # a bucket with no finite value picks its first, which is what it should show
        first_bad = pick(~finite, np.argmax)
        picks = [pick(np.where(finite, y, np.inf), np.argmin),
                 pick(np.where(finite, y, -np.inf), np.argmax), first_bad[~finite[first_bad]]]
    idx = np.unique(np.concatenate([[0, n - 1], *picks]))
    return x[idx], y[idx]


def robust_band(values: np.ndarray, sample: int = 2000) -> tuple[float, float]:
    """The range that holds all but outliers: the 1st to 99th percentile widened by its own span
    on each side. A gradual trend (a falling loss) stays inside; a one-off spike of 1e22 does
    not. Percentiles of an evenly strided sample keep this cheap for long runs."""
    strided = values[::max(1, len(values) // sample)]
    k = len(strided) // 100
    ends = np.partition(strided, [k, len(strided) - 1 - k])  # np.percentile, minus its overhead
    lo, hi = float(ends[k]), float(ends[len(strided) - 1 - k])
    span = hi - lo
    return lo - span, hi + span


def smooth(xs: Sequence[float], ys: Sequence[float | None], max_points: int = SMOOTH_POINTS,
           weight: float = 0.9, log: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A smoothed line through (xs, ys) with at most `max_points` points.

    The finite values are averaged per bucket of consecutive points, then a debiased exponential
    moving average (TensorBoard's) runs across the buckets, so the window is a steady fraction of
    the run however long it gets. Non-finite values are left out and outliers are clipped to the
    `robust_band`, so one overflowed batch does not drag the line off the chart for the rest of
    the run: the raw line shows them.

    With `log`, the smoothing happens on log10(y) (for a log axis: an average of raw values is
    dominated by the largest ones, so on a log axis it would lag far above the raw line) and
    values <= 0 are left out.
    """
    x, y = _floats(xs), _floats(ys)
    if len(x) != len(y):
        raise ValueError(f"xs and ys differ in length: {len(x)} != {len(y)}")
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(y > 0, np.log10(y), np.nan)
    finite = np.isfinite(y)
    if not finite.all():
        x, y = x[finite], y[finite]
    n = len(y)
    if n == 0:
        return x, y
    y = np.clip(y, *robust_band(y))
    buckets = min(n, max_points)
    starts = np.linspace(0, n, buckets + 1).astype(int)
    counts = np.diff(starts)
    starts = starts[:-1]
    means_x = np.add.reduceat(x, starts) / counts
    means_y = np.add.reduceat(y, starts) / counts
    out = []
    ema = norm = 0.0  # norm debiases the start, where ema still leans towards 0
    for value in means_y.tolist():
        ema = weight * ema + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(ema / norm)
    smoothed = np.array(out)
    return means_x, (10.0 ** smoothed if log else smoothed)


def throughput(steps: Sequence[float], times: Sequence[float], samples: Sequence[float],
               max_points: int = SMOOTH_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Samples per second along the run: per bucket of consecutive steps, the samples of its
    steps over the time between the previous step's end and its last step's end (the first
    bucket counts from the start, time 0). The same definition as `Run.rates` (given step
    times net of compiling), so the last bucket agrees with a rate over the same steps. x is
    each bucket's last step."""
    x, t, n_samples = _floats(steps), _floats(times), _floats(samples)
    n = len(x)
    if n == 0 or len(t) != n or len(n_samples) != n:
        return np.empty(0), np.empty(0)
    t_end = np.concatenate([[0.0], t])
    total = np.concatenate([[0.0], np.cumsum(np.nan_to_num(n_samples))])
    edges = np.unique(np.linspace(0, n, min(n, max_points) + 1).astype(int))
    dt = t_end[edges[1:]] - t_end[edges[:-1]]
    done = total[edges[1:]] - total[edges[:-1]]
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(dt > 0, done / dt, np.nan)
    return x[edges[1:] - 1], rate


# --- tick labels -------------------------------------------------------------------------------

def _fmt_steps(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _fmt_seconds(v: float) -> str:
    """A time tick: 0.5s, 45s, 2m, 2m30s, 1h, 1h30m."""
    if abs(v - round(v)) > 1e-6:
        return f"{round(v, 6):g}s"
    s = int(round(v))
    hours, minutes, seconds = s // 3600, s % 3600 // 60, s % 60
    if hours:
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{seconds:02d}s" if seconds else f"{minutes}m"
    return f"{seconds}s"


# --- axes --------------------------------------------------------------------------------------

def _nice_step(span: float, target: int) -> float:
    raw = span / target
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)


def _ticks_between(lo: float, hi: float, step: float) -> list[float]:
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(hi / step + 1e-9) + 1)]


def _linear_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    return _ticks_between(lo, hi, _nice_step(hi - lo, target))


def _time_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    raw = (hi - lo) / target
    if raw < 1:  # a short run: ticks every 0.1s, 0.2s ... rather than none at all
        return _linear_ticks(lo, hi, target)
    step = next((s for s in _TIME_STEPS if s >= raw), None) or _nice_step(hi - lo, target)
    return _ticks_between(lo, hi, step)


def _log_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Whole exponents, every 1, 2, 4 ... of them."""
    step = 1
    while (hi - lo) / step > target:
        step *= 2
    return _ticks_between(lo, hi, step)


def _byte_ticks(hi: float, target: int = 4) -> tuple[list[float], str, float]:
    """Ticks from 0 in the largest binary unit below `hi`, e.g. 0, 0.5, 1, 1.5 GiB."""
    power = 0
    while power < len(BYTE_UNITS) - 1 and hi >= 1024 ** (power + 1):
        power += 1
    unit = 1024 ** power
    ticks = _linear_ticks(0, hi / unit, target)
    return [t * unit for t in ticks], BYTE_UNITS[power], unit


def _power_label(base: int, exponent: float) -> str:
    if base == 10 and exponent in (0, 1):
        return "1" if exponent == 0 else "10"
    return f"{base}{str(int(exponent)).translate(_SUPERSCRIPT)}"


def _y_axis(values: np.ndarray, y_scale: str, ignore_outliers: bool):
    """(lo, hi, ticks, labels) of the y axis for the finite values, which are exponents on
    the log scales."""
    if y_scale == "bytes":
        hi = float(values.max()) * 1.08 if len(values) and values.max() > 0 else 1024.0
        ticks, unit_name, unit = _byte_ticks(hi)
        labels = [f"{t / unit:g} {unit_name}" if t else "0" for t in ticks]
        return 0.0, hi, ticks, labels
    if y_scale == "rate":  # from 0, so a drop in throughput reads at its true size
        hi = float(values.max()) * 1.08 if len(values) and values.max() > 0 else 1.0
        ticks = _linear_ticks(0.0, hi, 4)
        return 0.0, hi, ticks, [_fmt_steps(t) for t in ticks]
    if len(values):
        lo, hi = float(values.min()), float(values.max())
        if ignore_outliers:
            band_lo, band_hi = robust_band(values)
            lo, hi = max(lo, band_lo), min(hi, band_hi)
    else:
        lo, hi = (10.0, 20.0) if y_scale == "log2" else (0.0, 1.0)
    logarithmic = y_scale in ("log2", "log10")
    floor_pad = 0.5 if logarithmic else (abs(lo) * 0.1 or 0.5)
    pad = max((hi - lo) * 0.06, 0 if hi > lo else floor_pad)
    lo, hi = lo - pad, hi + pad
    if logarithmic:
        ticks = _log_ticks(lo, hi)
        base = 2 if y_scale == "log2" else 10
        return lo, hi, ticks, [_power_label(base, t) for t in ticks]
    ticks = _linear_ticks(lo, hi)
    return lo, hi, ticks, [f"{t:.4g}" for t in ticks]


def _x_axis(values: np.ndarray, x_scale: str):
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    if 0 < lo <= 0.05 * hi and x_scale != "log10":  # steps from 1, times from the first
        lo = 0.0  # refresh: start the axis at 0
    if hi <= lo:
        hi = lo + 1.0
    if x_scale == "seconds":
        ticks = _time_ticks(lo, hi)
        return lo, hi, ticks, [_fmt_seconds(t) for t in ticks]
    if x_scale == "log10":  # the values are exponents
        ticks = _log_ticks(lo, hi)
        return lo, hi, ticks, [_power_label(10, t) for t in ticks]
    ticks = _linear_ticks(lo, hi)
    return lo, hi, ticks, [_fmt_steps(t) for t in ticks]


# --- charts ------------------------------------------------------------------------------------

@dataclass
class Series:
    """One line on a chart. style: line | faint | dashed | dotted | dashdot | markers."""
    label: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str
    style: str = "line"
    faded: bool = False  # an earlier run: drawn underneath, translucent, not in the legend

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, not {self.style!r}")


def _stroke(series: Series, width: float | None = None) -> str:
    if width is None:
        width = {"faint": 1.0, "markers": 1.2}.get(series.style, 1.4 if series.faded else 1.9)
    opacity = (0.3 if series.style == "faint" else 1.0) * (FADED_OPACITY if series.faded else 1)
    attrs = f'stroke="{_e(series.color)}" stroke-width="{width}" fill="none"'
    if opacity < 1:
        attrs += f' stroke-opacity="{opacity:.2f}"'
    if _DASHES[series.style]:
        attrs += f' stroke-dasharray="{_DASHES[series.style]}"'
    return attrs


def _path_d(px: np.ndarray, py: np.ndarray) -> str:
    """SVG path data through the points, broken at non-finite values, flat runs collapsed."""
    ok = np.isfinite(py)
    px, py = np.round(px, 1), np.round(py, 1)
    keep = ok.copy()
    if len(py) > 2:  # the middle of a horizontal run draws nothing
        keep[1:-1] &= ~((py[1:-1] == py[:-2]) & (py[1:-1] == py[2:]) & ok[:-2] & ok[2:])
    edges = np.flatnonzero(np.diff(np.concatenate([[False], ok, [False]]).astype(np.int8)))
    parts = []
    for start, stop in zip(edges[0::2].tolist(), edges[1::2].tolist()):
        idx = np.flatnonzero(keep[start:stop]) + start
        xy = tuple(np.column_stack([px[idx], py[idx]]).ravel().tolist())
        points = ("%.1f,%.1f " * len(idx) % xy).rstrip()  # one format call: the fast way
        # A lone point is a zero-length line, which round caps draw as a dot.
        parts.append(f"M{points}h0" if len(idx) == 1 else f"M{points}")
    return " ".join(parts)


def _fade(faded: bool) -> str:
    return f' opacity="{FADED_OPACITY}"' if faded else ""


def _triangle(x: float, y: float) -> str:
    """A downward triangle with its tip at (x, y)."""
    return f"M{x - 3.5:.1f},{y - 6:.1f}h7l-3.5,6z"


_TITLE_FONT, _FONT = 12.5, 11.0  # pixels: charts never scale up, so this is what is seen
_LEGEND_ROW = 15.0


def _legend(entries, width: float) -> tuple[list[str], int]:
    """Legend entries (label, color, style) flowed into rows: (svg parts, row count)."""
    parts, x, row = [], 8.0, 0
    for label, color, style in entries:
        w = len(label) * _FONT * 0.56 + 30  # a rough text width: the font is the page's
        if x + w > width and x > 8:
            x, row = 8.0, row + 1
        y = 36 + row * _LEGEND_ROW
        if style == "mark":
            swatch = f'<path d="{_triangle(x + 7, y + 2)}" fill="{ALERT}"/>'
        elif style == "nonfinite":
            swatch = f'<path d="M{x + 7},{y - 5}v9" stroke="{ALERT}" stroke-width="2"/>'
        elif style == "hollow":
            swatch = (f'<circle cx="{x + 8}" cy="{y - 1}" r="3" fill="none" '
                      f'stroke="{_e(color)}" stroke-width="1.3"/>')
        elif style == "off_scale":  # an arrow pointing up and out of the plot
            swatch = (f'<path d="M{x + 7},{y + 4}v-9m-3.5,3.5l3.5,-3.5l3.5,3.5" '
                      f'stroke="{INK}" stroke-width="1.5" fill="none"/>')
        else:  # a faint line is drawn wider here, or it could not be seen
            sample = _stroke(Series("", (), (), color, style), 3.0 if style == "faint" else None)
            swatch = f'<path d="M{x},{y - 1}h16" {sample}/>'
            if style == "markers":
                swatch += f'<circle cx="{x + 8}" cy="{y - 1}" r="2.5" fill="{_e(color)}"/>'
        parts.append(f'{swatch}<text x="{x + 21:.1f}" y="{y + 3.5}">{_e(label)}</text>')
        x += w
    return parts, (row + 1 if entries else 0)


def _auto_scale(values: np.ndarray, ignore_outliers: bool) -> str:
    """log10 when the positive values span over 1000x (outliers aside), else linear."""
    values = values[np.isfinite(values)]
    if not len(values) or values.min() <= 0:
        return "linear"
    lo, hi = values.min(), values.max()
    if ignore_outliers:
        band_lo, band_hi = robust_band(values)
        lo, hi = max(lo, band_lo), min(hi, band_hi)
    return "log10" if hi > 1000 * lo else "linear"


def _x_window(xs, ys, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """The points of an ascending series within [lo, hi], plus one on each side, so the line
    still runs out of the plot where the data goes on."""
    x, y = _floats(xs), _floats(ys)
    if len(x) != len(y):
        raise ValueError(f"xs and ys differ in length: {len(x)} != {len(y)}")
    first = max(int(np.searchsorted(x, lo, "left")) - 1, 0)
    last = int(np.searchsorted(x, hi, "right")) + 1
    return x[first:last], y[first:last]


def line_chart_svg(title: str, series: Sequence[Series], *, x_label: str = "step",
                   x_scale: str = "linear", y_scale: str = "linear", marks: Sequence[float] = (),
                   marks_label: str = "skipped step", note: str = "",
                   guides: Sequence[tuple[float, str]] = (),
                   ignore_outliers: bool = False, max_points: int = MAX_POINTS,
                   width: int = CHART_WIDTH, height: int = CHART_HEIGHT) -> str:
    """A standalone SVG document: a line chart with title, legend, ticks and gridlines,
    `width` x `height` pixels, in fixed colours (it must read inside an <img>, on any theme).

    x_scale: "linear" (steps, labelled 5k, 10k ...), "seconds" (0.5s, 30s, 2m ...) or
    "log10" (the xs are exponents, labelled 10⁻³, 10⁻² ...: a learning rate's axis);
    y_scale: "linear", "log2" (ticks 2¹⁰, 2¹⁶ ...), "log10", "bytes" (from 0, in KiB/MiB/GiB),
    "rate" (from 0, labelled 500, 1.5k ...) or "auto": linear, or log10 when positive data
    spans more than 1000x (a loss that diverged).
    The axes follow the bold (not faded) series: faded series, earlier runs, are drawn
    underneath, clipped to the plot and left out of the legend, so a diverged earlier run
    cannot flatten the current one. (With no bold data yet, the axes fit the faded series.)
    `marks` are x positions flagged by red triangles above the plot (skipped steps); non-finite
    values of the bold series get a red tick there too. `note` is written across the plot
    (e.g. "no scaler"). `guides` are (x, label) drawn as labelled vertical lines (suggested
    learning rates). With `ignore_outliers`, the y axis spans the `robust_band` of the data,
    not its extremes (lines run off the plot there and the legend counts them), so a single
    overflowed batch cannot flatten the rest of the loss curve.
    Every series is reduced to about `max_points` points first.
    """
    scales = ("linear", "log2", "log10", "bytes", "rate", "auto")
    if x_scale not in ("linear", "seconds", "log10") or y_scale not in scales:
        raise ValueError(f"unknown scale: x_scale={x_scale!r}, y_scale={y_scale!r}")
    plot = _Plot(series, _floats(marks), x_scale, y_scale, ignore_outliers, max_points)
    legend, legend_rows = _legend(plot.legend_entries(marks_label), width)
    box = _Box(plot, width, height, legend_rows)
    lines, nonfinite_columns = _lines_svg(plot, box)
    out = [_frame_svg(title, x_label, plot, box, legend), lines,
           _marks_svg(plot, box, nonfinite_columns, marks_label, x_label),
           _guides_svg(box, guides)]
    if note or not plot.has_data:
        empty = (f"no finite value ({plot.nonfinite:,} NaN/inf)" if plot.nonfinite
                 else "no data yet")
        out.append(f'<text x="{(box.left + box.right) / 2}" y="{(box.top + box.bottom) / 2}" '
                   f'text-anchor="middle" font-size="{_TITLE_FONT}">'
                   f'{_e(note or empty)}</text>')
    out.append("</svg>")
    return "".join(out)


class _Plot:
    """The series reduced to what is drawn, on the y axis' scale, and the axes they span."""

    def __init__(self, series: Sequence[Series], mark_xs: np.ndarray, x_scale: str,
                 y_scale: str, ignore_outliers: bool, max_points: int):
        bold_series = [s for s in series if not s.faded]
        bold = [_floats(s.ys) for s in bold_series]
        self.nonfinite = sum(len(ys) - int(np.isfinite(ys).sum()) for ys in bold)
        if y_scale == "auto":
            y_scale = _auto_scale(np.concatenate(bold + [np.empty(0)]), ignore_outliers)
        self.y_scale, self.mark_xs = y_scale, mark_xs
        reduced = [self._on_axis(s, *downsample(s.xs, ys, max_points))
                   for s, ys in zip(bold_series, bold)]
        faded = [s for s in series if s.faded]
        all_y = _finite([y for *_, y in reduced])
        if len(all_y):  # the axes follow the bold series; earlier runs are cut to their x range
            self.x_axis = _x_axis(_finite([x for _, x, _, _ in reduced] + [mark_xs]), x_scale)
            x_lo, x_hi = self.x_axis[:2]
            faded_reduced = [self._on_axis(s, *downsample(*_x_window(s.xs, s.ys, x_lo, x_hi),
                                                           max_points)) for s in faded]
        else:  # no bold data yet: the earlier runs set the axes
            faded_reduced = [self._on_axis(s, *downsample(s.xs, s.ys, max_points))
                             for s in faded]
            self.x_axis = _x_axis(_finite([x for _, x, _, _ in faded_reduced] + [mark_xs]),
                                  x_scale)
            all_y = _finite([y for *_, y in faded_reduced])
        # earlier runs of the same order of magnitude share the y axis; the others are drawn
        # along its edge and counted in the legend, never silently cut away
        self.off_faded = set()
        if len(all_y) and reduced:
            near = []
            for s, _, _, y in faded_reduced:
                values = y[np.isfinite(y)]
                if len(values) and _comparable(values, all_y, ignore_outliers):
                    near.append(values)
                elif len(values):
                    self.off_faded.add(id(s))
            all_y = np.concatenate([all_y, *near])
        self.has_data = bool(len(all_y))
        self.y_axis = _y_axis(all_y, y_scale, ignore_outliers)
        self.reduced = faded_reduced + reduced  # drawn underneath
        self.off_scale = self._off_scale(bold) if ignore_outliers else 0

    def to_axis(self, values: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            log = {"log2": np.log2, "log10": np.log10}.get(self.y_scale)
            return log(values) if log else values

    def _on_axis(self, s: Series, x: np.ndarray, values: np.ndarray) -> tuple:
        return s, x, values, self.to_axis(values)

    def _off_scale(self, bold: list[np.ndarray]) -> int:
        """Finite values beyond the y axis (NaN/inf are counted apart, above)."""
        y_lo, y_hi = self.y_axis[:2]
        count = 0
        for ys in bold:
            with np.errstate(invalid="ignore"):
                on_axis = self.to_axis(ys)
                outside = (on_axis < y_lo) | (on_axis > y_hi)
            count += int(np.count_nonzero(outside & np.isfinite(on_axis)))
        return count

    def legend_entries(self, marks_label: str) -> list[tuple[str, str, str]]:
        entries = [(s.label, s.color, s.style) for s, *_ in self.reduced
                   if s.label and not s.faded]
        if len(self.mark_xs):
            entries.append((f"{marks_label} ({len(self.mark_xs):,})", ALERT, "mark"))
        if self.nonfinite:
            entries.append((f"NaN/inf ({self.nonfinite:,})", ALERT, "nonfinite"))
        if self.off_scale:
            entries.append((f"off scale ({self.off_scale:,})", INK, "off_scale"))
        if self.off_faded:
            entries.append((f"earlier run{'s' * (len(self.off_faded) != 1)} off scale, at the "
                            f"edge ({len(self.off_faded)})", INK, "off_scale"))
        return entries


class _Box:
    """Where the plot area lies in the picture, and data -> pixels."""

    def __init__(self, plot: _Plot, width: int, height: int, legend_rows: int):
        self.width, self.height = width, height
        self.x_lo, self.x_hi, x_ticks, x_labels = plot.x_axis
        self.y_lo, self.y_hi, y_ticks, y_labels = plot.y_axis
        if not plot.has_data:  # no data: an empty frame, not made-up ticks
            x_ticks, x_labels, y_ticks, y_labels = [], [], [], []
        self.x_ticks, self.y_ticks = list(zip(x_ticks, x_labels)), list(zip(y_ticks, y_labels))
        self.left = 12 + max(map(len, y_labels), default=1) * _FONT * 0.6
        self.right = width - 10.0
        self.top, self.bottom = 30 + legend_rows * _LEGEND_ROW + 8, height - 30.0

    def sx(self, v):
        return self.left + (np.asarray(v, float) - self.x_lo) / (self.x_hi - self.x_lo) * (
            self.right - self.left)

    def sy(self, v):
        return self.bottom - (np.asarray(v, float) - self.y_lo) / (self.y_hi - self.y_lo) * (
            self.bottom - self.top)


def _frame_svg(title: str, x_label: str, plot: _Plot, box: _Box, legend: list[str]) -> str:
    """The document's start: title, legend, gridlines, ticks and the axes."""
    left, right, top, bottom = box.left, box.right, box.top, box.bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{box.width}" height="{box.height}" '
           f'viewBox="0 0 {box.width} {box.height}" role="img" aria-label="{_e(title)}" '
           f'font-family="system-ui,-apple-system,Segoe UI,Roboto,sans-serif" font-size="{_FONT}" '
           f'fill="{INK}" stroke-linecap="round" '
           f'stroke-linejoin="round"><title>{_e(title)}</title>'
           f'<text x="8" y="17" font-size="{_TITLE_FONT}" font-weight="600">{_e(title)}</text>',
           *legend]
    grid = []
    for t, label in box.y_ticks:
        py = float(box.sy(t))
        grid.append(f"M{left},{py:.1f}H{right}")
        out.append(f'<text class="ytick" x="{left - 5}" y="{py + 3.5:.1f}" text-anchor="end">'
                   f"{_e(label)}</text>")
    for t, label in box.x_ticks:
        px = float(box.sx(t))
        grid.append(f"M{px:.1f},{top}V{bottom}")
        out.append(f'<text class="xtick" x="{px:.1f}" y="{bottom + 14}" text-anchor="middle">'
                   f"{_e(label)}</text>")
    out.append(f'<path d="{" ".join(grid)}" stroke="{INK}" stroke-opacity="0.3" '
               f'fill="none"/><path d="M{left},{top}V{bottom}H{right}" stroke="{INK}" '
               f'fill="none"/>')
    if x_label:
        out.append(f'<text x="{right}" y="{box.height - 3}" text-anchor="end">'
                   f"{_e(x_label)}</text>")
    return "".join(out)


def _lines_svg(plot: _Plot, box: _Box) -> tuple[str, dict]:
    """The series, clipped to the plot (off-scale values and earlier runs beyond the axes run
    out of it) by a nested viewport, which needs no id: ids would clash between the many charts
    of one notebook. Also returns the pixel columns of the bold series' non-finite values."""
    left, right, top, bottom = box.left, box.right, box.top, box.bottom
    out = [f'<svg x="{left - 2}" y="{top - 2}" width="{right - left + 4}" '
           f'height="{bottom - top + 4}" viewBox="{left - 2} {top - 2} {right - left + 4} '
           f'{bottom - top + 4}" overflow="hidden">']
    nonfinite_columns = {}  # pixel column -> (x, value, label): one mark per column
    for s, x, values, y in plot.reduced:
        px, py = box.sx(x), box.sy(y)
        # far-off points are pulled in to just outside the plot: same look, short numbers; an
        # earlier run off the scale runs along its edge instead
        edge = (top, bottom) if id(s) in plot.off_faded else (top - box.height, bottom + box.height)
        py = np.where(np.isfinite(py), np.clip(py, *edge), np.nan)
        if s.style == "hollow":
            rings = "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3"/>'
                            for a, b in zip(px.tolist(), py.tolist()) if math.isfinite(b))
            out.append(f'<g class="series" data-series="{_e(s.label)}" fill="none" '
                       f'stroke="{_e(s.color)}" stroke-width="1.3"{_fade(s.faded)}>{rings}'
                       f"<title>{_e(s.label)}</title></g>")
            continue
        out.append(f'<path class="series" data-series="{_e(s.label)}" d="{_path_d(px, py)}" '
                   f"{_stroke(s)}><title>{_e(s.label)}</title></path>")
        few = int(np.isfinite(py).sum()) <= 2  # a line of one or two points hardly shows
        if (s.style == "markers" and len(x) <= 100) or (few and s.style != "faint"):
            dots = "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5"/>'
                           for a, b in zip(px.tolist(), py.tolist()) if math.isfinite(b))
            out.append(f'<g fill="{_e(s.color)}"{_fade(s.faded)}>{dots}</g>')
        if not s.faded:
            for i in np.flatnonzero(~np.isfinite(y)).tolist():
                nonfinite_columns.setdefault(round(float(px[i])), (x[i], values[i], s.label))
    out.append("</svg>")
    return "".join(out), nonfinite_columns


def _marks_svg(plot: _Plot, box: _Box, nonfinite_columns: dict, marks_label: str,
               x_label: str) -> str:
    """Above the plot: red triangles at the marks, red ticks at non-finite values."""
    top, out = box.top, []
    mark_columns = {}
    for m in plot.mark_xs[np.isfinite(plot.mark_xs)].tolist():
        mark_columns.setdefault(round(float(box.sx(m))), m)
    for column, m in mark_columns.items():
        out.append(f'<path class="mark" data-x="{m:g}" d="{_triangle(column, top - 1)}" '
                   f'fill="{ALERT}"><title>{_e(marks_label)} {m:g}</title></path>')
    for column, (m, value, label) in nonfinite_columns.items():
        out.append(f'<path class="nonfinite" data-x="{m:g}" d="M{column},{top - 8}V{top + 4}" '
                   f'stroke="{ALERT}" stroke-width="2"><title>{_e(label)} is {value} at '
                   f"{_e(x_label)} {m:g}</title></path>")
    return "".join(out)


def _guides_svg(box: _Box, guides: Sequence[tuple[float, str]]) -> str:
    """Labelled vertical lines, the labels stepped down so that neighbours do not overlap."""
    out = []
    for i, (x, label) in enumerate(sorted(guides)):
        if not (math.isfinite(x) and box.x_lo <= x <= box.x_hi):
            continue
        px = float(box.sx(x))
        anchor = "end" if px > (box.left + box.right) / 2 else "start"
        dx = -3 if anchor == "end" else 3
        out.append(f'<path class="guide" d="M{px:.1f},{box.top}V{box.bottom}" stroke="{INK}" '
                   f'stroke-width="1" stroke-dasharray="3 3" fill="none"/>'
                   f'<text class="guide" x="{px + dx:.1f}" y="{box.top + 11 + 12 * (i % 4)}" '
                   f'text-anchor="{anchor}">{_e(label)}</text>')
    return "".join(out)


def _comparable(values: np.ndarray, current: np.ndarray, ignore_outliers: bool) -> bool:
    """An earlier run's values (axis units) share the axis when the two together span at most
    10x what the current run's span."""
    def band(v: np.ndarray) -> tuple[float, float]:
        return robust_band(v) if ignore_outliers else (float(v.min()), float(v.max()))

    lo, hi = band(current)
    other_lo, other_hi = band(values)
    span = max(hi - lo, abs(hi) * 0.05, 1e-12)
    return max(hi, other_hi) - min(lo, other_lo) <= 10 * span


def _finite(columns: list[np.ndarray]) -> np.ndarray:
    joined = np.concatenate(columns + [np.empty(0)])
    return joined[np.isfinite(joined)]


def svg_image(svg: str, alt: str, width: int = CHART_WIDTH, height: int = CHART_HEIGHT) -> str:
    """The SVG as an <img> with a data URI: survives the sanitiser of untrusted notebooks,
    nbconvert's HTML and GitHub's viewer. At most its own pixel size, smaller in a narrower
    box; the width and height attributes reserve its space before it is decoded."""
    data = base64.b64encode(svg.encode()).decode("ascii")
    return (f'<img class="amp-chart" src="data:image/svg+xml;base64,{data}" alt="{_e(alt)}" '
            f'width="{width}" height="{height}" style="display:block;width:100%;'
            f'max-width:{width}px;height:auto">')


def svg_inline(svg: str, width: int = CHART_WIDTH) -> str:
    """The SVG placed in the page itself (the live widget): the same size rules as svg_image."""
    return svg.replace("<svg ", '<svg style="display:block;width:100%;max-width:'
                       f'{width}px;height:auto" ', 1)


# --- the dashboard -----------------------------------------------------------------------------

@dataclass
class RunTrace:
    """One run's history as plain columns.

    steps/loss/scale/time/samples are aligned per optimizer step (scale empty without a
    GradScaler; time: seconds since the start at the step's end; samples: the step's batch
    size); memory maps a label ("allocated", "reserved", "peak", "device used (NVML)", or
    "resident (RSS)") to bytes aligned with memory_time (seconds since the start); the first
    label is the one drawn for earlier runs.
    """
    name: str
    flags: str = ""  # what differs from the current run, e.g. "lr=0.01 dtype=bf16"
    steps: Sequence[float] = ()
    loss: Sequence[float | None] = ()
    scale: Sequence[float | None] = ()
    skipped: Sequence[float] = ()  # steps the GradScaler skipped
    val_steps: Sequence[float] = ()
    val_loss: Sequence[float | None] = ()
    memory_time: Sequence[float] = ()
    memory: dict[str, Sequence[float | None]] = field(default_factory=dict)
    time: Sequence[float] = ()
    samples: Sequence[float] = ()


_COLUMNS = ("steps", "loss", "scale", "skipped", "val_steps", "val_loss", "memory_time", "time",
            "samples")


@dataclass
class DashboardView:
    """Everything the dashboard shows, as plain values."""
    current: RunTrace
    earlier: list[RunTrace] = field(default_factory=list)  # oldest first, drawn faded
    status: str = ""  # device, dtype, scaler settings, skipped steps so far
    scaler: bool = False  # True: a loss-scale chart; False: a throughput chart in its place
    step: int = 0
    total_steps: int | None = None
    epoch: int = 1  # 1-based
    epochs: int | None = None
    samples_per_s: float | None = None
    steps_per_s: float | None = None
    rate_window: str = ""  # what the rates were measured over, e.g. "last 50 steps"
    lr: float | None = None
    elapsed: float = 0.0  # seconds
    eta: float | None = None  # seconds
    alarms: list[str] = field(default_factory=list)
    summary: list[tuple[str, str]] | None = None  # the final summary rows; None while running
    comparison: bool = False  # finished runs side by side (%amp_runs --plot): no "this run"


def _run_colors(view: DashboardView) -> list[str]:
    """Colour of the current run, then of each earlier run: the palette, then as many more
    distinct colours as a sweep's runs need (no two runs of a chart share one)."""
    return run_colors(1 + len(view.earlier))


def run_colors(count: int) -> list[str]:
    """`count` distinct colours: the palette first, then hues spaced by the golden angle at
    the palette's mid lightness (reads on light and dark themes), away from ALERT's red."""
    colors = list(PALETTE[:count])
    hue = 0.0
    while len(colors) < count:
        hue = (hue + 0.381966) % 1.0
        if hue < 0.04 or hue > 0.96:  # ALERT's red marks skipped steps
            continue
        r, g, b = colorsys.hls_to_rgb(hue, 0.5, 0.6)
        candidate = f"#{round(r * 255):02X}{round(g * 255):02X}{round(b * 255):02X}"
        if candidate not in colors:
            colors.append(candidate)
    return colors


def loss_axis(loss: np.ndarray) -> str:
    """The loss chart's y scale for the current run's losses: "log10" or "linear"."""
    return _auto_scale(loss, ignore_outliers=True)


def _loss_chart_svg(view: DashboardView, colors: Sequence[str]) -> str:
    run, color = view.current, colors[0]
    y_scale = loss_axis(run.loss)
    log = y_scale == "log10"  # smooth in the axis' space, or the line lags above the data
    series = []
    for earlier, c in zip(view.earlier, colors[1:]):
        series += [Series(f"{earlier.name} loss", *smooth(earlier.steps, earlier.loss, log=log), c,
                          faded=True),
                   Series(f"{earlier.name} val loss", earlier.val_steps, earlier.val_loss, c,
                          "markers", faded=True)]
    series += [Series("loss", run.steps, run.loss, color, "faint"),
               Series("smoothed", *smooth(run.steps, run.loss, log=log), color)]
    if len(run.val_steps):
        series.append(Series("val loss", run.val_steps, run.val_loss, color, "markers"))
    return line_chart_svg("Loss", series, y_scale=y_scale, ignore_outliers=True)


def _scale_chart_svg(view: DashboardView, colors: Sequence[str]) -> str:
    series = [Series(f"{run.name} loss scale", run.steps, run.scale, color, faded=True)
              for run, color in zip(view.earlier, colors[1:]) if len(run.scale)]
    run = view.current
    series.append(Series("loss scale", run.steps, run.scale, colors[0]))
    return line_chart_svg("Loss scale", series, y_scale="log2", marks=run.skipped)


def _throughput_chart_svg(view: DashboardView, colors: Sequence[str]) -> str:
    """In the loss-scale chart's place for runs without a scaler (bf16, fp32)."""
    series = [Series(f"{run.name} samples/s", *throughput(run.steps, run.time, run.samples),
                     color, faded=True)
              for run, color in zip(view.earlier, colors[1:])]
    run = view.current
    series.append(Series("samples/s", *throughput(run.steps, run.time, run.samples), colors[0]))
    return line_chart_svg("Throughput", series, y_scale="rate", max_points=SMOOTH_POINTS)


def _memory_chart_svg(view: DashboardView, colors: Sequence[str]) -> str:
    series = []
    for run, color in zip(view.earlier, colors[1:]):
        if run.memory:  # the first kind only: four faded lines per run would be a tangle
            label, values = next(iter(run.memory.items()))
            series.append(Series(f"{run.name} {label}", run.memory_time, values, color, faded=True))
    run = view.current
    series += [Series(label, run.memory_time, values, colors[0], style)
               for (label, values), style in zip(run.memory.items(), _MEMORY_STYLES)]
    return line_chart_svg("Memory", series, x_label="time", x_scale="seconds", y_scale="bytes",
                          max_points=SMOOTH_POINTS)


LEGEND_CHARS = 90  # the runs legend lists earlier runs while it fits about this many characters


def _swatch(color: str) -> str:
    return (f'<span style="display:inline-block;width:14px;height:3px;background:{_e(color)};'
            f'vertical-align:middle;margin-right:5px;border-radius:2px"></span>')


def _runs_legend(view: DashboardView, colors: Sequence[str]) -> str:
    """One line: the current run, then the earlier runs (newest first; in a comparison, in the
    order given) while they fit in about LEGEND_CHARS characters; the rest collapse into
    "+N earlier runs" (their names and flags in its tooltip)."""
    def item(run: RunTrace, color: str, faded: bool, note: str) -> str:
        flags = f' <span style="opacity:.75">{_e(run.flags)}</span>' if run.flags else ""
        fade = ' style="opacity:.75"' if faded else ""
        return (f'<span{fade}><span style="white-space:nowrap">{_swatch(color)}'
                f'<b>{_e(run.name)}</b>{note}</span>{flags}</span>')

    note = "" if view.comparison else " (this run)"
    items = [item(view.current, colors[0], False, note)]
    used = len(view.current.name + note)
    earlier = list(zip(view.earlier, colors[1:]))
    if not view.comparison:
        earlier.reverse()  # newest first
    shown = 0
    for run, color in earlier:
        width = len(run.name) + len(run.flags) + 4
        rest = len(earlier) - shown - 1
        if used + width + (18 if rest else 0) > LEGEND_CHARS:
            break
        items.append(item(run, color, True, ""))
        used += width
        shown += 1
    hidden = earlier[shown:]
    if hidden:
        tip = "; ".join(f"{run.name} {run.flags}".strip() for run, _ in hidden)
        swatches = "".join(_swatch(color).replace("width:14px", "width:8px")
                           for _, color in hidden[:6])
        more = "" if shown == 0 else "more "
        plural = "s" if len(hidden) != 1 else ""
        items.append(f'<span class="amp-more-runs" title="{_e(tip)}" style="white-space:nowrap;'
                     f'opacity:.75">{swatches}+{len(hidden)} {more}earlier run{plural}</span>')
    return (f'<div class="amp-runs" style="display:flex;flex-wrap:wrap;column-gap:16px;'
            f'margin:2px 0 6px 0">{"".join(items)}</div>')


def _progress_html(view: DashboardView) -> str:
    fraction = (min(1.0, max(0.0, view.step / view.total_steps)) if view.total_steps else None)
    epochs = f"/{view.epochs}" if view.epochs else ""
    total = f" / {view.total_steps:,}" if view.total_steps else ""
    bar = ""
    if fraction is not None:
        bar = (f'<div style="flex:1 1 160px;min-width:120px;height:8px;border-radius:4px;'
               f'background:rgba(128,128,128,.25);overflow:hidden">'
               f'<div class="amp-progress" data-fraction="{fraction:.4f}" style="height:100%;'
               f'width:{fraction * 100:.2f}%;background:{PALETTE[0]}"></div></div>')
    parts = [f"epoch {view.epoch}{epochs}", f"step {view.step:,}{total}"]
    if fraction is not None:
        parts.append(f"{fraction:.0%}")
    label = " · ".join(f'<span style="white-space:nowrap">{p}</span>' for p in parts)
    return (f'<div class="amp-header" style="display:flex;flex-wrap:wrap;align-items:center;'
            f'gap:2px 10px;margin:4px 0">{bar}<span>{label}</span></div>')


def _stats_html(view: DashboardView) -> str:
    window = (f' <span style="opacity:.65">({_e(view.rate_window)})</span>'
              if view.rate_window else "")
    stats = [("samples/s", format_number(view.samples_per_s), ""),
             ("steps/s", format_number(view.steps_per_s), window),
             ("lr", "—" if view.lr is None else f"{view.lr:.3g}", ""),
             ("elapsed", format_duration(view.elapsed), ""),
             ("ETA", format_duration(view.eta), "")]
    cells = "".join(
        f'<span style="white-space:nowrap"><span style="opacity:.65">{k}</span> '
        f'<b>{v}</b>{extra}</span>' for k, v, extra in stats)
    return (f'<div class="amp-stats" style="display:flex;flex-wrap:wrap;gap:0 20px;'
            f'margin:2px 0 4px 0">{cells}</div>')


def _alarms_html(alarms: Sequence[str]) -> str:
    return "".join(
        f'<div class="amp-alarm" style="border-left:4px solid {ALERT};padding:4px 8px;'
        f'margin:4px 0;background:rgba(204,51,17,.12);border-radius:2px">⚠ {_e(a)}</div>'
        for a in alarms)


def _with_arrays(run: RunTrace) -> RunTrace:
    """The trace with numpy columns, so lists are converted once, not once per use."""
    columns = {name: _floats(getattr(run, name)) for name in _COLUMNS}
    return replace(run, memory={k: _floats(v) for k, v in run.memory.items()}, **columns)


CHART_TITLES = {"loss": "Loss", "scale": "Loss scale", "throughput": "Throughput",
                "memory": "Memory"}


def dashboard_html(view: DashboardView, inline: bool = False) -> str:
    """The whole dashboard as one self-contained HTML string (no scripts, inline styles).

    Charts are <img> elements with SVG data URIs (what a saved notebook must hold: it reads
    untrusted, in nbconvert and on GitHub); `inline=True` places the same SVG in the page
    instead, for the live widget. Three charts of fixed size in a wrapping row: loss, then the
    loss scale (fp16) or the throughput (no scaler), then memory."""
    view = replace(view, current=_with_arrays(view.current),
                   earlier=[_with_arrays(run) for run in view.earlier])
    colors = _run_colors(view)
    middle = ("scale", _scale_chart_svg) if view.scaler else ("throughput", _throughput_chart_svg)
    drawn = [("loss", _loss_chart_svg(view, colors)), (middle[0], middle[1](view, colors)),
             ("memory", _memory_chart_svg(view, colors))]

    def place(name: str, svg: str) -> str:
        return svg_inline(svg) if inline else svg_image(svg, f"{CHART_TITLES[name]} chart")

    charts = "".join(f'<div style="flex:1 1 300px;min-width:0;max-width:{CHART_WIDTH}px">'
                     f"{place(name, svg)}</div>" for name, svg in drawn)
    status = f'<div style="opacity:.8;margin:2px 0">{_e(view.status)}</div>' if view.status else ""
    summary = summary_table_html(view.summary) if view.summary is not None else ""
    return (f'<div class="amp-dashboard" style="font-family:system-ui,-apple-system,\'Segoe UI\','
            f'Roboto,sans-serif;font-size:12.5px;line-height:1.45;color:inherit;padding:4px 0">'
            f"{_runs_legend(view, colors)}{_progress_html(view)}{_stats_html(view)}{status}"
            f"{_alarms_html(view.alarms)}"
            f'<div class="amp-charts" style="display:flex;flex-wrap:wrap;gap:8px 16px;'
            f'margin-top:6px">{charts}</div>{summary}</div>')
