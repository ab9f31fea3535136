"""`--nproc 2` against a hand-written DistributedDataParallel loop, on this machine's CPU (gloo).

    python benchmarks/distributed.py [--steps 200] [--rounds 3]

Prints the wall time of a one-step run (fork, process group, DDP, one step, state back: the
cost of starting) and the per-step time of `amp_magics.train(..., nproc=2)` against the
hand-written DDP AMP loop in the same conditions (each rank: fork, gloo, DDP with defaults,
batches r::2, bf16 autocast), with their ratio. Per-step times come from two run lengths,
(T(2n) - T(n)) / n, so start-up cancels.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.multiprocessing import start_processes

import amp_magics


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def batches(n):
    torch.manual_seed(1)
    return [(torch.randn(64, 256), torch.randint(0, 10, (64,))) for _ in range(2 * n)]


def _rank(rank, meeting, data):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{meeting}", rank=rank, world_size=2)
    model, opt = make()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    for x, y in data[rank::2]:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
    del ddp  # before the group: a Reducer outliving a gloo group can hang its teardown
    dist.destroy_process_group()


def hand_written(data):
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        start_processes(_rank, args=(os.path.join(folder, "meeting"), data), nprocs=2,
                        start_method="fork")
        return time.perf_counter() - t


def ours(data):
    model, opt = make()
    t = time.perf_counter()
    amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model, optimizer=opt,
                     data=data, dtype="bf16", nproc=2, progress=False)
    return time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.steps
    short, long = batches(n)[: 2 * n // 2], batches(2 * n)
    results = {"hand-written DDP loop": hand_written, "amp_magics --nproc 2": ours}
    times = {name: {"short": [], "long": [], "one": []} for name in results}
    for r in range(args.rounds):
        for name, fn in (results.items() if r % 2 == 0 else reversed(results.items())):
            times[name]["one"].append(fn(long[:2]))
            times[name]["short"].append(fn(short))
            times[name]["long"].append(fn(long))
    per_step = {}
    print(f"torch {torch.__version__}, 2 ranks x 1 thread, gloo, bf16; {n} and {2 * n} steps "
          f"per rank, {args.rounds} rounds (medians)")
    for name, t in times.items():
        short_t, long_t = statistics.median(t["short"]), statistics.median(t["long"])
        per_step[name] = (long_t - short_t) / n
        print(f"{name:>24}: {per_step[name] * 1e3:.2f} ms/step, a one-step run "
              f"{statistics.median(t['one']):.2f} s")
    ratio = per_step["amp_magics --nproc 2"] / per_step["hand-written DDP loop"]
    print(f"per-step ratio amp_magics / hand-written: {ratio:.3f}")


if __name__ == "__main__":
    main()
