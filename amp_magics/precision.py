"""Which autocast dtype to use on which device, and why.

Pure policy: it looks at the hardware, never at IPython or widgets. The policy functions
(`auto_for_capability`, `auto_for_cpu`) need no torch, so GPU status can give advice
without importing it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import AmpUsageError
from .system.host import cpu_precision_flags

if TYPE_CHECKING:
    import torch

CHOICES = ("auto", "fp16", "bf16", "fp32")
# torch.amp.GradScaler's own defaults, spelled out so runs can record and compare them.
SCALER_DEFAULTS = {"init_scale": 2.0**16, "growth_factor": 2.0, "backoff_factor": 0.5,
                   "growth_interval": 2000}


class PrecisionError(AmpUsageError):
    """The requested precision cannot run on this device."""


@dataclass(frozen=True)
class Precision:
    name: str  # "fp16" | "bf16" | "fp32"
    device_type: str  # "cuda" | "cpu" | "mps" | ...
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.name]

    @property
    def autocast_enabled(self) -> bool:
        return self.name != "fp32"

    @property
    def needs_scaler(self) -> bool:
        # fp16's narrow exponent range needs loss scaling; bf16 has fp32's range.
        return self.name == "fp16"

    def check_scaler_settings(self, given: bool, runs: str = "this run uses") -> None:
        """Scaler settings (`given`) apply only where fp16's GradScaler is used."""
        if given and not self.needs_scaler:
            raise AmpUsageError(f"scaler settings only apply with a GradScaler, which is used "
                                f"for fp16; {runs} {self.name}. Drop them or use --dtype fp16.")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context for this precision; fp32 gets none at all, exactly like the
        plain fp32 loop. Reusable: one object serves every micro-batch."""
        import torch

        if not self.autocast_enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def auto_for_capability(major: int, minor: int) -> Precision:
    """`--dtype auto` on a CUDA GPU of this compute capability."""
    cc = f"compute capability {major}.{minor}"
    # is_bf16_supported() also says yes where bf16 is only emulated: trust the capability.
    if major >= 8:
        return Precision("bf16", "cuda", f"{cc}: bf16 Tensor Cores, no loss scaling needed")
    if major == 7:
        return Precision("fp16", "cuda", f"{cc}: fp16 Tensor Cores, with GradScaler")
    return Precision("fp32", "cuda", f"{cc}: no Tensor Cores, mixed precision would not speed up")


def auto_for_cpu() -> Precision:
    """`--dtype auto` on this machine's CPU: bf16 where it has native bf16, else fp32.

    fp16 is never picked on a CPU, even with native fp16 (AVX512-FP16, Arm FP16): it needs a
    GradScaler and its skipped steps, which bf16 and fp32 do not, so it stays an explicit
    choice; the reason says where --dtype fp16 would run natively.
    """
    flags = cpu_precision_flags()
    if flags["bf16"]:
        return Precision("bf16", "cpu",
                         f"CPU has native bf16 instructions ({', '.join(flags['bf16'])})")
    reason = "CPU has no native bf16: emulated bf16 would be slower than fp32"
    if flags["fp16"]:
        reason += (f"; it has native fp16 ({', '.join(flags['fp16'])}): --dtype fp16 "
                   "(with GradScaler) may be faster")
    return Precision("fp32", "cpu", reason)


def cpu_fp16_note() -> str | None:
    """What a run in fp16 on this CPU should be told: None where the CPU has native fp16."""
    flags = cpu_precision_flags()
    if flags["fp16"]:
        return None
    faster = (f"--dtype bf16 is native here ({', '.join(flags['bf16'])})" if flags["bf16"]
              else "fp32 is faster here")
    return ("fp16 autocast on this CPU is emulated and slow (no AVX512-FP16, AMX-FP16 or Arm "
            f"FP16 instructions); {faster}")


def _resolve_cuda(requested: str, device) -> Precision:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    if requested == "auto":
        return auto_for_capability(major, minor)
    cc = f"compute capability {major}.{minor}"
    if requested == "bf16" and major < 8:
        raise PrecisionError(
            f"bf16 needs compute capability 8.0 or newer; this GPU has {major}.{minor}. "
            "Use --dtype fp16 (with GradScaler) or --dtype auto."
        )
    return Precision(requested, "cuda", f"requested, {cc}")


def resolve(requested: str, device: str | torch.device) -> Precision:
    """Turn --dtype (auto|fp16|bf16|fp32) into a concrete precision for torch `device`."""
    import torch

    if requested not in CHOICES:
        raise PrecisionError(f"unknown dtype {requested!r}; choose one of {', '.join(CHOICES)}")
    device = torch.device(device)
    if device.type == "cuda":
        return _resolve_cuda(requested, device)
    if requested != "auto":
        return Precision(requested, device.type, "requested")
    if device.type == "mps":
        return Precision("fp16", "mps", "Apple GPU: fp16 autocast")
    if device.type == "cpu":
        return auto_for_cpu()
    return Precision("fp32", device.type, f"no mixed-precision policy known for {device.type}")
