"""The notebook side shared by every magic: the cell body as a step, and objects found by name.

torch loads only when a lookup needs it, so %load_ext stays cheap.
"""
from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError

from ..errors import AmpUsageError
from ..formatting import a_or_an, names

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from typing import Union

    import torch
    from IPython.core.interactiveshell import InteractiveShell

    Kind = Union[type, tuple[type, ...]]  # what isinstance() accepts


class CellStep:
    """The cell body compiled once; called as step(batch, step, epoch) for every batch.

    It runs in a private copy of the notebook's namespace, so names it assigns do not leak
    into the notebook (the magic copies back only the names given to --log). Line numbers
    in tracebacks are the cell's own: line 1 is the %%amp_train line.
    """

    def __init__(self, shell: InteractiveShell, cell: str, log_names: Iterable[str] = ()):
        source = "\n" + shell.transform_cell(cell)
        filename = shell.compile.cache(source, cell_number(shell), raw_code="\n" + cell)
        self.code = shell.compile(source, filename, "exec")
        self.namespace = dict(shell.user_ns)
        # exec(code, namespace) without exec's per-call work: module code called as a
        # function reads and writes its globals, which are the namespace
        self.body = types.FunctionType(self.code, self.namespace)
        self.log_names = tuple(log_names)

    def __call__(self, batch: Any, step: int, epoch: int) -> Any:
        __tracebackhide__ = True
        ns = self.namespace
        ns["batch"], ns["step"], ns["epoch"] = batch, step, epoch
        ns.pop("loss", None)
        self.body()
        if "loss" not in ns:
            raise AmpUsageError("the cell body never assigned `loss`: end it with e.g. "
                                "`loss = F.cross_entropy(model(x), y)`")
        if not self.log_names:
            return ns["loss"]
        return {"loss": ns["loss"], **{n: ns[n] for n in self.log_names if n in ns}}


def cell_number(shell: InteractiveShell) -> int:
    """The number of the cell running now, as its prompt shows it (In[29]): the cell's input
    is stored before it runs, whereas IPython 9 counts execution_count up before running it
    and IPython 8 after."""
    history = getattr(shell.history_manager, "input_hist_raw", None)
    return len(history) - 1 if history else shell.execution_count


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn AmpUsageError ("the request is wrong") into IPython's UsageError, without traceback."""
    try:
        yield
    except AmpUsageError as e:
        raise UsageError(str(e)) from None


def lookup(user_ns: Mapping[str, Any], name: str, flag: str, kind: Kind, what: str) -> Any:
    """The notebook object `name` (dotted names reach attributes), checked against `kind`.

    `what` says what `kind` is in words, with its article ("an nn.Module"); every problem is a
    UsageError that names `flag` and the notebook's objects of the right kind.
    """
    head, *attrs = name.split(".")
    if head not in user_ns:
        raise UsageError(f"{flag} {name}: no variable named {head!r} in the notebook. "
                         f"{candidates(user_ns, kind, what)} Pass the right one with "
                         f"{flag} NAME.")
    obj = user_ns[head]
    for attr in attrs:
        if not hasattr(obj, attr):
            raise UsageError(f"{flag} {name}: {type(obj).__name__} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    if (kind is Iterable and isinstance(obj, (str, bytes))) or not isinstance(obj, kind):
        raise UsageError(f"{flag} {name} is {a_or_an(type(obj).__name__)}, not {what}. "
                         f"{_dataset_hint(obj, name)}{candidates(user_ns, kind, what)}")
    return obj


def _dataset_hint(obj: Any, name: str) -> str:
    """A Dataset yields samples, not batches: say how to batch it."""
    dataset = getattr(sys.modules.get("torch.utils.data"), "Dataset", None)
    if dataset is not None and isinstance(obj, dataset):
        return (f"A {type(obj).__name__} yields single samples: batch it, e.g. "
                f"DataLoader({name}, batch_size=32, shuffle=True). ")
    return ""


def candidates(user_ns: Mapping[str, Any], kind: Kind, what: str) -> str:
    """A sentence naming the notebook's objects of `kind`, each with its type where the kind
    is a family (any iterable of batches: DataLoaders, and Datasets to batch)."""
    label = what.split(" ", 1)[1]  # "an nn.Module" -> "nn.Module"
    if kind is Iterable:
        import torch

        kind, label = (torch.utils.data.DataLoader, torch.utils.data.Dataset), "data"
    found = sorted(k for k, v in user_ns.items() if not k.startswith("_") and isinstance(v, kind))
    if not found:
        return f"No {label} object is defined in the notebook yet."
    if isinstance(kind, tuple):
        found = [f"{k} ({type(user_ns[k]).__name__})" for k in found]
    return f"{label} objects in the notebook: {', '.join(found)}."


def resolve_objects(user_ns: Mapping[str, Any], given: Mapping[str, Any],
                    dataset_data: bool = False) -> dict:
    """The notebook objects that options in `given` name (their flags' values), by kind.
    With `dataset_data` (the batch-size finder), `--data` may name a map-style Dataset."""
    from ..training.options import option_specs

    found = {}
    for spec in option_specs():
        kind = spec.option.notebook
        if kind == "iterable" and spec.name == "data" and dataset_data:
            kind = "loader or dataset"
        if kind is not None and spec.name in given:
            found[spec.name] = _find(kind, user_ns, given[spec.name], spec.flag)
    return found


def _find(kind: str, user_ns: Mapping[str, Any], name: str, flag: str) -> Any:
    import torch

    if kind == "optimizers":
        return lookup_optimizers(user_ns, name)
    of_kind = {"model": (torch.nn.Module, "an nn.Module"),
               "iterable": (Iterable, "an iterable of batches"),
               "loader or dataset": ((torch.utils.data.DataLoader, torch.utils.data.Dataset),
                                     "a DataLoader or a Dataset"),
               "scheduler": (scheduler_types(), "an LR scheduler"),
               "scaler": (torch.amp.GradScaler, "a GradScaler")}
    return lookup(user_ns, name, flag, *of_kind[kind])


def lookup_optimizers(user_ns: Mapping[str, Any], text: str) -> list[torch.optim.Optimizer]:
    """The optimizers named by --optimizer's comma-separated `text`."""
    import torch

    found = names(text)
    if not found:
        raise UsageError("--optimizer needs at least one name, e.g. --optimizer opt")
    return [lookup(user_ns, n, "--optimizer", torch.optim.Optimizer, "an optimizer")
            for n in found]


def scheduler_types() -> tuple[type, ...]:
    """The classes an LR scheduler is an instance of, for lookup(..., "--scheduler", ...)."""
    from torch.optim import lr_scheduler

    return tuple(t for t in (getattr(lr_scheduler, "LRScheduler", None),
                             lr_scheduler.ReduceLROnPlateau) if t is not None)
