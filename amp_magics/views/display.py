"""How the kernel displays data that does not draw itself: registered on IPython's display
formatters when the extension loads, so data modules never import views.

A running Run (what a `--background` cell returns) is shown with a display_id and rewritten
when it ends; a GPU Status and an %amp_check Report render as HTML tables and as text, a
learning-rate finding as its chart and suggestions, a batch-size finding and a search as
their trials.
"""
from __future__ import annotations

from typing import Any

from ..system.doctor import Report
from ..system.gpu import Status
from ..training.run import Run
from ..tuning.findings import BatchSizeFinding, LrFinding, Search
from . import between_cells
from .finder import batch_finding_html, finding_html
from .status import checks_html, checks_text, status_html, status_text
from .trials import search_html


def _display_run(run: Run) -> None:
    from .dashboard import display_run  # numpy and the charts load when a run is shown

    display_run(run)


def _pretty(render) -> Any:
    return lambda obj, printer, cycle: printer.text(render(obj))


_RICH = {  # type -> (text/html, text/plain)
    Status: (status_html, _pretty(status_text)),
    Report: (lambda report: checks_html(report.checks),
             _pretty(lambda report: checks_text(report.checks))),
    LrFinding: (finding_html, _pretty(repr)),
    BatchSizeFinding: (batch_finding_html, _pretty(repr)),
    Search: (search_html, _pretty(repr)),
}


def register(shell: Any) -> None:
    """On an IPython shell's display formatters."""
    between_cells.register(shell)
    formatters = shell.display_formatter
    formatters.ipython_display_formatter.for_type(Run, _display_run)
    for kind, (as_html, as_text) in _RICH.items():
        formatters.formatters["text/html"].for_type(kind, as_html)
        formatters.formatters["text/plain"].for_type(kind, as_text)


def unregister(shell: Any) -> None:
    between_cells.unregister(shell)
    formatters = shell.display_formatter
    formatters.ipython_display_formatter.pop(Run, None)
    for kind in _RICH:
        formatters.formatters["text/html"].pop(kind, None)
        formatters.formatters["text/plain"].pop(kind, None)
