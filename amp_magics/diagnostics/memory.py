"""Where a model's memory goes: weights, gradients, optimizer state, activations, live tensors.

No IPython here. On CUDA the numbers come from PyTorch's caching allocator and are exact. On the
CPU the peak of a step comes from the process's resident memory (RSS) and is approximate: the
C allocator keeps freed memory, other threads allocate too. The bytes a step keeps for backward
are counted exactly on every device, by watching what autograd saves.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .. import ownership
from .._torch_compat import is_fake
from ..errors import AmpUsageError
from ..precision import Precision, resolve
from ..formatting import a_or_an, escape, format_bytes, table_html
from ..system.host import process_rss
from ..tensors import (as_step, model_device, preserved, tensors_in, to_device,
                       unpack_loss)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from ..tensors import StepFn

    StorageKey = tuple[torch.device, int]


# -- tensors and their storages ----------------------------------------------------------
def storage_of(t: torch.Tensor) -> tuple[StorageKey | None, int]:
    """(key, bytes) of the memory behind `t`; key is None where it holds none (meta, sparse...).

    Views and tied weights share a storage, so keying by it counts their memory once.
    """
    if is_fake(t):  # traced by torch.compile inside a measured step: it holds no memory
        return None, 0
    try:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None, 0
    if ptr == 0:
        return None, 0
    return (t.device, ptr), storage.nbytes()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- weights, gradients, optimizer state, buffers ------------------------------------------
CATEGORIES = ("parameters", "gradients", "optimizer state", "buffers")


@dataclass
class MemoryReport:
    """Bytes per category and dtype; a storage is counted once, in the first category holding it."""

    model: str
    by_category: dict[str, dict[str, int]]  # category -> {dtype name: bytes}
    optimizers: list[str] = field(default_factory=list)
    in_flux: str = ""  # the run writing gradients and optimizer state right now, if any

    def total(self, category: str | None = None) -> int:
        cats = [category] if category else CATEGORIES
        return sum(sum(self.by_category[c].values()) for c in cats)

    def rows(self) -> list[tuple[str, str, str]]:
        rows = []
        for cat in CATEGORIES:
            parts = self.by_category[cat]
            detail = ", ".join(f"{d} {format_bytes(b)}" for d, b in sorted(parts.items())) or "none"
            if self.in_flux and cat == "gradients":
                detail = f"not read: being written by {self.in_flux}"
            elif self.in_flux and cat == "optimizer state":
                detail += f" (being written by {self.in_flux})"
            rows.append((cat, format_bytes(self.total(cat)), detail))
        rows.append(("total", format_bytes(self.total()), ""))
        return rows

    def title(self) -> str:
        opts = ", ".join(self.optimizers) or "no optimizer given"
        return f"{self.model} ({opts})"

    def __repr__(self) -> str:
        return "\n".join([self.title()] + [f"  {c:<16}{b:>12}  {d}" for c, b, d in self.rows()])

    def _repr_html_(self) -> str:
        return table_html(["", "bytes", "by dtype"], self.rows(), self.title())


def model_memory(model: torch.nn.Module,
                 optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] = (),
                 held: ownership.Claim | None = None) -> MemoryReport:
    """Memory held by the model's parameters, their gradients, the optimizers' state and buffers.

    Read-only and never blocks: while a run trains the model its gradients are not read at
    all (autograd replaces `.grad` tensors from the training thread; reading one meanwhile is
    a data race in C++), and gradients and optimizer state are marked as being written.
    `held`: the claim the caller itself holds, reading between its own runs (a tuning tool
    between trials): nothing writes the gradients then, so they are counted.
    """
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    owner = ownership.owner_of(ownership.owned_objects(model, optimizers))
    owner = None if owner is held else owner
    seen: set = set()

    def tally(tensors: Iterable[torch.Tensor | None]) -> dict[str, int]:
        out: dict = {}
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            key, nbytes = storage_of(t)
            if key is None or key in seen:
                continue
            seen.add(key)
            name = dtype_name(t.dtype)
            out[name] = out.get(name, 0) + nbytes
        return out

    params = list(model.parameters())
    by_category = {
        "parameters": tally(params),
        "gradients": tally(p.grad for p in params) if owner is None else {},
        # list(): one atomic copy, as a training thread may add state meanwhile
        "optimizer state": tally(t for opt in optimizers for state in list(opt.state.values())
                                 for t in tensors_in(state)),
        "buffers": tally(model.buffers()),
    }
    in_flux = owner.describe() if owner is not None and owner.run is not None else ""
    return MemoryReport(type(model).__name__, by_category, [type(o).__name__ for o in optimizers],
                        in_flux)


# -- one training step ----------------------------------------------------------------------
def forward_loss(step: StepFn, batch: Any, chosen: Precision) -> torch.Tensor:
    """The loss of `step(batch, 0, 0)` under `chosen`'s autocast, checked like the engine does."""
    with chosen.autocast():
        out = step(batch, 0, 0)
    return unpack_loss(out)[0]


