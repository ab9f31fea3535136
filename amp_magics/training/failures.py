"""When a step fails for lack of memory: free what the failed step held and say what fits."""
from __future__ import annotations

import gc

import torch

from ..formatting import format_bytes
from .telemetry import memory_snapshot


def release_memory(error: BaseException, device: torch.device, *, batch_size: int, accum: int,
                   step: int, precision: str) -> str:
    """Free the failed step's tensors (its frames' locals, the CUDA cache) and return the note
    for the run: what is still held and a batch size with --accum that keeps the same
    effective batch."""
    _clear_user_frames(error.__traceback__)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    snap = memory_snapshot(device)
    held = ", ".join(f"{k} {format_bytes(v)}" for k, v in snap.items() if v is not None)
    smaller = (f"a batch of {max(batch_size // 2, 1)} with --accum {accum * 2} (the same "
               f"effective batch of {batch_size * accum})" if batch_size > 1
               else "a smaller model")
    lower = ("" if precision in ("bf16", "fp16")
             else ", or --dtype bf16/fp16 (roughly halves activation memory)")
    return (f"out of memory at step {step} with a batch of {batch_size}; after freeing the "
            f"step: {held}. Try {smaller}{lower}.")


def _clear_user_frames(tb) -> None:
    """Drop the locals of the failed step's frames (they hold its activations), keeping the
    traceback printable. Our own frames keep theirs: __tracebackhide__ lives there."""
    ours = __name__.split(".")[0]
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").split(".")[0] != ours:
            try:
                tb.tb_frame.clear()
            except RuntimeError:  # a frame still executing
                pass
        tb = tb.tb_next
