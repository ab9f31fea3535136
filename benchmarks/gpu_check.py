"""Everything CUDA-side of amp_magics in one run, for the day a GPU can be borrowed.

    python benchmarks/gpu_check.py              # on a CUDA machine
    python benchmarks/gpu_check.py --cpu        # rehearsal of the same steps on the CPU

It prints the GPU status and %amp_check's checks, then, through a real IPython shell with the
extension loaded: trains a small MLP with %%amp_train in fp16 (GradScaler) and, where the GPU
has bf16 Tensor Cores, in bf16, printing steps, skipped steps, final scale and peak memory;
runs a background training while `%gpu_status --watch` refreshes; checks that %gpu_status then
shows this kernel's PyTorch memory and the CUDA-context gap; and writes the memory pictures
(%amp_memory and Run.plot()) as HTML. It ends with its findings, exit status 1 if any is a
problem. Without CUDA (and without --cpu) it says so and exits 0.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

MLP = "torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))"
STEP = "x, y = batch\nloss = F.cross_entropy(net(x), y)"


class Findings:
    def __init__(self):
        self.items: list[tuple[bool, str]] = []

    def expect(self, ok: bool, text: str) -> None:
        self.items.append((bool(ok), text))
        print(f"  [{'ok' if ok else 'PROBLEM'}] {text}")

    @property
    def problems(self) -> list[str]:
        return [text for ok, text in self.items if not ok]


def section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 75 - len(title)))


def setup_notebook(shell, device: str, batches: int) -> None:
    """What a notebook's first cells would do: a model, an optimizer, a loader on the device."""
    shell.run_cell(f"""
import torch
import torch.nn.functional as F
torch.manual_seed(0)
net = {MLP}.to({device!r})
opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
teacher = torch.randn(512, 10, device={device!r})  # learnable labels, so the loss must fall
xs = [torch.randn(256, 512, device={device!r}) for _ in range({batches})]
loader = [(x, (x @ teacher).argmax(1)) for x in xs]
""", store_history=False)


def train(shell, device: str, dtype: str, steps: int, findings: Findings, extra: str = ""):
    setup_notebook(shell, device, batches=16)
    name = f"{dtype}{'_bg' if extra else ''}"
    line = (f"--model net --optimizer opt --data loader --dtype {dtype} --steps {steps} "
            f"--no-plot --name {name} -o run_{name} {extra}")
    start = time.perf_counter()
    shell.run_cell_magic("amp_train", line, STEP)
    returned_after = time.perf_counter() - start
    return shell.user_ns[f"run_{name}"], returned_after


