"""Rewriting a cell's output from a background thread, also when it happens between cells.

A kernel sends a thread's output with the parent of the cell executing at that moment, or,
while none is, of the cell that ran last. Headless runners (nbclient: `nbconvert --execute`,
papermill) read only the executing cell's messages, so a background run that ends between
two cells would leave its live widget in the saved notebook. Such rewrites are sent again
when the next cell starts.
"""
from __future__ import annotations

import threading
from typing import Any


class _Rewrites:
    def __init__(self):
        self._lock = threading.Lock()
        self._executing = True  # the extension is loaded from a cell, or before any runs
        self._again = {}  # display_id -> (handle, data): sent between cells

    def update(self, handle: Any, data: dict) -> None:
        with self._lock:
            handle.update(data, raw=True)
            if not self._executing:
                self._again[handle.display_id] = (handle, data)  # the latest rewrite wins

    def pre_run_cell(self, info: Any = None) -> None:
        with self._lock:
            self._executing = True
            again, self._again = self._again, {}
            for handle, data in again.values():
                handle.update(data, raw=True)

    def post_run_cell(self, result: Any = None) -> None:
        with self._lock:
            self._executing = False


_REWRITES = _Rewrites()


def rewrite(handle: Any, data: dict) -> None:
    """`handle.update(data, raw=True)`, sent again when the next cell starts if no cell is
    executing now."""
    _REWRITES.update(handle, data)


def register(shell: Any) -> None:
    if getattr(shell, "kernel", None) is None:  # a terminal prints each rewrite: once is enough
        return
    shell.events.register("pre_run_cell", _REWRITES.pre_run_cell)
    shell.events.register("post_run_cell", _REWRITES.post_run_cell)


def unregister(shell: Any) -> None:
    for event, callback in (("pre_run_cell", _REWRITES.pre_run_cell),
                            ("post_run_cell", _REWRITES.post_run_cell)):
        if callback in shell.events.callbacks[event]:
            shell.events.unregister(event, callback)
