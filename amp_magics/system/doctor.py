"""%amp_check: the environment checks an AMP notebook depends on, each with a concrete fix.

Every check returns a `Check` (pass/warn/fail/info). The AMP smoke test is real: two optimizer
steps under autocast on the active device; the companions check imports torchvision and every
other package built on torch in a subprocess (companions.py). `%amp_check --export` writes the
environment down (environment.py).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..formatting import short_path
from . import gpu
from .companions import IMPORT_TIMEOUT, companion_fix, find_companions, import_in_subprocess
from .environment import GET_TORCH
from .host import cpu_precision_flags

if TYPE_CHECKING:
    from types import ModuleType


@dataclass
class Check:
    name: str
    status: str  # "pass" | "warn" | "fail" | "info"
    detail: str
    fix: str = ""


@dataclass
class Report:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def to_dict(self) -> dict:
        return asdict(self)


def run_checks() -> Report:
    """Run every check; imports torch."""
    status = gpu.probe()
    checks = [_python()]
    try:
        import torch
    except ImportError as e:
        checks.append(Check("torch", "fail", f"cannot import torch: {e}", f"install torch: {GET_TORCH}"))
    else:
        cuda = torch.cuda.is_available()
        capability = torch.cuda.get_device_capability() if cuda else None
        checks += [
            _torch_build(torch, status),
            _cuda_available(torch, status),
            _cudnn(torch, cuda),
            _gpu_name(torch, status, cuda),
            _tensor_cores(capability),
            _bf16(capability),
            _driver(torch, status),
            amp_smoke_test(torch),
            torch_companions(torch.__version__),
        ]
    return Report(checks + [_nvidia_ml_py(), _no_deprecated_pynvml(), _ipywidgets(), _conda()])


def _python() -> Check:
    return Check("Python", "info", f"{platform.python_version()} at {short_path(sys.executable)}")


def _torch_build(torch, status) -> Check:
    version = torch.__version__
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda} build"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip} build"
    else:
        build = "CPU-only build"
        if status.gpus:
            return Check("torch", "fail", f"{version} is a CPU-only build, but this machine has "
                         f"{len(status.gpus)} NVIDIA GPU(s)",
                         f"install a CUDA build of torch for CUDA {status.cuda_driver_version} or older: "
                         + GET_TORCH)
    if _major_minor(version) < (2, 4):
        return Check("torch", "fail", f"{version} ({build}): amp_magics needs torch 2.4 or newer "
                     "(torch.amp.GradScaler)", "pip install -U torch")
    return Check("torch", "pass", f"{version} ({build})")


def _cuda_available(torch, status) -> Check:
    if torch.cuda.is_available():
        return Check("CUDA available", "pass", f"yes: {torch.cuda.device_count()} device(s), "
                     f"active cuda:{torch.cuda.current_device()}")
    if not status.gpus:
        return Check("CUDA available", "warn", f"no: {status.no_gpu_reason}",
                     "AMP still runs on the CPU (bf16 autocast); for fp16/bf16 Tensor Cores, "
                     "run on a machine with an NVIDIA GPU and its driver")
    if not torch.version.cuda:
        return Check("CUDA available", "fail", "no: this torch build is CPU-only",
                     "install a CUDA build of torch (see the torch row)")
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    return Check("CUDA available", "fail",
                 f"no: torch was built for CUDA {torch.version.cuda}, the driver supports CUDA "
                 f"{status.cuda_driver_version}, yet torch cannot use the GPU",
                 f"update the NVIDIA driver or install torch for CUDA {status.cuda_driver_version} or older"
                 + (f"; CUDA_VISIBLE_DEVICES is {hidden!r}" if hidden is not None else ""))


def _cudnn(torch, cuda: bool) -> Check:
    if not cuda:
        return Check("cuDNN", "info", "not used: no CUDA device")
    cudnn = torch.backends.cudnn
    if not cudnn.is_available():
        return Check("cuDNN", "warn", "this torch build has no cuDNN: convolutions run slowly",
                     f"install an official CUDA build of torch (it bundles cuDNN): {GET_TORCH}")
    version = _cudnn_version(cudnn.version())
    if not cudnn.enabled:
        return Check("cuDNN", "warn", f"cuDNN {version} is disabled: convolutions run slowly",
                     "torch.backends.cudnn.enabled = True")
    return Check("cuDNN", "pass", f"cuDNN {version}, enabled")


def _cudnn_version(v: int) -> str:
    # cuDNN 8 encodes 8.9.2 as 8902; cuDNN 9 encodes 9.1.0 as 90100.
    if v < 10000:
        return f"{v // 1000}.{v % 1000 // 100}.{v % 100}"
    return f"{v // 10000}.{v % 10000 // 100}.{v % 100}"


def _gpu_name(torch, status, cuda: bool) -> Check:
    if cuda:
        index = torch.cuda.current_device()
        return Check("GPU", "pass", f"{torch.cuda.get_device_name(index)} (cuda:{index})")
    if status.gpus:
        names = ", ".join(g.name for g in status.gpus)
        return Check("GPU", "fail", f"NVML sees {names}, but torch cannot use it",
                     "see the torch and CUDA rows")
    return Check("GPU", "info", "none: training runs on the CPU")


def tensor_core_generation(major: int, minor: int) -> str | None:
    """The Tensor Core generation of a compute capability; None before Volta."""
    if major < 7:
        return None
    if major == 7:
        return "1st generation (Volta)" if minor < 5 else "2nd generation (Turing)"
    if major == 8:
        return "4th generation (Ada Lovelace)" if minor >= 9 else "3rd generation (Ampere)"
    if major == 9:
        return "4th generation (Hopper)"
    return "5th generation (Blackwell) or newer"


def _tensor_cores(capability) -> Check:
    if capability is None:
        return Check("Tensor Cores", "info", "no CUDA device")
    major, minor = capability
    generation = tensor_core_generation(major, minor)
    if generation is None:
        return Check("Tensor Cores", "warn", f"none (compute capability {major}.{minor}): AMP saves "
                     "memory here but barely speeds training up",
                     "use a Volta (7.0) or newer GPU for mixed-precision speed")
    precisions = ", ".join(gpu.tensor_core_precisions(major, minor))
    return Check("Tensor Cores", "pass", f"{generation}, compute capability {major}.{minor}: {precisions}")


def _bf16(capability) -> Check:
    if capability is None:
        flags = cpu_precision_flags()
        fp16 = (f"; fp16 is native too ({', '.join(flags['fp16'])})" if flags["fp16"]
                else "; fp16 is emulated")
        if flags["bf16"]:
            return Check("bf16", "pass",
                         f"this CPU has native bf16 instructions ({', '.join(flags['bf16'])}){fp16}")
        fp16 = (f"; fp16 is native ({', '.join(flags['fp16'])}): --dtype fp16 may be faster"
                if flags["fp16"] else "; so is fp16")
        return Check("bf16", "warn", "this CPU has no native bf16 (no avx512_bf16, amx_bf16 or Arm "
                     f"bf16 flag): bf16 autocast is emulated, slower than fp32{fp16}",
                     "--dtype auto picks fp32 on this CPU; force --dtype bf16 only to save activation memory")
    major, minor = capability
    if major >= 8:
        return Check("bf16", "pass", f"bf16 Tensor Cores (compute capability {major}.{minor})")
    return Check("bf16", "warn", f"no bf16 Tensor Cores (compute capability {major}.{minor}): "
                 "bf16 would be emulated, slowly", "use --dtype fp16 (with GradScaler); --dtype auto does")


def _driver(torch, status) -> Check:
    runtime = torch.version.cuda
    if status.driver_version is None:
        return Check("driver / CUDA", "info", f"no NVIDIA driver ({status.no_gpu_reason}); CUDA runtime "
                     f"in torch: {runtime or 'none'}")
    detail = (f"driver {status.driver_version} supports CUDA up to {status.cuda_driver_version}; "
              f"torch's CUDA runtime: {runtime or 'none (CPU-only build)'}")
    if not runtime or status.cuda_driver_version is None:
        return Check("driver / CUDA", "info", detail)
    supported, needed = _major_minor(status.cuda_driver_version), _major_minor(runtime)
    fix = (f"update the NVIDIA driver to one supporting CUDA {runtime}, or install torch for "
           f"CUDA {status.cuda_driver_version} or older")
    if supported[0] < needed[0]:
        return Check("driver / CUDA", "fail", detail + ": the driver is too old for this torch", fix)
    if supported < needed:
        return Check("driver / CUDA", "warn", detail + ": runs through CUDA minor-version "
                     "compatibility, but JIT-compiled (PTX) kernels can fail", fix)
    return Check("driver / CUDA", "pass", detail)


def amp_smoke_test(torch: ModuleType) -> Check:
    """Two real optimizer steps under autocast on the active device.

    fp16 + GradScaler on CUDA; bf16 on the CPU. The user's random state is left untouched.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.float16 if cuda else torch.bfloat16
    label = "fp16 autocast + GradScaler" if cuda else "bf16 autocast"
    name = "AMP smoke test"
    try:
        from ..tensors import rng_kept  # torch only when asked to check

        with rng_kept():
            torch.manual_seed(0)
            model = torch.nn.Linear(16, 4).to(device)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            scaler = torch.amp.GradScaler(device.type, enabled=cuda)  # bf16 needs no loss scaling
            x = torch.randn(8, 16, device=device)
            y = torch.randn(8, 4, device=device)
            losses = []
            for _ in range(2):
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=dtype):
                    out = model(x)
                loss = torch.nn.functional.mse_loss(out.float(), y)
                if out.dtype != dtype:
                    return Check(name, "fail", f"autocast on {device} produced {out.dtype}, not {dtype}",
                                 "pip install -U torch")
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(loss.item())
    except Exception as e:  # whatever breaks here is the finding
        return Check(name, "fail", f"{label} on {device} failed: {type(e).__name__}: {e}",
                     "run %gpu_status for memory and driver state; pip install -U torch")
    detail = f"2 steps of {label} on {device}: loss {losses[0]:.4f} -> {losses[1]:.4f}"
    if cuda:
        detail += f", loss scale {scaler.get_scale():.0f}"
    if not all(math.isfinite(v) for v in losses):
        return Check(name, "fail", detail + ": the loss is not finite", "pip install -U torch")
    if not losses[1] < losses[0]:
        return Check(name, "warn", detail + ": the step did not lower the loss (skipped by GradScaler?)")
    return Check(name, "pass", detail)


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_ml_py() -> Check:
    version = _distribution_version("nvidia-ml-py")
    if version is None:
        return Check("nvidia-ml-py", "warn", "not installed: %gpu_status cannot query GPUs",
                     "pip install nvidia-ml-py")
    return Check("nvidia-ml-py", "pass", version)


