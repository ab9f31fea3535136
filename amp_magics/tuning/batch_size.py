"""The batch-size finder (`--find-batch-size`, `amp_magics.find_batch_size`).

From the loader's own batch size it halves while that does not fit, doubles while it fits,
then bisects between the last that fitted and the first that did not. Each trial trains at
least 3 whole optimizer steps (with --accum, whole accumulation windows) on the same loader
re-made with another batch size (sampler, shuffle, collate_fn, workers, pin_memory, drop_last
and generator kept), from the same starting state. A trial fits when its peak memory stays
under (1 - headroom) x the limit: the device's memory, or --max-memory. Out of memory is
recognised by its type (torch.OutOfMemoryError), never by its message, and cleaned up. On the
CPU an allocation failure has no type of its own, so the limit decides there and a trial that
the last one predicts over it is not run. Everything is put back afterwards.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import numbers
import re
from collections.abc import Callable
from typing import Any

import torch

from ..diagnostics.memory import SavedForBackward, model_memory
from ..errors import AmpUsageError
from ..formatting import format_bytes, number
from ..loaders import remade
from ..precision import CHOICES, resolve
from ..system.host import host_info
from ..tensors import StepFn, as_step, model_device
from ..training.engine import prepare
from ..training.objects import Loan, TrainingObjects
from ..training.options import TrainOptions
from .findings import (FITS, HEADROOM_ONLY, OUT_OF_MEMORY, OVER_CAP, PREDICTED,
                       BatchSizeFinding, BatchSizeSearch, Trial)
from .lr_finder import check_finder_options

STEPS_PER_TRIAL = 3
HEADROOM = 0.10
OUT_OF_MEMORY_TYPES = tuple({t for t in (getattr(torch, "OutOfMemoryError", None),
                                         getattr(torch.cuda, "OutOfMemoryError", None)) if t})


def with_batch_size(loader: torch.utils.data.DataLoader, batch_size: int
                    ) -> torch.utils.data.DataLoader:
    """The same loader with another batch size: its sampler (so shuffle and its generator)
    and the rest kept."""
    return remade(loader, batch_size=batch_size)


def checked_loader(data: Any) -> torch.utils.data.DataLoader:
    """A DataLoader whose batch size can vary: a map-style Dataset becomes one (batch 1)."""
    loader_type, dataset_type = torch.utils.data.DataLoader, torch.utils.data.Dataset
    if isinstance(data, dataset_type) and not isinstance(data, torch.utils.data.IterableDataset):
        return loader_type(data, batch_size=1)
    if not isinstance(data, loader_type):
        raise AmpUsageError(f"--find-batch-size varies a DataLoader's batch size: --data is a "
                            f"{type(data).__name__}. Pass a DataLoader (or its Dataset)")
    if isinstance(data.dataset, torch.utils.data.IterableDataset):
        raise AmpUsageError("--find-batch-size needs a map-style dataset (with len()): a "
                            "stream cannot say how many samples a trial may use")
    if data.batch_size is None:
        raise AmpUsageError("--find-batch-size: this DataLoader's batch_sampler decides the "
                            "batch size, so it cannot be varied; pass a loader made with "
                            "batch_size=")
    return data


def memory_limit(text: str | None, device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) for --max-memory SIZE|PCT, or the device's memory: a GPU's own,
    the RAM available now on the CPU."""
    if device.type == "cuda":
        total, what = torch.cuda.get_device_properties(device).total_memory, "the GPU's memory"
    else:
        total, what = host_info().ram_available, "the RAM available at the start"
    if text is None:
        if not total:
            raise AmpUsageError("cannot tell this device's memory: give --max-memory SIZE")
        return total, f"{what} ({format_bytes(total)})"
    match = re.fullmatch(r"\s*([0-9.e+*-]+)\s*(%|[KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    try:
        value = number(match[1]) if match else math.nan
    except ValueError:
        value = math.nan
    unit = (match[2] or "").upper() if match else ""
    if not value > 0 or not unit or (unit == "%" and not (value <= 100 and total)):
        # a bare number is refused: 10 is more likely 10 GiB than 10 bytes
        raise AmpUsageError(f"--max-memory {text}: give a size with its unit such as 6GiB "
                            "or 500MB, or a percentage of the device's memory such as 80%")
    if unit == "%":
        return int(total * value / 100), f"{value:g}% of {what} ({format_bytes(total * value / 100)})"
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}[unit]
    return int(value * scale), f"--max-memory {text.strip()}"


