"""What `--search` may vary, and how: `lr=log(1e-5,1e-1); weight_decay=0,1e-4; clip=uniform(0.5,5)`.

Each key is one `--sweep` takes (a numeric optimizer hyperparameter, or accum, clip,
init_scale, dtype); its values are `log(a,b)` (log-uniform), `uniform(a,b)`, `int(a,b)` or a
comma list (a choice among them). A bad part is refused naming that part and the fix.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import AmpUsageError
from .hyperparameters import ENGINE_KEYS, check_ratios, parse_value, value_type

FLAG = "--search"
EXAMPLE = '--search "lr=log(1e-5,1e-1); weight_decay=0,1e-4"'
_RANGE = re.compile(r"(log|uniform|int)\((.*)\)", re.IGNORECASE)


@dataclass(frozen=True)
class Dimension:
    key: str
    kind: str  # "log", "uniform", "int" or "choice"
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial asks for (its sampler picks it)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.kind == "log")

    def text(self) -> str:
        if self.kind == "choice":
            return ",".join(map(str, self.choices))
        return f"{self.kind}({self.low:g},{self.high:g})"


def parse_space(spec: str | Mapping[str, Any], optimizers: Sequence[torch.optim.Optimizer]
                ) -> dict[str, Dimension]:
    """The search space from `--search`'s text or from `search(space={...})`, whose values are
    such texts, lists of choices, or one number (a choice of one)."""
    if isinstance(spec, str):
        parts = [p for p in spec.split(";") if p.strip()]
        pairs = []
        for part in parts:
            key, sep, values = part.partition("=")
            if not sep or not key.strip():
                raise AmpUsageError(f"{FLAG} part {part.strip()!r} is not KEY=VALUES: write "
                                    f"e.g. {EXAMPLE}")
            pairs.append((key.strip().replace("-", "_"), values.strip()))
    elif isinstance(spec, Mapping):
        pairs = list(spec.items())
    else:
        raise AmpUsageError(f"{FLAG} (space=) takes a text or a dict, got {type(spec).__name__}"
                            f': write e.g. space={{"lr": "log(1e-5,1e-1)", "momentum": [0, 0.9]}}')
    if not pairs:
        raise AmpUsageError(f"{FLAG} is empty: write e.g. {EXAMPLE}")
    space: dict[str, Dimension] = {}
    for key, values in pairs:
        if key in space:
            raise AmpUsageError(f"{FLAG} names {key!r} twice")
        space[key] = _dimension(key, values, optimizers)
        if key not in ENGINE_KEYS:
            check_ratios(FLAG, key, optimizers)
    return space


def _dimension(key: str, values: Any, optimizers: Sequence[torch.optim.Optimizer]) -> Dimension:
    kind = value_type(FLAG, key, optimizers[0])
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]  # one value from Python: a choice of one, as --sweep's lr=0.1
    if isinstance(values, (list, tuple, range, set, frozenset)):  # choices from Python
        return _choice(key, [str(v) for v in values], optimizers)
    if not isinstance(values, str):
        raise AmpUsageError(f"{FLAG} {key}={values!r}: give a range as text, e.g. "
                            f'"log(1e-4,1e-1)", a list of values, e.g. [0.1, 0.2], or one number')
    match = _RANGE.fullmatch(values)
    if match is None:
        return _choice(key, [v.strip() for v in values.split(",") if v.strip()], optimizers)
    how, bounds = match[1].lower(), [b.strip() for b in match[2].split(",")]
    if kind is str or len(bounds) != 2:
        raise AmpUsageError(f"{FLAG} {key}={values}: " + (
            f"{key} takes a list of choices, e.g. {key}=bf16,fp16" if kind is str
            else f"{how}() takes two bounds, e.g. {key}={how}(1e-4,1e-1)"))
    low, high = (parse_value(FLAG, key, b, optimizers[0]) for b in bounds)
    if not low < high:
        raise AmpUsageError(f"{FLAG} {key}={values}: the low bound must be below the high one")
    if how == "log" and low <= 0:
        raise AmpUsageError(f"{FLAG} {key}={values}: log() needs a positive low bound")
    if how == "int" or kind is int:
        if how != "int" or low != int(low) or high != int(high):
            raise AmpUsageError(f"{FLAG} {key}={values}: {key} takes whole numbers: write "
                                f"{key}=int(1,8) or a list")
    return Dimension(key, how, low, high)


def _choice(key: str, texts: list[str], optimizers: Sequence[torch.optim.Optimizer]
            ) -> Dimension:
    if not texts:
        raise AmpUsageError(f"{FLAG} {key}= has no values: give a list, e.g. {key}=0.1,0.2, "
                            f"or a range, e.g. {key}=log(1e-4,1e-1)")
    return Dimension(key, "choice", choices=tuple(
        dict.fromkeys(parse_value(FLAG, key, t, optimizers[0]) for t in texts)))
