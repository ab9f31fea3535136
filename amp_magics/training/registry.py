"""The runs of this process, by name: `runs()`, and the background runs still training.

A Run is plain data (run.py); this registry is what a kernel knows of them: each run under a
unique name, and which runs (or searches: each has a name, `request_stop()` and `status`)
train in a background thread now (for `%amp_stop`, `%amp_wait` and unloading the extension).
"""
from __future__ import annotations

import os
import re
import threading
from typing import TYPE_CHECKING

from ..formatting import records_html

if TYPE_CHECKING:
    from collections.abc import Callable

    from .run import Run

_RUNS: list = []
_RUNS_LOCK = threading.Lock()
# A process forked while another thread held the lock (a --nproc rank) starts with it free.
os.register_at_fork(after_in_child=lambda: globals().update(_RUNS_LOCK=threading.Lock()))


# Views the kernel adds to every run its notebook starts (%%amp_train, amp_magics.train, a
# search...): the runs file JupyterLab's status bar reads. A forked rank trains with the views
# it is handed, never these.
_KERNEL_VIEWS: list = []


def set_kernel_views(views: list) -> None:
    _KERNEL_VIEWS[:] = views


def kernel_views() -> list:
    return list(_KERNEL_VIEWS)


def runs() -> list["Run"]:
    """Every Run started in this process, oldest first."""
    with _RUNS_LOCK:
        return list(_RUNS)


def register(run: "Run") -> None:
    """Add the run to `runs()` under a name no other run of the session has: a taken name
    gets a number, `first` -> `first2`, `sweep[lr=0.001]` -> `sweep2[lr=0.001]`."""
    with _RUNS_LOCK:
        taken = {r.name for r in _RUNS}
        base, bracket, rest = run.name.partition("[")
        n = 1
        while run.name in taken:
            n += 1
            run.name = f"{_numbered(base, n)}{bracket}{rest}"
        _RUNS.append(run)


def unique_group(base: str) -> str:
    """A prefix for a group of runs (a sweep's `sweep[lr=...]`, a showdown's `compare[bf16]`)
    that no run of the session uses yet: `base`, else `base2`, `base3` ..."""
    with _RUNS_LOCK:
        taken = {r.name.partition("[")[0] for r in _RUNS}
    n, name = 1, base
    while name in taken:
        n += 1
        name = _numbered(base, n)
    return name


def _numbered(base: str, n: int) -> str:
    return f"{base}-{n}" if re.search(r"\d$", base) else f"{base}{n}"


def forget_runs() -> int:
    """Forget every finished run (running ones stay) and the finders' results; return how
    many were forgotten."""
    with _RUNS_LOCK:
        kept = [r for r in _RUNS if not r.done]
        forgotten = len(_RUNS) - len(kept) + len(_FINDINGS)
        _RUNS[:] = kept
        _FINDINGS.clear()
        _UNTOLD.clear()
    return forgotten


class RunList(list):
    """Runs shown as a table: name, model, flags, status, steps, final loss, time, memory;
    below it, apart, the finders' results (`findings`)."""

    def __init__(self, runs=(), findings=()):
        super().__init__(runs)
        self.findings = list(findings)

    def rows(self) -> list[dict]:
        return [self._row(r, r.summary) for r in self]

    @staticmethod
    def _row(run, summary) -> dict:
        return {"run": run.name, "model": run.config.get("model_name", run.model_label),
                "flags": run.flags_text(), "status": run.status, "steps": len(run.history),
                "final loss": summary["final_loss"], "time s": run.wall_time,
                "peak memory": summary["peak_memory"]}

    def finding_rows(self) -> list[dict]:
        return [{"finder": f.kind, "precision": f.precision, "status": f.status,
                 "answer": f.answer, "how it ended": f.stop_reason} for f in self.findings]

    def _repr_html_(self) -> str:
        page = records_html(self.rows(), f"{len(self)} run{'s' * (len(self) != 1)} this session")
        if self.findings:
            page += records_html(self.finding_rows(), "finders (they train only to measure, "
                                 "and put everything back)")
        return page

    def __repr__(self) -> str:
        lines = [repr(r) for r in self] + [f"<{f.kind} {f.status}: {f.answer}>"
                                           for f in self.findings]
        return "\n".join(lines) or "no runs yet"


def next_name() -> str:
    with _RUNS_LOCK:
        taken = {r.name for r in _RUNS}
    n = len(taken) + 1
    while f"run{n}" in taken:
        n += 1
    return f"run{n}"


# -- finders' results, apart from runs ----------------------------------------------------------
_FINDINGS: list = []


def add_finding(finding) -> None:
    with _RUNS_LOCK:
        _FINDINGS.append(finding)


def findings() -> list:
    """What the finders (--find-lr, --find-batch-size) found this session, oldest first."""
    with _RUNS_LOCK:
        return list(_FINDINGS)


# -- background runs ----------------------------------------------------------------------------
# Run (or Search) -> the Event its thread sets as the last thing it does. Waits are on that,
# never on Thread.join or is_alive: a join that Ctrl-C interrupts leaves the thread looking
# ended for good (CPython <= 3.12), and %amp_wait or %amp_stop would no longer wait.
_BACKGROUND: dict = {}
_UNTOLD: list = []  # background jobs that have ended, in that order, not yet take_ended()


def start_background(job, work: Callable[[], None]) -> None:
    """Run `work` (training `job`, a Run or a Search) in a daemon thread, listed in
    `background_runs()` until it has ended."""
    def in_thread():
        try:
            work()
        finally:
            _end_background(job)

    with _RUNS_LOCK:
        _BACKGROUND[job] = threading.Event()
    try:
        threading.Thread(target=in_thread, name=f"amp_magics {job.name}", daemon=True).start()
    except BaseException:
        _end_background(job)
        raise


def _end_background(job) -> None:
    with _RUNS_LOCK:
        done = _BACKGROUND.pop(job, None)
        if done is not None:
            _UNTOLD.append(job)
    if done is not None:
        done.set()


def take_ended(jobs=None) -> list:
    """The background runs (or searches) that have ended since they were last taken, in the
    order they ended (only those among `jobs` when given): a run that fails before the user
    asks how it went is still told once."""
    with _RUNS_LOCK:
        wanted = None if jobs is None else {id(j) for j in jobs}
        taken = [j for j in _UNTOLD if wanted is None or id(j) in wanted]
        _UNTOLD[:] = [j for j in _UNTOLD if wanted is not None and id(j) not in wanted]
    return taken


def is_background(job) -> bool:
    """True while `job`'s background thread has not ended."""
    with _RUNS_LOCK:
        return job in _BACKGROUND


def background_runs() -> list[tuple["Run", threading.Event]]:
    """(run, done) of every run (or search) training in a background thread now: `done` is
    set once its thread has ended."""
    with _RUNS_LOCK:
        return list(_BACKGROUND.items())


def stop_background_runs(wait: float = 10.0) -> None:
    """Ask every background run to stop after its step, and wait up to `wait` s for each."""
    going = background_runs()
    for run, _ in going:
        run.request_stop()
    for _, done in going:
        done.wait(wait)
