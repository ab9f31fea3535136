"""Everything one training run is asked to do, defined and checked once: `TrainOptions`.

Each field carries its `Option` (help, flag, group, legend): from these the magic's parser,
`amp_magics.train`'s keywords, the legends' labels and the README's flag table are generated,
so an option is written in one place. `amp_magics.train`, `%%amp_train`, sweeps, finders and
the precision showdown all build this one frozen object; a bad value raises AmpUsageError
naming the flag and the fix before anything changes. Variations (`dataclasses.replace`) are
checked again.
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from ..errors import AmpUsageError
from ..formatting import a_or_an, names, number
from ..precision import CHOICES

if TYPE_CHECKING:  # torch loads when options are checked, not when flags are made
    import torch

    Optimizers = Union[torch.optim.Optimizer, Sequence[torch.optim.Optimizer]]

MAX_COUNT = 2**31 - 1  # counts feed torch integer arguments; beyond this they overflow
SCALER_KEYS = ("init_scale", "growth_interval", "growth_factor", "backoff_factor")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def as_optimizers(optimizer: Optimizers) -> tuple:
    """One optimizer or several (a list or tuple) -> a tuple."""
    return tuple(optimizer) if isinstance(optimizer, (list, tuple)) else (optimizer,)


@dataclass(frozen=True)
class Option:
    """How one setting is offered: to the magic as a flag, to `train` as a keyword, to legends.

    flag: "" derives `--field-name`; None offers no flag (a keyword only); short: another
    spelling ("-o"). metavar: the flag's argument as the README writes it; choices: the values
    it takes; bare: the value of the flag given alone (`--find-lr` means `--find-lr 1e-7,10`). parse: text -> value for the flag (default: the
    field's type). notebook: the kind of notebook object a flag names ("model", "optimizers",
    "iterable", "scheduler", "scaler"), looked up by the magic. legend: shown beside a run in
    legends and tables when not the default. tunable: a key `--sweep` and `--search` may vary.
    doc: the README's words (default: help). keyword: accepted by `amp_magics.train`.
    """

    help: str
    group: str
    flag: Optional[str] = ""
    short: Optional[str] = None  # e.g. "-o"
    metavar: Optional[str] = None
    choices: Optional[tuple] = None
    bare: Optional[str] = None  # the value when the flag is given without one
    parse: Optional[Callable[[str], Any]] = None
    notebook: Optional[str] = None
    magic_default: Optional[str] = None
    legend: bool = True
    tunable: bool = False
    doc: Optional[str] = None
    keyword: bool = True


def option(default: Any = MISSING, **how: Any) -> Any:
    """A TrainOptions field with its Option; mutable defaults are made per instance."""
    meta = {"option": Option(**how)}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


WHAT, LENGTH, PRECISION, STEP = "what to train", "how long", "precision", "the step"
CHECKPOINTS, PROCESSES, DISPLAY = "checkpoints", "processes", "runs and display"
DIAGNOSIS = "tuning and diagnosis"


@dataclass(frozen=True)
class TrainOptions:
    """One run's settings. Field names are the keyword arguments of `amp_magics.train`."""

    model: torch.nn.Module = option(
        help="nn.Module to train (default: model)", group=WHAT, metavar="NAME",
        notebook="model", magic_default="model", legend=False,
        doc="the `nn.Module` to train (default `model`; dotted names like `trainer.net` work)")
    optimizer: Optimizers = option(
        help="optimizer name, or several comma-separated (default: optimizer)", group=WHAT,
        metavar="NAME[,NAME]", notebook="optimizers", magic_default="optimizer", legend=False,
        doc="one or several optimizers, stepped with one scaler (default `optimizer`)")
    data: Iterable = option(
        help="iterable of batches, e.g. a DataLoader (default: train_loader)", group=WHAT,
        metavar="NAME", notebook="iterable", magic_default="train_loader", legend=False,
        doc="any iterable of batches, e.g. a DataLoader (default `train_loader`)")
    val: Optional[Iterable] = option(
        None, help="validation iterable, evaluated at each epoch end", group=WHAT,
        metavar="NAME", notebook="iterable", legend=False,
        doc="validation iterable, run at each epoch end with the same body under `no_grad` "
            "and `eval()`")
    scheduler: Any = option(
        None, help="LR scheduler, stepped after each optimizer step", group=WHAT,
        metavar="NAME", notebook="scheduler",
        doc="LR scheduler stepped after each optimizer step, skipped or not, as in PyTorch's "
            "recipe (`ReduceLROnPlateau`: at epoch end with the val loss, or without `--val` "
            "the epoch's mean train loss; with several processes, averaged over the ranks, so "
            "that every rank's lr moves alike). When the loss scaler "
            "skips the very first step, torch's warning \"lr_scheduler.step() before "
            "optimizer.step()\" is a false alarm: it is not shown, and a note on the run says "
            "why")
    skip_aware_scheduler: bool = option(
        False, help="step --scheduler only after optimizer steps the loss scaler did not skip "
                    "(free with ordinary optimizers; one sync per step with fused ones)",
        group=WHAT,
        doc="step `--scheduler` only after optimizer steps that happened, not after the ones "
            "the loss scaler skipped; each step's `scheduler_stepped` is in the history. Free "
            "with ordinary optimizers (GradScaler already knows on the host whether it called "
            "`step()`); with fused ones (`fused=True`, which skip on the device) it costs one "
            "sync per step")
    epochs: Optional[int] = option(
        None, help="passes over --data (default 1; unlimited with --steps)", group=LENGTH,
        metavar="N",
        doc="passes over `--data` (default 1; unlimited when only `--steps` is given)")
    steps: Optional[int] = option(
        None, help="stop after this many optimizer steps", group=LENGTH, metavar="N",
        doc="stop after N optimizer steps")
    dtype: str = option(
        "auto", help="autocast precision; auto picks by hardware (default: auto)",
        group=PRECISION, choices=CHOICES, tunable=True,
        doc="autocast precision (default `auto`, see below)")
    init_scale: Optional[float] = option(
        None, help="GradScaler initial scale, e.g. 2**14", group=PRECISION, metavar="X",
        parse=number, tunable=True,
        doc="GradScaler initial scale; accepts expressions such as `2**14`")
    growth_interval: Optional[int] = option(
        None, help="GradScaler growth interval (steps)", group=PRECISION, metavar="N")
    growth_factor: Optional[float] = option(
        None, help="GradScaler growth factor", group=PRECISION, metavar="X")
    backoff_factor: Optional[float] = option(
        None, help="GradScaler backoff factor", group=PRECISION, metavar="X")
    scaler: Optional[torch.amp.GradScaler] = option(
        None, help="your own torch.amp.GradScaler to use instead", group=PRECISION,
        metavar="NAME", notebook="scaler", doc="use your own `torch.amp.GradScaler` instead")
    accum: int = option(
        1, help="micro-batches per optimizer step (gradient accumulation; loss divided by it)",
        group=STEP, metavar="K", tunable=True,
        doc="gradient accumulation: K micro-batches per optimizer step, loss divided by K")
    clip: Optional[float] = option(
        None, help="max gradient norm of the parameters the optimizers step (unscale_ then "
                   "clip_grad_norm_)", group=STEP, metavar="NORM", tunable=True,
        doc="`scaler.unscale_` then `clip_grad_norm_` over the parameters the optimizers step "
            "(all of `model.parameters()` when they cover the model, as in the recipe; only "
            "those were unscaled), NORM; the norm is recorded. Parameters that require grad but "
            "are in no optimizer get a note: they cost backward time and memory")
    log: tuple = option(
        (), help="other scalars of the body to record, comma-separated", group=STEP,
        metavar="a,b", parse=names, legend=False,
        doc="other scalars of the body to record per step (and to keep in the notebook)")
    seed: Optional[int] = option(
        None, help="seed torch, random and numpy before training", group=STEP, metavar="N",
        doc="seed torch, `random` and numpy before training")
    move: bool = option(
        True, help="do not move batch tensors to the model's device", group=STEP,
        flag="--no-move")
    compile: bool = option(
        False, help="train through torch.compile(model), compiled once per model and reused "
                    "by re-runs; the model itself stays the plain module", group=STEP,
        doc="train through `torch.compile(model)`: the body's `model(x)` calls go to the "
            "compiled module, which is compiled once and reused by re-runs of the cell "
            "(dynamo's cache; torch 2.13 reuses it for a fresh model of the same architecture "
            "too); the notebook's `model` stays the plain module (while a `--background` run "
            "trains, calls of it from other cells go through the compiled module too) and "
            "checkpoints keep its keys. The first step's compile "
            "time is shown apart (\"compiling...\" while it runs, the elapsed time and the memory "
            "chart running on, then \"compiled in 14 s\"), "
            "booked per step as `compile_s` and left out of steps/s and the ETA; a "
            "recompilation later in the run (not in its first step, not in validation, where "
            "compiling anew is expected) raises an alarm naming dynamo's reason (a batch of a "
            "new shape, a Python number that changes every step) with the fix. With "
            "`--compare`, a `compile s` column stands beside the steady-state step time. Not "
            "with `--nproc` yet; under torchrun, through `torch.compile(DDP(model))`")
    compile_mode: Optional[str] = option(
        None, help="torch.compile mode: default, reduce-overhead, max-autotune, "
                   "max-autotune-no-cudagraphs (implies --compile)", group=STEP,
        metavar="MODE",
        doc="`torch.compile` mode: `default`, `reduce-overhead`, `max-autotune`, "
            "`max-autotune-no-cudagraphs` (implies `--compile`)")
    keep_grads: bool = option(
        False, help="keep the last step's gradients (by default freed when the run ends)",
        group=STEP,
        doc="keep the last step's `.grad` tensors; by default a run frees them when it ends "
            "(as `zero_grad(set_to_none=True)` would): a model's worth of memory, and a later "
            "hand-written loop that zeroes after stepping would add them into its first update")
    checkpoint: Optional[str] = option(
        None, help="save model, optimizer, scaler, scheduler, RNG and history here (atomic)",
        group=CHECKPOINTS, metavar="PATH", legend=False,
        doc="save model, optimizers, scaler, scheduler, RNG and history atomically")
    every: Optional[int] = option(
        None, help="checkpoint every N optimizer steps (default: at each epoch end)",
        group=CHECKPOINTS, metavar="N", legend=False,
        doc="checkpoint every N optimizer steps (default: at each epoch end and at the end)")
    resume: Optional[str] = option(
        None, help="continue from a --checkpoint file", group=CHECKPOINTS, metavar="PATH",
        legend=False,
        doc="continue from a checkpoint, bit-identical to a run that was never interrupted "
            "(read with `torch.load(weights_only=True)`: a checkpoint from elsewhere cannot run "
            "code)")
    nproc: Union[int, str] = option(
        1, help="train on N processes with DistributedDataParallel (gloo on the CPU, one GPU "
                "each with NCCL); auto: one per visible GPU (default 1)", group=PROCESSES,
        metavar="N|auto", parse=lambda text: _processes(text),
        doc="train on N processes with `DistributedDataParallel` (default 1); `auto` = one "
            "per visible GPU. See \"Several processes\" below")
    timeout: float = option(
        300.0, help="seconds the ranks wait for each other at a collective before the run "
                    "fails, naming the rank that did not arrive (default 300)",
        group=PROCESSES, metavar="S", parse=number, legend=False,
        doc="seconds the ranks wait for each other at a gradient exchange (or any collective) "
            "before the run fails naming the rank that did not arrive and where the others "
            "waited, every process ended (default 300; joining the process group has its own 120 s)")
    find_unused_parameters: bool = option(
        False, help="DDP's find_unused_parameters: for a model whose forward leaves some "
                    "parameters out of the loss", group=PROCESSES,
        doc="`DistributedDataParallel(find_unused_parameters=True)`: for a model whose "
            "forward leaves some parameters out of the loss (costs a graph walk per step)")
    static_graph: bool = option(
        False, help="DDP's static_graph: the same parameters are used in every step",
        group=PROCESSES,
        doc="`DistributedDataParallel(static_graph=True)`: the graph (used and unused "
            "parameters) is the same in every step")
    name: Optional[str] = option(
        None, help="name of this run (default run1, run2, ...)", group=DISPLAY,
        metavar="NAME", legend=False,
        doc="name of the run (default `run1`, `run2`, ...)")
    refresh_seconds: float = option(
        0.5, help="seconds between view refreshes (default 0.5)", group=DISPLAY,
        flag="--refresh", metavar="S", legend=False)
    diagnose: bool = option(
        False, help="at the first skipped step or non-finite loss, re-run that batch with hooks "
                    "and name the module that overflows (costs one sync per step until then)",
        group=DIAGNOSIS,
        doc="at the first skipped step or non-finite loss, re-run that batch with hooks and "
            "name the module that overflows (`run.diagnosis`, and a note); costs one sync per "
            "step until then")
    handle_sigint: bool = option(
        True, help="Ctrl-C stops after the current optimizer step (a second one at once)",
        group=DISPLAY, flag=None, legend=False)
    sync_timing: bool = option(
        False, help="a sync per step on CUDA, for step times (the precision showdown)",
        group=DIAGNOSIS, flag=None, legend=False, keyword=False)
    config: Mapping = option(
        {}, help="extra entries for the run's config", group=DISPLAY, flag=None, legend=False)

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "optimizer", as_optimizers(self.optimizer))
        # log="acc" or "acc,f1" from Python, as the flag takes it; else any iterable of names
        set_(self, "log", names(self.log) if isinstance(self.log, str) else tuple(self.log))
        set_(self, "config", dict(self.config or {}))
        if self.compile_mode is not None:
            set_(self, "compile", True)
        self._check_objects()
        self._check_numbers()
        self._check_files()

    @classmethod
    def from_keywords(cls, caller: str, given: Mapping[str, Any], **fixed: Any) -> TrainOptions:
        """The options from keyword arguments, an unknown or missing keyword named with its
        fix."""
        (options,) = split_keywords(caller, given, cls)
        missing = [f"{f.name}=" for f in fields(cls) if f.default is MISSING
                   and f.default_factory is MISSING and f.name not in {**options, **fixed}]
        if missing:  # as Python says it for a function's own keywords, and what goes there
            raise TypeError(f"{caller}() missing keyword argument(s) {', '.join(missing)}: "
                            "the model, its optimizer(s) and the batches, e.g. "
                            "model=net, optimizer=opt, data=train_loader")
        return cls(**options, **fixed)

    @property
    def epoch_limit(self) -> int | None:
        """Passes over the data: `epochs`, else 1, or unlimited when only `steps` is given."""
        return 1 if self.epochs is None and self.steps is None else self.epochs

    @property
    def steps_per_epoch(self) -> int | None:
        """Optimizer steps in a pass over the data (None for a stream)."""
        length = data_length(self.data)
        return None if length is None else math.ceil(length / self.accum)

    @property
    def total_steps(self) -> int | None:
        """Optimizer steps the run is asked for (None when only a stream's end tells)."""
        per_epoch, epochs = self.steps_per_epoch, self.epoch_limit
        by_epochs = epochs * per_epoch if epochs is not None and per_epoch is not None else None
        candidates = [n for n in (self.steps, by_epochs) if n is not None]
        return min(candidates) if candidates else None

    @property
    def optimizers(self) -> tuple:
        return self.optimizer

    @property
    def scaler_settings(self) -> dict:
        """The GradScaler settings given (not the defaults)."""
        return {k: getattr(self, k) for k in SCALER_KEYS if getattr(self, k) is not None}

    def settings(self) -> dict:
        """The settings given that say how the run trained (legend options not at their
        default), as plain values: objects by their type's name."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["option"].legend and value != _default(f) and value is not None:
                plain = isinstance(value, (bool, int, float, str))
                out[f.name] = value if plain else type(value).__name__
        return out

    # -- checks ----------------------------------------------------------------------------
    def _check_objects(self):
        import torch

        if not isinstance(self.model, torch.nn.Module):
            raise AmpUsageError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not self.optimizers:
            raise AmpUsageError("give at least one optimizer")
        for opt in self.optimizers:
            if not isinstance(opt, torch.optim.Optimizer):
                raise AmpUsageError(f"optimizer must be a torch.optim.Optimizer, "
                                    f"got {type(opt).__name__}")
        _check_disjoint(self.optimizers)
        for label, value in (("data", self.data), ("val", self.val)):
            if value is None and label == "val":
                continue
            if isinstance(value, torch.nn.Module):
                raise AmpUsageError(f"{label} is {a_or_an(type(value).__name__)}, a model, not an "
                                    "iterable of batches")
            if not isinstance(value, Iterable):
                raise AmpUsageError(f"{label} must be iterable (a DataLoader, a list of "
                                    f"batches...), got {type(value).__name__}")
            if data_length(value) == 0:
                raise AmpUsageError(f"{label} is empty: it has no batches")
        if self.scheduler is not None and not callable(getattr(self.scheduler, "step", None)):
            raise AmpUsageError(f"scheduler must have a step() method (a torch.optim."
                                f"lr_scheduler), got {type(self.scheduler).__name__}")
        if self.skip_aware_scheduler:
            self._check_skip_aware_scheduler()
        if self.compile:
            self._check_compile()
        if self.scaler is not None and not isinstance(self.scaler, torch.amp.GradScaler):
            raise AmpUsageError(f"scaler must be a torch.amp.GradScaler, "
                                f"got {type(self.scaler).__name__}")
        if self.scaler is not None and self.scaler_settings:
            raise AmpUsageError("give either your own scaler or scaler settings (init_scale, "
                                "growth_interval, growth_factor, backoff_factor), not both")
        if self.dtype not in CHOICES:
            raise AmpUsageError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(CHOICES)}")

    def _check_skip_aware_scheduler(self):
        import torch

        flag = "--skip-aware-scheduler"
        if self.scheduler is None:
            raise AmpUsageError(f"{flag} needs a scheduler: give --scheduler NAME, or drop it")
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise AmpUsageError(f"{flag} does not apply to ReduceLROnPlateau, which steps once "
                                "per epoch with the loss, not after each optimizer step: drop it")
        driven = getattr(self.scheduler, "optimizer", None)
        if not any(driven is opt for opt in self.optimizers):
            raise AmpUsageError(f"{flag}: the scheduler drives an optimizer that is not trained "
                                "here; build the scheduler on one of the run's optimizers")

    def _check_compile(self):
        from .._torch_compat import compiled_in_place, plain_module

        if self.compile_mode not in (None, *COMPILE_MODES):
            raise AmpUsageError(f"--compile-mode {self.compile_mode!r}: choose one of "
                                f"{', '.join(COMPILE_MODES)}")
        if plain_module(self.model) is not self.model or compiled_in_place(self.model):
            raise AmpUsageError("--compile: the model is already compiled (torch.compile): "
                                "pass the plain module with --compile, or drop --compile")
        if self.nproc != 1:
            raise AmpUsageError("--compile with --nproc is not supported yet: train on one "
                                "process, or compile inside a torchrun script")

    def _check_numbers(self):
        for label in ("epochs", "steps", "accum"):
            value = getattr(self, label)
            if value is not None and (not isinstance(value, int) or not 1 <= value <= MAX_COUNT):
                raise AmpUsageError(f"--{label} must be a positive whole number up to "
                                    f"{MAX_COUNT}, got {value!r}")
        if self.clip is not None and not self.clip > 0:  # a norm of 0 zeroes every gradient
            raise AmpUsageError(f"--clip must be a positive max gradient norm (leave it out "
                                f"for no clipping), got {self.clip!r}")
        if not (self.nproc == "auto" or (isinstance(self.nproc, int) and
                                         not isinstance(self.nproc, bool) and
                                         1 <= self.nproc <= 1024)):
            raise AmpUsageError(f"--nproc must be a number of processes (1 to 1024) or auto, "
                                f"got {self.nproc!r}")
        if not 0 < self.timeout < math.inf:
            raise AmpUsageError(f"--timeout must be a positive number of seconds, got "
                                f"{self.timeout!r}")
        if not self.refresh_seconds > 0:
            raise AmpUsageError(f"refresh interval must be positive, got {self.refresh_seconds!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**64):
            raise AmpUsageError(f"--seed must be a whole number from 0 to 2**64-1, got {self.seed!r}")
        given = self.scaler_settings
        if not 0 < given.get("init_scale", 1) < math.inf:
            raise AmpUsageError("--init-scale must be positive and finite, e.g. 2**14")
        if not 1 <= given.get("growth_interval", 1) <= MAX_COUNT:
            raise AmpUsageError(f"--growth-interval must be a positive number of steps up to "
                                f"{MAX_COUNT}")
        if not 1 < given.get("growth_factor", 2) < math.inf:
            raise AmpUsageError("--growth-factor must be greater than 1, e.g. 2.0")
        if not 0 < given.get("backoff_factor", 0.5) < 1:
            raise AmpUsageError("--backoff-factor must be between 0 and 1, e.g. 0.5")

    def _check_files(self):
        if self.every is not None and (self.checkpoint is None or not isinstance(self.every, int)
                                       or self.every < 1):
            raise AmpUsageError("--every N needs --checkpoint PATH and a positive number of steps")
        if self.resume is not None and not os.path.isfile(self.resume):
            raise AmpUsageError(f"--resume {self.resume}: no such checkpoint file")
        if self.checkpoint is not None:
            checked_output_path(self.checkpoint, "--checkpoint", "run.pt")


def _check_disjoint(optimizers: Sequence) -> None:
    """Each parameter is stepped by one optimizer: given to two, it would move twice per step
    (and under fp16 the scaler refuses the second step)."""
    stepped_by: dict[int, int] = {}
    for i, opt in enumerate(optimizers):
        for group in opt.param_groups:
            for param in group["params"]:
                first = stepped_by.setdefault(id(param), i)
                if first != i:
                    same = " (the same optimizer, given twice)" if opt is optimizers[first] else ""
                    raise AmpUsageError(
                        f"optimizers {first + 1} and {i + 1} step the same parameters{same}: "
                        "give each parameter to one optimizer, or it moves twice per step")


def checked_output_path(path: Any, label: str, example: str) -> str:
    """`path` as a string, where a file can be written: not a folder, and in a folder that
    exists and is writable or can be made (missing folders are made at the first write)."""
    path = os.fspath(path)

    def shown(p: str) -> str:  # a flag, or a keyword argument
        return f"{label} {p}" if label.startswith("-") else f"{label}={p!r}"
    if os.path.isdir(path):
        raise AmpUsageError(f"{shown(path)} is a folder: give a file in it, e.g. "
                            f"{shown(os.path.join(path, example))}")
    existing = os.path.dirname(os.path.abspath(path)) or "."
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise AmpUsageError(f"{shown(path)}: cannot write in {existing}")
    return path


# -- the options as a table, for the generated parser, keywords and README ---------------------
@dataclass(frozen=True)
class OptionSpec:
    """One option as offered: its name (a TrainOptions field, or a magic's own flag), its
    Option, its default and the type of its values."""

    name: str
    option: Option
    default: Any
    kind: Any  # the value's type: bool, int, float, str, or object for the rest

    @property
    def flag(self) -> str | None:
        flag = self.option.flag
        return None if flag is None else flag or "--" + self.name.replace("_", "-")


def option_specs(cls: type = TrainOptions) -> list[OptionSpec]:
    """Every field of `cls` (TrainOptions, or another dataclass of `option` fields) with its
    Option, in declaration order."""
    return [OptionSpec(f.name, f.metadata["option"], _default(f), _value_type(f.type))
            for f in fields(cls)]


def split_keywords(caller: str, given: Mapping[str, Any], *classes: type) -> list[dict]:
    """`given` keyword arguments shared out among `classes` (dataclasses of `option` fields),
    one dict each; a keyword none of them takes is refused with the nearest one that exists."""
    known = [{s.name for s in option_specs(cls) if s.option.keyword} for cls in classes]
    every = set().union(*known)
    for key in given:
        if key not in every:
            close = difflib.get_close_matches(key, sorted(every), n=1)
            hint = f": did you mean {close[0]}?" if close else ""
            raise AmpUsageError(f"{caller}() has no option {key!r}{hint} (its options: "
                                f"{', '.join(sorted(every))})")
    return [{k: v for k, v in given.items() if k in taken} for taken in known]


def tunable_types() -> dict[str, type]:
    """The engine options a sweep or a search may vary, with their types."""
    return {d.name: d.kind for d in option_specs() if d.option.tunable}


def _default(f) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _value_type(annotation: str) -> Any:
    """bool, int, float or str for a field annotated so (Optional[int] too); object for the
    rest. Read from the annotation as written: no torch import to evaluate it."""
    plain = re.fullmatch(r"(?:Optional\[)?(bool|int|float|str)\]?", annotation)
    return {"bool": bool, "int": int, "float": float, "str": str}[plain[1]] if plain else object


def _processes(text: str) -> int | str:
    """--nproc N or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a number of processes or auto, got {text!r}"
                                         ) from None


def data_length(data) -> int | None:
    """len(data), or None for streams: a DataLoader over an IterableDataset has __len__ but
    raises TypeError from it."""
    try:
        return len(data)
    except TypeError:
        return None
