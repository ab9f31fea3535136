"""What a user tunes: optimizer hyperparameters (set on every param group, keeping their
ratios) and the engine options marked tunable (`accum`, `clip`, `init_scale`, `dtype`)."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import AmpUsageError
from ..precision import CHOICES
from ..formatting import number
from ..training.options import tunable_types

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
                group[key] = value if group[key] == first else value * group[key] / first
                if key == "lr" and "initial_lr" in group:
                    group["initial_lr"] = group["lr"]
        applied[key] = group_values(key, optimizers)
        if key == "lr" and scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [g["lr"] for g in scheduler.optimizer.param_groups]
    return applied


def check_engine_values(flag: str, options: Any, values: dict[str, Sequence]) -> None:
    """Every engine value a sweep or search may give a run is one the run accepts: `clip=-1`
    is refused before anything trains, not after the settings before it have."""
    for key, candidates in values.items():
        for value in candidates if key in ENGINE_KEYS else ():
            try:
                dataclasses.replace(options, **{key: value})
            except AmpUsageError as e:
                raise AmpUsageError(f"{flag} {key}={value}: {e}") from None


def engine_options(setting: dict) -> dict:
    """The setting's engine options (accum, clip, init_scale, dtype), for dataclasses.replace."""
    return {k: v for k, v in setting.items() if k in ENGINE_KEYS}


def ratio_notes(applied: dict[str, list]) -> list[str]:
    return [f"param groups kept their ratios: {key} set to "
            f"{', '.join(f'{v:.4g}' for v in values)}"
            for key, values in applied.items() if len(set(values)) > 1]
