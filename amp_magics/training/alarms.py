"""Known ways mixed precision goes wrong, spotted in the history and said in words.

GradScaler searches for a loss scale at the start of a run: from --init-scale it halves the
scale on every step whose gradients overflow fp16, skipping that step, until one fits. With
`--init-scale 2**30` that is a dozen skips in a row, and normal. What is not normal:
- skips that persist after the search ended ("skipping"): most recent steps skipped even
  though a scale was found, or steps skipped because the forward pass itself overflows
  (a non-finite loss, which no loss scale changes);
- the scale collapsing toward 1 ("scale"), the failure behind pytorch#40497, pytorch#99640 and
  DeepSpeed#697 ("Current loss scale already at minimum").
Gradient clipping changes neither: GradScaler checks the gradients for inf/NaN when it unscales
them, before any clipping, so the advice never suggests --clip for overflow.
"""
from __future__ import annotations

import math

RECENT = 20  # steps looked at for "most steps are skipped"
# A scale that FELL to 2 or below has collapsed. A search from 2**16 (GradScaler's default)
# or higher ends far above it on a healthy model; at 2 the gradients overflow fp16 with
# almost no scaling (unscaled values near 65504 / 2), so loss scaling no longer helps, and
# the next halvings reach 1 (DeepSpeed's floor) and below 1, where scaling shrinks gradients
# and makes underflow worse (pytorch#99640). A higher threshold, such as 2**4, would also
# catch models with large but stable gradients that simply settle at a low scale.
COLLAPSED = 2.0


def _overflow_fix(device: str) -> str:
    return (f"--dtype bf16 (fp32's range), or keep the overflowing module in fp32 "
            f"(`with torch.autocast('{device}', enabled=False):` around it, on a `.float()` "
            "input); `%%amp_doctor` or --diagnose finds it.")


def check(new: list[dict], history: list[dict], settled: int | None,
          device: str = "cuda") -> dict[str, str]:
    """Alarms called for by the `new` records just appended to `history`, by kind.

    `settled` is the index in `history` of the first step that was not skipped (the end of
    GradScaler's search for a scale), None while every step so far was skipped. Only the new
    records and the recent tail are scanned, so a refresh stays cheap however long the run.
    """
    found = {}
    bad = next((r for r in new if not math.isfinite(r["loss"])), None)
    if bad is not None and bad["scale"] is None:  # no GradScaler: bf16 or fp32
        found["nonfinite"] = (
            f"loss is {bad['loss']} at step {bad['step']}: training diverged, or a module's "
            "values went beyond this precision's range. Try a lower learning rate; "
            "`%%amp_doctor` or --diagnose finds the module."
        )
    elif bad is not None:
        found["nonfinite"] = (
            f"loss is {bad['loss']} at step {bad['step']}: the forward pass overflowed fp16, or "
            f"training diverged. If it overflowed, try {_overflow_fix(device)} If it diverged, "
            "try a lower learning rate."
        )
    # Skips during the search do not count; skips of a non-finite loss always do (the forward
    # pass overflowed, which no loss scale changes).
    start = max(len(history) - RECENT, 0)
    counted = [r for i, r in enumerate(history[start:], start)
               if (settled is not None and i >= settled) or not math.isfinite(r["loss"])]
    skipped = sum(r["skipped"] for r in counted)
    if len(counted) >= RECENT // 2 and skipped > len(counted) / 2:
        found["skipping"] = (
            f"{skipped} of the last {len(counted)} steps were skipped by the GradScaler (not "
            "counting its initial search for a loss scale): fp16 keeps overflowing, so the model "
            f"is not learning. Try {_overflow_fix(device)}"
        )
    first = history[0]["scale"] if history else None
    low = next((r for r in new if r["scale"] is not None and first is not None
                and r["scale"] <= COLLAPSED and r["scale"] < first), None)
    if low is not None:
        found["scale"] = (
            f"loss scale collapsed to {low['scale']:.3g} at step {low['step']} (from {first:g}): "
            "fp16 overflows even with almost no loss scaling, so the GradScaler cannot help. "
            f"Try {_overflow_fix(device)}"
        )
    return found


class Alarms:
    """The alarm checks of one run. It remembers where the scale search ended, so that each
    refresh looks only at its new records and the recent tail."""

    def __init__(self, device: str = "cuda"):
        self.device = device
        self.settled: int | None = None  # index in the history of the first step not skipped
        self._seen = 0  # history records already looked at for it

    def check(self, new: list[dict], history: list[dict]) -> dict[str, str]:
        if self.settled is None:
            self.settled = next((i for i in range(self._seen, len(history))
                                 if not history[i]["skipped"]), None)
            self._seen = len(history)
        return check(new, history, self.settled, self.device)
