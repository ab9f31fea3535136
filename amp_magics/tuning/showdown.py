"""The precision showdown (`--compare fp32,bf16,fp16`): the same steps in each precision,
from the same starting state; median step time, memory, the loss gap to fp32, a verdict."""
from __future__ import annotations

import dataclasses
import html
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import AmpUsageError
from ..formatting import format_percent, records_html
from ..precision import resolve
from ..tensors import StepFn, model_device
from ..training.engine import prepare
from ..training.objects import TrainingObjects
from ..training.options import TrainOptions
from ..training.registry import unique_group
from ..training.run import Run
from ..training.view import View


def parse_compare(spec: str, device: str | torch.device) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if len(names) < 2:
        raise AmpUsageError("--compare needs at least two precisions, e.g. --compare fp32,bf16")
    for name in names:
        if name not in ("fp32", "fp16", "bf16"):
            raise AmpUsageError(f"--compare {name}: choose from fp32, fp16, bf16")
        resolve(name, device)  # a dtype the device lacks raises PrecisionError here
    if len(set(names)) != len(names):
        raise AmpUsageError("--compare names a precision twice")
    return names


@dataclass
class Showdown:
    runs: dict[str, Run]  # precision name -> Run
    warmup: int
    peaks: dict = field(default_factory=dict)  # precision -> bytes above the starting state
    peak_method: str = ""

    @property
    def memory_label(self) -> str:
        """What the memory column measured: not the runs' "peak memory" (the whole process)."""
        return ("peak memory above the start" if self.peak_method.startswith("CUDA")
                else "memory kept for backward")

    def rows(self) -> list[dict]:
        base = self.runs.get("fp32")
        out = []
        for precision, run in self.runs.items():
            out.append({"precision": precision, "median step ms": self.step_ms(run),
                        self.memory_label: self.peaks.get(precision),
                        FINAL_LOSS: final_loss(run),
                        LOSS_GAP: _relative(final_loss(run), final_loss(base))
                        if base is not None else None,
                        "skipped": run.summary["skipped_steps"]})
            if any(r.compiles for r in self.runs.values()):  # --compile: apart from the steps
                out[-1]["compile s"] = run.compile_seconds
        return out

    def step_ms(self, run: Run) -> float | None:
        times = [r["time"] for r in run.history]
        deltas = [b - a for a, b in zip(times, times[1:])][self.warmup:]
        return statistics.median(deltas) * 1e3 if deltas else None

    def verdicts(self) -> list[str]:
        base = self.runs.get("fp32")
        if base is None:
            return []
        base_ms, base_peak = self.step_ms(base), self.peaks.get("fp32")
        lines = []
        for precision, run in self.runs.items():
            if precision == "fp32":
                continue
            parts = []
            ms = self.step_ms(run)
            if ms and base_ms:
                parts.append(speed_words(base_ms, ms))
            peak = self.peaks.get(precision)
            if peak is not None and base_peak:
                change = 1 - peak / base_peak
                parts.append(f"{abs(change):.0%} {'less' if change >= 0 else 'more'} "
                             f"{self.memory_label}")
            gap = _relative(final_loss(run), final_loss(base))
            if gap is not None:
                parts.append(f"final loss within {format_percent(gap)} of fp32"
                             if math.isfinite(gap) else "loss not finite")
            skipped = run.summary["skipped_steps"]
            if skipped:
                parts.append(f"{skipped} skipped step{'s' * (skipped != 1)}")
            lines.append(f"{precision}: " + ", ".join(parts))
        return lines

    def _repr_html_(self) -> str:
        verdict = "".join(f"<li>{html.escape(v)}</li>" for v in self.verdicts())
        caption = f"memory: {self.peak_method}"
        return records_html(self.rows(), caption, byte_columns=(self.memory_label,),
                            formats={LOSS_GAP: format_percent}) + f"<ul>{verdict}</ul>"

    def __repr__(self) -> str:
        return "\n".join(self.verdicts()) or f"<Showdown of {', '.join(self.runs)}>"


FINAL_LOSS = "final loss (mean of last 5)"
LOSS_GAP = "loss gap to fp32"
SAME_SPEED = 0.10  # step times within 10% of fp32's read as "about as fast"


def speed_words(base_ms: float, ms: float) -> str:
    """fp32's median step time against another's, in words: "1.8x faster", or within
    SAME_SPEED "about as fast as fp32 (3% slower)" (a "1x slower" says nothing)."""
    ratio = base_ms / ms
    if abs(ms / base_ms - 1) < SAME_SPEED:
        change = ms / base_ms - 1
        return f"about as fast as fp32 ({abs(change):.0%} {'slower' if change > 0 else 'faster'})"
    return f"{ratio:.2g}x faster" if ratio >= 1 else f"{1 / ratio:.2g}x slower"


def final_loss(run: Run, last: int = 5) -> float | None:
    """Mean of the last few losses: a single step's loss is too noisy to compare."""
    losses = [r["loss"] for r in run.history[-last:]]
    return sum(losses) / len(losses) if losses else None


def _relative(value, reference):
    if value is None or reference is None:
        return None
    if not (math.isfinite(value) and math.isfinite(reference)):
        return math.inf
    return abs(value - reference) / max(abs(reference), 1e-12)


def showdown(step_fn: StepFn, precisions: list[str], options: TrainOptions,
             views: Sequence[View] = ()) -> Showdown:
    """Run `options.steps` optimizer steps in each precision from the same starting state.

    Step times are medians after warm-up (synchronised on CUDA). Memory: on CUDA the allocator
    peak above the starting state over the run; elsewhere the exact bytes one step keeps for
    backward (process RSS is too coarse to compare precisions run one after another).
    """
    __tracebackhide__ = True
    from ..diagnostics.memory import PeakMemory, step_activation_memory

    model, steps = options.model, options.steps
    if steps is None:
        raise AmpUsageError("a precision comparison needs a number of steps, e.g. --steps 50")
    name = unique_group(options.name or "compare")
    objects = TrainingObjects.of(options)
    result = Showdown({}, warmup=min(5, max(steps // 5, 1)))
    device = model_device(model)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    result.peak_method = ("CUDA allocator peak above the start, exact" if cuda else
                          "memory one step keeps for backward, first batch, exact")
    with objects.borrowed(name, options.data) as loan:
        if not cuda:
            batch = next(iter(options.data))
            for precision in precisions:
                report = step_activation_memory(step_fn, model, batch, precision)
                result.peaks[precision] = report.steps[-1].saved
        for precision in precisions:
            loan.start.restore()
            run_options = dataclasses.replace(options, dtype=precision, epochs=None,
                                              name=f"{name}[{precision}]", sync_timing=True)
            training = prepare(step_fn, run_options, views, loan.claim)
            result.runs[precision] = training.run
            if cuda:
                meter = PeakMemory(device).start()
                training.execute()
                result.peaks[precision] = meter.stop()["peak"]
            else:
                training.execute()
            if training.run.status != "finished":
                break
    return result
