"""General tensor plumbing shared by training and diagnostics.

Moving batches to a device, counting their samples, finding a model's device, calling a step
function, checking the loss it returns, capturing and restoring random state, and running
something on a model while leaving it as it was found. Nothing here knows of runs or views.
"""
from __future__ import annotations

import contextlib
import inspect
import random
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .errors import AmpUsageError

StepFn = Callable[[Any, int, int], Any]


def map_batch(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """The batch with `fn` applied to each tensor in it, also inside tuples (named too), lists
    and any Mapping (dicts, Hugging Face's BatchEncoding), rebuilt as the same type. The one
    walk over a batch's structure: moving, counting and finding tensors all go through it."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if type(obj) is tuple:  # the usual (x, y), without the named-tuple check
        return tuple([map_batch(o, fn) for o in obj])
    if isinstance(obj, tuple):
        moved = [map_batch(o, fn) for o in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else tuple(moved)
    if isinstance(obj, list):
        return [map_batch(o, fn) for o in obj]
    if isinstance(obj, Mapping):
        # one atomic copy of the items: another thread may be adding keys
        mapped = {k: map_batch(v, fn) for k, v in list(obj.items())}
        if type(obj) is dict:
            return mapped
        try:
            return type(obj)(mapped)
        except TypeError:  # a Mapping that cannot be made from a dict
            return mapped
    return obj


def to_device(obj: Any, device: torch.device) -> Any:
    """Move tensors (see map_batch) to `device`, non-blocking. Tensors already there are
    returned as they are (what .to() would do, without its dispatch)."""
    return map_batch(obj, lambda t: t if t.device == device else t.to(device, non_blocking=True))


def batch_placer(device: torch.device, move: bool = True
                 ) -> Callable[[Any], tuple[Any, int]]:
    """A function batch -> (the batch on `device`, or as it is without `move`; its
    batch_size), made once per run. The usual batch, a tuple of tensors already on the
    device, is returned after one cheap test per tensor: no device objects, no new tuple.
    (Per step, each distinct C function called is cold again after the model's own work,
    so the test reads one tensor property and nothing else.)"""
    on_cpu = device.type == "cpu"
    index = device.index if device.type == "cuda" else None

    def there(t: torch.Tensor) -> bool:
        if index is not None:
            return t.is_cuda and t.get_device() == index
        return t.device == device

    def place(batch: Any) -> tuple[Any, int]:
        if type(batch) is tuple and batch and type(batch[0]) is torch.Tensor:
            try:  # a 0-dim first tensor, or an element that is no tensor: the general path
                if move:
                    for t in batch:
                        if not (t.is_cpu if on_cpu else there(t)):
                            break
                    else:
                        return batch, batch[0].shape[0]
                else:
                    return batch, batch[0].shape[0]
            except (AttributeError, IndexError):
                pass
        if move:
            batch = to_device(batch, device)
        return batch, batch_size(batch)
    return place


def batch_size(obj: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor that has rows (0 if
    none)."""
    if type(obj) is tuple and obj and type(obj[0]) is torch.Tensor and obj[0].ndim:
        return obj[0].shape[0]  # the usual (x, y), without the walk
    return next((n for n in (t.shape[0] if t.ndim else 1 for t in tensors_in(obj)) if n), 0)


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors inside a batch (see map_batch), and `obj` itself if it is one."""
    found: list[torch.Tensor] = []
    map_batch(obj, found.append)
    return iter(found)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for an empty model."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


# -- the step function -----------------------------------------------------------------------
def as_step(step_fn: Callable) -> StepFn:
    """Accept step_fn(batch) or step_fn(batch, step, epoch); call it as the latter."""
    if not callable(step_fn):
        raise AmpUsageError("step_fn must be a function: step_fn(batch) -> loss")
    try:
        params = list(inspect.signature(step_fn).parameters.values())
    except (TypeError, ValueError):
        return step_fn
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) >= 3:
        return step_fn
    if len(positional) >= 1:
        return _BatchOnly(step_fn)
    raise AmpUsageError("step_fn must take the batch: step_fn(batch) or "
                        "step_fn(batch, step, epoch)")


class _BatchOnly:
    """`as_step`'s wrapper of a step_fn(batch)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __call__(self, batch: Any, step: int, epoch: int) -> Any:
        __tracebackhide__ = True
        return self.fn(batch)


def batch_only(step: StepFn) -> Callable[[Any], Any] | None:
    """The user's step_fn(batch) behind `as_step`'s wrapper, for a caller that calls it for
    every batch without the extra frame; None when step_fn takes (batch, step, epoch)."""
    return step.fn if type(step) is _BatchOnly else None


def unpack_loss(out: Any, *, training: bool = True) -> tuple[torch.Tensor, dict]:
    """(loss, logs) from what a step returned: a loss tensor, or a dict holding "loss".

    The loss must be a one-element tensor, and in training reach the model (have a grad_fn).
    """
    logs: dict = {}
    if isinstance(out, dict):
        if "loss" not in out:
            raise AmpUsageError("the training step never assigned `loss`: end the cell "
                                "body with e.g. `loss = F.cross_entropy(model(x), y)`")
        loss, logs = out["loss"], out
    else:
        loss = out
    if not isinstance(loss, torch.Tensor):
        raise AmpUsageError(f"`loss` must be a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise AmpUsageError(f"`loss` must be a scalar, got shape {tuple(loss.shape)}: "
                            "reduce it, e.g. loss = loss.mean()")
    if training and loss.grad_fn is None:
        raise AmpUsageError("`loss` has no grad_fn, so backward() cannot reach the model: "
                            "was it computed under torch.no_grad(), detached, or without "
                            "the model's parameters?")
    return loss, logs


# -- random state ----------------------------------------------------------------------------
def capture_rng() -> dict:
    """The state of every random generator training draws from: torch, CUDA, random, numpy."""
    state = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_initialized():  # reading CUDA's state must not start CUDA
        state["cuda"] = torch.cuda.get_rng_state_all()
    if "numpy" in sys.modules:  # its key array as a list: checkpoints load weights_only
        name, keys, *rest = sys.modules["numpy"].random.get_state()
        state["numpy"] = (name, keys.tolist(), *rest)
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state and "numpy" in sys.modules:
        np = sys.modules["numpy"]
        name, keys, *rest = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    """Draw random numbers inside; afterwards every generator is where it was."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


@contextlib.contextmanager
def preserved(model: torch.nn.Module) -> Iterator[None]:
    """Run something on `model` and leave it as found.

    Inside, every .grad is None (as after zero_grad(set_to_none=True)); afterwards the original
    .grad tensors are back, buffers (BatchNorm statistics) hold their old values and the RNG
    is rewound, so a diagnosis does not change what training does next.
    """
    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with rng_kept():
            for p in params:
                p.grad = None
            yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, old in buffers:
                b.copy_(old)


# -- failures --------------------------------------------------------------------------------
def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the CPU allocator's failure, or Python's MemoryError."""
    if isinstance(error, (MemoryError, getattr(torch.cuda, "OutOfMemoryError", MemoryError))):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text
                                                or "out of memory" in text)