def forward_sum_step(model: torch.nn.Module) -> Callable[[Any], torch.Tensor]:
    """A stand-in step: `model(x).float().sum()`, x the batch or its first element.

    A dict batch (Hugging Face's `input_ids`, `attention_mask`, `labels`...) is passed as
    keywords, `model(**batch)`, once the model's forward is checked to take those names. An
    output holding a scalar `loss` with a gradient (a Hugging Face model given labels) is that
    loss; otherwise the first floating-point tensor of the output (logits), summed.

    It measures the model's own activations; a real loss function (e.g. cross-entropy over a
    large vocabulary) adds its own, which only the real step body shows.
    """
    def step(batch: Any) -> torch.Tensor:
        if isinstance(batch, Mapping):
            _check_keywords(model, batch)
            return _stand_in_loss(model(**batch))
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, torch.Tensor):
            raise AmpUsageError(f"the batch is {a_or_an(type(batch).__name__)}, not a tensor, a tuple "
                                "starting with one or a dict of model inputs: give the step body "
                                "in a %%amp_memory cell")
        return _stand_in_loss(model(x))
    return step


def _check_keywords(model: torch.nn.Module, batch: Mapping) -> None:
    """Refuse a dict batch whose keys the model's forward does not take, or that lacks one the
    forward needs, before calling `model(**batch)`."""
    names = list(batch.keys())
    bad = [k for k in names if not isinstance(k, str)]
    if bad:
        raise AmpUsageError(f"the batch is {a_or_an(type(batch).__name__)} with keys that are not names "
                            f"({', '.join(map(repr, bad))}): give the step body in a "
                            "%%amp_memory cell")
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a forward without a signature: let the call decide
        return
    takes = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    model_name = type(model).__name__
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        unknown = [k for k in names if k not in takes]
        if unknown:
            raise AmpUsageError(
                f"the batch is a dict, passed as model(**batch), but {model_name}.forward takes no "
                f"argument named {', '.join(map(repr, unknown))} (it takes "
                f"{', '.join(sorted(takes)) or 'no named arguments'}): give the step body in a "
                "%%amp_memory cell")
    missing = [p.name for p in params if p.default is p.empty and p.name not in batch
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise AmpUsageError(
            f"the batch is a dict, passed as model(**batch), but it has no "
            f"{', '.join(map(repr, missing))}, which {model_name}.forward needs (the batch has "
            f"{', '.join(map(repr, names)) or 'no keys'}): give the step body in a %%amp_memory cell")


def _stand_in_loss(out: Any) -> torch.Tensor:
    """The loss the model returned (a scalar `loss` with a gradient), else its first
    floating-point tensor summed in float32."""
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, Mapping):  # Hugging Face's ModelOutput is a dict with attributes
        loss = out.get("loss")
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.grad_fn is not None:
            return loss
        parts: Any = list(out.values())
    elif isinstance(out, (tuple, list)):
        parts = out
    else:
        parts = ()
    for t in tensors_in(parts):
        if t.is_floating_point():
            return t.float().sum()
    raise AmpUsageError(f"the model returned {a_or_an(type(out).__name__)}, not a tensor nor one "
                        "holding a floating-point tensor: give the step body in a %%amp_memory cell")


