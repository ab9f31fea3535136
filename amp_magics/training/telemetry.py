"""Per-step measurements recorded without host-device synchronisation.

Each optimizer step appends device tensors (loss, loss scale, found-inf) to plain lists;
`drain()` stacks them and reads them back in one transfer, once per refresh. Host-side
values (time, lr, epoch, batch size) are plain Python numbers.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from ..system.host import process_rss
from . import alarms
from .compiling import CompileWatch, recompile_alarm
from .view import View, notify

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .run import Run


# Every COMPACT_STEPS steps the recorded tensors are stacked into one tensor per column, on
# their device and without a sync. Thousands of small tensors kept until a refresh would
# outlive young garbage collections and wake Python's full collections, which walk every
# object in the process (0.12 s measured with torch and IPython loaded).
COMPACT_STEPS = 64
# Fields of a recorded step (see StepRecorder): host numbers, device columns, the --log values
MICRO, LOSS_SUM, FOUND_INF, LR = 4, 5, 7, 9  # what a tool watching each step reads
_HOST = (0, 1, 2, 3, MICRO, 11)  # step, epoch, time, samples, micro, scheduled
_DEVICE = slice(LOSS_SUM, 10)  # loss_sum, scale, found_inf, grad_norm, lr
_LOGS = 10


class StepRecorder:
    """One tuple per optimizer step, appended on the hot path; stacked by `compact()`; read
    back, one device transfer per column, when `drain()` is called at a refresh.

    `record((step, epoch, time, samples, micro, loss_sum, scale, found_inf, grad_norm, lr,
    logs, scheduled))`: `loss_sum` is the window's micro-batch losses summed (a device
    tensor); `scale` the scale used, or None; `found_inf` > 0 where the scaler skipped the
    step; `lr` a float or a device tensor; `logs` the --log values summed, in `log_names`
    order; `scheduled`, with a skip-aware scheduler, whether it advanced after this step.
    A tool that must see each step as it is recorded (the learning-rate finder) wraps
    `record`; ordinary runs pay nothing for that.
    """

    def __init__(self, log_names: Iterable[str] = ()):
        self.log_names = tuple(log_names)
        self.pending: list[tuple] = []  # steps since the last compaction
        self.record = self.pending.append  # one C call per step
        # Earlier steps, per compaction: (host columns, device and --log columns stacked)
        self._chunks: list[tuple[list, list]] = []

    def __len__(self) -> int:
        return len(self.pending) + sum(len(host[0]) for host, _ in self._chunks)

    def compact(self) -> None:
        """Stack the pending steps' device columns: each becomes one tensor (no sync)."""
        if not self.pending:
            return
        steps = self.pending.copy()
        self.pending.clear()
        columns = list(zip(*steps))
        logs = zip(*columns[_LOGS]) if self.log_names else ()
        self._chunks.append(([columns[i] for i in _HOST],
                             [_stacked(c) for c in (*columns[_DEVICE], *logs)]))

    def drain(self) -> list[dict]:
        """Turn the recorded steps into history records (one device read per column)."""
        self.compact()
        chunks, self._chunks = self._chunks, []
        if not chunks:
            return []
        step_, epoch_, time_, samples_, micro_, scheduled_ = (
            [v for host, _ in chunks for v in host[i]] for i in range(len(_HOST)))
        losses, scales, found, norms, lrs, *logs = (
            _joined([device[i] for _, device in chunks]) for i in range(len(chunks[0][1])))
        records = [{"step": step, "epoch": epoch, "loss": loss / micro, "scale": scale,
                    "skipped": bool(skipped), "lr": lr, "time": at, "samples": samples}
                   for step, epoch, loss, micro, scale, skipped, lr, at, samples
                   in zip(step_, epoch_, losses, micro_, scales, found, lrs, time_, samples_)]
        optional = [("grad_norm", norms), ("scheduler_stepped", scheduled_)]
        optional += [(name, [v / m if v is not None else None for v, m in zip(column, micro_)])
                     for name, column in zip(self.log_names, logs)]
        for name, column in optional:
            if name not in self.log_names and column.count(None) == len(column):
                continue  # e.g. no --clip: no grad_norm
            for rec, value in zip(records, column):
                if value is not None or name in self.log_names:
                    rec[name] = value
        return records


def _stacked(values: tuple) -> torch.Tensor | tuple:
    """A column of one-element tensors on one device as one float32 tensor (no sync), else
    as it is: numbers, None, or tensors on several devices are read by `_joined`."""
    if not all(type(v) is torch.Tensor for v in values):
        return values
    try:
        return _stack(values)
    except RuntimeError:  # several devices
        return values


def _joined(pieces: list) -> list:
    """A column's compacted pieces -> floats (None stays None), one transfer per device."""
    if all(type(p) is torch.Tensor for p in pieces):
        try:
            return torch.cat(pieces).tolist()
        except RuntimeError:  # pieces on several devices
            pass
    out: list = []
    for piece in pieces:
        out += piece.tolist() if type(piece) is torch.Tensor else _to_floats(piece)
    return out


