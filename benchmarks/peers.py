"""Per-step cost of amp_magics and its peers against a bare hand-written AMP loop, in one process.

    python benchmarks/peers.py [--model tiny|realistic] [--dtype bf16] [--steps N] [--rounds 9]
                               [--threads 1]
    pip install amp_magics[bench]      # Lightning and Accelerate, the peers it compares against

Variants, each training the same freshly seeded MLP with SGD(lr=0.01, momentum=0.9) on the same
pre-built CPU batches for the same number of steps:

  bare loop          PyTorch's AMP recipe written out: torch.autocast, and GradScaler for fp16
  amp_magics.train   progress=False
  %%amp_train        --no-plot, in a real IPython shell, its printed line swallowed; and with
                     the live dashboard (widgets built and redrawn each refresh, no kernel)
  Lightning Fabric   fabric.setup, fabric.autocast for the loss, fabric.backward
  Lightning Trainer  a LightningModule, Trainer.fit on a DataLoader of the batches (batch_size=None)
  Accelerate         accelerator.prepare, accelerator.autocast, accelerator.backward

A timing covers all a variant does once the model and optimizer exist, as a notebook cell
would: building the Fabric, Trainer or Accelerator, then the steps. Each variant first runs once
untimed (the warm-up), and that run checks its result: the parameters compared with the bare
loop's by torch.equal, and the optimizer steps counted. Then each round runs every variant, the
order rotated by one each round to cancel drift. Per model it prints a Markdown table: the
median over rounds of the variant's time divided by the bare loop's in the same round, the cost
per step (the median over rounds of the time above the bare loop's, over steps, in
microseconds, signed: a variant's fixed cost per run is spread over its steps), and whether the
trained parameters are bit-identical to the bare loop's.

Whole runs drift with the machine (a shared host's speed wanders by several percent over
seconds, more than the costs measured), so each variant also runs --interleaved rounds in which
every one of its steps alternates with one step of the bare recipe on a second model of the
same shape, on the same batch: the data iterable times both. A step's cost is the variant's
time for its batch minus the reference step next to it, so drift cancels step by step. The
median over steps is the steady cost of a step; the mean also counts what comes every so
often (refreshes, read-backs, garbage collection); both are taken net of the bare loop's own
(the timing's cost), as medians over rounds. A run's setup is outside them: it is in the
whole-run column. Models: tiny (MLP 16-16-16-10, batch 8),
where fixed per-step costs show, and realistic (MLP 256-1024-1024-10, batch 256). A peer that
is not installed gets a row saying so.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import logging
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import overhead  # its bare recipe loop and amp_magics.train variant, shared
from amp_magics.precision import resolve

MODELS = {  # name: (layer widths, batch size, default steps)
    "tiny": ((16, 16, 16, 10), 8, 2000),
    "realistic": ((256, 1024, 1024, 10), 256, 100),
}
LIGHTNING_PRECISION = {"bf16": "bf16-mixed", "fp16": "16-mixed", "fp32": "32-true"}
ACCELERATE_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
NOT_INSTALLED = "not installed (pip install amp_magics[bench])"


def make(widths, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        if i:
            layers.append(torch.nn.ReLU())
        layers.append(torch.nn.Linear(n_in, n_out))
    model = torch.nn.Sequential(*layers)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def batches(widths, batch, steps):
    torch.manual_seed(1)
    return [(torch.randn(batch, widths[0]), torch.randint(0, widths[-1], (batch,)))
            for _ in range(steps)]


class Interleaved(torch.utils.data.IterableDataset):
    """The batches, each preceded by one bare-recipe step on a reference model; records how
    long each reference step took and how long the variant took between two of them."""

    def __init__(self, data, widths, dtype):
        self.data, self.chosen = data, resolve(dtype, "cpu")
        self.model, self.opt = make(widths, seed=1)
        self.scaler = torch.amp.GradScaler("cpu") if self.chosen.needs_scaler else None
        self.ref, self.variant = [], []

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        clock, last = time.perf_counter, None
        for batch in self.data:
            start = clock()
            if last is not None:
                self.variant.append(start - last)
            overhead.bare(self.model, self.opt, [batch], self.chosen, self.scaler)
            last = clock()
            self.ref.append(last - start)
            yield batch

    def costs(self):
        """(median, mean) over steps of the variant's time minus the reference step's."""
        diffs = [v - r for v, r in zip(self.variant, self.ref[1:])]
        return statistics.median(diffs), statistics.fmean(diffs)


# Each variant: fn(model, opt, data, dtype) -> what precision it actually ran, or None when it
# is the one asked for.

def bare(model, opt, data, dtype):
    overhead.bare(model, opt, data, resolve(dtype, "cpu"))


def api(model, opt, data, dtype):
    overhead.api(model, opt, data, resolve(dtype, "cpu"))


def magic_runner(shell, flags):
    def magic(model, opt, data, dtype):
        shell.user_ns.update(model=model, optimizer=opt, data=data, F=F)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress line; keep the table clean
            shell.run_cell_magic(
                "amp_train", f"--model model --optimizer optimizer --data data --dtype {dtype} "
                f"{flags}", "x, y = batch\nloss = F.cross_entropy(model(x), y)\n")
    return magic


def fabric(model, opt, data, dtype):
    from lightning.fabric import Fabric

    fab = Fabric(accelerator="cpu", devices=1, precision=LIGHTNING_PRECISION[dtype])
    model, opt = fab.setup(model, opt)
    for x, y in data:
        opt.zero_grad()
        with fab.autocast():  # the loss too, as in the recipe; the module's forward already is
            loss = F.cross_entropy(model(x), y)
        fab.backward(loss)
        opt.step()
    ran = getattr(fab._precision, "precision", "32-true")
    return None if ran == LIGHTNING_PRECISION[dtype] else ran


def trainer(model, opt, data, dtype):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return opt

    fit = L.Trainer(accelerator="cpu", devices=1, precision=LIGHTNING_PRECISION[dtype],
                    max_steps=len(data), max_epochs=1, num_sanity_val_steps=0,
                    limit_val_batches=0, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
    fit.fit(Module(), torch.utils.data.DataLoader(data, batch_size=None))
    if not isinstance(data, Interleaved) and fit.global_step != len(data):
        print(f"warning: Lightning Trainer: global_step {fit.global_step}, expected {len(data)}")
    ran = str(fit.precision)
    return None if ran == LIGHTNING_PRECISION[dtype] else ran


def accelerate_loop(model, opt, data, dtype):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, mixed_precision=ACCELERATE_PRECISION[dtype])
    model, opt = acc.prepare(model, opt)
    for x, y in data:
        opt.zero_grad()
        with acc.autocast():
            loss = F.cross_entropy(model(x), y)
        acc.backward(loss)
        opt.step()
    if dtype != "fp32" and not acc.native_amp:
        return f"mixed_precision={acc.mixed_precision!r} without autocast, i.e. fp32"
    if dtype == "fp16" and acc.scaler is None:
        return "fp16 without a GradScaler"
    return None


def importable(name):
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def peers():
    """(name, fn or the reason it cannot run) for each peer."""
    lightning_ok, accelerate_ok = importable("lightning"), importable("accelerate")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric",
                 "pytorch_lightning", "accelerate", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return [("Lightning Fabric", fabric if lightning_ok else NOT_INSTALLED),
            ("Lightning Trainer", trainer if lightning_ok else NOT_INSTALLED),
            ("Accelerate", accelerate_loop if accelerate_ok else NOT_INSTALLED)]


def versions():
    found = []
    for name in ("lightning", "accelerate"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        found.append(f"{name} {module.__version__}")
    return found


def counted(fn, model, opt, data, dtype, threads):
    """Run fn once; return (what it ran, optimizer steps taken, trained parameters)."""
    steps = [0]
    hook = opt.register_step_post_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    try:
        ran = fn(model, opt, data, dtype)
    finally:
        hook.remove()
    if torch.get_num_threads() != threads:
        print(f"warning: the run changed torch's threads to {torch.get_num_threads()}; reset")
        torch.set_num_threads(threads)
    return ran, steps[0], [p.detach().clone() for p in model.parameters()]


def bench(label, widths, batch, steps, args, variants):
    data = batches(widths, batch, steps)
    rows = {}  # name: bit-identical "yes"/"no", or the reason the variant has no timing
    notes = []
    runnable = []
    reference = None
    for name, fn in variants:
        if isinstance(fn, str):
            rows[name] = fn
            continue
        model, opt = make(widths)
        try:
            ran, taken, params = counted(fn, model, opt, data, args.dtype, args.threads)
        except Exception as exc:  # a peer that cannot run here: say so, keep the others
            rows[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        if reference is None:  # the bare loop comes first
            reference = (taken, params)
            rows[name] = "(reference)"
        else:
            same = all(torch.equal(a, b) for a, b in zip(reference[1], params))
            rows[name] = "yes" if same else "no"
            if not same:
                diff = max((a.float() - b.float()).abs().max().item()
                           for a, b in zip(reference[1], params))
                notes.append(f"{name}: parameters differ from the bare loop's, "
                             f"max abs difference {diff:.3g}")
        if ran:
            notes.append(f"{name}: asked for {args.dtype}, it ran {ran}")
        if taken != reference[0]:
            print(f"warning: {name} took {taken} optimizer steps, the bare loop {reference[0]}")
        runnable.append((name, fn))

    times = {name: [] for name, _ in runnable}
    for r in range(args.rounds):
        k = r % len(runnable)
        for name, fn in runnable[k:] + runnable[:k]:
            model, opt = make(widths)
            gc.collect()
            t = time.perf_counter()
            fn(model, opt, data, args.dtype)
            times[name].append(time.perf_counter() - t)
            torch.set_num_threads(args.threads)

    steady = {name: [] for name, _ in runnable}
    all_in = {name: [] for name, _ in runnable}
    for r in range(args.interleaved):
        k = r % len(runnable)
        for name, fn in runnable[k:] + runnable[:k]:
            model, opt = make(widths)
            timed = Interleaved(data, widths, args.dtype)
            gc.collect()
            fn(model, opt, timed, args.dtype)
            median, mean = timed.costs()
            steady[name].append(median)
            all_in[name].append(mean)
            torch.set_num_threads(args.threads)

    base = times["bare loop"]
    base_median = statistics.median(base)
    print(f"\n## {label}: MLP {'-'.join(map(str, widths))}, batch {batch}, "
          f"{steps} steps x {args.rounds} rounds (+ {args.interleaved} interleaved)\n")
    print(f"bare loop: {base_median / steps * 1e3:.3f} ms/step (median)\n")
    print("| variant | ratio to bare loop | cost per step, whole runs (us) | steady cost per "
          "step, interleaved (us) | all-in cost per step, interleaved (us) | bit-identical "
          "to bare |")
    print("|---|---:|---:|---:|---:|:---:|")
    own = [statistics.median(steady["bare loop"]), statistics.median(all_in["bare loop"])]
    for name, _ in variants:
        if name not in times:
            print(f"| {name} | - | - | - | - | {rows[name]} |")
            continue
        ts = times[name]
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        cost = statistics.median(t - b for t, b in zip(ts, base)) / steps * 1e6
        net = [(statistics.median(column[name]) - mine) * 1e6
               for column, mine in zip((steady, all_in), own)]
        print(f"| {name} | {ratio:.3f} | {cost:+.1f} | {net[0]:+.1f} | {net[1]:+.1f} "
              f"| {rows[name]} |")
    if notes:
        print()
    for note in notes:
        print(f"note: {note}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=(*MODELS, "both"), default="both")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int,
                        help="steps per run (default: " +
                             ", ".join(f"{k} {v[2]}" for k, v in MODELS.items()) + ")")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--interleaved", type=int, default=5,
                        help="rounds interleaved step by step with a reference (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steadier ratios on a busy machine)")
    args = parser.parse_args()
    if args.rounds < 1 or args.interleaved < 1 or (args.steps is not None and args.steps < 2):
        parser.error("--rounds and --interleaved need at least 1, --steps at least 2 (a step "
                     "is timed from one batch to the next)")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # the peers' advice about workers, loggers and fallbacks

    from IPython.testing.globalipapp import start_ipython

    shell = start_ipython()
    shell.run_line_magic("load_ext", "amp_magics")
    shell.run_line_magic("config", "AmpMagics.view = 'dashboard'")  # widgets without a kernel
    variants = [("bare loop", bare), ("amp_magics.train", api),
                ("%%amp_train --no-plot", magic_runner(shell, "--no-plot")),
                ("%%amp_train (dashboard)", magic_runner(shell, "")), *peers()]
    print(f"torch {torch.__version__}, dtype {args.dtype}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; " + (", ".join(versions()) or "no peers installed"))
    for label in (MODELS if args.model == "both" else [args.model]):
        widths, batch, steps = MODELS[label]
        bench(label, widths, batch, args.steps or steps, args, variants)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
