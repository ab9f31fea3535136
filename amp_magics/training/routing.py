"""Calls of the notebook's model, routed through a wrapper for the length of a run.

A step body calls the notebook's module (`net(x)`); under `--nproc` those calls must go
through DistributedDataParallel (its gradient all-reduce), under `--compile` through the
compiled module. The instance's class becomes a subclass whose __call__ hands the call to the
wrapper, which calls the model back with the ordinary __call__ (hooks run once).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_ROUTE = "_amp_magics_route"
# One routing subclass per class, reused by every run: compiled code guards on the type.
_ROUTING_CLASSES: dict[type, type] = {}


class _Route:
    __slots__ = ("wrapper", "inside", "before")

    def __init__(self, wrapper: Callable[..., Any]):
        self.wrapper = wrapper
        self.inside = False
        self.before: Callable[[], None] | None = None


def _routing_class(original: type) -> type:
    routed = _ROUTING_CLASSES.get(original)
    if routed is None:
        def __call__(self, *args, **kwargs):
            route = self.__dict__.get(_ROUTE)
            if route is None or route.inside:  # the wrapper calling the model back
                return original.__call__(self, *args, **kwargs)
            route.inside = True
            try:
                if route.before is not None:
                    route.before()
                return route.wrapper(*args, **kwargs)
            finally:
                route.inside = False

        routed = type(original.__name__, (original,), {
            "__call__": __call__, "__module__": original.__module__,
            "__qualname__": original.__qualname__})
        _ROUTING_CLASSES[original] = routed
    return routed


def routed_to(model: torch.nn.Module) -> Callable[..., Any] | None:
    """The wrapper `model`'s calls go through now (DDP, a compiled module), or None."""
    route = model.__dict__.get(_ROUTE)
    return None if route is None else route.wrapper


def before_each_call(model: torch.nn.Module, hook: Callable[[], None]) -> None:
    """Call `hook()` as each call of the routed `model` begins, ahead of its wrapper (and of
    any compiled code), until the routing is released."""
    model.__dict__[_ROUTE].before = hook


def route_through(model: torch.nn.Module, wrapper: Callable[..., Any]) -> Callable[[], None]:
    """Make `model(...)` run through `wrapper` until the returned function is called, which
    puts the class back and drops the wrapper (DDP's Reducer must be freed while its process
    group lives, or gloo's teardown can abort the process). A model routed already (through
    DDP) is routed through `wrapper` instead until then."""
    route = model.__dict__.get(_ROUTE)
    if route is not None:
        previous, route.wrapper = route.wrapper, wrapper

        def put_back() -> None:
            route.wrapper = previous
        return put_back
    original = type(model)
    route = _Route(wrapper)
    object.__setattr__(model, _ROUTE, route)  # not Module.__setattr__: no submodule, no state
    model.__class__ = _routing_class(original)

    def release() -> None:
        model.__class__ = original
        model.__dict__.pop(_ROUTE, None)
        route.wrapper = None
    return release
