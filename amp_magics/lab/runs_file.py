"""What a kernel's runs are doing, in a file the Jupyter server reads: the status bar shows a
kernel's runs without ever asking the kernel itself.

Each kernel with the extension loaded keeps one small JSON file in Jupyter's runtime folder,
`amp_magics/kernel-<kernel id>.json`, rewritten (atomically) when a run starts, at most once a
second while it refreshes, and when it ends. The server lists the files of the kernels it runs.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any

from ..files import atomic_write
from ..training.registry import runs
from ..training.view import View

REWRITE_SECONDS = 1.0
RECENT = 5  # ended runs listed beside the running ones


def runs_folder() -> str:
    from jupyter_core.paths import jupyter_runtime_dir

    return os.path.join(jupyter_runtime_dir(), "amp_magics")


def this_kernel_id() -> str | None:
    """The id of the Jupyter kernel this process is, from its connection file; None outside
    a kernel (a terminal IPython)."""
    try:
        from ipykernel.connect import get_connection_file

        name = os.path.basename(get_connection_file())
    except Exception:  # not a kernel, or an ipykernel that keeps it elsewhere
        return None
    match = re.fullmatch(r"kernel-(.+)\.json", name)
    return match[1] if match else None


def run_entry(run: Any) -> dict:
    last = run.history[-1] if run.history else {}
    loss = last.get("loss")
    if loss is not None and not math.isfinite(loss):
        loss = str(loss)  # "nan", "inf": strict JSON, which a browser's JSON.parse insists on
    return {"name": run.name, "status": run.status, "step": len(run.history),
            "total_steps": run.total_steps, "loss": loss,
            "precision": run.precision, "device": run.device, "started": run.started}


class RunsFile(View):
    """A View that keeps this kernel's file current; shared by every run of the kernel."""

    def __init__(self, kernel_id: str, folder: str | None = None):
        self.path = os.path.join(folder or runs_folder(), f"kernel-{kernel_id}.json")
        self.kernel_id = kernel_id
        self.written = 0.0

    def on_start(self, run: Any) -> None:
        self.write()

    def on_refresh(self, run: Any) -> None:
        if time.monotonic() - self.written >= REWRITE_SECONDS:
            self.write()

    def on_end(self, run: Any) -> None:
        self.write()

    def write(self) -> None:
        every = runs()
        shown = [r for r in every if not r.done] + [r for r in every if r.done][-RECENT:]
        payload = {"kernel_id": self.kernel_id, "pid": os.getpid(), "updated": time.time(),
                   "runs": [run_entry(r) for r in shown]}
        self.written = time.monotonic()
        atomic_write(self.path, lambda f: json.dump(payload, f, default=str, allow_nan=False),
                     prefix=".amp_runs_")


def read_runs(folder: str, kernel_ids: set[str]) -> dict[str, list[dict]]:
    """kernel id -> its runs, for the kernels in `kernel_ids` (files of gone kernels are left
    out); a file half-written or unreadable is skipped."""
    found: dict[str, list[dict]] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in names:
        match = re.fullmatch(r"kernel-(.+)\.json", name)
        if not match or match[1] not in kernel_ids:
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                found[match[1]] = json.load(f).get("runs", [])
        except (OSError, ValueError):
            continue
    return found
