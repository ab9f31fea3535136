"""training/telemetry.py's StepRecorder: what a step records is read back exactly, and the
tensors it keeps are stacked every COMPACT_STEPS steps, so they do not live until a refresh."""
import gc
import weakref

import torch

from amp_magics.training.telemetry import COMPACT_STEPS, StepRecorder


def test_compacted_steps_read_back_as_recorded():
    recorder = StepRecorder(log_names=("acc", "width"))
    expected, kept = [], []
    for step in range(2 * COMPACT_STEPS + 11):
        # shapes () and (1,), bf16 and fp32 mixed in one column, as accumulation windows give
        loss = (torch.tensor(step / 7, dtype=torch.bfloat16) if step % 3 else
                torch.tensor([step / 7]))
        scale = torch.tensor(2.0 ** (step % 5)) if step < COMPACT_STEPS else None
        found = torch.tensor(float(step % 4 == 0))
        lr = torch.tensor(0.1 / (step + 1)) if step % 2 else 0.1 / (step + 1)
        acc, width = torch.tensor(step * 0.5), float(step)
        micro = 1 + step % 2
        recorder.record((step, step // 50, step * 0.01, 8, micro, loss, scale, found, None, lr,
                         (acc, width), step % 5 != 0))
        if len(recorder.pending) == COMPACT_STEPS:  # as AmpStep does
            recorder.compact()
        assert len(recorder.pending) < COMPACT_STEPS and len(recorder) == step + 1
        kept.append(weakref.ref(loss))
        expected.append({
            "step": step, "epoch": step // 50, "loss": loss.float().item() / micro,
            "scale": None if scale is None else scale.item(), "skipped": step % 4 == 0,
            "lr": lr.item() if step % 2 else lr, "time": step * 0.01,
            "samples": 8, "scheduler_stepped": step % 5 != 0,
            "acc": acc.item() / micro, "width": width / micro})
        del loss, scale, found, lr, acc
    gc.collect()
    alive = [r for r in kept if r() is not None]
    assert len(alive) == len(kept) - 2 * COMPACT_STEPS  # only the steps not yet compacted
    records = recorder.drain()
    assert len(recorder) == 0 and recorder.drain() == []
    assert records == expected


def test_columns_nobody_recorded_are_left_out():
    recorder = StepRecorder()
    for step in range(3):
        recorder.record((step, 0, 0.1 * step, 4, 1, torch.tensor(1.0), None, None, None, 0.01,
                         (), None))
    records = recorder.drain()
    assert [r["loss"] for r in records] == [1.0, 1.0, 1.0]
    assert all("grad_norm" not in r and "scheduler_stepped" not in r for r in records)
