"""The loss scaler: one persistent GradScaler per optimizer, and what it did at each step.

Recording the scale and the skipped steps without a host-device sync needs GradScaler's
private scale tensor and found-inf flags (read through _torch_compat), checked once per
process; where a torch version keeps them elsewhere, a warning says so and the slower public
path (one sync per step through `get_scale()`) keeps the skipped-step record correct.
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import _torch_compat as private

# Scalers persist per (first) optimizer, so re-running a cell continues with the learned scale.
_PERSISTENT: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = weakref.WeakKeyDictionary()
_private_state_ok: bool | None = None  # checked once per process, on the first recorded step


def persistent_scaler(optimizer: torch.optim.Optimizer, device_type: str,
                      settings: Mapping[str, float]) -> torch.amp.GradScaler:
    """The scaler kept for `optimizer`, made anew when the device or settings changed."""
    key = (device_type, tuple(sorted(settings.items())))
    entry = _PERSISTENT.get(optimizer)
    if entry is not None and entry[0] == key:
        return entry[1]
    scaler = torch.amp.GradScaler(device_type, **settings)
    _PERSISTENT[optimizer] = (key, scaler)
    return scaler


def scaler_for(optimizer: torch.optim.Optimizer) -> torch.amp.GradScaler | None:
    """The persistent scaler trained with `optimizer`, if any."""
    entry = _PERSISTENT.get(optimizer)
    return None if entry is None else entry[1]


def snapshot(optimizer: torch.optim.Optimizer) -> tuple | None:
    """The persistent scaler of `optimizer` and a copy of its state, for `restore`."""
    entry = _PERSISTENT.get(optimizer)
    return None if entry is None else (entry[0], entry[1], entry[1].state_dict())


def restore(optimizer: torch.optim.Optimizer, saved: tuple | None) -> None:
    """Put the persistent scaler back as `snapshot` found it."""
    if saved is None:
        _PERSISTENT.pop(optimizer, None)
        return
    key, scaler, state = saved
    scaler.load_state_dict(state)
    _PERSISTENT[optimizer] = (key, scaler)


def describe(scaler: torch.amp.GradScaler | None) -> dict | None:
    """The scaler's settings as plain numbers (one sync for the scale, once per run)."""
    if scaler is None:
        return None
    return {"init_scale": scaler.get_scale() if scaler.is_enabled() else None,
            "growth_factor": scaler.get_growth_factor(),
            "backoff_factor": scaler.get_backoff_factor(),
            "growth_interval": scaler.get_growth_interval(), "enabled": scaler.is_enabled()}


class StepReading:
    """Reads what a scaler did at one optimizer step: call `before_update`, then `update`.

    Returns (scale used, found_inf) where found_inf > 0 means the step was skipped. Without a
    sync these are device tensors, read back later in one transfer per refresh.
    """

    def __init__(self, scaler: torch.amp.GradScaler, optimizers: Sequence[torch.optim.Optimizer]):
        self.scaler = scaler
        self.optimizers = optimizers
        self.private: bool | None = None  # known after the first scaler.step()
        self.scale_device: torch.device | None = None

    def update(self) -> tuple[Any, Any]:
        """`scaler.update()`, returning the scale that was used and whether inf/NaN was found."""
        scaler = self.scaler
        if not scaler.is_enabled():
            scaler.update()
            return None, None
        if self.private is None:
            self.private = _check_private_state(scaler, self.optimizers)
        if self.private:
            # Copy before update(): update() mutates the scale and consumes found_inf.
            scale = private.scale_tensor(scaler)
            if self.scale_device is None:  # read once: a device object per step costs
                self.scale_device = scale.device
            device, found = self.scale_device, []
            for opt in self.optimizers:  # as update() does; keyed by the tensors' devices
                for where, t in private.found_inf(scaler, opt).items():
                    found.append(t if where == device else t.to(device, non_blocking=True))
            # one tensor is kept as it is (update() leaves it); several are summed first,
            # as update() adds them into the first one in place
            found_inf = found[0] if len(found) == 1 else sum(found) if found else None
            used = scale.clone()
            scaler.update()
            return used, found_inf
        # Public path: a skip is the only thing that lowers the scale (backoff_factor < 1).
        used = scaler.get_scale()
        scaler.update()
        return used, float(scaler.get_scale() < used)


class RealSteps:
    """Which optimizers really stepped at one optimizer step, for a scheduler that advances
    only after steps that happened. GradScaler checks found_inf on the host and calls an
    ordinary optimizer's step() only when its gradients are finite, so a step post-hook sees
    a skip with no sync. Optimizers that unscale and skip on the device themselves (fused=True:
    `_step_supports_amp_scaling`) are always called; for them found_inf is read: one sync."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.ran: set[int] = set()
        self.handles = [opt.register_step_post_hook(self._ran) for opt in optimizers]

    def _ran(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.ran.add(id(optimizer))

    def begin(self) -> None:
        self.ran.clear()

    def stepped(self, scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
        """After scaler.step(optimizer), before scaler.update()."""
        if id(optimizer) not in self.ran:
            return False
        if not (scaler.is_enabled() and private.skips_on_device(optimizer)):
            return True
        found = (private.found_inf(scaler, optimizer)
                 if private.keeps_step_state(scaler, [optimizer]) else {})
        return not any(t.item() for t in found.values())

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _check_private_state(scaler: torch.amp.GradScaler,
                         optimizers: Sequence[torch.optim.Optimizer]) -> bool:
    """Called after scaler.step(): is the private state where this torch version keeps it?"""
    global _private_state_ok
    if _private_state_ok is None:
        _private_state_ok = private.keeps_step_state(scaler, optimizers)
        if not _private_state_ok:
            warnings.warn(f"torch {torch.__version__} keeps GradScaler's state differently than "
                          "amp_magics expects: the loss scale is read with get_scale(), one "
                          "host-device sync per step", RuntimeWarning, stacklevel=4)
    return _private_state_ok
