"""Every use of PyTorch's private state, in one place.

amp_magics needs a few things torch does not offer publicly: GradScaler's scale tensor and
found-inf flags (to record a step without a host-device sync), the flag that makes an LR
scheduler's first step warn, dynamo's compilation metrics, the module behind a
`torch.compile` wrapper, and whether `nn.Module.compile()` was called on a model. Each is read here and nowhere
else, through a function that falls back to public behaviour where the installed torch keeps
it elsewhere. `PRIVATE_NAMES` lists them; `missing()` says which the installed torch lacks
(tests/test_torch_compat.py runs it, so a torch upgrade shows what moved).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

# name -> what it is for (the torch versions amp_magics supports, >= 2.4, all have them)
PRIVATE_NAMES = {
    "GradScaler._scale": "the loss scale as a device tensor, copied per step without a sync",
    "GradScaler._per_optimizer_states": "per optimizer: found_inf_per_device, stage",
    "found_inf_per_device": "whether a step's gradients held inf/NaN, per device (a key)",
    "Optimizer._step_supports_amp_scaling": "fused optimizers skip on the device themselves",
    "Optimizer._opt_called": "set by the LR scheduler's patch of optimizer.step()",
    "Optimizer.step._wrapped_by_lr_sched": "marks that patch",
    "LRScheduler._step_count": "the scheduler's steps so far (1 before its first step)",
    "torch._dynamo.utils.get_compilation_metrics": "compile time and recompile reasons",
    "OptimizedModule._orig_mod": "the module behind torch.compile(model)",
    "Module._compiled_call_impl": "set by nn.Module.compile(): a model compiled in place",
    "torch._subclasses.fake_tensor.FakeTensor": "what torch.compile traces with: no memory",
}


# -- GradScaler --------------------------------------------------------------------------------
# scale_tensor and found_inf run once per optimizer step: lean, and used only after
# keeps_step_state() found the state where they read it.
def scale_tensor(scaler: torch.amp.GradScaler) -> torch.Tensor:
    """The scale as the device tensor the scaler multiplies by."""
    return scaler._scale


def found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> Mapping:
    """device -> found-inf tensor of `optimizer` at this step (after unscale_ or step)."""
    state = scaler._per_optimizer_states.get(id(optimizer))
    return state["found_inf_per_device"] if state is not None else {}


def keeps_step_state(scaler: torch.amp.GradScaler,
                     optimizers: Sequence[torch.optim.Optimizer]) -> bool:
    """After scaler.step(): are the scale and the found-inf flags where this module reads?"""
    states = getattr(scaler, "_per_optimizer_states", None)
    return (isinstance(getattr(scaler, "_scale", None), torch.Tensor)
            and isinstance(states, Mapping)
            and all("found_inf_per_device" in states.get(id(o), {}) for o in optimizers))


def forget_step(scaler: torch.amp.GradScaler | None) -> None:
    """After an error between unscale_/step and update: let the next step unscale afresh."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        states.clear()


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """A fused optimizer unscales and skips inf/NaN steps itself, on the device."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


# -- LR schedulers -------------------------------------------------------------------------------
def first_schedule_would_warn(scheduler: Any) -> bool:
    """torch warns "lr_scheduler.step() before optimizer.step()" at a scheduler's first
    step when its optimizer's patched step() never ran."""
    opt = getattr(scheduler, "optimizer", None)
    return (getattr(scheduler, "_step_count", None) == 1
            and hasattr(getattr(opt, "step", None), "_wrapped_by_lr_sched")
            and not getattr(opt, "_opt_called", False))


def mark_optimizer_stepped(optimizer: torch.optim.Optimizer) -> None:
    """What the scheduler's patch of optimizer.step() records when step() runs."""
    optimizer._opt_called = True


# -- torch.compile -----------------------------------------------------------------------------
def compilation_metrics() -> list:
    """dynamo's record of every compilation in this process (empty if it never compiled)."""
    utils = sys.modules.get("torch._dynamo.utils")  # nothing compiled if never imported
    metrics: Callable[[], Any] | None = getattr(utils, "get_compilation_metrics", None)
    return list(metrics()) if metrics is not None else []


def plain_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module itself behind a torch.compile wrapper (whose state_dict keys carry
    `_orig_mod.`), so compiled and plain training share checkpoints."""
    return getattr(model, "_orig_mod", model)


def compiled_in_place(model: torch.nn.Module) -> bool:
    """nn.Module.compile() was called on `model` (its calls go through compiled code)."""
    return getattr(model, "_compiled_call_impl", None) is not None


def is_fake(t: torch.Tensor) -> bool:
    """A FakeTensor, as torch.compile traces with: a shape without memory, whose data
    pointer torch warns about when read (the isinstance check torch's warning asks for)."""
    fake = sys.modules.get("torch._subclasses.fake_tensor")  # none exist if never imported
    cls = getattr(fake, "FakeTensor", None)
    return cls is not None and isinstance(t, cls)


def missing() -> list[str]:
    """The names of PRIVATE_NAMES the installed torch does not have where we look."""
    from torch._dynamo.eval_frame import OptimizedModule  # noqa: F401  (exists, or raises)

    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.ones(1, 1)).sum()).backward()
    scaler.step(opt)
    found = {
        "GradScaler._scale": isinstance(getattr(scaler, "_scale", None), torch.Tensor),
        "GradScaler._per_optimizer_states": isinstance(
            getattr(scaler, "_per_optimizer_states", None), Mapping),
        "found_inf_per_device": keeps_step_state(scaler, [opt]),
        "Optimizer._step_supports_amp_scaling": hasattr(
            torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True),
            "_step_supports_amp_scaling"),
        "Optimizer._opt_called": hasattr(opt, "_opt_called"),
        "Optimizer.step._wrapped_by_lr_sched": hasattr(opt.step, "_wrapped_by_lr_sched"),
        "LRScheduler._step_count": hasattr(scheduler, "_step_count"),
        "torch._dynamo.utils.get_compilation_metrics": hasattr(
            sys.modules.get("torch._dynamo.utils"), "get_compilation_metrics"),
        "OptimizedModule._orig_mod": plain_module(torch.compile(model)) is model,
        "Module._compiled_call_impl": compiled_in_place(_compiled_in_place(model)),
        "torch._subclasses.fake_tensor.FakeTensor": is_fake(_fake_tensor()),
    }
    return [name for name in PRIVATE_NAMES if not found[name]]


def _compiled_in_place(model: torch.nn.Module) -> torch.nn.Module:
    model.compile()  # lazy: nothing compiles until it is called
    return model


def _fake_tensor() -> torch.Tensor:
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        return torch.ones(1)
