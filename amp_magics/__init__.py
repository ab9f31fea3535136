"""amp_magics: mixed-precision PyTorch training in notebooks, one line away and fully visible.

`%load_ext amp_magics` registers %%amp_train, %gpu_status and friends. Importing the package
is cheap: torch, IPython and ipywidgets load only when a feature needs them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

__version__ = "0.1.0"

__all__ = ["train", "find_lr", "find_batch_size", "search", "plot", "Run", "runs", "View",
           "load_ipython_extension", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy so that `python -m amp_magics status` never pays for importing torch.
    if name in ("train", "find_lr", "find_batch_size", "search"):
        from . import api
        return getattr(api, name)
    if name == "Run":
        from .training.run import Run
        return Run
    if name == "runs":
        from .training.registry import runs
        return runs
    if name == "View":
        from .training.view import View
        return View
    raise AttributeError(f"module 'amp_magics' has no attribute {name!r}")


def plot(run: Any, *others: Any) -> Any:
    """A static picture of `run`'s dashboard with `others` drawn faded underneath: HTML that
    notebooks show (untrusted too, nbconvert and GitHub), a few lines of text in a terminal."""
    from .views.dashboard import overlay_picture

    return overlay_picture([run, *others])


def load_ipython_extension(ipython: InteractiveShell) -> None:
    from .magics.diagnose import DiagnoseMagics
    from .magics.gpu import GpuMagics
    from .magics.train import AmpMagics
    from .views import display

    ipython.register_magics(AmpMagics(ipython))
    ipython.register_magics(GpuMagics(ipython))
    ipython.register_magics(DiagnoseMagics(ipython))
    display.register(ipython)


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    from .magics.diagnose import stop_memory_tracking
    from .ownership import release_all
    from .training.registry import set_kernel_views, stop_background_runs
    from .views import display

    stop_background_runs()
    set_kernel_views([])  # the status bar's runs file: written by a loaded extension only
    release_all()  # a run still finishing its step lets go of its model here
    stop_memory_tracking(ipython)
    display.unregister(ipython)
