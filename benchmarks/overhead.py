"""Overhead of amp_magics against a bare hand-written AMP loop, measured in one process.

    python benchmarks/overhead.py [--steps 300] [--rounds 7] [--dtype auto] [--threads N]

Each round runs, in alternating order, the bare recipe loop, `amp_magics.train`, the
`%%amp_train` magic with text progress, and the magic with the live dashboard, on the same
MLP (256-1024-1024-10, batch 256) for the same steps. It prints the median over rounds of
each variant's time divided by the bare loop's time in the same round, and the mean cost of
one dashboard refresh.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import torch
import torch.nn.functional as F

import amp_magics
from amp_magics.precision import resolve


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10))
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def bare(model, opt, data, chosen, scaler=None):
    """PyTorch's AMP recipe loop; `scaler`: one to go on with (default: a new one for fp16)."""
    if scaler is None and chosen.needs_scaler:
        scaler = torch.amp.GradScaler("cpu")
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=chosen.dtype, enabled=chosen.autocast_enabled):
            loss = F.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()


def api(model, opt, data, chosen):
    def step(batch):
        x, y = batch
        return F.cross_entropy(model(x), y)
    return amp_magics.train(step, model=model, optimizer=opt, data=data, dtype=chosen.name,
                            progress=False)


def magic_runner(shell, plot):
    flags = "" if plot else "--no-plot"

    def magic(model, opt, data, chosen):
        shell.user_ns.update(model=model, optimizer=opt, train_loader=data, F=F)
        with contextlib.redirect_stdout(io.StringIO()):  # the views print; keep the report clean
            result = shell.run_cell(f"%%amp_train --dtype {chosen.name} {flags} -o _bench_run\n"
                                    "x, y = batch\nloss = F.cross_entropy(model(x), y)\n",
                                    silent=True)
        result.raise_error()
        return shell.user_ns["_bench_run"]
    return magic


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: torch's choice); 1 leaves a core for the "
                             "rest of the machine, which steadies the ratios on a busy host")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    chosen = resolve(args.dtype, "cpu")
    torch.manual_seed(1)
    data = [(torch.randn(256, 256), torch.randint(0, 10, (256,))) for _ in range(args.steps)]
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "amp_magics")
    shell.run_line_magic("config", "AmpMagics.view = 'dashboard'")  # widgets without a kernel
    variants = {"bare loop": bare, "amp_magics.train": api,
                "%%amp_train --no-plot": magic_runner(shell, plot=False),
                "%%amp_train (dashboard)": magic_runner(shell, plot=True)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {chosen.name} "
          f"({chosen.reason}); {args.steps} steps x {args.rounds} rounds")
    model, opt = make()
    bare(model, opt, data[:20], chosen)  # warm-up: allocator, kernels, first-call caches

    times = {name: [] for name in variants}
    refresh_costs = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants.items())
        if r % 2:
            order.reverse()
        for name, fn in order:
            model, opt = make()
            t = time.perf_counter()
            run = fn(model, opt, data, chosen)
            times[name].append(time.perf_counter() - t)
            if run is not None:
                refresh_costs[name] += run.refresh_costs

    base = times["bare loop"]
    ms = statistics.median(base) / args.steps * 1e3
    print(f"bare loop: {ms:.2f} ms/step (median)")
    for name, ts in times.items():
        if name == "bare loop":
            continue
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        costs = refresh_costs[name]
        cost = (f", refresh {statistics.mean(costs) * 1e3:.2f} ms mean over {len(costs)}"
                if costs else "")
        print(f"{name:>26}: {ratio:.3f} x bare loop{cost}")


if __name__ == "__main__":
    main()
