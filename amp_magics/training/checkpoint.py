"""Checkpoints taken at optimizer-step boundaries, complete enough to resume bit for bit.

A checkpoint holds the model, optimizers, scaler and scheduler states, the history so far,
where in the epoch training stood, and two RNG snapshots: the one taken just before the
epoch's data iterator was created (so a shuffled DataLoader replays the same order) and the
one at the boundary itself (so dropout and friends continue exactly).
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from ..files import atomic_write
from ..tensors import capture_rng, restore_rng
from .objects import TrainingObjects

FORMAT = 2  # 2: every value loads with torch.load(weights_only=True)


def save_checkpoint(path: str | os.PathLike, objects: TrainingObjects, *, step: int,
                    epoch: int, batches_in_epoch: int, epoch_rng: dict | None,
                    history: list[dict], val_history: list[dict]) -> None:
    """Write atomically: a temporary file in the same folder, then rename over `path`."""
    payload = {"format": FORMAT, **objects.state_dict(), "step": step, "epoch": epoch,
               "batches_in_epoch": batches_in_epoch, "epoch_rng": epoch_rng,
               "history": history, "val_history": val_history, "world_size": world_size()}
    atomic_write(path, lambda f: torch.save(payload, f), binary=True, prefix=".amp_ckpt_")


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict:
    """The checkpoint's contents. Only tensors and plain values are unpickled
    (weights_only=True): a checkpoint from elsewhere cannot run code when loaded. `mmap`:
    tensors are read from the file only when used (to read the rest cheaply)."""
    try:
        payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True,
                             mmap=mmap)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # the system's words say what is wrong
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds objects other than tensors and plain values, which "
                         f"are not loaded (weights_only): {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - torch's words for a broken file say little
        raise ValueError(f"{path} is not a checkpoint: empty, cut short, or not written by "
                         f"torch.save ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:100]})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise ValueError(f"{path} is not an amp_magics checkpoint")
    if payload["format"] != FORMAT:
        raise ValueError(f"{path} was written by another version of amp_magics (format "
                         f"{payload['format']}, this one reads {FORMAT})")
    return payload


def load_checkpoint(path: str | os.PathLike, objects: TrainingObjects) -> dict:
    """Load states into `objects`; return the position and history to continue from."""
    payload = read_checkpoint(path)
    check_same_world(payload, world_size())
    objects.load_state_dict(payload)
    return payload


def world_size() -> int:
    """How many processes train together: this rank's process group's size, else 1."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_same_world(payload: dict, world: int) -> None:
    """Raise ValueError unless `payload` was written by as many processes as train now: each
    one's part of an epoch depends on how many there are, so another number would skip or
    repeat batches where the checkpoint stood."""
    written = payload.get("world_size")  # absent from checkpoints written before it was kept
    if written is not None and written != world:
        raise ValueError(f"it was written by a run on {written} process(es) and this one has "
                         f"{world}: each process's part of the epoch would differ, skipping or "
                         f"repeating batches. Resume with --nproc {written}")


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