def _to_floats(values: Sequence) -> list:
    """Device tensors and numbers -> floats (None stays None), with one sync per device."""
    kinds = {type(v) for v in values}
    if kinds == {torch.Tensor}:  # the usual column: one device, read back at once
        try:
            return _stack(values).tolist()
        except RuntimeError:  # tensors on several devices
            pass
    elif not any(issubclass(kind, torch.Tensor) for kind in kinds):
        return [None if v is None else float(v) for v in values]
    out: list = [None] * len(values)
    by_device: dict = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
        elif v is not None:
            out[i] = float(v)
    for indices in by_device.values():
        for i, value in zip(indices, _stack([values[i] for i in indices]).tolist()):
            out[i] = value
    return out


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One-element tensors of one device as one float32 tensor, without a sync (RuntimeError
    for several devices). Recorded values usually share a shape, and then stack as they are:
    no per-value op."""
    with torch.no_grad():
        try:
            return torch.stack(tensors).float().reshape(len(tensors))
        except RuntimeError:  # mixed shapes, () and (1,)
            return torch.stack([t.reshape(()).float() for t in tensors])


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
                 views: Sequence[View], refresh_seconds: float,
                 sample_memory: Callable[[], dict] | None = None):
        self.run = run
        self.recorder = recorder  # anything with drain() -> new history records
        self.device = device
        self.sample_memory = sample_memory or (lambda: memory_snapshot(device))
        self.views = views
        self.refresh_seconds = refresh_seconds
        # set again by start(); a run that fails before it (a rank that fails while the others
        # start) is timed from here, not from the clock's zero
        self.t0 = time.perf_counter()
        self.next_refresh = 0.0
        self.raised_alarms: set = set()
        self.alarms = alarms.Alarms(device.type)
        self.compiles: CompileWatch | None = None
        self.pending_compiles: list = []
        self.recompile: tuple[int, str] | None = None  # (alarm index, first reason)
        # Compiling is expected in the first step (a cache made for another precision or
        # shape) and in validation (eval, no_grad): no recompile alarm there.
        self.first_step_end: float | None = None
        self.expected: list[tuple[float, float]] = []
        self.lock = threading.Lock()

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.compiles = CompileWatch(time.time())  # the same moment on dynamo's clock
        self.next_refresh = self.t0 + self.refresh_seconds
        notify(self.views, "on_start", self.run)
        if self.run.compiling:
            threading.Thread(target=self._while_compiling, daemon=True,
                             name=f"amp_magics {self.run.name} compiling").start()

    def _while_compiling(self) -> None:
        """The first step of --compile can take minutes, and the loop refreshes only between
        steps: meanwhile the clock runs on and memory is sampled, every refresh_seconds.
        The step's records are not touched (the training thread owns the recorder)."""
        run = self.run
        while True:
            time.sleep(self.refresh_seconds)
            with self.lock:
                if not run.compiling or run.done:
                    return
                self._publish(0, time.perf_counter())

    def drain(self) -> None:
        run = self.run
        new = self.recorder.drain()
        run.history.extend(new)
        if self.compiles is not None:
            self._count_compiles(new)
        for kind, message in self.alarms.check(new, run.history).items():
            if kind not in self.raised_alarms:
                self.raised_alarms.add(kind)
                run.alarms.append(message)

    @contextlib.contextmanager
    def compiling_expected(self) -> Iterator[None]:
        """Around work that compiles anew as a matter of course (validation)."""
        start = time.perf_counter() - self.t0
        try:
            yield
        finally:
            self.expected.append((start, time.perf_counter() - self.t0))

    def _count_compiles(self, new: list[dict]) -> None:
        """Book each compilation on the step it happened in (`compile_s`, left out of the
        rates) and raise one alarm for unexpected recompilations, its count kept current."""
        run = self.run
        if self.first_step_end is None and new:
            self.first_step_end = new[0]["time"]
        pending, self.pending_compiles = self.pending_compiles + self.compiles.new(), []
        for c in pending:
            record = next((r for r in new if r["time"] >= c.start), None)
            if record is None:  # e.g. compiled for validation: the next step books it
                self.pending_compiles.append(c)
                continue
            record["compile_s"] = record.get("compile_s", 0.0) + c.seconds
            run.compile_seconds += c.seconds
            run.compiles += c.graph
            expected = c.start <= self.first_step_end or any(
                start <= c.start <= end for start, end in self.expected)
            if c.recompile_reason and not expected:
                run.recompiles += 1
                if self.recompile is None:
                    self.recompile = (len(run.alarms), c.recompile_reason)
                    run.alarms.append("")
                index, reason = self.recompile
                run.alarms[index] = recompile_alarm(run.recompiles, reason)

    def refresh(self, step: int) -> None:
        with self.lock:  # not at once with a refresh while compiling
            now = time.perf_counter()
            self.next_refresh = now + self.refresh_seconds
            self.drain()
            self._publish(step, now)
            self.run.refresh_costs.append(time.perf_counter() - now)

    def _publish(self, step: int, now: float) -> None:
        """The clock and a memory sample into the Run, then the views told."""
        run = self.run
        run.wall_time = now - self.t0
        run.memory.append({"time": run.wall_time, "step": step, **self.sample_memory()})
        notify(self.views, "on_refresh", run)
