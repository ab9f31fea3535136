"""One model, one owner: who may train or run a model right now.

While a run trains a model, it owns the model (every parameter, by identity, so `net2 = net`
and `net.encoder` are covered), its optimizers, scaler and scheduler. Anything else that
would train them is refused with `Owned`, naming the owner; a measurement that reads and
restores (a memory step, an overflow diagnosis) waits for a step boundary instead: it takes
the owner's step lock, the run pauses for that long and says why.

The engine holds the step lock around each optimizer step's work and lets go between steps;
uncontended, taking it is one non-blocking acquire.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .errors import AmpUsageError

_REGISTRY_LOCK = threading.Lock()
# A process forked while another thread held the lock (a --nproc rank) starts with it free.
os.register_at_fork(after_in_child=lambda: globals().update(_REGISTRY_LOCK=threading.Lock()))
_OWNERS: dict[int, "Claim"] = {}  # id(object) -> the claim holding it


class Owned(AmpUsageError):
    """The objects are being trained by another run right now."""


class Claim:
    """What one run (or sweep) owns, and the lock it holds while it steps."""

    def __init__(self, label: str, objects: list):
        self.label = label  # "run3", "sweep", "%amp_memory"
        self.objects = objects  # strong references: ids stay unique while claimed
        self.step_lock = threading.RLock()
        self.run: Any = None  # the Run training now, for progress in messages
        self.paused_for: str | None = None  # what holds the lock from outside, if anything
        self.held = threading.Event()  # set while that outside holder has the lock
        self.released = False

    def describe(self) -> str:
        run = self.run
        if run is None:
            return self.label
        total = f" of {run.total_steps}" if run.total_steps else ""
        return f"{run.name} ({len(run.history)}{total} steps done, {run.status})"

    def release(self) -> None:
        with _REGISTRY_LOCK:
            if self.released:
                return
            self.released = True
            for obj in self.objects:
                if _OWNERS.get(id(obj)) is self:
                    del _OWNERS[id(obj)]

    @contextlib.contextmanager
    def paused(self, reason: str) -> Iterator[None]:
        """Hold the step lock from outside: the run waits at its next step boundary (it sees
        `paused_for` and lets this take the lock first, so a busy run cannot starve it)."""
        self.paused_for = reason
        try:
            with self.step_lock:
                self.held.set()
                try:
                    yield
                finally:
                    self.held.clear()
        finally:
            self.paused_for = None


def owned_objects(model: torch.nn.Module | None = None, others: Iterable = ()) -> list:
    """The objects a claim covers: the model, each of its parameters, and `others`."""
    objects: list = []
    if model is not None:
        objects.append(model)
        objects.extend(model.parameters())
    objects.extend(o for o in others if o is not None)
    return objects


def owner_of(objects: Iterable) -> Claim | None:
    """The live claim holding any of `objects`, or None."""
    with _REGISTRY_LOCK:
        for obj in objects:
            claim = _OWNERS.get(id(obj))
            if claim is not None:
                return claim
    return None


def claim(label: str, objects: list) -> Claim:
    """Own `objects`, or raise Owned naming the run that does."""
    with _REGISTRY_LOCK:
        for obj in objects:
            holder = _OWNERS.get(id(obj))
            if holder is not None:
                raise Owned(refusal(holder))
        new = Claim(label, objects)
        for obj in objects:
            _OWNERS[id(obj)] = new
    return new


def refusal(holder: Claim) -> str:
    name = holder.run.name if holder.run is not None else holder.label
    return (f"this model is being trained by {holder.describe()}; training it from here too "
            f"would interleave two runs' updates. Stop that run with `%amp_stop {name}`, or "
            f"wait for it to end with `%amp_wait {name}`, then run this again.")


@contextlib.contextmanager
def at_step_boundary(reason: str, model: torch.nn.Module,
                     others: Iterable = ()) -> Iterator[Claim | None]:
    """Run a read-and-restore measurement on `model` safely.

    If a run owns it, wait for its step boundary and keep it paused while the body runs
    (yields that claim). Otherwise own the objects for the body's duration (yields None).
    """
    objects = owned_objects(model, others)
    holder = owner_of(objects)
    if holder is not None:
        with holder.paused(reason):
            yield holder
        return
    mine = claim(reason, objects)
    try:
        yield None
    finally:
        mine.release()


def release_all() -> int:
    """Forget every claim (unloading the extension). Returns how many there were."""
    with _REGISTRY_LOCK:
        claims = {id(c): c for c in _OWNERS.values()}
        _OWNERS.clear()
    for c in claims.values():
        c.released = True
    return len(claims)
