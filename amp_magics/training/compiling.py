"""--compile: the run's model compiled with torch.compile, and what dynamo says it compiled.

The notebook's module stays the plain module; for the length of a run its calls go through
`torch.compile(model)` (routing.py), bit for bit what the usual recipe (`torch.compile(model)`)
computes; `nn.Module.compile()` is not used: its code computes differently here. Dynamo keeps
compiled code per code object, guarded on the model, so a re-run of the cell on the same model
(and mode) reuses it without compiling.

Compile time and recompilations come from dynamo's compilation metrics (read through
_torch_compat) at refreshes, never per step; where a torch version lacks them, compile time
simply is not separated from step time.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import _torch_compat as private
from .routing import route_through, routed_to

def compile_for_run(model: torch.nn.Module, mode: str) -> Callable[[], None]:
    """Route `model(...)` through torch.compile(model) until the returned function is called;
    a model routed through DDP (under torchrun) through torch.compile(DDP(model)), as the DDP
    docs write it. Dynamo runs DDP's own forward eagerly (its graph breaks, not ours) and
    compiles the model's, which our routing frame lets it reach: on torch 2.13 on the CPU
    this is bit-identical to DDP(torch.compile(model))."""
    target = routed_to(model) or model
    return route_through(model, torch.compile(target, mode=None if mode == "default" else mode))


@dataclass
class Compilation:
    start: float  # seconds after the run started (the steps' clock)
    seconds: float
    graph: bool  # a forward graph (a backward compile belongs to the graph before it)
    recompile_reason: str | None


class CompileWatch:
    """The compilations that started after `wall_start` (time.time()), each reported once."""

    def __init__(self, wall_start: float):
        self.wall_start = wall_start
        self.seen: set = set()

    def new(self) -> list[Compilation]:
        found = []
        for m in private.compilation_metrics():
            start = _start_seconds(m)
            if start is None or start < self.wall_start:
                continue
            forward = getattr(m, "is_forward", True) is not False
            key = (start, getattr(m, "co_name", None), forward)
            if key in self.seen:
                continue
            self.seen.add(key)
            found.append(Compilation(start - self.wall_start, _seconds(m), forward,
                                     getattr(m, "recompile_reason", None) if forward else None))
        return found


def _start_seconds(m) -> float | None:
    us = getattr(m, "start_time_us", None)
    return us / 1e6 if us is not None else getattr(m, "start_time", None)


def _seconds(m) -> float:
    us = getattr(m, "duration_us", None)
    if us is not None:
        return us / 1e6
    return getattr(m, "entire_frame_compile_time_s", None) or 0.0


def recompile_alarm(count: int, reason: str) -> str:
    """What a recompilation means, from dynamo's guard failure, with the fix."""
    first = reason.strip().splitlines()[0] if reason.strip() else "unknown"
    first = re.sub(r"^\d+/\d+:\s*", "", first).split("#")[0].strip()  # less the source line
    if "size mismatch" in first:
        why = ("a batch of a new shape reached the compiled model (often the last, smaller "
               "batch of an epoch). Give every batch one shape (DataLoader(drop_last=True), or "
               "pad), or compile with dynamic shapes; dynamo now treats that size as dynamic")
    elif re.search(r"==\s*-?[\d.]+(e-?\d+)?\s*$", first) and "type" not in first:
        why = ("a Python number that changes between steps was compiled in as a constant, "
               "so a new value compiled again (dynamo may then make it dynamic, or give up "
               "after its cache limit): pass it as a tensor (torch.tensor(value)) or keep it "
               "out of the model's forward")
    elif "check_obj_id" in first or "check_type_id" in first:
        why = ("another object (a different model, module or optimizer) reached the same "
               "compiled code: compile each model once and keep using it")
    else:
        why = "run with TORCH_LOGS=recompiles to see every guard that failed"
    return (f"torch.compile recompiled the model ({count} time{'s' * (count != 1)} so far; "
            f"guard: {first}): {why}")
