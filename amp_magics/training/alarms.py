"""Known ways mixed precision goes wrong, spotted in the history and said in words."""
from __future__ import annotations

import math

RECENT = 20  # steps looked at for "most steps are skipped"


def check(new: list[dict], history: list[dict]) -> dict[str, str]:
    """Alarms called for by the `new` records just appended to `history`, by kind.

    Only the new records and the recent tail are scanned, so a refresh stays cheap however
    long the run.
    """
    found = {}
    bad = next((r for r in new if not math.isfinite(r["loss"])), None)
    if bad is not None:
        found["nonfinite"] = (
            f"loss is {bad['loss']} at step {bad['step']}: the forward pass overflowed or "
            "diverged. Try --dtype bf16, a lower --init-scale such as 2**14, --clip 1.0, a lower "
            "learning rate, or keep the offending module in fp32 (%amp_doctor finds it)."
        )
    recent = history[-RECENT:]
    skipped = sum(r["skipped"] for r in recent)
    if len(recent) >= RECENT // 2 and skipped > len(recent) / 2:
        found["skipping"] = (
            f"{skipped} of the last {len(recent)} steps were skipped by the GradScaler: gradients "
            "keep overflowing in fp16, so the model is not learning. Try --dtype bf16, "
            "--clip 1.0, or a lower learning rate."
        )
    low = next((r for r in new if r["scale"] is not None and r["scale"] < 1), None)
    if low is not None:
        found["scale"] = (
            f"loss scale fell below 1 ({low['scale']:.3g}) at step {low['step']}: fp16 cannot "
            "represent these gradients. Use --dtype bf16, or keep the unstable module in fp32."
        )
    return found