def _release_freed_memory():
    """Hand freed heap memory back to the OS so that RSS growth shows a step's real need."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


class PeakMemory:
    """Memory growth and peak over a stretch of code on `device`.

    CUDA: allocator counters (exact). Elsewhere: the process's RSS, with its peak from the
    kernel's high-water mark (Linux, reset through /proc/self/clear_refs) or, where that cannot
    be reset, from a thread sampling RSS every half millisecond, which can miss spikes shorter
    than a few milliseconds (the thread waits for the GIL).
    """

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        # CPU-only builds raise from the CUDA memory calls: use them only where CUDA runs.
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._sampler = None

    @property
    def method(self) -> str:
        if self.cuda:
            return "CUDA allocator, exact"
        how = "kernel high-water mark" if self._sampler is None else "sampled every 0.5 ms"
        return f"process RSS, {how}: approximate"

    def start(self) -> PeakMemory:
        self.rss0 = process_rss()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = self.rss0
            if not _reset_high_water_mark():
                self._sampler = _RssSampler()
        return self

    def stop(self) -> dict[str, int | None]:
        """{"delta", "peak" (above the start), "now", "rss_delta"}; None where unreadable."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            now = torch.cuda.memory_allocated(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            now = process_rss()
            peak = self._sampler.stop() if self._sampler else _high_water_mark()
            if peak is not None and now is not None:
                peak = max(peak, now)
        rss = process_rss()
        return {"delta": _minus(now, self.base), "peak": _minus(peak, self.base), "now": now,
                "rss_delta": _minus(rss, self.rss0)}


def _minus(a, b):
    return None if a is None or b is None else a - b


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5 resets only the peak RSS; it does not touch page state
        return _high_water_mark() is not None
    except OSError:
        return False


def _high_water_mark():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class _RssSampler:
    def __init__(self, interval=0.0005):
        self.peak = process_rss()
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="amp_magics-rss", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.wait(self._interval):
            rss = process_rss()
            if rss is not None and (self.peak is None or rss > self.peak):
                self.peak = rss

    def stop(self) -> int | None:
        self._done.set()
        self._thread.join()
        return self.peak


@dataclass
class StepMemory:
    precision: str
    saved: int  # bytes autocast/autograd keep from forward to backward (exact)
    peak: int | None  # highest memory above the start, forward + backward
    method: str
    seconds: float


@dataclass
class ActivationReport:
    device: str
    steps: list[StepMemory]  # fp32 first, then the AMP dtype
    note: str = ""

    def rows(self) -> list[tuple[str, str, str, str]]:
        return [(s.precision, format_bytes(s.saved), format_bytes(s.peak), f"{s.seconds:.3f} s")
                for s in self.steps]

    def title(self) -> str:
        method = self.steps[0].method if self.steps else ""
        return f"one training step on {self.device} (peak: {method})"

    def __repr__(self) -> str:
        header = f"  {'dtype':<6}{'kept for backward':>20}{'step peak':>14}{'time':>10}"
        lines = [self.title(), header]
        lines += [f"  {p:<6}{s:>20}{k:>14}{t:>10}" for p, s, k, t in self.rows()]
        return "\n".join(lines + ([f"  {self.note}"] if self.note else []))

    def _repr_html_(self) -> str:
        table = table_html(["dtype", "kept for backward", "step peak", "time"], self.rows(),
                           self.title())
        return table + (f"<p>{escape(self.note)}</p>" if self.note else "")


