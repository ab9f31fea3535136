"""What hardware is here: NVIDIA GPUs through NVML, this kernel's PyTorch memory, the host CPU and RAM.

Plain data out (dataclasses with `to_dict()`). No IPython, no widgets; torch is consulted only when
the caller has already imported it, so a status check stays well under a second.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..precision import auto_for_capability, auto_for_cpu
from .host import HostInfo, host_info

if TYPE_CHECKING:
    from collections.abc import Callable

_TENSOR_CORE_PRECISIONS = (("fp16", (7, 0)), ("bf16", (8, 0)), ("tf32", (8, 0)), ("fp8", (8, 9)))


def tensor_core_precisions(major: int, minor: int) -> tuple[str, ...]:
    """The AMP precisions that Tensor Cores of this compute capability run natively."""
    return tuple(name for name, since in _TENSOR_CORE_PRECISIONS if (major, minor) >= since)


@dataclass
class ProcessInfo:
    pid: int
    name: str
    used_memory: int | None  # bytes; None where the driver cannot tell (Windows WDDM, MIG as non-root)
    kind: str  # "C" compute, "G" graphics, "C+G" both, as nvidia-smi writes it
    is_self: bool  # this kernel's own process


@dataclass
class GpuInfo:
    index: int  # NVML's index, the one nvidia-smi shows
    name: str
    uuid: str | None
    capability: tuple[int, int] | None
    precisions: tuple[str, ...]  # what its Tensor Cores support
    memory_used: int | None  # bytes
    memory_total: int | None
    utilization: int | None  # percent
    temperature: int | None  # degrees C
    power_draw: float | None  # W
    power_limit: float | None  # W
    sm_clock: int | None  # MHz
    mig_enabled: bool | None  # None: this GPU has no MIG
    mig_pending: bool | None  # the mode after the next GPU reset
    processes: list[ProcessInfo] = field(default_factory=list)
    process_error: str | None = None


@dataclass
class TorchMemory:
    """What this kernel's PyTorch caching allocator holds on one CUDA device."""

    device: str  # "cuda:0", numbered as torch numbers it
    gpu_index: int | None  # the NVML index of the same GPU (matched by UUID), None if unmatched
    allocated: int
    reserved: int
    peak: int  # torch.cuda.max_memory_allocated
    nvml_used: int | None  # what NVML counts, for this process or (failing that) the whole GPU
    other_memory: int | None  # nvml_used - reserved
    other_label: str  # what other_memory is made of


@dataclass
class Recommendation:
    dtype: str  # what `--dtype auto` picks
    device: str  # "GPU 0 (NVIDIA A100-SXM4-80GB)" or "CPU"
    reason: str


@dataclass
class Status:
    gpus: list[GpuInfo]
    no_gpu_reason: str | None  # why no GPU is shown; None when GPUs are
    driver_version: str | None
    cuda_driver_version: str | None  # the newest CUDA this driver supports
    host: HostInfo
    torch_memory: list[TorchMemory]
    recommendation: Recommendation
    notes: list[str]
    taken_at: float  # time.time() of the probe

    def to_dict(self) -> dict:
        return asdict(self)