def _no_deprecated_pynvml() -> Check:
    # Both distributions install a `pynvml` module, so look at the distribution, never import it.
    version = _distribution_version("pynvml")
    if version is None:
        return Check("deprecated pynvml", "pass", "not installed")
    return Check("deprecated pynvml", "warn", f"pynvml {version} is installed: this deprecated package "
                 "can shadow nvidia-ml-py's pynvml module",
                 "pip uninstall -y pynvml && pip install --force-reinstall nvidia-ml-py")


def _ipywidgets() -> Check:
    if importlib.util.find_spec("ipywidgets") is None:
        return Check("ipywidgets", "warn", f"not installed for this kernel's Python ({short_path(sys.executable)}): "
                     "no progress widgets, no --watch", f"{sys.executable} -m pip install ipywidgets")
    return Check("ipywidgets", "pass", f"{_distribution_version('ipywidgets') or 'installed'} in this kernel")


def _conda() -> Check:
    env, prefix = os.environ.get("CONDA_DEFAULT_ENV"), os.environ.get("CONDA_PREFIX")
    if not prefix:
        return Check("conda", "info", f"not in a conda environment (Python prefix "
                                      f"{short_path(sys.prefix)})")
    if os.path.realpath(prefix) != os.path.realpath(sys.prefix):
        return Check("conda", "warn", f"conda environment {env!r} ({prefix}) is active, but this Python "
                     f"runs from {short_path(sys.prefix)}: the kernel is not that environment's",
                     f"in that environment: conda install ipykernel && python -m ipykernel install "
                     f"--user --name {env}; then choose that kernel")
    return Check("conda", "info", f"environment {env!r} at {prefix}")


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def torch_companions(torch_version: str, timeout: float = IMPORT_TIMEOUT) -> Check:
    """Import every installed package built on torch (torchvision, torchaudio...) in one
    subprocess: a CUDA torchvision next to a CPU torch passes every other check, then fails
    at `import torchvision` with `operator torchvision::nms does not exist`."""
    name = "torch companions"
    companions = find_companions()
    known = [c for c in companions if c.modules]
    unknown = ", ".join(f"{c.name} {c.version}" for c in companions if not c.modules)
    skipped = f"; not checked ({unknown}): no importable module found" if unknown else ""
    if not known:
        return Check(name, "info", "none installed (torchvision, torchaudio or other packages "
                     f"that need torch){skipped}")
    results, stuck, problem = import_in_subprocess([m for c in known for m in c.modules], timeout)
    timed_out = problem is not None and problem.startswith("did not finish")
    failed, hung, unchecked = [], [], []
    for c in known:
        errors = [results[m] for m in c.modules if results.get(m)]
        if errors:
            failed.append((c, errors[0]))
        elif stuck in c.modules and not timed_out:
            failed.append((c, f"importing {stuck} {problem}"))
        elif stuck in c.modules:
            hung.append(c)
        elif any(m not in results for m in c.modules):
            unchecked.append(c)
    found = ", ".join(f"{c.name} {c.version}" for c in known)
    later = (f"; not reached, so not checked: {', '.join(c.name for c in unchecked)}"
             if unchecked else "")
    if failed:
        details, fixes = [], []
        for c, error in failed:
            detail = f"{c.name} {c.version} fails to import with torch {torch_version}: {error}"
            theirs, ours = c.version.partition("+")[2], torch_version.partition("+")[2]
            if theirs and theirs != ours:
                detail += f" (a {theirs} build of {c.name} next to a {ours or 'PyPI'} build of torch)"
            details.append(detail)
            fixes.append(companion_fix(c, torch_version))
        return Check(name, "fail", "; ".join(details) + later + skipped, "; ".join(fixes))
    if hung or unchecked or problem:
        why = f"importing {stuck} {problem}" if stuck else problem or "some imports did not run"
        return Check(name, "warn", f"{why}{later}{skipped}",
                     f"import {stuck or known[0].modules[0]} in a fresh Python to see where it stops")
    return Check(name, "pass", f"{found} import with torch {torch_version}{skipped}")


