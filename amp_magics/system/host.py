"""Facts about the host: CPU model and instruction sets (native bf16/fp16), RAM, this
process's resident memory.

Torch-free and cheap (a few /proc reads), so the status command and the per-refresh memory
sample can use it.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache


@dataclass
class HostInfo:
    cpu_model: str
    logical_cpus: int | None
    usable_cpus: int | None  # this process's CPU affinity (containers and taskset narrow it)
    native_bf16: bool
    native_fp16: bool
    bf16_flags: tuple[str, ...]  # CPU flags giving native bf16, e.g. ("amx_bf16", "avx512_bf16")
    fp16_flags: tuple[str, ...]  # the same for fp16, e.g. ("avx512_fp16",)
    amx: bool | None  # None: not knowable on this OS
    torch_threads: int | None  # None: torch is not imported in this process
    ram_total: int | None  # bytes
    ram_available: int | None
    process_rss: int | None  # this process's resident memory



def host_info() -> HostInfo:
    model, flags = _cpu_model_and_flags()
    torch = sys.modules.get("torch")
    get_threads = getattr(torch, "get_num_threads", None)
    ram_total, ram_available, rss = _memory()
    found = cpu_precision_flags()
    return HostInfo(
        cpu_model=model,
        logical_cpus=os.cpu_count(),
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        native_bf16=bool(found["bf16"]),
        native_fp16=bool(found["fp16"]),
        bf16_flags=found["bf16"],
        fp16_flags=found["fp16"],
        amx=bool(flags & {"amx_bf16", "amx_tile"}) if flags is not None else None,
        torch_threads=get_threads() if get_threads else None,
        ram_total=ram_total,
        ram_available=ram_available,
        process_rss=rss,
    )


@lru_cache(maxsize=1)
def _cpu_model_and_flags() -> tuple[str, frozenset | None]:
    model, flags = None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and flags is None:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "?", flags


def process_rss() -> int | None:
    """Resident memory of this process in bytes (None where it cannot be read).

    Cheap enough to sample at kHz rates: one short read of /proc/self/statm on Linux.
    """
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # optional: the fallback off Linux

        return psutil.Process().memory_info().rss
    except Exception:
        return None


def _memory() -> tuple[int | None, int | None, int | None]:
    """(RAM total, RAM available, this process's resident memory), in bytes."""
    meminfo = _proc_kib("/proc/meminfo", ("MemTotal", "MemAvailable"))
    if meminfo:
        return meminfo.get("MemTotal"), meminfo.get("MemAvailable"), process_rss()
    try:
        import psutil  # optional: the fallback off Linux
    except ImportError:
        return None, None, process_rss()
    memory = psutil.virtual_memory()
    return memory.total, memory.available, process_rss()


def _proc_kib(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """Lines like 'MemTotal:  16384 kB' from a /proc file, in bytes."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in keys:
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


# Linux /proc/cpuinfo flags that mean native arithmetic (not just conversions) in a precision.
#   bf16: AVX512-BF16 and AMX-BF16 on x86; "bf16" is Arm's FEAT_BF16 (BFDOT, BFMMLA).
#   fp16: AVX512-FP16 and AMX-FP16 on x86; on Arm, FEAT_FP16 (Armv8.2) shows as two flags:
#   "fphp" (scalar half-precision arithmetic) and "asimdhp" (Advanced SIMD half-precision
#   arithmetic). Only "asimdhp" counts: autocast's kernels are vectorised, and scalar fp16
#   alone would not make them fast (Linux reports both together on every FEAT_FP16 core).
#   Conversion-only support (x86 "f16c") never counts: the arithmetic still runs in fp32.
_LINUX_FLAGS = {"bf16": frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
                "fp16": frozenset({"avx512_fp16", "amx_fp16", "asimdhp"})}
# macOS (Apple silicon): sysctl keys set to 1 where the feature is there; FEAT_FP16 is the same
# Armv8.2 feature as Linux's "fphp"/"asimdhp" (scalar and SIMD together).
_DARWIN_KEYS = {"bf16": "hw.optional.arm.FEAT_BF16", "fp16": "hw.optional.arm.FEAT_FP16"}


def cpu_precision_flags() -> dict[str, tuple[str, ...]]:
    """The instruction-set flags of this CPU that give native arithmetic in each precision.

    {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ()} on a Sapphire Rapids without
    AVX512-FP16, say; names as /proc/cpuinfo spells them (sorted), or the sysctl feature name
    ("FEAT_BF16") on macOS. () where there are none, or where the OS does not say.
    """
    return dict(_precision_flags())


@lru_cache(maxsize=1)
def _precision_flags() -> tuple[tuple[str, tuple[str, ...]], ...]:
    system = platform.system()
    if system == "Linux":
        flags = _cpu_model_and_flags()[1] or frozenset()
        return tuple((name, tuple(sorted(flags & native))) for name, native in _LINUX_FLAGS.items())
    if system == "Darwin":
        return tuple((name, (key.rpartition(".")[2],) if _sysctl(key) == "1" else ())
                     for name, key in _DARWIN_KEYS.items())
    return (("bf16", ()), ("fp16", ()))


def _sysctl(key: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 instructions (AVX512-BF16, AMX-BF16, Arm BF16).

    Without them bf16 autocast is emulated and far slower than fp32
    (measured: 665 ms vs 19 ms per MLP step on an AVX2-only CPU).
    """
    return bool(cpu_precision_flags()["bf16"])


def cpu_has_native_fp16() -> bool:
    """True where the CPU has fp16 arithmetic instructions (AVX512-FP16, AMX-FP16, Arm FP16).

    Without them fp16 autocast on the CPU is emulated and slow; with AVX512-FP16 a user's
    --compare measured it 1.3x faster than fp32.
    """
    return bool(cpu_precision_flags()["fp16"])