def step_activation_memory(step_fn: Callable[..., Any], model: torch.nn.Module, batch: Any,
                           precision: str | Precision = "auto") -> ActivationReport:
    """Run ONE forward + backward in fp32 and in `precision`, and report what each needed.

    "kept for backward" is exact: the tensors autograd saves (activations and autocast's
    weight copies) not already held as parameters, buffers or the batch. "step peak" is the
    highest memory above the start, gradients included, as after zero_grad(set_to_none=True).
    The optimizer is never stepped; parameters, grads, buffers and the RNG end as they were.
    """
    with ownership.at_step_boundary("%amp_memory", model):
        return _step_activation_memory(step_fn, model, batch, precision)


def _step_activation_memory(step_fn, model, batch, precision) -> ActivationReport:
    device = model_device(model)
    chosen = resolve(precision, device) if isinstance(precision, str) else precision
    step = as_step(step_fn)
    batch = to_device(batch, device)
    fp32 = Precision("fp32", device.type, "reference")
    runs = [fp32] if chosen.name == "fp32" else [fp32, chosen]
    note = ""
    if chosen.name == "fp32":
        note = ("fp32 only: pass an AMP dtype (fp16, bf16) to compare" if precision == "fp32" else
                f"fp32 only: {precision} picks fp32 here ({chosen.reason})")
    steps = [_measure(step, model, batch, p, device) for p in runs]
    return ActivationReport(str(device), steps, note)


