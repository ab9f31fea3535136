"""A search's trials (or a sweep's settings) drawn alike: one curve per trial of the values
reported to the pruner (a sweep: what it ranks by), on shared axes (pruned trials faded and
marked where they stopped; the best one in the first colour and named so in the legend), the
progress line, and a table of every trial (values, state, objective, steps, reason)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..formatting import escape, records_html, short_path
from .charts import INK, Series, line_chart_svg, run_colors, svg_image, svg_inline

if TYPE_CHECKING:
    from ..tuning.findings import Search, TrialRecord

TITLE = "Trials"


def trials_chart_svg(title: str, trials: Sequence[TrialRecord], best: TrialRecord | None,
                     unit: str = "trial") -> str:
    series, stops = [], []
    colors = run_colors(1 + len(trials))  # the best in the first, every trial its own
    for i, t in enumerate(trials):
        if not t.reports:
            continue
        steps, values = zip(*t.reports)
        pruned = t.state == "PRUNED"
        color = colors[0] if t is best else (INK if pruned else colors[1 + i])
        label = f"{unit} {t.number}" + (" (best)" if t is best else "")
        series.append(Series(label, steps, values, color, "line", faded=pruned))
        if pruned:
            stops.append(steps[-1])
    return line_chart_svg(f"{TITLE}: {title}", series, marks=stops,
                          marks_label="pruned here", y_scale="auto", ignore_outliers=True)


def trials_html(found: Any, live: bool = False, table: bool = True) -> str:
    """A search's or a sweep's panel (`found.kind` says which)."""
    return (search_html if found.kind == "search" else sweep_html)(found, live, table)


def search_html(found: Search, live: bool = False, table: bool = True) -> str:
    journal = (f"<p>study kept in <code>{escape(short_path(found.journal))}</code>; "
               f"<code>optuna-dashboard {escape(short_path(found.journal))}</code> opens it "
               "too</p>"
               if found.journal else "")
    return _panel(found.progress(), found.status, found.stop_reason,
                  f"{found.objective}, {found.direction}d; {found.setup}",
                  trials_chart_svg(found.objective, found.trials, found.best),
                  found.rows() if table else [], found.trials.index(found.best)
                  if found.best is not None else None, "trial", live, journal)


def sweep_html(sweep: Any, live: bool = False, table: bool = True) -> str:
    """A --sweep's settings as a search's trials (tuning/sweep.Sweep.trial_records)."""
    trials = sweep.trial_records()
    best = trials[sweep.best] if sweep.best is not None else None
    curve = "validation loss" if sweep.criterion == "validation loss" else "smoothed train loss"
    rows = [{"setting": t.number, **{k: v for k, v in t.row().items() if k != "trial"}}
            for t in trials] if table else []
    return _panel(sweep.progress(), sweep.status, sweep.stop_reason,
                  f"every setting from the same start; best by {sweep.criterion}",
                  trials_chart_svg(curve, trials, best, "setting"), rows, sweep.best,
                  "setting", live)


def _panel(progress: str, status: str, reason: str, about: str, svg: str, rows: list[dict],
           highlight: int | None, unit: str, live: bool, tail: str = "") -> str:
    """The panel: progress, chart, table and `tail` (HTML). Live, the chart is inline SVG;
    otherwise an <img>, which a saved notebook keeps."""
    chart = svg_inline(svg) if live else svg_image(svg, f"{TITLE} chart")
    grid = records_html(rows, f"every {unit} (highlighted: the best)", highlight) if rows else ""
    return (f'<div class="amp-search" style="font-size:12.5px;line-height:1.45">'
            f"<p><b>{escape(progress)}</b> · {escape(status)}"
            f"{escape(': ' + reason if reason else '')}</p>"
            f'<p style="opacity:.75">{escape(about)}</p>{chart}{grid}{tail}</div>')
