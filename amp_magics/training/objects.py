"""The objects a run trains, held as one: model, optimizers, loss scaler, scheduler (and RNG).

`claim()` owns them for a run (ownership.py). `state_dict()` / `load_state_dict()` are what
checkpoints and the `--nproc` copy-back carry. `snapshot()` / `restore()` keep an exact copy
in memory for whatever must leave them as it found them (sweeps, the finders, searches):
weights and buffers, gradients (None where they were None), train/eval modes, optimizer
state and hyperparameters, scaler, scheduler, every random generator and the generators a
DataLoader and its sampler draw their order from.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import ownership
from .._torch_compat import plain_module
from ..tensors import capture_rng, restore_rng
from . import scaler as scalers


@dataclass(frozen=True)
class TrainingObjects:
    model: torch.nn.Module
    optimizers: tuple
    scheduler: Any = None
    scaler: torch.amp.GradScaler | None = None  # the one the run uses, once it is known

    @classmethod
    def of(cls, options: Any) -> TrainingObjects:
        """What `options` (a TrainOptions) trains; the scaler is the user's own, if given."""
        return cls(options.model, tuple(options.optimizers), options.scheduler, options.scaler)

    def with_scaler(self, scaler: torch.amp.GradScaler | None) -> TrainingObjects:
        return dataclasses.replace(self, scaler=scaler)

    def claim(self, label: str) -> ownership.Claim:
        """Own the model, each parameter, the optimizers, scaler and scheduler, or raise
        ownership.Owned naming the run that does."""
        return ownership.claim(label, ownership.owned_objects(
            self.model, [*self.optimizers, self.scaler, self.scheduler]))

    # -- what checkpoints and the copy-back carry -----------------------------------------
    def state_dict(self) -> dict:
        return {"model": plain_module(self.model).state_dict(),  # plain keys, compiled or not
                "optimizers": [opt.state_dict() for opt in self.optimizers],
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "scheduler": (self.scheduler.state_dict() if self.scheduler is not None
                              else None),
                "rng": capture_rng()}

    def load_state_dict(self, state: dict, rng: bool = False) -> None:
        """Load what `state_dict()` wrote (the RNG only when asked: a resumed run restores it
        where the epoch it continues stood)."""
        model_state = state["model"]
        # files written by earlier versions while training a compiled model carry its prefix
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(model_state, "_orig_mod.")
        self._check_fits(model_state, state["optimizers"])  # nothing is loaded from a misfit
        plain_module(self.model).load_state_dict(model_state)
        for opt, opt_state in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if rng:
            restore_rng(state["rng"])

    def _check_fits(self, model_state: dict, optimizer_states: list) -> None:
        """Raise ValueError where the states do not fit these objects, before any is loaded
        (torch's own checks come one object at a time, after the earlier ones loaded)."""
        own = plain_module(self.model).state_dict()
        missing, unexpected = own.keys() - model_state.keys(), model_state.keys() - own.keys()
        if missing or unexpected:
            raise ValueError(f"its model does not fit this one: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        for key, tensor in own.items():
            if model_state[key].shape != tensor.shape:
                raise ValueError(f"its model does not fit this one: {key} has shape "
                                 f"{tuple(model_state[key].shape)}, here {tuple(tensor.shape)}")
        if len(optimizer_states) != len(self.optimizers):
            raise ValueError(f"it holds {len(optimizer_states)} optimizer(s), this run has "
                             f"{len(self.optimizers)}")
        for i, (opt, saved) in enumerate(zip(self.optimizers, optimizer_states), 1):
            sizes, here = ([len(g["params"]) for g in groups]
                           for groups in (saved["param_groups"], opt.param_groups))
            if sizes != here:
                raise ValueError(f"optimizer {i}'s parameter groups do not fit: it holds groups "
                                 f"of {sizes} parameters, this run {here}")

    # -- an exact copy in memory ------------------------------------------------------------
    def snapshot(self, data: Iterable | None = None) -> Snapshot:
        """Everything training can change, copied now; `data`'s order generators too."""
        return Snapshot(self, data)

    @contextlib.contextmanager
    def borrowed(self, label: str, data: Iterable | None = None) -> Iterator[Loan]:
        """Own these objects as `label` with a snapshot of them (and of `data`'s order) for a
        tool that trains them and must leave them as it found them: however the block ends,
        `loan.returned` (the snapshot, unless the tool keeps another) is put back and the
        claim let go, also when the snapshot itself could not be taken."""
        claim = self.claim(label)
        try:
            loan = Loan(claim, self.snapshot(data))
            try:
                yield loan
            finally:
                if not claim.released:  # else the extension was unloaded: no longer ours
                    loan.returned.restore()
        finally:
            claim.release()


@dataclass
class Loan:
    """A tool's hold on the objects: the claim its runs train under, the state they start
    from, and what is put back at the end (the start, unless the tool keeps a better one)."""
    claim: ownership.Claim
    start: Snapshot
    returned: Snapshot = field(init=False)

    def __post_init__(self) -> None:
        self.returned = self.start


class Snapshot:
    """TrainingObjects as they were when it was taken; `restore()` puts them back, as often
    as needed (each restore copies again, so a later one starts from the same state).

    The copies live in host memory: on a GPU they would take memory from the runs trained
    from them and count in the peaks those runs measure."""

    def __init__(self, objects: TrainingObjects, data: Iterable | None = None):
        self.objects = objects
        model = objects.model
        self.weights = {k: _host_copy(v) for k, v in model.state_dict().items()}
        self.modes = [(m, m.training) for m in model.modules()]
        params = _parameters(objects)
        self.grads = [(p, None if p.grad is None else _host_copy(p.grad)) for p in params]
        in_model = {id(p) for p in model.parameters()}
        # parameters only an optimizer holds (a learnable temperature): their values too
        self.extras = [(p, _host_copy(p)) for p in params if id(p) not in in_model]
        self.optimizers = [_host_tree(opt.state_dict()) for opt in objects.optimizers]
        self.scheduler = (copy.deepcopy(objects.scheduler.state_dict())
                          if objects.scheduler is not None else None)
        # The scaler kept per optimizer (made by the first fp16 run) and the user's own
        self.persistent_scaler = scalers.snapshot(objects.optimizers[0])
        self.scaler = (copy.deepcopy(objects.scaler.state_dict())
                       if objects.scaler is not None else None)
        self.rng = capture_rng()
        self.generators = [(g, g.get_state()) for g in order_generators(data)]

    def restore(self) -> None:
        o = self.objects
        o.model.load_state_dict(self.weights)
        for module, mode in self.modes:
            module.training = mode
        with torch.no_grad():
            for p, value in self.extras:
                p.copy_(value)
        for opt, state in zip(o.optimizers, self.optimizers):
            opt.load_state_dict(copy.deepcopy(state))  # onto each parameter's device
        for p, grad in self.grads:  # after load_state_dict, which leaves .grad alone
            p.grad = None if grad is None else grad.to(p.device, copy=True)
        if o.scheduler is not None:
            o.scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        scalers.restore(o.optimizers[0], self.persistent_scaler)
        if o.scaler is not None:
            o.scaler.load_state_dict(copy.deepcopy(self.scaler))
        restore_rng(self.rng)
        for generator, state in self.generators:
            generator.set_state(state)


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def _host_tree(state: Any) -> Any:
    """An optimizer's state_dict with every tensor copied to host memory."""
    if isinstance(state, torch.Tensor):
        return _host_copy(state)
    if isinstance(state, dict):
        return {k: _host_tree(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_host_tree(v) for v in state)
    return copy.deepcopy(state)


def _parameters(objects: TrainingObjects) -> list[torch.nn.Parameter]:
    """The model's parameters, then any an optimizer holds that the model does not."""
    params = {id(p): p for p in objects.model.parameters()}
    for opt in objects.optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                params.setdefault(id(p), p)
    return list(params.values())


def order_generators(data: Any) -> list[torch.Generator]:
    """The torch Generators a DataLoader draws its order from: its own, its sampler's and its
    batch sampler's sampler's (each distinct one once). Without one a loader draws from the
    global RNG, which capture_rng() covers."""
    if data is None:
        return []
    found: dict[int, torch.Generator] = {}
    candidates = [data, getattr(data, "sampler", None), getattr(data, "batch_sampler", None),
                  getattr(getattr(data, "batch_sampler", None), "sampler", None)]
    for holder in candidates:
        generator = getattr(holder, "generator", None)
        if isinstance(generator, torch.Generator):
            found.setdefault(id(generator), generator)
    return list(found.values())
