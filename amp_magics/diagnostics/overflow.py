"""Which module makes a mixed-precision step go inf/NaN: forward first, then backward.

`locate_nonfinite` re-runs one batch under the same autocast precision with hooks on every
submodule. Forward: the first module (in execution order) whose output is non-finite or beyond
the dtype's range. Backward: the first module (in backward order) whose parameter gradient or
input gradient is non-finite, with the loss multiplied by the loss scale as GradScaler does.
Tensor hooks are used rather than full backward hooks, which break modules that modify their
input in place (nn.ReLU(inplace=True)). The advice names a cause only where the evidence
supports it: weights that already hold inf/NaN, a batch that does, an inf or a value beyond
the dtype's range in the output; NaN alone does not prove an overflow. No IPython here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from .. import ownership
from ..errors import AmpUsageError
from ..tensors import as_step, model_device, preserved, tensors_in, to_device
from .memory import forward_loss
from ..formatting import table_html
from ..precision import SCALER_DEFAULTS, resolve

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ..precision import Precision
    from ..tensors import StepFn


@dataclass
class Finding:
    phase: str  # "forward" | "backward"
    module: str  # qualified name, "(model)" for the model itself
    kind: str  # the module's class
    tensor: str  # "output", "input gradient", "gradient of weight"...
    problem: str  # "inf", "NaN", "values up to 7e+04, beyond float16's max 65504"
    values: tuple[float, float] | None  # (min, max) |finite values| of that tensor
    inputs: tuple | None = None  # forward: (min, max) |finite values| of the module's inputs
    inputs_nonfinite: bool = False

    def describe(self) -> str:
        text = f"`{self.module}` ({self.kind}): {self.tensor} {self.problem}"
        if self.values:
            text += f"; finite |values| {_span(self.values)}"
        if self.phase == "forward":
            if self.inputs:
                text += f"; input |x| {_span(self.inputs)}"
            if self.inputs_nonfinite:
                text += "; the input already had inf/NaN"
            elif not self.inputs:
                text += "; no float input"
        return text


@dataclass
class Diagnosis:
    precision: str
    device: str
    loss: float | None
    loss_scale: float
    modules: int  # modules watched
    forward: Finding | None = None
    backward: Finding | None = None
    notes: list[str] = field(default_factory=list)
    auto_reason: str | None = None  # why --dtype auto means `precision` here; None if asked for
    # what nonfinite_state found: the model's own inf/NaN, which no precision causes or fixes
    nonfinite_weights: list[tuple[str, str]] = field(default_factory=list)
    batch_finite: bool = True

    @property
    def found(self) -> bool:
        return self.forward is not None or self.backward is not None

    @property
    def advice(self) -> str:
        f, b, p = self.forward, self.backward, self.precision
        if self.nonfinite_weights:
            return (f"{_weights_text(self.nonfinite_weights)}: the weights are already broken (a "
                    "diverged earlier run?), and no precision will fix this: reload them from a "
                    "checkpoint or re-initialise them.")
        if f is not None and f.inputs_nonfinite:
            return self._input_advice(f)
        if f is not None:
            return self._forward_advice(f)
        if self.loss is not None and not math.isfinite(self.loss):  # its gradients are too
            if not self.batch_finite:
                return (f"No module output is inf/NaN, but the loss is, and the batch holds "
                        f"inf/NaN (the targets?), so {p} is not the cause: check the batch.")
            return ("No module output is inf/NaN, but the loss is: the overflow is in the step "
                    "body outside modules. Compute the loss in fp32, e.g. "
                    "`loss = F.cross_entropy(out.float(), y)`.")
        if b is not None:
            if self.loss_scale > 1:
                return (f"The forward pass is finite, but gradients overflow at `{b.module}` "
                        f"({b.kind}) with loss scale {self.loss_scale:g}. GradScaler skips such "
                        "steps and lowers the scale by itself; if steps keep being skipped, start "
                        f"lower (--init-scale 2**14), keep `{b.module}` in fp32, or use --dtype "
                        "bf16 (fp32's range). Clipping does not help here: the scaler checks the "
                        "gradients before any clipping.")
            return (f"Gradients go inf/NaN at `{b.module}` ({b.kind}) without loss scaling: lower "
                    "the learning rate or clip gradients (--clip 1.0).")
        if p in ("fp32", "bf16"):
            span = " (fp32's range)" if p == "bf16" else ""
            return (f"No inf/NaN in the {p} forward or backward pass for this batch. {p}{span} "
                    "finds only genuinely non-finite values, not where fp16 would overflow: for "
                    "that, run with --dtype fp16.")
        return (f"No inf/NaN in the {p} forward or backward pass for this batch "
                f"(loss scale {self.loss_scale:g}). If training still skips steps, try the batch "
                "where it happened with --batch NAME.")

    def _input_advice(self, f: Finding) -> str:
        p = self.precision
        if not self.batch_finite:
            return (f"The input of `{f.module}` already contained inf/NaN, and so does the batch, "
                    f"so {p} is not the cause: check the batch for inf/NaN values.")
        text = (f"The input of `{f.module}` already contained inf/NaN, but the batch is finite: "
                "code outside the modules made it (the step body, or a module's own forward "
                "between its submodules). ")
        if p == "fp16":
            return text + ("Under fp16 autocast that may be an overflow: compute it in fp32 "
                           f"({self._fp32_call}) or use --dtype bf16 (fp32's range).")
        return text + (f"In {p} (fp32's range) that is a numerical problem: look there for 0/0, "
                       "inf - inf, or sqrt or log of a negative number.")

    def _forward_advice(self, f: Finding) -> str:
        p = self.precision
        if p != "fp16":
            return (f"`{f.module}` ({f.kind}) produces {f.problem} in {p}, which has fp32's "
                    "range: this is a numerical problem, not a precision one. Check its input, "
                    "lower the learning rate, or clip gradients (--clip 1.0).")
        fix = f"keep `{f.module}` ({f.kind}) in fp32: call it {self._fp32_call}"
        fp16_max = torch.finfo(torch.float16).max
        if f.problem != "NaN" or (f.inputs and f.inputs[1] > fp16_max):
            return (f"`{f.module}` ({f.kind}) overflows fp16 in the forward pass. Either "
                    f"{fix}; or use --dtype bf16 (fp32's range); or keep its input smaller "
                    "(normalisation, lower learning rate).")
        # NaN alone, output and input within fp16's range: nothing here shows an overflow
        return (f"`{f.module}` ({f.kind}) produces NaN in fp16, but no inf, and neither its "
                "output nor its input goes beyond fp16's max: nothing here shows an overflow. "
                "NaN comes from an invalid operation (0/0, inf - inf, sqrt or log of a negative "
                f"number), which may or may not follow an overflow inside `{f.module}`. To tell, "
                "run %%amp_doctor on this batch with --dtype fp32: NaN there too is a numerical "
                f"problem that no precision fixes; none means fp16's range, and then {fix}, or "
                "use --dtype bf16.")

    @property
    def _fp32_call(self) -> str:
        return (f"inside `with torch.autocast('{self.device.split(':')[0]}', enabled=False):` "
                "on a `.float()` input")

    def rows(self) -> list[tuple[str, str]]:
        auto = (f" (what --dtype auto trains with here: {self.auto_reason})"
                if self.auto_reason else "")
        rows = [("precision", f"{self.precision} on {self.device}{auto}"),
                ("loss", f"{self.loss:.6g}" if self.loss is not None else "-"),
                ("loss scale", f"{self.loss_scale:g}"),
                ("modules watched", str(self.modules)),
                ("forward", self.forward.describe() if self.forward else "finite"),
                ("backward", self.backward.describe() if self.backward else "finite")]
        if self.nonfinite_weights:
            rows.append(("weights", _weights_text(self.nonfinite_weights)))
        rows += [("note", n) for n in self.notes]
        return rows + [("advice", self.advice)]

    def __repr__(self) -> str:
        return "\n".join(["Diagnosis"] + [f"  {k:<16}{v}" for k, v in self.rows()])

    def _repr_html_(self) -> str:
        return table_html(["", ""], self.rows(), "amp_doctor diagnosis")


def locate_nonfinite(step_fn: Callable[..., Any], model: torch.nn.Module, batch: Any,
                     precision: str | Precision = "fp16",
                     scale: float | None = None) -> Diagnosis:
    """Re-run `batch` with hooks and name the first module that goes inf/NaN, forward and back.

    `scale` multiplies the loss before backward (default: GradScaler's initial 2**16 when the
    precision uses a scaler, else 1). Hooks are removed and the model's grads, buffers and the
    RNG restored afterwards; the optimizer is never stepped. While a run trains the model, this
    waits for its step boundary and keeps it paused meanwhile.
    """
    if any(torch.nn.parameter.is_lazy(p) for p in model.parameters()):
        raise AmpUsageError("the model has lazy parameters that no forward has shaped yet: "
                            "call it on a batch once (or train a step), then diagnose")
    with ownership.at_step_boundary("%amp_doctor", model):
        return _locate_nonfinite(step_fn, model, batch, precision, scale)


def _locate_nonfinite(step_fn, model, batch, precision, scale) -> Diagnosis:
    device = model_device(model)
    chosen = resolve(precision, device) if isinstance(precision, str) else precision
    if scale is None:
        scale = SCALER_DEFAULTS["init_scale"] if chosen.needs_scaler else 1.0
    watcher = _Watcher(model, chosen)
    step = as_step(step_fn)
    batch = to_device(batch, device)
    diagnosis = Diagnosis(chosen.name, str(device), None, float(scale), len(watcher.names),
                          auto_reason=chosen.reason if precision == "auto" else None)
    diagnosis.nonfinite_weights = nonfinite_state(model)
    diagnosis.batch_finite = all(bool(torch.isfinite(t).all()) for t in tensors_in(batch)
                                 if t.is_floating_point())
    with preserved(model):
        try:
            watcher.attach()
            loss = forward_loss(step, batch, chosen)
            diagnosis.loss = loss.detach().float().item()
            (loss.float() * scale).backward()
        finally:
            watcher.detach()
    diagnosis.forward, diagnosis.backward = watcher.forward, watcher.backward
    if diagnosis.forward and diagnosis.backward:
        diagnosis.notes.append("gradients of a non-finite forward pass are non-finite too: "
                               "fix the forward pass first")
    return diagnosis


def diagnose_window(step_fn: StepFn, model: torch.nn.Module, batches: Iterable[Any],
                    chosen: Precision, scale: torch.Tensor | float | None,
                    found_inf: torch.Tensor | float | None,
                    loss_sum: torch.Tensor | float) -> tuple[Diagnosis, str] | None:
    """--diagnose, after each optimizer step: if it skipped or its loss was not finite,
    re-run the window's batches with hooks and return (diagnosis, what happened); else None.

    One sync per step (reading found_inf and the loss) until the first overflow."""
    __tracebackhide__ = True
    skipped = found_inf is not None and float(found_inf) > 0
    if not skipped and math.isfinite(float(loss_sum)):
        return None
    used_scale = float(scale) if scale is not None else None
    for batch in batches:
        diagnosis = locate_nonfinite(step_fn, model, batch, chosen, scale=used_scale)
        if diagnosis.found:
            break
    return diagnosis, "skipped" if skipped else "had a non-finite loss"


class _Watcher:
    def __init__(self, model, chosen):
        self.names = {m: name or "(model)" for name, m in model.named_modules()}
        self.limit = torch.finfo(chosen.dtype).max
        self.dtype = chosen.name
        self.forward = self.backward = None
        self.handles = []
        self.inputs = {}  # id(tensor) -> (tensor, [modules taking it]) while the step runs

    def attach(self) -> None:
        for module, name in self.names.items():
            self.handles.append(module.register_forward_pre_hook(self._before, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._after, with_kwargs=True))
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    self.handles.append(p.register_hook(
                        partial(self._param_grad, module, f"gradient of {pname}")))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.inputs.clear()

    def _before(self, module, args, kwargs):
        # A hook on each input gives the gradient this module's backward produces. An input
        # shared by a container and its first child gets one hook; the innermost module wins.
        for t in tensors_in((args, kwargs)):
            if not (t.requires_grad and t.is_floating_point()):
                continue
            entry = self.inputs.get(id(t))
            if entry is not None and entry[0] is t:
                entry[1].append(module)
                continue
            consumers = [module]
            self.inputs[id(t)] = (t, consumers)
            self.handles.append(t.register_hook(partial(self._input_grad, consumers)))

    def _after(self, module, args, kwargs, output):
        if self.forward is not None:
            return
        problem, values = self._check(tensors_in(output))
        if problem:
            inputs = [t for t in tensors_in((args, kwargs)) if t.is_floating_point()]
            self.forward = Finding("forward", self.names[module], type(module).__name__,
                                   "output", problem, values, finite_range(inputs),
                                   any(not bool(torch.isfinite(t).all()) for t in inputs))

    def _input_grad(self, consumers, grad):
        self._grad(consumers[-1], "input gradient", grad)

    def _param_grad(self, module, label, grad):
        self._grad(module, label, grad)

    def _grad(self, module, label, grad):
        if self.backward is not None:
            return
        problem, values = self._check([grad], limit=math.inf)
        if problem:
            self.backward = Finding("backward", self.names[module], type(module).__name__, label,
                                    problem, values)

    def _check(self, tensors, limit=None):
        """(problem, finite range) of the first bad float tensor, or (None, None)."""
        limit = self.limit if limit is None else limit
        for t in tensors:
            if not t.is_floating_point() or t.numel() == 0:
                continue
            t = t.detach()
            top = t.abs().amax().float().item()  # NaN if any NaN, inf if any inf: one sync
            if math.isfinite(top) and top <= limit:
                continue
            kinds, values = _nonfinite_kinds(t), finite_range([t])
            if values and values[1] > limit:  # named beside NaN too: it is the overflow's sign
                kinds.append(f"values up to {values[1]:.3g}, beyond {self.dtype}'s max "
                             f"{self.limit:g}")
            return " and ".join(kinds), values
        return None, None


def nonfinite_state(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(name, "NaN" / "inf" / "NaN and inf") of each parameter holding inf/NaN, and of each
    buffer holding NaN."""
    found = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        kinds = _nonfinite_kinds(t.detach()) if t.is_floating_point() else []
        if not isinstance(t, torch.nn.Parameter):  # a buffer's -inf is often meant: a mask
            kinds = [kind for kind in kinds if kind == "NaN"]
        if kinds:
            found.append((name, " and ".join(kinds)))
    return found


def _nonfinite_kinds(t: torch.Tensor) -> list[str]:
    """["NaN"], ["inf"], ["NaN", "inf"] or [] for a float tensor."""
    return [kind for kind, bad in (("NaN", torch.isnan(t).any()), ("inf", torch.isinf(t).any()))
            if bool(bad)]


def finite_range(tensors: Iterable[torch.Tensor]) -> tuple[float, float] | None:
    """(min, max) of |x| over the finite values of float tensors; None if there are none."""
    lo = hi = None
    for t in tensors:
        a = t.detach().abs().float()
        a = a[torch.isfinite(a)]
        if a.numel():
            lo = a.min().item() if lo is None else min(lo, a.min().item())
            hi = a.max().item() if hi is None else max(hi, a.max().item())
    return None if lo is None else (lo, hi)


def _weights_text(nonfinite: list[tuple[str, str]], shown: int = 3) -> str:
    text = ", ".join(f"`{name}` holds {kinds}" for name, kinds in nonfinite[:shown])
    return text + (f" (and {len(nonfinite) - shown} more)" if len(nonfinite) > shown else "")


def _span(r) -> str:
    return f"{r[0]:.3g} .. {r[1]:.3g}"

