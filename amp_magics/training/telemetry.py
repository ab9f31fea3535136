"""Per-step measurements recorded without host-device synchronisation.

Each optimizer step appends device tensors (loss, loss scale, found-inf) to plain lists;
`drain()` stacks them and reads them back in one transfer, once per refresh. Host-side
values (time, lr, epoch, batch size) are plain Python numbers.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..system.host import process_rss
from . import alarms
from .view import View, notify

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from .run import Run


class StepRecorder:
    def __init__(self, log_names: Iterable[str] = ()):
        self.log_names = tuple(log_names)
        self._clear()

    def _clear(self):
        self._loss = []  # sum of the window's micro-batch losses (device tensors)
        self._micro = []  # micro-batches in the window
        self._scale = []  # scale used this step (device tensor) or None
        self._found_inf = []  # > 0 where the scaler skipped the step, or None
        self._grad_norm = []  # total norm before clipping, or None
        self._lr = []  # a float, or a device tensor for tensor learning rates
        self._host = []  # (step, epoch, time, samples)
        self._logs = {name: [] for name in self.log_names}

    def __len__(self):
        return len(self._host)

    def record(self, *, step: int, epoch: int, loss_sum: torch.Tensor, micro: int,
               scale: torch.Tensor | float | None, found_inf: torch.Tensor | float | None,
               grad_norm: torch.Tensor | None, lr: float | torch.Tensor, time: float,
               samples: int, logs: Mapping[str, Any]) -> None:
        self._loss.append(loss_sum)
        self._micro.append(micro)
        self._scale.append(scale)
        self._found_inf.append(found_inf)
        self._grad_norm.append(grad_norm)
        self._lr.append(lr)
        self._host.append((step, epoch, time, samples))
        for name in self.log_names:
            self._logs[name].append(logs[name])

    def drain(self) -> list[dict]:
        """Turn the pending steps into history records (one device read per column)."""
        if not self._host:
            return []
        n = len(self._host)
        losses = _to_floats(self._loss)
        scales = _to_floats(self._scale)
        found = _to_floats(self._found_inf)
        norms = _to_floats(self._grad_norm)
        lrs = _to_floats(self._lr)
        logs = {name: _to_floats(values) for name, values in self._logs.items()}
        records = []
        for i in range(n):
            step, epoch, t, samples = self._host[i]
            rec = {
                "step": step,
                "epoch": epoch,
                "loss": losses[i] / self._micro[i],
                "scale": scales[i],
                "skipped": bool(found[i]) if found[i] is not None else False,
                "lr": lrs[i],
                "time": t,
                "samples": samples,
            }
            if norms[i] is not None:
                rec["grad_norm"] = norms[i]
            for name in self.log_names:
                value = logs[name][i]
                rec[name] = value / self._micro[i] if value is not None else None
            records.append(rec)
        self._clear()
        return records


def _to_floats(values: list) -> list:
    """Device tensors and numbers -> floats (None stays None), with one sync per device."""
    out: list = [None] * len(values)
    tensors = [(i, v) for i, v in enumerate(values) if isinstance(v, torch.Tensor)]
    for i, v in enumerate(values):
        if v is not None and not isinstance(v, torch.Tensor):
            out[i] = float(v)
    by_device: dict = {}
    for i, v in tensors:
        by_device.setdefault(v.device, []).append((i, v))
    for items in by_device.values():
        stacked = torch.stack([v.detach().reshape(()).float() for _, v in items]).tolist()
        for (i, _), value in zip(items, stacked):
            out[i] = value
    return out


def memory_snapshot(device: torch.device) -> dict:
    """Memory now: torch allocator counters on CUDA (host-side, no sync), RSS everywhere."""
    snap = {"allocated": None, "reserved": None, "peak": None, "rss": process_rss()}
    if device.type == "cuda" and torch.cuda.is_available():
        snap["allocated"] = torch.cuda.memory_allocated(device)
        snap["reserved"] = torch.cuda.memory_reserved(device)
        snap["peak"] = torch.cuda.max_memory_allocated(device)
    return snap


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)



class RunBooks:
    """Moves recorded steps into the Run and tells its views, at most every refresh_seconds.

    A refresh drains the recorder (one device read per column), raises each kind of alarm
    once, samples memory and calls the views' on_refresh; its own cost is kept in the Run.
    """

    def __init__(self, run: Run, recorder: StepRecorder, device: torch.device,
                 views: Sequence[View], refresh_seconds: float):
        self.run = run
        self.recorder = recorder
        self.device = device
        self.views = views
        self.refresh_seconds = refresh_seconds
        self.t0 = 0.0
        self.next_refresh = 0.0
        self.raised_alarms: set = set()
        self.alarms = alarms.Alarms(device.type)

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.next_refresh = self.t0 + self.refresh_seconds
        notify(self.views, "on_start", self.run)

    def drain(self) -> None:
        run = self.run
        new = self.recorder.drain()
        run.history.extend(new)
        for kind, message in self.alarms.check(new, run.history).items():
            if kind not in self.raised_alarms:
                self.raised_alarms.add(kind)
                run.alarms.append(message)

    def refresh(self, step: int) -> None:
        now = time.perf_counter()
        self.next_refresh = now + self.refresh_seconds
        self.drain()
        run = self.run
        run.wall_time = now - self.t0
        run.memory.append({"time": run.wall_time, "step": step, **memory_snapshot(self.device)})
        notify(self.views, "on_refresh", run)
        run.refresh_costs.append(time.perf_counter() - now)
