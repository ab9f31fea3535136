"""The learning-rate range test drawn: loss against lr on a log axis (raw and smoothed), the
steps the loss scaler skipped as open circles, each suggestion a labelled line; a table of the
suggestions and their rules. Live in a widget while it runs (dashboard.FinderDashboard); the
LrFinding itself displays the final picture (an image: it reads in a saved, untrusted
notebook)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..formatting import escape, records_html
from .charts import ALERT, PALETTE, Series, line_chart_svg, svg_image, svg_inline

if TYPE_CHECKING:
    from ..tuning.findings import BatchSizeFinding, LrFinding

TITLE = "Learning-rate range test"


def lr_chart_svg(finding: LrFinding, suggested: dict[str, float]) -> str:
    trained = [r for r in finding.records if not r["skipped"]]
    skipped = [r for r in finding.records if r["skipped"]]
    x = [math.log10(r["lr"]) for r in trained]
    series = [Series("loss", x, [r["loss"] for r in trained], PALETTE[0], "faint"),
              Series("smoothed", x, [r["smoothed"] for r in trained], PALETTE[0])]
    if skipped:
        series.append(Series(f"skipped by the scaler ({len(skipped)})",
                             [math.log10(r["lr"]) for r in skipped],
                             [r["loss"] for r in skipped], ALERT, "hollow"))
    guides = [(math.log10(lr), f"{name} {lr:.2g}") for name, lr in suggested.items()]
    return line_chart_svg(TITLE, series, x_label="learning rate", x_scale="log10",
                          y_scale="auto", ignore_outliers=True, guides=guides)


def finding_html(finding: LrFinding, live: bool = False) -> str:
    """The picture: what ran and how it ended, the chart, the suggestions with their rules."""
    from ..tuning.findings import RULES

    head, *_, restored = finding.lines()
    # while it runs, the rules read the curve so far: the marks move as it grows
    suggested = finding.suggest() if live else finding.suggestions
    svg = lr_chart_svg(finding, suggested)
    chart = svg_inline(svg) if live else svg_image(svg, f"{TITLE} chart")
    rows = [{"rule": name, "lr": lr, "how": RULES[name]} for name, lr in suggested.items()]
    default = list(suggested).index(finding.default) if finding.default in suggested else None
    caption = ("suggestions from the steps so far" if live else
               "suggestions (highlighted: .suggestion, what .apply() sets)")
    table = records_html(rows, caption, default) if rows else ""
    note = "" if live else f'<p style="opacity:.75">{escape(restored)}</p>'
    return (f'<div class="amp-finder" style="font-size:12.5px;line-height:1.45">'
            f"<p>{escape(head)}</p>{chart}{table}{note}</div>")


def batch_finding_html(finding: BatchSizeFinding, live: bool = False) -> str:
    """The trials as a table, the answer of each precision highlighted, and how it was judged."""
    head, *answers, restored = finding.lines()
    rows = finding.rows()
    chosen = [i for i, row in enumerate(rows)
              if row["batch size"] == finding.searches[row["precision"]].batch_size
              and row["result"] == "fits"]
    table = records_html(rows, "trials, in the order run (highlighted: the answer)",
                         chosen[0] if len(chosen) == 1 else None, byte_columns=("peak memory",))
    notes = "".join(f"<li>{escape(a.strip())}</li>" for a in answers)
    tail = "" if live else f'<p style="opacity:.75">{escape(restored)}</p>'
    return (f'<div class="amp-finder" style="font-size:12.5px;line-height:1.45">'
            f"<p>{escape(head)}</p><ul>{notes}</ul>{table}{tail}</div>")
