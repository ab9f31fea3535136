"""`--nproc 2` against a hand-written DistributedDataParallel loop, on this machine's CPU (gloo).

    python benchmarks/distributed.py [--steps 200] [--rounds 3] [--notebook]

Prints the wall time of a one-step run (fork, process group, DDP, one step, state back: the
cost of starting) and the per-step time of `amp_magics.train(..., nproc=2)` against the
hand-written DDP AMP loop in the same conditions (each rank: fork, gloo, DDP with defaults,
batches r::2, bf16 autocast), with their ratio. Per-step times come from two run lengths,
(T(2n) - T(n)) / n, so start-up cancels. `--notebook` measures the same from inside a
Jupyter kernel (run by nbclient), where `%%amp_train --nproc 2` shows its live dashboard and
both loops fork the kernel's process, as a user's notebook does.
"""
from __future__ import annotations

import argparse
import os
import socket
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


def _accelerate_rank(data):
    from accelerate import Accelerator

    torch.set_num_threads(1)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model, opt = accelerator.prepare(*make())  # DDP, and autocast around forward
    for x, y in data[accelerator.process_index::2]:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        accelerator.backward(loss)
        opt.step()


def accelerate_notebook_launcher(data):
    """Accelerate's notebook_launcher (fork), the loop as its docs write it."""
    from accelerate import notebook_launcher

    with socket.socket() as s:  # a free port: the launcher takes a fixed one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    notebook_launcher(_accelerate_rank, args=(data,), num_processes=2, use_port=str(port))
    return time.perf_counter() - t


def lightning_ddp_notebook(data):
    """Lightning's Trainer with strategy="ddp_notebook" (fork), its extras switched off."""
    import lightning

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, _ = make()

        def setup(self, stage):  # in each rank, as the other loops do
            torch.set_num_threads(1)

        def training_step(self, batch, index):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)

    trainer = lightning.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_notebook", precision="bf16-mixed",
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False)
    # Lightning shards a map-style loader with a DistributedSampler: rank r takes r, r+2, ...
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    t = time.perf_counter()
    trainer.fit(Module(), loader)
    return time.perf_counter() - t


def peers() -> dict:
    """The notebook launchers of Accelerate and Lightning, where installed."""
    found = {}
    for module, name, fn in (("accelerate", "Accelerate notebook_launcher",
                              accelerate_notebook_launcher),
                             ("lightning", "Lightning ddp_notebook", lightning_ddp_notebook)):
        try:
            __import__(module)
        except ImportError:
            continue
        found[name] = fn
    return found


def ours_in_a_notebook(data):
    """In a kernel: the magic as a user runs it, with its live dashboard."""
    from IPython import get_ipython

    model, opt = make()
    get_ipython().user_ns.update(model=model, optimizer=opt, train_loader=data, F=F)
    t = time.perf_counter()
    get_ipython().run_cell_magic("amp_train", "--dtype bf16 --nproc 2",
                                 "loss = F.cross_entropy(model(batch[0]), batch[1])")
    return time.perf_counter() - t


def measure(n, rounds, results):
    long = batches(2 * n)  # 2n steps per rank (batches deals 2 ranks their steps)
    short = long[: 2 * n]  # n steps per rank, the same first batches
    times = {name: {"short": [], "long": [], "one": []} for name in results}
    for r in range(rounds):
        for name, fn in (results.items() if r % 2 == 0 else reversed(results.items())):
            times[name]["one"].append(fn(long[:2]))
            times[name]["short"].append(fn(short))
            times[name]["long"].append(fn(long))
    return times


def in_a_kernel(n, rounds):
    """The measurement run inside a fresh Jupyter kernel; its times come back as JSON."""
    import json

    import nbclient
    import nbformat

    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys, json; sys.path.insert(0, {here!r})\n"
            "import torch; torch.set_num_threads(1)\n"
            "%load_ext amp_magics\n"
            "import distributed as b\n"
            f"times = b.measure({n}, {rounds}, {{'hand-written DDP loop': b.hand_written, "
            "'amp_magics --nproc 2': b.ours_in_a_notebook, **b.peers()})\n"
            "print('TIMES' + json.dumps(times))")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3").execute()
    text = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.output_type == "stream")
    return json.loads(text.split("TIMES", 1)[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--notebook", action="store_true",
                        help="measure inside a Jupyter kernel, the dashboard shown")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.steps
    if args.notebook:
        times = in_a_kernel(n, args.rounds)
    else:
        times = measure(n, args.rounds, {"hand-written DDP loop": hand_written,
                                         "amp_magics --nproc 2": ours, **peers()})
    per_step = {}
    where = "in a Jupyter kernel, dashboard shown" if args.notebook else "from a script"
    print(f"torch {torch.__version__}, 2 ranks x 1 thread, gloo, bf16, {where}; {n} and "
          f"{2 * n} steps per rank, {args.rounds} rounds (medians)")
    for name, t in times.items():
        short_t, long_t = statistics.median(t["short"]), statistics.median(t["long"])
        per_step[name] = (long_t - short_t) / n
    hand = per_step["hand-written DDP loop"]
    for name, t in times.items():
        print(f"{name:>28}: {per_step[name] * 1e3:.2f} ms/step (ratio {per_step[name] / hand:.3f}"
              f" to the hand-written loop), a one-step run {statistics.median(t['one']):.2f} s")


if __name__ == "__main__":
    main()