def parse_indices(text: str) -> list[int]:
    """'0,2' -> [0, 2]; raises ValueError on anything else."""
    try:
        indices = list(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        raise ValueError(f"GPU indices must be integers separated by commas, like 0,2; got {text!r}") from None
    if any(i < 0 for i in indices):
        raise ValueError(f"GPU indices cannot be negative; got {text!r}")
    return indices


def probe(indices: list[int] | None = None) -> Status:
    """Look at the GPUs (all, or those NVML `indices`), this kernel's torch memory and the host."""
    nvml, reason = _nvml()
    gpus: list[GpuInfo] = []
    notes: list[str] = []
    driver = cuda = None
    if nvml is not None:
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as e:
            count, reason = 0, f"NVML could not count the GPUs: {e}"
        else:
            if count == 0:
                reason = "the NVIDIA driver is loaded but sees no GPU"
        if count:
            wanted = range(count) if indices is None else indices
            missing = [i for i in wanted if i >= count]
            if missing:
                raise ValueError(f"no GPU {missing[0]}: this machine has {count} (0-{count - 1})")
            driver = _text(_query(nvml, nvml.nvmlSystemGetDriverVersion))
            cuda = _cuda_version(_query_first(nvml, ("nvmlSystemGetCudaDriverVersion_v2",
                                                     "nvmlSystemGetCudaDriverVersion")))
            for i in wanted:
                try:
                    gpus.append(_gpu_info(nvml, i))
                except nvml.NVMLError as e:
                    notes.append(f"GPU {i} could not be read: {e}")
    host = host_info()
    torch_memory = _torch_memory(gpus, notes)
    return Status(gpus=gpus, no_gpu_reason=None if gpus else reason, driver_version=driver,
                  cuda_driver_version=cuda, host=host, torch_memory=torch_memory,
                  recommendation=_recommend(gpus), notes=notes, taken_at=time.time())


# --- NVML ------------------------------------------------------------------------------------

_nvml_lock = threading.Lock()
_nvml_state: tuple | None = None  # (pynvml module, None) or (None, why NVML is unusable)


def _nvml() -> tuple:
    """NVML, initialised once per process; a failure is remembered too (a driver does not appear mid-run)."""
    global _nvml_state
    with _nvml_lock:
        if _nvml_state is None:
            _nvml_state = _init_nvml()
        return _nvml_state


def _init_nvml() -> tuple:
    try:
        import pynvml  # provided by the nvidia-ml-py package
    except ImportError:
        return None, "nvidia-ml-py is not installed, so GPUs cannot be queried (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return None, "NVML library not found: no NVIDIA driver is installed on this machine"
    except pynvml.NVMLError_DriverNotLoaded:
        return None, ("NVIDIA driver not loaded: it is installed but its kernel module is not "
                      "running (check nvidia-smi; a reboot after a driver update often fixes it)")
    except pynvml.NVMLError_NoPermission:
        return None, ("no permission to query the NVIDIA driver: this user cannot open /dev/nvidia* "
                      "(in a container, start it with GPU access, e.g. docker run --gpus all)")
    except pynvml.NVMLError as e:
        return None, f"NVML failed to start: {e}"
    return pynvml, None


def _query(nvml, fn, *args):
    """One NVML reading, or None where this GPU or driver does not provide it."""
    try:
        return fn(*args)
    except nvml.NVMLError:
        return None


def _call_first(nvml, names: tuple[str, ...], *args):
    """Call the newest of `names` this NVML has: older drivers lack the newer symbols."""
    # nvidia-ml-py's unversioned wrappers report a missing symbol as NVMLLibraryMismatchError.
    missing = (nvml.NVMLError_FunctionNotFound,
               getattr(nvml, "NVMLLibraryMismatchError", nvml.NVMLError_FunctionNotFound))
    for name in names:
        fn = getattr(nvml, name, None)
        if fn is not None:
            try:
                return fn(*args)
            except missing:
                pass
    raise nvml.NVMLError_FunctionNotFound()


def _query_first(nvml, names, *args):
    try:
        return _call_first(nvml, names, *args)
    except nvml.NVMLError:
        return None


def _text(value) -> str | None:
    # Older nvidia-ml-py versions return bytes.
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _cuda_version(value: int | None) -> str | None:
    return None if value is None else f"{value // 1000}.{value % 1000 // 10}"


def _gpu_info(nvml, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)

    def read(fn: Callable[..., Any], *args: Any) -> Any:
        return _query(nvml, fn, handle, *args)

    capability = read(nvml.nvmlDeviceGetCudaComputeCapability)
    memory = read(nvml.nvmlDeviceGetMemoryInfo)
    utilization = read(nvml.nvmlDeviceGetUtilizationRates)
    power = read(nvml.nvmlDeviceGetPowerUsage)  # mW
    limit = read(nvml.nvmlDeviceGetEnforcedPowerLimit)  # mW
    mig = read(nvml.nvmlDeviceGetMigMode)  # [current, pending]
    processes, process_error = _processes(nvml, handle)
    return GpuInfo(
        index=index,
        name=_text(read(nvml.nvmlDeviceGetName)) or "?",
        uuid=_text(read(nvml.nvmlDeviceGetUUID)),
        capability=tuple(capability) if capability else None,
        precisions=tensor_core_precisions(*capability) if capability else (),
        memory_used=memory.used if memory else None,
        memory_total=memory.total if memory else None,
        utilization=utilization.gpu if utilization else None,
        temperature=read(nvml.nvmlDeviceGetTemperature, nvml.NVML_TEMPERATURE_GPU),
        power_draw=power / 1000 if power is not None else None,
        power_limit=limit / 1000 if limit is not None else None,
        sm_clock=read(nvml.nvmlDeviceGetClockInfo, nvml.NVML_CLOCK_SM),
        mig_enabled=bool(mig[0]) if mig else None,
        mig_pending=bool(mig[1]) if mig else None,
        processes=processes,
        process_error=process_error,
    )


_PROCESS_QUERIES = (
    ("C", ("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2",
           "nvmlDeviceGetComputeRunningProcesses")),
    ("G", ("nvmlDeviceGetGraphicsRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v2",
           "nvmlDeviceGetGraphicsRunningProcesses")),
)


def _processes(nvml, handle) -> tuple[list[ProcessInfo], str | None]:
    by_pid: dict[int, ProcessInfo] = {}
    errors: list[str] = []
    for kind, names in _PROCESS_QUERIES:
        try:
            entries = _call_first(nvml, names, handle)
        except nvml.NVMLError as e:
            errors.append(f"process query failed: {e}")
            continue
        for entry in entries:
            known = by_pid.get(entry.pid)
            if known:
                known.kind = "C+G"
                continue
            by_pid[entry.pid] = ProcessInfo(
                pid=entry.pid, name=_process_name(nvml, entry.pid), used_memory=entry.usedGpuMemory,
                kind=kind, is_self=entry.pid == os.getpid(),
            )
    return list(by_pid.values()), "; ".join(dict.fromkeys(errors)) or None


def _process_name(nvml, pid: int) -> str:
    name = _text(_query(nvml, nvml.nvmlSystemGetProcessName, pid))
    if name:
        return name
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


# --- this kernel's PyTorch memory ------------------------------------------------------------

def _torch_memory(gpus: list[GpuInfo], notes: list[str]) -> list[TorchMemory]:
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    # Only when torch already holds CUDA state: asking an uninitialised torch would create a context.
    if cuda is None or not cuda.is_initialized():
        return []
    try:
        held = [(i, str(cuda.get_device_properties(i).uuid), cuda.memory_allocated(i),
                 cuda.memory_reserved(i), cuda.max_memory_allocated(i))
                for i in range(cuda.device_count()) if cuda.memory_reserved(i)]
    except Exception as e:  # a half-imported or broken torch must not break the status
        notes.append(f"PyTorch's CUDA memory could not be read: {e}")
        return []
    by_uuid = {_bare_uuid(g.uuid): g for g in gpus if g.uuid}
    out = []
    for i, uuid, allocated, reserved, peak in held:
        gpu = by_uuid.get(_bare_uuid(uuid))
        nvml_used, label = _nvml_side(gpu, notes)
        out.append(TorchMemory(
            device=f"cuda:{i}", gpu_index=gpu.index if gpu else None, allocated=allocated,
            reserved=reserved, peak=peak, nvml_used=nvml_used,
            other_memory=nvml_used - reserved if nvml_used is not None else None, other_label=label,
        ))
    return out


def _bare_uuid(uuid: str) -> str:
    # NVML writes "GPU-1a2b...", torch writes "1a2b...".
    return uuid.lower().removeprefix("gpu-")


def _nvml_side(gpu: GpuInfo | None, notes: list[str]) -> tuple[int | None, str]:
    """NVML's used memory to compare torch's reserved memory with, and what the gap is made of."""
    if gpu is None:
        return None, "not matched to a GPU listed here (not selected, or a MIG instance)"
    mine = [p for p in gpu.processes if p.is_self and p.used_memory is not None]
    if mine:
        return mine[0].used_memory, "CUDA context and non-PyTorch memory"
    if gpu.process_error is None:
        notes.append(f"this kernel (pid {os.getpid()}) is not in GPU {gpu.index}'s process list: "
                     "inside a container NVML reports host PIDs, so it cannot be matched")
    return gpu.memory_used, "CUDA context, non-PyTorch memory and other processes"


def _recommend(gpus: list[GpuInfo]) -> Recommendation:
    for gpu in gpus:
        if gpu.capability:
            choice = auto_for_capability(*gpu.capability)
            return Recommendation(choice.name, f"GPU {gpu.index} ({gpu.name})", choice.reason)
    choice = auto_for_cpu()
    return Recommendation(choice.name, "CPU", choice.reason)