class SavedForBackward:
    """Counts, exactly, the bytes autograd saves for backward in the forward passes run inside
    `watching(batch)`: storages other than the model's parameters and buffers and the batch's
    own tensors, each once. `most` is the largest of any one forward pass watched."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.most = 0

    @contextlib.contextmanager
    def watching(self, batch: Any) -> Iterator[dict]:
        held = {storage_of(t)[0] for t in [*self.model.parameters(), *self.model.buffers(),
                                          *tensors_in(batch)]}
        saved: dict = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key, nbytes = storage_of(t)
            if key is not None and key not in held:
                saved[key] = nbytes
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield saved
        finally:
            self.most = max(self.most, sum(saved.values()))


def _measure(step, model, batch, chosen, device) -> StepMemory:
    counter = SavedForBackward(model)
    with preserved(model):
        _release_freed_memory()
        peak = PeakMemory(device).start()
        t0 = time.perf_counter()
        with counter.watching(batch):
            loss = forward_loss(step, batch, chosen)
        loss.backward()
        del loss
        measured = peak.stop()
        seconds = time.perf_counter() - t0
    return StepMemory(chosen.name, counter.most, measured["peak"], peak.method, seconds)


# -- live tensors --------------------------------------------------------------------------
@dataclass
class LiveTensor:
    name: str  # the notebook name holding it, or "" if none was found
    shape: tuple[int, ...]
    dtype: str
    device: str
    bytes: int


class TopTensors(list):
    def rows(self) -> list[tuple[str, str, str, str, str]]:
        return [(t.name or "(unnamed)", "x".join(map(str, t.shape)) or "scalar", t.dtype,
                 t.device, format_bytes(t.bytes)) for t in self]

    def __repr__(self) -> str:
        lines = [f"{len(self)} largest live tensors"]
        lines += [f"  {n:<32} {s:<16} {d:<9} {v:<7} {b:>10}" for n, s, d, v, b in self.rows()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return table_html(["name", "shape", "dtype", "device", "bytes"], self.rows(),
                          f"{len(self)} largest live tensors")


def largest_tensors(namespace: dict, n: int = 10) -> TopTensors:
    """The `n` largest live tensors (by distinct storage), named after the notebook variable,
    module parameter (`net.0.weight`), gradient or optimizer state that holds them.

    It sees tensors that have a Python object; memory held only inside C++ (e.g. a pending
    autograd graph) is not listed.
    """
    names = notebook_names(namespace)
    found: dict = {}
    for obj in gc.get_objects():
        if not issubclass(type(obj), torch.Tensor):  # type(), not isinstance: no proxy tricks
            continue
        key, nbytes = storage_of(obj)
        if key is None or obj.device.type == "meta":
            continue
        best = found.get(key)
        if best is None or (key not in names and obj.numel() > best[0].numel()):
            found[key] = (obj, nbytes)
    ranked = sorted(found.items(), key=lambda kv: kv[1][1], reverse=True)[:n]
    return TopTensors(
        LiveTensor(names.get(key, ""), tuple(t.shape), dtype_name(t.dtype), str(t.device), nbytes)
        for key, (t, nbytes) in ranked)


def notebook_names(namespace: dict) -> dict:
    """storage key -> the first notebook name found for it."""
    names: dict = {}
    param_names: dict = {}

    def add(name: str, t: Any) -> None:
        if isinstance(t, torch.Tensor):
            key = storage_of(t)[0]
            if key is not None:
                names.setdefault(key, name)

    items = [(k, v) for k, v in namespace.items() if not k.startswith("_")]  # skip Out, _1...
    for var, value in items:
        # A .grad that a run is writing is not read (see model_memory).
        if isinstance(value, torch.Tensor):
            add(var, value)
            if ownership.owner_of([value]) is None:
                add(f"{var}.grad", value.grad)
        elif isinstance(value, torch.nn.Module):
            owned = ownership.owner_of([value, *value.parameters()]) is not None
            for pname, p in value.named_parameters():
                param_names.setdefault(p, f"{var}.{pname}")
                add(f"{var}.{pname}", p)
                if not owned:
                    add(f"{var}.{pname}.grad", p.grad)
            for bname, b in value.named_buffers():
                add(f"{var}.{bname}", b)
    for var, value in items:
        if isinstance(value, torch.optim.Optimizer):
            for i, (p, state) in enumerate(value.state.items()):
                label = param_names.get(p, f"#{i}")
                for k, v in state.items():
                    add(f"{var}.state[{label}][{k!r}]", v)
    return names


# -- per-cell tracking -----------------------------------------------------------------------
class MemoryTracker:
    """One line per notebook cell: memory growth and peak (IPython pre/post_run_cell events)."""

    def __init__(self, device: str | torch.device | None = None,
                 print_fn: Callable[[str], Any] = print):
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.print_fn = print_fn
        self._peak = None

    def pre_run_cell(self, info: Any = None) -> None:
        self._peak = PeakMemory(self.device).start()

    def post_run_cell(self, result: Any = None) -> None:
        if self._peak is None:  # the cell that switched tracking on had no start
            return
        peak, self._peak = self._peak, None
        self.print_fn(self.describe(peak.stop(), peak.method))

    def describe(self, m: dict, method: str) -> str:
        what = f"{self.device} allocated" if self.device.type == "cuda" else "RSS"
        line = (f"[amp_memory] {what} {_signed(m['delta'])} (now {format_bytes(m['now'])}), "
                f"peak {_signed(m['peak'])} in this cell ({method})")
        if self.device.type == "cuda":
            line += f"; RSS {_signed(m['rss_delta'])}"
        return line


def _signed(n) -> str:
    return "-" if n is None else ("+" if n >= 0 else "-") + format_bytes(abs(n))


# -- rendering -------------------------------------------------------------------------------
@dataclass
class MemoryOverview:
    """What %amp_memory shows: any of the model report, one step's memory, the largest tensors."""

    model: MemoryReport | None = None
    step: ActivationReport | None = None
    top: TopTensors | None = None

    def parts(self) -> list[MemoryReport | ActivationReport | TopTensors]:
        return [p for p in (self.model, self.step, self.top) if p is not None]

    def __repr__(self) -> str:
        return "\n\n".join(repr(p) for p in self.parts())

    def _repr_html_(self) -> str:
        return "".join(p._repr_html_() for p in self.parts())