def report_run(run, dtype: str, steps: int, findings: Findings) -> None:
    s = run.summary
    peak = s["peak_memory"]
    print(f"\n  {dtype}: status {s['status']}, {s['steps']} steps, {s['skipped_steps']} skipped, "
          f"final scale {s['final_scale']}, final loss {s['final_loss']:.4f}, "
          f"peak memory {peak / 2**20:.0f} MiB, {s['steps_per_s']:.1f} steps/s"
          if peak is not None else f"\n  {dtype}: {s}")
    losses = [r["loss"] for r in run.history]
    start, end = (sum(part) / len(part) if part else math.nan for part in (losses[:5], losses[-5:]))
    findings.expect(s["status"] == "finished" and s["steps"] == steps,
                    f"{dtype}: {s['steps']}/{steps} steps, status {s['status']}")
    findings.expect(math.isfinite(end) and end < start,
                    f"{dtype}: mean loss of the first 5 steps {start:.4f}, of the last 5 {end:.4f}")
    if dtype == "fp16":
        findings.expect(s["final_scale"] is not None and s["skipped_steps"] < steps // 2,
                        f"fp16: GradScaler active, scale {s['final_scale']}, "
                        f"{s['skipped_steps']} skipped steps")
    else:
        findings.expect(s["skipped_steps"] == 0, f"{dtype}: no skipped steps (no loss scaling needed)")
    findings.expect(peak is not None, f"{dtype}: peak memory recorded ({peak})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true",
                        help="rehearse every step on the CPU (checks this script, not a GPU)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="folder for the HTML pictures (default benchmarks/results)")
    args = parser.parse_args(argv)

    from amp_magics.system import doctor, gpu
    from amp_magics.views.status import checks_text, status_html, status_text

    section("GPU status (python -m amp_magics status)")
    before = gpu.probe()
    print(status_text(before))
    section("%amp_check")
    report = doctor.run_checks()
    print(checks_text(report.checks))

    import torch

    if not torch.cuda.is_available() and not args.cpu:
        why = before.no_gpu_reason or "torch cannot use the GPU (see %amp_check above)"
        print(f"\nNo CUDA here: {why}.\nNothing CUDA-side to check; run this on a GPU machine "
              "(or with --cpu to rehearse the steps).")
        return 0

    from IPython.core.interactiveshell import InteractiveShell

    import amp_magics

    device = "cpu" if args.cpu else "cuda"
    findings = Findings()
    findings.expect(report.ok, "%amp_check: no failed check")
    shell = InteractiveShell.instance()
    amp_magics.load_ipython_extension(shell)

    bf16 = args.cpu or torch.cuda.get_device_capability()[0] >= 8
    for dtype in ("fp16", "bf16") if bf16 else ("fp16",):
        section(f"%%amp_train --dtype {dtype} on {device}")
        run, _ = train(shell, device, dtype, args.steps, findings)
        report_run(run, dtype, args.steps, findings)
    if not bf16:
        print("\n  bf16 skipped: this GPU has no bf16 Tensor Cores (compute capability < 8.0)")

    section("%gpu_status with this kernel's PyTorch memory")
    status = shell.run_line_magic("gpu_status", "")
    print(status_text(status))
    if not args.cpu:
        findings.expect(status.torch_memory, "torch's CUDA memory is listed")
        for mem in status.torch_memory:
            findings.expect(mem.other_memory is not None,
                            f"{mem.device}: gap to NVML labelled '{mem.other_label}'")
        marked = any(p.is_self for g in status.gpus for p in g.processes)
        findings.expect(marked or any("container" in n for n in status.notes),
                        "this kernel is marked among the GPU processes (or the container note says why not)")

    section("background %%amp_train while %gpu_status --watch refreshes")
    run, returned_after = train(shell, device, "fp16", args.steps * 3, findings, extra="--background")
    watch = shell.run_line_magic("gpu_status", "--watch 0.2")
    values = {watch.html.value}
    watch.html.observe(lambda change: values.add(change["new"]), "value")
    deadline = time.monotonic() + 300
    while not run.done and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    watch.stop()
    findings.expect(returned_after < 1.0, f"the background run gave the kernel back after {returned_after:.2f} s")
    findings.expect(run.status == "finished", f"background run {run.status}")
    findings.expect(len(values) > 1, f"the watch refreshed during the run ({len(values)} distinct views)")
    findings.expect(not watch.running, "the watch thread stopped")

    section("memory pictures")
    os.makedirs(args.out, exist_ok=True)
    overview = shell.run_line_magic("amp_memory", "--model net --optimizer opt --data loader --dtype fp16")
    print(repr(overview))
    pictures = {"gpu_check_amp_memory.html": overview._repr_html_(),
                "gpu_check_runs.html": amp_magics.plot(shell.user_ns["run_fp16"], *[
                    shell.user_ns[n] for n in ("run_bf16",) if n in shell.user_ns])._repr_html_(),
                "gpu_check_status.html": status_html(status)}
    for name, page in pictures.items():
        path = os.path.join(args.out, f"{'cpu_' if args.cpu else ''}{name}")
        with open(path, "w") as f:
            f.write(page)
        findings.expect("<svg" in page or "<table" in page, f"wrote {path} ({len(page)} bytes)")

    section("findings")
    for text in findings.problems:
        print(f"  PROBLEM: {text}")
    print(f"  {len(findings.items) - len(findings.problems)} of {len(findings.items)} as expected")
    return 1 if findings.problems else 0


if __name__ == "__main__":
    sys.exit(main())