def headroom_share(value: str | float | None) -> float:
    """--headroom PCT ("20%", "20" or 20) as a share of the limit; None: HEADROOM."""
    if value is None:
        return HEADROOM
    text = str(value).strip()
    try:
        percent = number(text.removesuffix("%"))
    except ValueError:
        percent = math.nan
    if 0 < percent < 1 and not text.endswith("%"):  # 0.2 meant as a share would be 0.2%
        raise AmpUsageError(f"--headroom {value}: a percentage, e.g. 20 or '20%' for a fifth; "
                            f"write '{percent:g}%' if you mean {percent:g} percent")
    if not 0 <= percent < 100:
        raise AmpUsageError(f"--headroom {value}: give the share of memory to leave free as a "
                            "percentage from 0 to below 100, e.g. 20%")
    return percent / 100


class _Trials:
    """Runs one trial at a batch size from the starting state, and judges it."""

    def __init__(self, step_fn: StepFn, options: TrainOptions, loader: Any, snapshot: Any,
                 claim: Any, finding: BatchSizeFinding, precision: str):
        self.step_fn, self.options, self.loader = as_step(step_fn), options, loader
        self.snapshot, self.claim, self.finding = snapshot, claim, finding
        self.precision = precision
        self.device = model_device(options.model)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.last: tuple[int, int, int] | None = None  # (batch, state bytes, activation bytes)

    def predicted_peak(self, batch_size: int) -> int | None:
        if self.last is None:
            return None
        size, state, activations = self.last
        return int(state + activations * batch_size / size)

    def __call__(self, batch_size: int) -> Trial:
        predicted = self.predicted_peak(batch_size)
        if not self.cuda and predicted is not None and predicted > self.finding.limit:
            return Trial(batch_size, PREDICTED, predicted)  # on the CPU, never risk the RAM
        self.snapshot.restore()
        counter = SavedForBackward(self.options.model)
        run_options = dataclasses.replace(
            self.options, data=with_batch_size(self.loader, batch_size), epochs=None,
            steps=STEPS_PER_TRIAL, dtype=self.precision, keep_grads=True,
            name=f"find-batch-size[{batch_size}]")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        training = prepare(self._watched(counter), run_options, [], self.claim, listed=False)
        try:
            training.execute()
        except OUT_OF_MEMORY_TYPES:
            return self._out_of_memory(batch_size)
        if training.run.status == "interrupted":  # Ctrl-C or Stop: the whole search ends
            raise KeyboardInterrupt
        # the trial's run has ended and the claim is ours: its gradients count too
        state = model_memory(self.options.model, self.options.optimizers,
                             held=self.claim).total()
        peak = (torch.cuda.max_memory_allocated(self.device) if self.cuda
                else state + counter.most)
        self.last = (batch_size, state, counter.most)
        history = training.run.history
        rate = training.run.rates(last=len(history) - 1)[0] if len(history) > 1 else None
        return Trial(batch_size, self._judge(peak), peak, rate)

    def _watched(self, counter: SavedForBackward) -> Callable[..., Any]:
        def step(batch: Any, step: int, epoch: int) -> Any:
            __tracebackhide__ = True
            with counter.watching(batch):
                return self.step_fn(batch, step, epoch)
        return step

    def _judge(self, peak: int) -> str:
        if peak > self.finding.limit:
            return OVER_CAP
        return FITS if peak <= (1 - self.finding.headroom) * self.finding.limit else HEADROOM_ONLY

    def _out_of_memory(self, batch_size: int) -> Trial:
        gc.collect()  # the engine freed the step's frames; what they held goes now
        if self.cuda:
            torch.cuda.empty_cache()
        return Trial(batch_size, OUT_OF_MEMORY, None)


def search(trial: Callable[[int], Trial], start: int, largest: int,
           record: Callable[[Trial], None]) -> int | None:
    """Halve from `start` while it does not fit, double while it fits (up to `largest`), then
    bisect; returns the largest size that fits, or None."""
    tried: dict[int, Trial] = {}

    def fits(size: int) -> bool:
        if size not in tried:
            tried[size] = trial(size)
            record(tried[size])
        return tried[size].result == FITS

    size = min(start, largest)
    while not fits(size):
        if size == 1:
            return None
        size //= 2
    fitted, failed = size, None
    while failed is None and fitted < largest:
        bigger = min(fitted * 2, largest)
        if fits(bigger):
            fitted = bigger
        else:
            failed = bigger
    while failed is not None and failed - fitted > 1:
        middle = (fitted + failed) // 2
        if fits(middle):
            fitted = middle
        else:
            failed = middle
    return fitted


