"""Checkpoints taken at optimizer-step boundaries, complete enough to resume bit for bit.

A checkpoint holds the model, optimizers, scaler and scheduler states, the history so far,
where in the epoch training stood, and two RNG snapshots: the one taken just before the
epoch's data iterator was created (so a shuffled DataLoader replays the same order) and the
one at the boundary itself (so dropout and friends continue exactly).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..files import atomic_write
from ..tensors import capture_rng, plain_module, restore_rng

if TYPE_CHECKING:
    from collections.abc import Sequence

FORMAT = 1


def save_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module,
                    optimizers: Sequence[torch.optim.Optimizer],
                    scaler: torch.amp.GradScaler | None, scheduler: Any, step: int, epoch: int,
                    batches_in_epoch: int, epoch_rng: dict | None, history: list[dict],
                    val_history: list[dict]) -> None:
    """Write atomically: a temporary file in the same folder, then rename over `path`."""
    payload = {
        "format": FORMAT,
        "model": plain_module(model).state_dict(),  # plain keys, compiled or not
        "optimizers": [opt.state_dict() for opt in optimizers],
        "scaler": scaler.state_dict() if scaler is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": step,
        "epoch": epoch,
        "batches_in_epoch": batches_in_epoch,
        "epoch_rng": epoch_rng,
        "rng": capture_rng(),
        "history": history,
        "val_history": val_history,
    }
    atomic_write(path, lambda f: torch.save(payload, f), binary=True, prefix=".amp_ckpt_")


def load_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module,
                    optimizers: Sequence[torch.optim.Optimizer],
                    scaler: torch.amp.GradScaler | None, scheduler: Any) -> dict:
    """Load states into the given objects; return the position and history to continue from."""
    # Our own file: it holds RNG tuples and plain history, which weights_only would refuse.
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an amp_magics checkpoint")
    if len(payload["optimizers"]) != len(optimizers):
        raise ValueError(f"{path} holds {len(payload['optimizers'])} optimizer(s), "
                         f"this run has {len(optimizers)}")
    state = payload["model"]
    # files written by earlier versions while training a compiled model carry its prefix
    torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state, "_orig_mod.")
    plain_module(model).load_state_dict(state)
    for opt, state in zip(optimizers, payload["optimizers"]):
        opt.load_state_dict(state)
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    return payload


def open_epoch(data: Iterable, resumed: dict | None,
               keep_rng: bool) -> tuple[Iterator, dict | None, int]:
    """A fresh iterator over `data`, the RNG state its epoch started from (kept only when
    checkpoints need it) and the batches already read: none, or on resume as many as the
    checkpoint had read, so training continues exactly where it stood."""
    __tracebackhide__ = True
    if resumed is None or resumed["batches_in_epoch"] == 0:
        if resumed is not None:
            restore_rng(resumed["rng"])
        epoch_rng = capture_rng() if keep_rng else None  # before iter(): a loader draws its order
        return iter(data), epoch_rng, 0
    # Replay the epoch's start so a shuffled loader yields the same order, skip what was
    # already trained on, then continue from the RNG state at the checkpoint itself.
    restore_rng(resumed["epoch_rng"])
    it = iter(data)
    for _ in range(resumed["batches_in_epoch"]):
        next(it, None)
    restore_rng(resumed["rng"])
    return it, resumed["epoch_rng"], resumed["batches_in_epoch"]
