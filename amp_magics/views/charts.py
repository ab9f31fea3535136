"""The training dashboard as SVG and HTML strings: data in, markup out.

Pure functions with no IPython, widget or torch dependency, so the same markup serves the live
widget and the static snapshot left in the saved notebook. Charts are inline SVG that take
their text colour from the page (`currentColor`), so they read on light and dark themes, and
use presentation attributes rather than a <style> block, which sanitisers strip.

Cost is bounded whatever the run length: every series is reduced to about `max_points` points
before drawing. Columns may be lists or numpy arrays; pass arrays (and keep them for finished
runs), since turning a list into an array costs ~3.5 ms per 100,000 values, on every render.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .format import BYTE_UNITS, escape as _e, format_duration, format_number, summary_table_html

if TYPE_CHECKING:
    from collections.abc import Callable

# Paul Tol's "vibrant" scheme (its blue lightened): colour-blind safe and mid-luminance, so it
# reads on light and dark themes.
PALETTE = ("#1E88E5", "#EE7733", "#009988", "#EE3377", "#33BBEE", "#BBBBBB")
ALERT = "#CC3311"  # skipped steps and non-finite values; no run gets this colour
FADED_OPACITY = 0.35
MAX_POINTS = 1000
SMOOTH_POINTS = 200  # for slow lines (smoothed loss, memory): fewer points, same look

_DASHES = {"line": None, "faint": None, "dashed": "6 3", "dotted": "1.5 3", "dashdot": "7 3 1.5 3",
           "markers": "2 3"}
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
           weight: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """A smoothed line through (xs, ys) with at most `max_points` points.

    The finite values are averaged per bucket of consecutive points, then a debiased exponential
    moving average (TensorBoard's) runs across the buckets, so the window is a steady fraction of
    the run however long it gets. Non-finite values are left out and outliers are clipped to the
    `robust_band`, so one overflowed batch does not drag the line off the chart for the rest of
    the run: the raw line shows them.
    """
    x, y = _floats(xs), _floats(ys)
    if len(x) != len(y):
        raise ValueError(f"xs and ys differ in length: {len(x)} != {len(y)}")
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
    return means_x, np.array(out)


# --- tick labels -------------------------------------------------------------------------------

def _fmt_steps(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _fmt_seconds(v: float) -> str:
    """A time tick: 45s, 2m, 2m30s, 1h, 1h30m."""
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
    if 0 < lo <= 0.05 * hi:  # steps from 1, times from the first refresh: start the axis at 0
        lo = 0.0
    if hi <= lo:
        hi = lo + 1.0
    if x_scale == "seconds":
        ticks = _time_ticks(lo, hi)
        return lo, hi, ticks, [_fmt_seconds(t) for t in ticks]
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
        width = {"faint": 1.0, "markers": 1.2}.get(series.style, 1.3 if series.faded else 1.8)
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


_TITLE_FONT, _FONT = 13.0, 10.5
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
        elif style == "off_scale":  # an arrow pointing up and out of the plot
            swatch = (f'<path d="M{x + 7},{y + 4}v-9m-3.5,3.5l3.5,-3.5l3.5,3.5" '
                      f'stroke="currentColor" stroke-width="1.5" fill="none"/>')
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


def line_chart_svg(title: str, series: Sequence[Series], *, x_label: str = "step",
                   x_scale: str = "linear", y_scale: str = "linear", marks: Sequence[float] = (),
                   marks_label: str = "skipped step", note: str = "",
                   ignore_outliers: bool = False, max_points: int = MAX_POINTS,
                   width: int = 360, height: int = 240) -> str:
    """A self-contained <svg> line chart with title, legend, ticks and gridlines.

    x_scale: "linear" (steps, labelled 5k, 10k ...) or "seconds" (30s, 2m ...);
    y_scale: "linear", "log2" (ticks 2¹⁰, 2¹⁶ ...), "bytes" (from 0, in KiB/MiB/GiB) or "auto":
    linear, or log10 when positive data spans more than 1000x (a loss that diverged).
    `marks` are x positions flagged by red triangles above the plot (skipped steps); non-finite
    values of the bold series get a red tick there too. `note` is written across the plot
    (e.g. "no scaler"). With `ignore_outliers`, the y axis spans the `robust_band` of the data,
    not its extremes (lines run off the plot there and the legend counts them), so a single
    overflowed batch cannot flatten the rest of the loss curve.
    Every series is reduced to about `max_points` points first; faded series are drawn
    underneath and left out of the legend.
    """
    if x_scale not in ("linear", "seconds") or y_scale not in ("linear", "log2", "bytes", "auto"):
        raise ValueError(f"unknown scale: x_scale={x_scale!r}, y_scale={y_scale!r}")
    drawn, bold, nonfinite = [], [], 0
    for s in sorted(series, key=lambda s: not s.faded):
        ys = _floats(s.ys)
        drawn.append((s, *downsample(s.xs, ys, max_points)))
        if not s.faded:
            bold.append(ys)
            nonfinite += len(ys) - int(np.isfinite(ys).sum())
    if y_scale == "auto":
        y_scale = _auto_scale(np.concatenate([v for *_, v in drawn] + [np.empty(0)]),
                              ignore_outliers)

    def to_axis(values: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            log = {"log2": np.log2, "log10": np.log10}.get(y_scale)
            return log(values) if log else values

    reduced = [(s, x, values, to_axis(values)) for s, x, values in drawn]
    mark_xs = _floats(marks)
    all_x = np.concatenate([x for _, x, _, _ in reduced] + [mark_xs, np.empty(0)])
    all_y = np.concatenate([y for *_, y in reduced] + [np.empty(0)])
    all_y = all_y[np.isfinite(all_y)]
    x_lo, x_hi, x_ticks, x_tick_labels = _x_axis(all_x[np.isfinite(all_x)], x_scale)
    y_lo, y_hi, y_ticks, y_tick_labels = _y_axis(all_y, y_scale, ignore_outliers)
    off_scale = 0
    if ignore_outliers:
        for ys in bold:
            with np.errstate(invalid="ignore"):
                on_axis = to_axis(ys)
                outside = (on_axis < y_lo) | (on_axis > y_hi)
            off_scale += int(np.count_nonzero(outside & np.isfinite(on_axis)))  # NaN/inf: above

    entries = [(s.label, s.color, s.style) for s, *_ in reduced if s.label and not s.faded]
    if len(mark_xs):
        entries.append((f"{marks_label} ({len(mark_xs):,})", ALERT, "mark"))
    if nonfinite:
        entries.append((f"NaN/inf ({nonfinite:,})", ALERT, "nonfinite"))
    if off_scale:
        entries.append((f"off scale ({off_scale:,})", "currentColor", "off_scale"))
    legend, legend_rows = _legend(entries, width)
    if not len(all_y):  # no data: an empty frame, not made-up ticks
        x_ticks, x_tick_labels, y_ticks, y_tick_labels = [], [], [], []
    left = 12 + max(map(len, y_tick_labels), default=1) * _FONT * 0.6
    right = width - 10.0
    top, bottom = 30 + legend_rows * _LEGEND_ROW + 8, height - 30.0

    def sx(v):
        return left + (np.asarray(v, float) - x_lo) / (x_hi - x_lo) * (right - left)

    def sy(v):
        return bottom - (np.asarray(v, float) - y_lo) / (y_hi - y_lo) * (bottom - top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" '
           f'style="display:block;max-width:{width * 2}px" role="img" aria-label="{_e(title)}" '
           f'font-family="system-ui,-apple-system,Segoe UI,Roboto,sans-serif" font-size="{_FONT}" '
           f'fill="currentColor" stroke-linecap="round" '
           f'stroke-linejoin="round"><title>{_e(title)}</title>'
           f'<text x="8" y="17" font-size="{_TITLE_FONT}" font-weight="600">{_e(title)}</text>',
           *legend]
    grid = []
    for t, label in zip(y_ticks, y_tick_labels):
        py = float(sy(t))
        grid.append(f"M{left},{py:.1f}H{right}")
        out.append(f'<text class="ytick" x="{left - 5}" y="{py + 3.5:.1f}" text-anchor="end">'
                   f"{_e(label)}</text>")
    for t, label in zip(x_ticks, x_tick_labels):
        px = float(sx(t))
        grid.append(f"M{px:.1f},{top}V{bottom}")
        out.append(f'<text class="xtick" x="{px:.1f}" y="{bottom + 14}" text-anchor="middle">'
                   f"{_e(label)}</text>")
    out.append(f'<path d="{" ".join(grid)}" stroke="currentColor" stroke-opacity="0.13" '
               f'fill="none"/><path d="M{left},{top}V{bottom}H{right}" stroke="currentColor" '
               f'stroke-opacity="0.45" fill="none"/>')
    if x_label:
        out.append(f'<text x="{right}" y="{height - 3}" text-anchor="end" opacity="0.7">'
                   f"{_e(x_label)}</text>")

    # Lines are clipped to the plot (off-scale values run out of it) by a nested viewport,
    # which needs no id: ids would clash between the many charts of one notebook.
    out.append(f'<svg x="{left - 2}" y="{top - 2}" width="{right - left + 4}" '
               f'height="{bottom - top + 4}" viewBox="{left - 2} {top - 2} {right - left + 4} '
               f'{bottom - top + 4}" overflow="hidden">')
    nonfinite_columns = {}  # pixel column -> (x, value, label): one mark per column
    for s, x, values, y in reduced:
        px, py = sx(x), sy(y)
        # far-off points are pulled in to just outside the plot: same look, short numbers
        py = np.where(np.isfinite(py), np.clip(py, top - height, bottom + height), np.nan)
        out.append(f'<path class="series" data-series="{_e(s.label)}" d="{_path_d(px, py)}" '
                   f"{_stroke(s)}><title>{_e(s.label)}</title></path>")
        if s.style == "markers" and len(x) <= 100:
            dots = "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5"/>'
                           for a, b in zip(px.tolist(), py.tolist()) if math.isfinite(b))
            out.append(f'<g fill="{_e(s.color)}"{_fade(s.faded)}>{dots}</g>')
        if not s.faded:
            for i in np.flatnonzero(~np.isfinite(y)).tolist():
                nonfinite_columns.setdefault(round(float(px[i])), (x[i], values[i], s.label))

    out.append("</svg>")

    # Above the plot: red triangles at the marks, red ticks at non-finite values.
    mark_columns = {}
    for m in mark_xs[np.isfinite(mark_xs)].tolist():
        mark_columns.setdefault(round(float(sx(m))), m)
    for column, m in mark_columns.items():
        out.append(f'<path class="mark" data-x="{m:g}" d="{_triangle(column, top - 1)}" '
                   f'fill="{ALERT}"><title>{_e(marks_label)} {m:g}</title></path>')
    for column, (m, value, label) in nonfinite_columns.items():
        out.append(f'<path class="nonfinite" data-x="{m:g}" d="M{column},{top - 8}V{top + 4}" '
                   f'stroke="{ALERT}" stroke-width="2"><title>{_e(label)} is {value} at '
                   f"{_e(x_label)} {m:g}</title></path>")
    if note or not len(all_y):
        out.append(f'<text x="{(left + right) / 2}" y="{(top + bottom) / 2}" text-anchor="middle" '
                   f'opacity="0.6" font-size="{_TITLE_FONT}">{_e(note or "no data yet")}</text>')
    out.append("</svg>")
    return "".join(out)


# --- the dashboard -----------------------------------------------------------------------------

@dataclass
class RunTrace:
    """One run's history as plain columns.

    steps/loss/scale are aligned per optimizer step (scale empty without a GradScaler);
    memory maps a label ("allocated", "reserved", "peak", "device used (NVML)", or
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


_COLUMNS = ("steps", "loss", "scale", "skipped", "val_steps", "val_loss", "memory_time")


@dataclass
class DashboardView:
    """Everything the dashboard shows, as plain values."""
    current: RunTrace
    earlier: list[RunTrace] = field(default_factory=list)  # oldest first, drawn faded
    status: str = ""  # device, dtype, scaler settings, skipped steps so far
    scaler: bool = False  # False: the scale panel says "no scaler"
    step: int = 0
    total_steps: int | None = None
    epoch: int = 1  # 1-based
    epochs: int | None = None
    samples_per_s: float | None = None
    steps_per_s: float | None = None
    lr: float | None = None
    elapsed: float = 0.0  # seconds
    eta: float | None = None  # seconds
    alarms: list[str] = field(default_factory=list)
    summary: list[tuple[str, str]] | None = None  # the final summary rows; None while running


def _run_colors(view: DashboardView) -> list[str]:
    """Colour of the current run, then of each earlier run (the palette wraps)."""
    earlier = PALETTE[1:]
    return [PALETTE[0]] + [earlier[i % len(earlier)] for i in range(len(view.earlier))]


def _loss_chart_svg(view: DashboardView, colors: Sequence[str]) -> str:
    series = []
    for run, color in zip(view.earlier, colors[1:]):
        series += [Series(f"{run.name} loss", *smooth(run.steps, run.loss), color, faded=True),
                   Series(f"{run.name} val loss", run.val_steps, run.val_loss, color, "markers",
                          faded=True)]
    run, color = view.current, colors[0]
    series += [Series("loss", run.steps, run.loss, color, "faint"),
               Series("smoothed", *smooth(run.steps, run.loss), color)]
    if len(run.val_steps):
        series.append(Series("val loss", run.val_steps, run.val_loss, color, "markers"))
    return line_chart_svg("Loss", series, y_scale="auto", ignore_outliers=True)


def _scale_chart_svg(view: DashboardView, colors: Sequence[str]) -> str:
    series = [Series(f"{run.name} loss scale", run.steps, run.scale, color, faded=True)
              for run, color in zip(view.earlier, colors[1:]) if len(run.scale)]
    run = view.current
    if view.scaler:
        series.append(Series("loss scale", run.steps, run.scale, colors[0]))
    return line_chart_svg("Loss scale", series, y_scale="log2",
                          marks=run.skipped if view.scaler else (),
                          note="" if view.scaler else "no scaler (only fp16 needs one)")


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


def _runs_legend(view: DashboardView, colors: Sequence[str]) -> str:
    def item(run: RunTrace, color: str, faded: bool, note: str) -> str:
        flags = f' <span style="opacity:.75">{_e(run.flags)}</span>' if run.flags else ""
        return (f'<span style="display:inline-block;margin-right:16px'
                f'{";opacity:.6" if faded else ""}"><span style="white-space:nowrap">'
                f'<span style="display:inline-block;width:14px;height:3px;background:{_e(color)};'
                f'vertical-align:middle;margin-right:5px;border-radius:2px"></span>'
                f'<b>{_e(run.name)}</b>{note}</span>{flags}</span>')

    items = [item(view.current, colors[0], False, " (this run)")]
    items += [item(run, color, True, "") for run, color in zip(view.earlier, colors[1:])]
    return f'<div style="margin:2px 0 6px 0;line-height:1.8">{"".join(items)}</div>'


def _progress_html(view: DashboardView) -> str:
    fraction = (min(1.0, max(0.0, view.step / view.total_steps)) if view.total_steps else None)
    epochs = f"/{view.epochs}" if view.epochs else ""
    total = f" / {view.total_steps:,}" if view.total_steps else ""
    percent = f" · {fraction:.0%}" if fraction is not None else ""
    bar = ""
    if fraction is not None:
        bar = (f'<div style="flex:1;min-width:120px;height:8px;border-radius:4px;'
               f'background:rgba(128,128,128,.25);overflow:hidden">'
               f'<div class="amp-progress" data-fraction="{fraction:.4f}" style="height:100%;'
               f'width:{fraction * 100:.2f}%;background:{PALETTE[0]}"></div></div>')
    label = f"epoch {view.epoch}{epochs} · step {view.step:,}{total}{percent}"
    return (f'<div style="display:flex;align-items:center;gap:10px;margin:4px 0">{bar}'
            f'<span style="white-space:nowrap;font-variant-numeric:tabular-nums">{label}'
            f"</span></div>")


def _stats_html(view: DashboardView) -> str:
    stats = [("samples/s", format_number(view.samples_per_s)),
             ("steps/s", format_number(view.steps_per_s)),
             ("lr", "—" if view.lr is None else f"{view.lr:.3g}"),
             ("elapsed", format_duration(view.elapsed)),
             ("ETA", format_duration(view.eta))]
    cells = "".join(
        f'<span style="margin-right:22px;white-space:nowrap"><span style="opacity:.65">{k}</span> '
        f'<b style="font-variant-numeric:tabular-nums">{v}</b></span>' for k, v in stats)
    return f'<div style="margin:2px 0 4px 0">{cells}</div>'


def _alarms_html(alarms: Sequence[str]) -> str:
    return "".join(
        f'<div class="amp-alarm" style="border-left:4px solid {ALERT};padding:4px 8px;'
        f'margin:4px 0;background:rgba(204,51,17,.12);border-radius:2px">⚠ {_e(a)}</div>'
        for a in alarms)


def _with_arrays(run: RunTrace) -> RunTrace:
    """The trace with numpy columns, so lists are converted once, not once per use."""
    columns = {name: _floats(getattr(run, name)) for name in _COLUMNS}
    return replace(run, memory={k: _floats(v) for k, v in run.memory.items()}, **columns)


def dashboard_html(view: DashboardView) -> str:
    """The whole dashboard as one self-contained HTML string (no scripts, inline styles)."""
    view = replace(view, current=_with_arrays(view.current),
                   earlier=[_with_arrays(run) for run in view.earlier])
    colors = _run_colors(view)
    charts = "".join(f'<div style="min-width:0">{svg}</div>' for svg in (
        _loss_chart_svg(view, colors), _scale_chart_svg(view, colors),
        _memory_chart_svg(view, colors)))
    status = f'<div style="opacity:.8;margin:2px 0">{_e(view.status)}</div>' if view.status else ""
    summary = summary_table_html(view.summary) if view.summary is not None else ""
    return (f'<div class="amp-dashboard" style="font-family:system-ui,-apple-system,\'Segoe UI\','
            f'Roboto,sans-serif;font-size:12.5px;line-height:1.45;color:inherit;padding:4px 0">'
            f"{_runs_legend(view, colors)}{_progress_html(view)}{_stats_html(view)}{status}"
            f"{_alarms_html(view.alarms)}"
            f'<div style="display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));'
            f'gap:8px 16px;margin-top:6px">{charts}</div>{summary}</div>')
