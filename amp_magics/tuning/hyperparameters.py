"""What a user tunes: optimizer hyperparameters (set on every param group, keeping their
ratios) and the engine options marked tunable (`accum`, `clip`, `init_scale`, `dtype`)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import AmpUsageError
from ..formatting import number
from ..precision import CHOICES, resolve
from ..tensors import model_device
from ..training.options import SCALER_KEYS, tunable_types

ENGINE_KEYS = tunable_types()  # passed to the run as options; the rest set on optimizers


def tunable_keys(optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's numeric hyperparameters (lr, weight_decay, momentum...)."""
    return sorted(k for k, v in optimizer.param_groups[0].items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool))


def value_type(flag: str, key: str, optimizer: torch.optim.Optimizer) -> type:
    """The type of values `key` takes (float for an optimizer hyperparameter); refused with
    the keys there are."""
    if key in ENGINE_KEYS:
        return ENGINE_KEYS[key]
    if key in tunable_keys(optimizer):
        return float
    raise AmpUsageError(f"{flag} cannot set {key!r}: use an optimizer hyperparameter of "
                        f"{type(optimizer).__name__} ({', '.join(tunable_keys(optimizer))}) or "
                        f"one of {', '.join(sorted(ENGINE_KEYS))}")


def parse_value(flag: str, key: str, text: str, optimizer: torch.optim.Optimizer) -> Any:
    """One value of `key`, written as text (numbers as `number()` reads them: 2**14)."""
    kind = value_type(flag, key, optimizer)
    if kind is str:
        if text not in CHOICES:
            raise AmpUsageError(f"{flag} {key}={text}: choose from {', '.join(CHOICES)}")
        return text
    try:
        value = number(text)
    except ValueError:
        raise AmpUsageError(f"{flag} {key}={text}: not a number") from None
    if kind is int:
        if value != int(value):
            raise AmpUsageError(f"{flag} {key}={text}: must be a whole number")
        value = int(value)
    return value


def group_values(key: str, optimizers: Sequence[torch.optim.Optimizer]) -> list:
    return [group[key] for opt in optimizers for group in opt.param_groups]


def check_ratios(flag: str, key: str, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Param groups that differ keep their ratios to the first: refused where it is 0."""
    values = group_values(key, optimizers)
    if len(set(values)) > 1 and values[0] == 0:
        raise AmpUsageError(f"{flag} {key}: the param groups have different values "
                            f"({', '.join(map(str, values))}) and the first is 0, so their "
                            "ratios cannot be kept: give the first group a non-zero value, or "
                            "tune the groups in your own loop")


def in_ratio(value: float, current: float, first: float) -> float:
    """What a param group gets when the first group gets `value`: its ratio to it kept."""
    return value if current == first else value * current / first


def apply_hyperparameters(setting: dict, optimizers: Sequence[torch.optim.Optimizer],
                          scheduler: Any) -> dict[str, list]:
    """Set optimizer hyperparameters (the engine's own keys are passed as options instead).

    Every param group gets the value times its ratio to the first group, so groups that
    differ (a smaller lr for a backbone) keep their proportions. Returns each key's values
    as set, group by group."""
    applied = {}
    for key, value in setting.items():
        if key in ENGINE_KEYS:
            continue
        first = group_values(key, optimizers)[0]
        for opt in optimizers:
            for group in opt.param_groups:
                group[key] = in_ratio(value, group[key], first)
                if key == "lr" and "initial_lr" in group:
                    group["initial_lr"] = group["lr"]
        applied[key] = group_values(key, optimizers)
        if key == "lr" and scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [g["lr"] for g in scheduler.optimizer.param_groups]
    return applied


def check_values(flag: str, options: Any, values: dict[str, Sequence]) -> None:
    """Every value a sweep or search may give a run is one the run accepts, refused before
    anything trains (not after the settings before it have): an engine option as the run's
    options check it (`clip=-1`), an optimizer hyperparameter as the optimizer's own
    constructor does (`lr=-0.1`), and scaler settings only where the precision has a scaler."""
    for key, candidates in values.items():
        for value in candidates:
            if key in ENGINE_KEYS:
                try:
                    dataclasses.replace(options, **{key: value})
                except AmpUsageError as e:
                    raise AmpUsageError(f"{flag} {key}={value}: {e}") from None
            else:
                _check_optimizer_value(flag, key, value, options.optimizers)
    _check_scaler_precision(flag, options, values)


def _check_optimizer_value(flag: str, key: str, value: float,
                           optimizers: Sequence[torch.optim.Optimizer]) -> None:
    first = group_values(key, optimizers)[0]
    for opt in optimizers:
        for group in opt.param_groups:
            try:
                _rebuild(opt, group, key, in_ratio(value, group[key], first))
            except ValueError as e:
                raise AmpUsageError(f"{flag} {key}={value}: {type(opt).__name__} refuses it "
                                    f"({e}); choose values it accepts") from None


def _rebuild(opt: torch.optim.Optimizer, group: dict, key: str, value: float) -> None:
    """A throwaway optimizer of `opt`'s class on a one-value parameter, with `group`'s
    settings and `key` at `value`: torch's own constructor checks judge the value. One whose
    constructor needs more than its defaults checks its values itself when it steps."""
    param = group["params"][0]
    dummy = torch.zeros(1, dtype=param.dtype, device=param.device, requires_grad=True)
    settings = {k: group[k] for k in opt.defaults if k in group}
    try:
        type(opt)([dummy], **{**settings, key: value})
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - it needs more than its defaults (or a process group)
        pass


def _check_scaler_precision(flag: str, options: Any, values: dict[str, Sequence]) -> None:
    """Scaler settings (given, or tuned) apply only with fp16's GradScaler: each dtype the
    runs may train in is resolved now, as the run will, and refused where it has none."""
    given = [k for k in SCALER_KEYS if k in values or k in options.scaler_settings]
    if not given:
        return
    device = model_device(options.model)
    for dtype in values.get("dtype", [options.dtype]):
        runs = f"the runs with dtype={dtype} use" if "dtype" in values else "these runs use"
        try:
            resolve(dtype, device).check_scaler_settings(True, runs)
        except AmpUsageError as e:
            raise AmpUsageError(f"{flag} {given[0]}: {e}") from None


def engine_options(setting: dict) -> dict:
    """The setting's engine options (accum, clip, init_scale, dtype), for dataclasses.replace."""
    return {k: v for k, v in setting.items() if k in ENGINE_KEYS}


def ratio_notes(applied: dict[str, list]) -> list[str]:
    return [f"param groups kept their ratios: {key} set to "
            f"{', '.join(f'{v:.4g}' for v in values)}"
            for key, values in applied.items() if len(set(values)) > 1]
