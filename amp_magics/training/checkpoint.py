"""Checkpoints taken at optimizer-step boundaries, complete enough to resume bit for bit.

A checkpoint holds the model, optimizers, scaler and scheduler states, the history so far,
where in the epoch training stood, and two RNG snapshots: the one taken just before the
epoch's data iterator was created (so a shuffled DataLoader replays the same order) and the
one at the boundary itself (so dropout and friends continue exactly).
"""
from __future__ import annotations

import os
import tempfile

import torch

from ..tensors import capture_rng

FORMAT = 1


def save_checkpoint(path, *, model, optimizers, scaler, scheduler, step, epoch, batches_in_epoch,
         epoch_rng, history, val_history) -> None:
    """Write atomically: a temporary file in the same folder, then rename over `path`."""
    payload = {
        "format": FORMAT,
        "model": model.state_dict(),
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
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".amp_ckpt_", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_checkpoint(path, *, model, optimizers, scaler, scheduler) -> dict:
    """Load states into the given objects; return the position and history to continue from."""
    # Our own file: it holds RNG tuples and plain history, which weights_only would refuse.
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an amp_magics checkpoint")
    if len(payload["optimizers"]) != len(optimizers):
        raise ValueError(f"{path} holds {len(payload['optimizers'])} optimizer(s), "
                         f"this run has {len(optimizers)}")
    model.load_state_dict(payload["model"])
    for opt, state in zip(optimizers, payload["optimizers"]):
        opt.load_state_dict(state)
    if scaler is not None and payload["scaler"] is not None:
        scaler.load_state_dict(payload["scaler"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    return payload
