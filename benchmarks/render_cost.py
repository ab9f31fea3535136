"""Cost of one dashboard render and its payload, for runs of 1k, 10k and 100k steps.

Each view has the current run plus 3 earlier runs of the same length, as numpy arrays (what an
adapter should keep) and as Python lists (plain history columns, converted on every render).

    python benchmarks/render_cost.py              # the table
    python benchmarks/render_cost.py --html x.html --steps 20000   # a sample dashboard to look at
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from amp_magics.views.charts import DashboardView, RunTrace, dashboard_html

GIB = 1 << 30


def sample_trace(name: str, steps: int, seed: int, *, lr_factor: float = 1.0, flags: str = "",
                 nan_at: int | None = None) -> RunTrace:
    """A noisy decaying loss with spikes; an fp16 loss scale that doubles every 2000 good steps
    and halves on each skipped step; CUDA-like memory sampled every 0.5 s at 40 steps/s."""
    rng = np.random.default_rng(seed)
    x = np.arange(1, steps + 1, dtype=float)
    loss = 0.25 + 2.2 * np.exp(-x * lr_factor / (steps / 4)) + rng.normal(0, 0.06, steps) * (
        1 + np.exp(-x / (steps / 10)))
    loss[rng.random(steps) < 0.0008] += 1.5  # spikes that downsampling must keep
    if nan_at is not None and nan_at < steps:
        loss[nan_at] = np.nan
    # the usual burst while the scale settles, then a rare overflow
    skipped = np.unique(np.concatenate([[3, 4, 5], rng.choice(steps, steps // 3000)]))
    scale, s, good = np.empty(steps), 2.0 ** 16, 0
    skip_set = set(skipped.tolist())
    for i in range(steps):
        scale[i] = s
        s, good = (s / 2, 0) if i in skip_set else (s, good + 1)
        if good == 2000:
            s, good = s * 2, 0
    t = np.arange(0.5, steps / 40, 0.5)
    allocated = (1.2 + 0.8 * (t > 2) + 0.3 * ((t // 20) % 2) * (t > 40)) * GIB
    epoch_len = max(1, steps // 5)
    val_steps = np.arange(epoch_len, steps + 1, epoch_len, dtype=float)
    return RunTrace(
        name=name, flags=flags, steps=x, loss=loss, scale=scale, skipped=x[skipped],
        val_steps=val_steps, val_loss=np.interp(val_steps, x, loss) + 0.05,
        memory_time=t,
        memory={"allocated": allocated, "reserved": np.maximum.accumulate(allocated) + 0.4 * GIB,
                "peak": np.maximum.accumulate(allocated * 1.15),
                "device used (NVML)": np.maximum.accumulate(allocated) + 0.9 * GIB})


def _until(run: RunTrace, step: int) -> RunTrace:
    """The run as it stands, live, at `step`."""
    until = {"steps": run.steps <= step, "val_steps": run.val_steps <= step,
             "memory_time": run.memory_time <= step / 40}
    cut = {name: getattr(run, name)[mask] for name, mask in until.items()}
    return replace(run, **cut, loss=run.loss[until["steps"]], scale=run.scale[until["steps"]],
                   skipped=run.skipped[run.skipped <= step],
                   val_loss=run.val_loss[until["val_steps"]],
                   memory={k: v[until["memory_time"]] for k, v in run.memory.items()})


def sample_view(steps: int, *, as_lists: bool = False) -> DashboardView:
    """Step 60% of a `steps`-step run, with 3 finished earlier runs of the same length."""
    done = steps * 3 // 5
    current = _until(sample_trace("run4", steps, 4, nan_at=done * 2 // 3), done)
    earlier = [sample_trace("run1", steps, 1, lr_factor=0.6, flags="lr=1e-4"),
               sample_trace("run2", steps, 2, lr_factor=0.8, flags="lr=3e-4 batch=64"),
               sample_trace("run3", steps, 3, lr_factor=1.3, flags="lr=1e-3 dtype=bf16")]
    if as_lists:
        current, *earlier = [
            replace(run, memory={k: v.tolist() for k, v in run.memory.items()},
                    **{f.name: getattr(run, f.name).tolist() for f in fields(run)
                       if isinstance(getattr(run, f.name), np.ndarray)})
            for run in [current, *earlier]]
    return DashboardView(
        current=current, earlier=earlier, scaler=True, step=done, total_steps=steps,
        epoch=4, epochs=5, samples_per_s=40 * 256, steps_per_s=40.0, lr=3e-4, elapsed=done / 40,
        eta=(steps - done) / 40,
        status=(f"cuda:0 (NVIDIA H200) · fp16 autocast · GradScaler(init_scale=65536, "
                f"growth_interval=2000) · {len(current.skipped)} skipped steps so far"),
        alarms=[f"loss is nan at step {done * 2 // 3}: the forward pass overflowed or diverged."])


def cost(view: DashboardView, repeats: int) -> tuple[float, float, int]:
    """(mean, best) seconds per dashboard_html call, and the payload in bytes."""
    payload = len(dashboard_html(view).encode())  # also warms up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dashboard_html(view)
        times.append(time.perf_counter() - start)
    return sum(times) / len(times), min(times), payload


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", help="write the sample dashboard to this file and stop")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.html:
        with open(args.html, "w") as f:
            f.write(dashboard_html(sample_view(args.steps)))
        print(f"wrote {args.html}")
        return
    print(f"{'steps':>8} {'arrays: mean ms':>16} {'best ms':>8} {'lists: mean ms':>15} "
          f"{'best ms':>8} {'payload kB':>11}")
    for steps in (1_000, 10_000, 100_000):
        mean, best, payload = cost(sample_view(steps), args.repeats)
        list_mean, list_best, _ = cost(sample_view(steps, as_lists=True), args.repeats)
        print(f"{steps:>8,} {mean * 1e3:>16.2f} {best * 1e3:>8.2f} {list_mean * 1e3:>15.2f} "
              f"{list_best * 1e3:>8.2f} {payload / 1e3:>11.1f}")

if __name__ == "__main__":
    main()
