"""A search's trials drawn: one curve per trial of the values reported to the pruner, on shared
axes (pruned trials faded and marked where they stopped; the best one in the first colour and
named so in the legend), the progress line,
and a table of every trial (values, state, objective, steps, reason)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..formatting import escape, records_html
from .charts import INK, Series, line_chart_svg, run_colors, svg_image, svg_inline

if TYPE_CHECKING:
    from ..tuning.findings import Search

TITLE = "Trials"


def trials_chart_svg(found: Search) -> str:
    best = found.best
    series, stops = [], []
    colors = run_colors(1 + len(found.trials))  # the best in the first, every trial its own
    for i, t in enumerate(found.trials):
        if not t.reports:
            continue
        steps, values = zip(*t.reports)
        pruned = t.state == "PRUNED"
        color = colors[0] if t is best else (INK if pruned else colors[1 + i])
        label = f"trial {t.number}" + (" (best)" if t is best else "")
        series.append(Series(label, steps, values, color, "line", faded=pruned))
        if pruned:
            stops.append(steps[-1])
    return line_chart_svg(f"{TITLE}: {found.objective}", series, marks=stops,
                          marks_label="pruned here", y_scale="auto", ignore_outliers=True)


def search_html(found: Search, live: bool = False) -> str:
    svg = trials_chart_svg(found)
    chart = svg_inline(svg) if live else svg_image(svg, f"{TITLE} chart")
    best = found.best
    highlight = found.trials.index(best) if best is not None else None
    table = records_html(found.rows(), "every trial (highlighted: the best)", highlight)
    journal = (f"<p>study kept in <code>{escape(found.journal)}</code>; "
               f"<code>optuna-dashboard {escape(found.journal)}</code> opens it too</p>"
               if found.journal else "")
    return (f'<div class="amp-search" style="font-size:12.5px;line-height:1.45">'
            f"<p><b>{escape(found.progress())}</b> · {escape(found.status)}"
            f"{escape(': ' + found.stop_reason if found.stop_reason else '')}</p>"
            f'<p style="opacity:.75">{escape(found.objective)}, {escape(found.direction)}d; '
            f"{escape(found.setup)}</p>{chart}{table}{journal}</div>")
