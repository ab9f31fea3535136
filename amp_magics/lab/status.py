"""What the status bar shows, as JSON: each GPU (NVML), the host, and each kernel's AMP runs.

Plain functions and a small cache, no web framework: the handler (handlers.py) serves them.
A reading costs an NVML query of every GPU, so it is cached for `ttl` seconds and taken in a
worker thread, never on the server's event loop; requests that arrive while one is being
taken wait for that one.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable

from ..system import gpu
from ..views.status import status_html
from .runs_file import read_runs, runs_folder

VERSION = 1


def payload(status: gpu.Status, kernel_runs: dict[str, list[dict]]) -> dict:
    """The JSON answer: {"version", "taken_at", "gpus": [...], "no_gpu_reason", "host",
    "kernels": [{"id", "runs": [...]}], "html": %gpu_status's table}."""
    host = status.host
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "version": VERSION,
        "taken_at": status.taken_at,
        "gpus": [{"index": g.index, "name": g.name, "utilization": g.utilization,
                  "memory_used": g.memory_used, "memory_total": g.memory_total,
                  "temperature": g.temperature, "power_draw": g.power_draw,
                  "power_limit": g.power_limit} for g in status.gpus],
        "no_gpu_reason": status.no_gpu_reason,
        "host": {"cpu_model": host.cpu_model, "logical_cpus": host.logical_cpus,
                 "load_1min": load, "ram_total": host.ram_total,
                 "ram_available": host.ram_available},
        "kernels": [{"id": k, "runs": runs} for k, runs in sorted(kernel_runs.items())],
        "html": status_html(status, this_process=False),  # the server's own: not shown
    }


class StatusCache:
    """The latest payload, taken again once it is older than `ttl` seconds."""

    def __init__(self, ttl: float = 1.0, probe: Callable[[], gpu.Status] = gpu.probe,
                 folder: Callable[[], str] = runs_folder):
        self.ttl, self.probe, self.folder = ttl, probe, folder
        self.taken = -float("inf")
        self.status: gpu.Status | None = None
        self._pending: asyncio.Future | None = None

    async def get(self, kernel_ids: Iterable[str]) -> dict:
        if time.monotonic() - self.taken >= self.ttl:
            if self._pending is None:  # one reading at a time; others wait for it
                self._pending = asyncio.ensure_future(self._take())
            await asyncio.shield(self._pending)
        runs = read_runs(self.folder(), set(kernel_ids))  # a few small files: cheap
        return payload(self.status, runs)

    async def _take(self) -> None:
        try:
            self.status = await asyncio.get_running_loop().run_in_executor(None, self.probe)
            self.taken = time.monotonic()
        finally:
            self._pending = None
