"""The one interface between a training run and whatever shows it.

The engine calls these hooks; the text reporter and the dashboard (in views/) implement them,
as fastprogress's notebook and console bars share one base. Every hook receives the Run,
whose history already holds the steps drained at this refresh.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .run import Run


class View:
    """Shows a run. Override what you need; every hook defaults to doing nothing.

    A hook that raises is detached with a warning: a broken view never costs the run.
    """

    def on_start(self, run: "Run") -> None:
        """Training begins (the notebook thread, or the background thread)."""

    def on_refresh(self, run: "Run") -> None:
        """New steps were drained into `run.history` (at most every refresh_seconds)."""

    def on_end(self, run: "Run") -> None:
        """The run finished, was interrupted or failed: `run.status` says which."""

    def show(self, run: "Run") -> None:
        """Put the view on screen from the notebook's thread before a background run starts."""

    def finish(self) -> None:
        """After a group of runs (a sweep or a comparison): leave the final picture."""


def notify(views: list[View], hook: str, run: "Run") -> None:
    """Call `hook` on every view; a view that raises is detached with a warning."""
    for view in list(views):
        try:
            getattr(view, hook)(run)
        except Exception as e:  # a broken view must not cost the training run
            views.remove(view)
            warnings.warn(f"{type(view).__name__}.{hook} failed and was detached: {e!r}",
                          RuntimeWarning, stacklevel=3)