def find_batch_size(step_fn: StepFn, options: TrainOptions, *, max_size: int | None = None,
                    max_memory: str | None = None, headroom: str | float | None = None,
                    precisions: tuple[str, ...] = (),
                    on_trial: Callable[[BatchSizeFinding, Trial], None] | None = None
                    ) -> BatchSizeFinding:
    """Search each precision (default: the options' dtype) from the same starting state; put
    everything back; the finding's `.loader` is the loader re-made with the first answer."""
    __tracebackhide__ = True
    check_finder_options(options, "--find-batch-size", f"{STEPS_PER_TRIAL} steps per trial",
                         ("epochs", "steps"))
    loader = checked_loader(options.data)
    options = dataclasses.replace(options, data=loader)
    largest, capped_by = _largest(loader, STEPS_PER_TRIAL * options.accum, max_size)
    device = model_device(options.model)
    for precision in precisions:
        if precision not in CHOICES:
            raise AmpUsageError(f"--compare {precision}: choose from {', '.join(CHOICES)}")
    # named as they run (bf16, not auto); a precision the device lacks is refused now
    precisions = tuple(resolve(p, device).name for p in precisions or (options.dtype,))
    limit, source = memory_limit(max_memory, device)
    finding = BatchSizeFinding(limit, source, headroom_share(headroom), "", loader.batch_size)
    objects = TrainingObjects.of(options)
    try:
        with objects.borrowed("find-batch-size", loader) as loan:
            _search_each(step_fn, options, loader, loan, finding, precisions, largest, capped_by,
                         on_trial)
        finding.status = "finished"
    except KeyboardInterrupt:
        finding.status, finding.stop_reason = "interrupted", "interrupted by the user"
    if finding.batch_size is not None:
        finding.loader = with_batch_size(loader, finding.batch_size)
    return finding


def _largest(loader: torch.utils.data.DataLoader, batches: int, max_size: int | None
             ) -> tuple[int, str]:
    """The largest batch size a trial can fill `batches` batches with, and what sets it: the
    samples the loader's sampler yields per epoch (a subset sampler yields fewer than the
    dataset holds), or MAX."""
    if max_size is not None and (isinstance(max_size, bool) or
                                 not isinstance(max_size, numbers.Integral) or max_size < 1):
        raise AmpUsageError(f"--find-batch-size (max_size=) {max_size!r}: give the largest "
                            "batch size to try as a positive whole number, e.g. 512")
    sampler = loader.sampler
    samples = len(sampler) if hasattr(sampler, "__len__") else len(loader.dataset)
    largest = samples // batches
    if largest < 1:
        raise AmpUsageError(f"--find-batch-size: the loader's {samples} samples per epoch "
                            f"cannot fill {batches} batches ({STEPS_PER_TRIAL} optimizer steps per trial)")
    if max_size is not None and max_size < largest:
        return max_size, f"--find-batch-size {max_size}"
    return largest, (f"the data ({samples} samples per epoch fill {batches} batches of at most "
                     f"{largest})")


def _search_each(step_fn: StepFn, options: TrainOptions, loader: Any, loan: Loan,
                 finding: BatchSizeFinding, precisions: tuple, largest: int, capped_by: str,
                 on_trial: Callable[[BatchSizeFinding, Trial], None] | None) -> None:
    for precision in precisions:
        trials = _Trials(step_fn, options, loader, loan.start, loan.claim, finding, precision)
        finding.memory_method = ("CUDA allocator peak" if trials.cuda else
                                 "tensor bytes: model, gradients, optimizer state and what a "
                                 "step keeps for backward")
        found = finding.searches[precision] = BatchSizeSearch(precision)

        def record(t: Trial, found: BatchSizeSearch = found) -> None:
            found.trials.append(t)
            if on_trial is not None:
                on_trial(finding, t)
        found.batch_size = search(trials, loader.batch_size, largest, record)
        found.faster = _faster(found)
        if found.batch_size == largest:
            found.capped_by = capped_by


FASTER = 1.05  # a smaller batch is called faster from 5% more samples per second on


def _faster(found: BatchSizeSearch) -> Trial | None:
    """A smaller batch that fitted and trained clearly more samples per second than the
    answer."""
    best = next((t for t in found.trials if t.batch_size == found.batch_size), None)
    smaller = [t for t in found.trials if t.result == FITS and t.samples_per_s
               and best is not None and t.batch_size < best.batch_size]
    quicker = max(smaller, key=lambda t: t.samples_per_s, default=None)
    if quicker is None or not best.samples_per_s or \
            quicker.samples_per_s < FASTER * best.samples_per_s:
        return None
    return quicker
