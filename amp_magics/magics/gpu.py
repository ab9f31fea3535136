"""%gpu_status and %amp_check: a thin IPython adapter over system/gpu.py, system/doctor.py and
views/status.py."""
from __future__ import annotations

import html
import json
import os
import threading
import time

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ..system import doctor, environment
from ..system import gpu
from .args import parse
from ..views.between_cells import rewrite
from ..views.status import status_html, status_text


class StatusWatch:
    """A status view refreshed in place from a daemon thread until `stop()` or its Stop button;
    then a static snapshot of the last status takes its place, so a saved notebook shows the
    status, not a widget's repr."""

    def __init__(self, indices: list[int] | None, interval: float, first: gpu.Status):
        import ipywidgets as widgets

        self.interval = interval
        self._indices = indices
        self.status = first
        self.html = widgets.HTML(status_html(first))
        self.button = widgets.Button(description="Stop", icon="stop", tooltip="stop refreshing")
        self.button.on_click(lambda _: self.stop())
        self.widget = widgets.VBox([self.button, self.html])
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="amp_magics-gpu-watch", daemon=True)
        self._handle = None

    def start(self) -> StatusWatch:
        """Show the live view (from the cell's own thread) and start refreshing it."""
        from IPython.display import display

        bundle = self.widget._repr_mimebundle_()  # the widget, and a text form that reads
        bundle["text/plain"] = status_text(self.status)  # where widgets cannot
        self._handle = display(bundle, raw=True, display_id=True)
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)  # bounded: a hung driver call must not hang the kernel

    def _run(self) -> None:
        stopped = ""
        try:
            while not self._stopping.wait(self.interval):
                self.status = gpu.probe(self._indices)
                self.html.value = status_html(self.status)
        except Exception as e:  # shown in the widget: a background thread has no cell to print to
            stopped = f"refresh stopped: {type(e).__name__}: {e}"
            self.html.value += f"<div>{html.escape(stopped)}</div>"
        finally:
            self.button.disabled = True
            self.button.description = "Stopped"
            self._leave_snapshot(stopped)

    def _leave_snapshot(self, stopped: str) -> None:
        if self._handle is None:
            return
        taken = time.strftime("%H:%M:%S", time.localtime(self.status.taken_at))
        note = stopped or f"watch stopped; the last refresh, at {taken}"
        rewrite(self._handle, {"text/html": status_html(self.status)
                               + f"<p style=\"opacity:.7\">{html.escape(note)}</p>",
                               "text/plain": f"{status_text(self.status)}\n{note}"})
        self.widget.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<StatusWatch every {self.interval:g} s, {state}; .stop() ends it>"


@magics_class
class GpuMagics(Magics):
    @magic_arguments()
    @argument("--watch", nargs="?", const=1.0, type=float, metavar="S",
              help="refresh in place every S seconds (default 1) from a background thread, with a "
                   "Stop button; the kernel stays free for other cells")
    @argument("--json", action="store_true", help="print the status as JSON instead")
    @argument("-i", "--index", metavar="0,2",
              help="only these GPUs, numbered as nvidia-smi numbers them")
    @line_magic
    def gpu_status(self, line: str) -> gpu.Status | StatusWatch | None:
        """The GPUs, their processes, this kernel's PyTorch memory, and what --dtype auto picks.

        Without a GPU it says why, then shows the CPU, RAM and the CPU dtype advice.
        Returns the Status (`.to_dict()`); with --watch, the running StatusWatch (`.stop()`);
        with --json, prints JSON and returns nothing.
        """
        args = parse(self.gpu_status, line)
        if args.watch is not None and args.json:
            raise UsageError("--watch and --json do not combine; use `python -m amp_magics status "
                             "--watch S --json` for a JSON stream")
        if args.watch is not None and not args.watch > 0:
            raise UsageError(f"--watch needs a positive number of seconds, got {args.watch:g}")
        try:
            indices = None if args.index is None else gpu.parse_indices(args.index)
            status = gpu.probe(indices)
        except ValueError as e:  # not indices like 0,2, or an index with no GPU
            raise UsageError(str(e)) from None
        if args.json:
            print(json.dumps(status.to_dict(), indent=2))
            return None
        if args.watch is None:
            return status
        try:
            watch = StatusWatch(indices, args.watch, status)
        except ImportError:
            raise UsageError("--watch needs ipywidgets in this kernel: pip install ipywidgets") from None
        return watch.start()

    @magic_arguments()
    @argument("--export", metavar="PATH",
              help="also write this environment as a conda environment file, e.g. environment.yml")
    @line_magic
    def amp_check(self, line: str) -> doctor.Report:
        """Check torch, CUDA, cuDNN, the GPU, the driver, AMP itself and the notebook setup.

        Each check says pass/warn/fail with a concrete fix; the AMP smoke test runs two real
        training steps on the active device. Returns the Report (`.checks`, `.ok`, `.to_dict()`).
        """
        args = parse(self.amp_check, line)
        report = doctor.run_checks()
        if args.export:
            try:
                path = environment.export_environment(args.export)
            except OSError as e:
                raise UsageError(f"cannot write {args.export}: {e}") from None
            print(f"Wrote {path}")
            print(f"Rebuild it elsewhere with: conda env create -f {os.path.basename(path)}")
        return report
