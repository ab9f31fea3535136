"""%amp_memory and %%amp_doctor: a thin IPython adapter over memory.py and overflow.py.

torch loads only when a magic runs, so %load_ext stays cheap.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from .. import precision
from ..formatting import a_or_an, number
from .args import parse
from .notebook import CellStep, lookup, lookup_optimizers, usage_errors

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from ..diagnostics.memory import MemoryOverview
    from ..diagnostics.overflow import Diagnosis

# shell -> MemoryTracker whose pre/post_run_cell callbacks are registered on it
_TRACKERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def stop_memory_tracking(ipython: InteractiveShell) -> bool:
    """Remove the `%amp_memory --track on` callbacks from `ipython`; True if there were any."""
    tracker = _TRACKERS.pop(ipython, None)
    if tracker is None:
        return False
    ipython.events.unregister("pre_run_cell", tracker.pre_run_cell)
    ipython.events.unregister("post_run_cell", tracker.post_run_cell)
    return True


@magics_class
class DiagnoseMagics(Magics):
    # -- %amp_memory / %%amp_memory ------------------------------------------------------
    @magic_arguments()
    @argument("--model", help="nn.Module to inspect (default: model)")
    @argument("--optimizer",
              help="optimizer(s) whose state to count, comma-separated (default: optimizer, "
                   "if defined)")
    @argument("--data", help="iterable of batches; its first batch is run as one training step "
                             "(default: train_loader, if defined)")
    @argument("--dtype", default="auto", choices=precision.CHOICES,
              help="AMP dtype to compare with fp32 (default: auto, which may mean fp32 on a CPU)")
    @argument("--top", type=int, metavar="N",
              help="also list the N largest live tensors, with the notebook names holding them")
    @argument("--track", choices=("on", "off"),
              help="on: print memory growth and peak after every cell; off: stop. Used alone.")
    @line_cell_magic
    def amp_memory(self, line: str, cell: str | None = None) -> MemoryOverview | None:
        """Memory of the model: weights, gradients, optimizer state, buffers (by dtype), and the
        memory of ONE training step in fp32 and in the AMP dtype, side by side.

        The step runs forward and backward for real on the first batch of --data; the optimizer
        is never stepped, and parameters, grads, buffers and the RNG end as they were.
        "kept for backward" (activations and autocast's weight copies) is exact on every
        device; "step peak" is exact on CUDA and approximate on the CPU (process RSS).

        As a line magic the step is `model(x).float().sum()`, x the batch or its first
        element: the model's own activations, without your loss function's. As a cell magic
        the body is your step, as in %%amp_train (it sees `batch` and must assign `loss`):

            %%amp_memory --model net --data train_loader --dtype bf16
            x, y = batch
            loss = F.cross_entropy(net(x), y)

        Returns a MemoryOverview. `--top N` adds the largest live tensors; `--track on|off`
        switches a one-line memory report after every cell.
        """
        __tracebackhide__ = True
        args = parse(self.amp_memory, line)
        if args.track:
            others = [f for f in ("model", "optimizer", "data", "top") if getattr(args, f)]
            if others or args.dtype != "auto" or cell is not None:
                raise UsageError("--track on|off is used alone, e.g. `%amp_memory --track on`")
            return self._track(args.track == "on")
        if args.top is not None and args.top < 1:
            raise UsageError(f"--top needs a positive number of tensors, got {args.top}")
        import torch

        from ..diagnostics import memory

        overview = memory.MemoryOverview()
        model = self._optional(args.model, "model", "--model", torch.nn.Module, "an nn.Module",
                               needed=args.top is None or cell is not None)
        if model is not None:
            overview.model = memory.model_memory(model, self._optimizers(args.optimizer))
            data = self._optional(args.data, "train_loader", "--data", Iterable,
                                  "an iterable of batches", needed=cell is not None)
            if data is not None:
                step = (CellStep(self.shell, cell) if cell is not None
                        else memory.forward_sum_step(model))
                batch = _first_batch(data, args.data or "train_loader")
                with usage_errors():
                    overview.step = memory.step_activation_memory(step, model, batch, args.dtype)
        if args.top:
            overview.top = memory.largest_tensors(self.shell.user_ns, args.top)
        return overview

    def _track(self, on: bool):
        from ..diagnostics.memory import MemoryTracker

        stop_memory_tracking(self.shell)
        if on:
            tracker = MemoryTracker()
            self.shell.events.register("pre_run_cell", tracker.pre_run_cell)
            self.shell.events.register("post_run_cell", tracker.post_run_cell)
            _TRACKERS[self.shell] = tracker
            print(f"amp_memory: one line per cell from now on ({tracker.device}); "
                  "`%amp_memory --track off` stops it")
        else:
            print("amp_memory: per-cell tracking off")

    def _optimizers(self, flag):
        if flag is None and "optimizer" not in self.shell.user_ns:
            return []  # the default is optional: a model alone is a fine report
        return lookup_optimizers(self.shell.user_ns, "optimizer" if flag is None else flag)

    # -- %%amp_doctor ------------------------------------------------------------------
    @magic_arguments()
    @argument("--model", default="model", help="nn.Module to diagnose (default: model)")
    @argument("--data", default="train_loader",
              help="iterable of batches; the first one is diagnosed (default: train_loader)")
    @argument("--batch", help="diagnose this batch (a notebook variable) instead")
    @argument("--dtype", default="auto", choices=precision.CHOICES,
              help="autocast precision to diagnose (default: auto, the dtype that training "
                   "with --dtype auto uses on the model's device)")
    @argument("--scale", type=number,
              help="loss scale for the backward pass, e.g. 2**14 (default: 2**16, GradScaler's "
                   "initial scale, with fp16; 1 otherwise)")
    @cell_magic
    def amp_doctor(self, line: str, cell: str) -> Diagnosis:
        """Find the module where a mixed-precision step goes inf/NaN, and say what to do.

        The cell body is your training step, as in %%amp_train (it sees `batch` and must assign
        `loss`). It runs once on one batch under autocast with hooks on every submodule and
        names the first module whose output is inf/NaN or beyond the dtype's range (65504 for
        fp16), then the first whose gradient is inf/NaN. Hooks are removed afterwards; grads,
        buffers and the RNG end as they were, and the optimizer is not stepped.

            %%amp_doctor --model net --dtype fp16
            x, y = batch
            loss = F.cross_entropy(net(x), y)

        Without --dtype it diagnoses the dtype `--dtype auto` trains with on the model's device
        and says so. Where that is bf16 or fp32 (fp32's range, e.g. on a CPU) only genuinely
        non-finite values show: pass --dtype fp16 to see where fp16 would overflow.

        Returns the Diagnosis (`.forward`, `.backward`, `.advice`).
        """
        __tracebackhide__ = True
        args = parse(self.amp_doctor, line)
        import torch

        from ..diagnostics.overflow import locate_nonfinite

        if args.scale is not None and not (0 < args.scale < math.inf):
            raise UsageError(f"--scale must be a positive finite number, got {args.scale:g}")
        ns = self.shell.user_ns
        model = lookup(ns, args.model, "--model", torch.nn.Module, "an nn.Module")
        if args.batch:
            head = args.batch.split(".")[0]
            if head not in ns:
                raise UsageError(f"--batch {args.batch}: no variable named {head!r} in the "
                                 "notebook")
            batch = lookup(ns, args.batch, "--batch", object, "a batch")
        else:
            data = lookup(ns, args.data, "--data", Iterable, "an iterable of batches")
            batch = _first_batch(data, args.data)
        step = CellStep(self.shell, cell)
        with usage_errors():
            return locate_nonfinite(step, model, batch, args.dtype, args.scale)

    # -- helpers ----------------------------------------------------------------------
    def _optional(self, name, default, flag, kind, what, needed):
        """The object named by `flag`, or by its default name when that exists; else None."""
        if name is None and not needed and default not in self.shell.user_ns:
            return None
        return lookup(self.shell.user_ns, name or default, flag, kind, what)


def _first_batch(data, name):
    import torch

    if isinstance(data, torch.nn.Module):  # nn.Sequential is iterable, over its layers
        raise UsageError(f"--data {name} is {a_or_an(type(data).__name__)}, a model, not an iterable "
                         "of batches")
    it = iter(data)
    if it is data:
        raise UsageError(f"--data {name} is a one-shot iterator: taking a batch would consume it. "
                         "Pass a list or DataLoader, or a single batch with --batch (%%amp_doctor)")
    try:
        return next(it)
    except StopIteration:
        raise UsageError(f"--data {name} is empty: it has no batches") from None
