"""A Run in words: its summary table (the dashboard's final picture and a finished run shown
on its own), the notice a running background run displays, and the sentence that replaces
that notice when it ends; a failed run's traceback below the last two."""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from ..formatting import (escape, format_bytes, format_duration, format_number, format_value,
                          summary_table_html)

if TYPE_CHECKING:
    from ..training.run import Run


def summary_rows(run: Run) -> list[tuple[str, str]]:
    s = run.summary
    rows = [
        ("run", s["name"]),
        ("status", s["status"] + (f" ({run.error})" if run.error else "")),
        ("device / dtype", f"{s['device']} / {s['dtype']}"),
        ("steps", f"{s['steps']} ({s['skipped_steps']} skipped)"),
        ("final loss", format_value(s["final_loss"])),
        ("best loss", format_value(s["best_loss"])),
    ]
    if s["final_val_loss"] is not None:
        rows.append(("val loss (final / best)",
                     f"{format_value(s['final_val_loss'])} / {format_value(s['best_val_loss'])}"))
    if s["final_scale"] is not None:
        scale = s["final_scale"]
        power = f" (2^{math.log2(scale):.0f})" if scale > 0 and math.log2(scale).is_integer() else ""
        rows.append(("final loss scale", f"{scale:g}{power}"))
    rows.append(("wall time", f"{s['wall_time']:.2f} s"))
    if run.compiles:
        rows.append(("compile time (not in the throughput)",
                     f"{s['compile_seconds']:.2f} s, {run.compiles} graph"
                     f"{'s' * (run.compiles != 1)} ({run.recompiles} recompiled)"))
    rows += [
        ("throughput (mean over the run)",
         f"{format_number(s['samples_per_s'])} samples/s, "
         f"{format_number(s['steps_per_s'])} steps/s"),
        ("peak memory", f"{format_bytes(s['peak_memory'])} ({peak_memory_source(run)})"
         if s["peak_memory"] is not None else "-"),
    ]
    rows += [("alarm", a) for a in run.alarms]
    rows += [("note", n) for n in run.notes]
    return rows


def peak_memory_source(run: Run) -> str:
    """What `run.summary["peak_memory"]` measured; in a --nproc run, each rank's too."""
    key = "peak" if any(m.get("peak") is not None for m in run.memory) else "rss"
    source = "CUDA allocator peak" if key == "peak" else "process RSS, highest sample"
    ranks = run.rank_peaks(key)
    if len(ranks) < 2:
        return source
    each = ", ".join(f"rank {r} {format_bytes(v)}" for r, v in ranks.items())
    return f"{source}, the highest of {len(ranks)} ranks: {each}"


def run_html(run: Run) -> str:
    """A running run: where it is shown and how to stop it; an ended one: its summary."""
    if run.status == "running":
        started = time.strftime("%H:%M:%S", time.localtime(run.started))
        return (f"<p>Run <b>{escape(run.name)}</b> started at {started}; the dashboard "
                "shows it live and keeps its final picture. Stop it with "
                "<code>%amp_stop</code> or the Stop button.</p>")
    return summary_table_html(summary_rows(run)) + _traceback_html(run)


def ended_html(run: Run) -> str:
    """One sentence for where the running notice was: how the run ended."""
    s = run.summary
    return (f"<p>Run <b>{escape(run.name)}</b> {escape(run.status)}: {s['steps']:,} "
            f"steps ({s['skipped_steps']} skipped) in {format_duration(s['wall_time'])}, "
            f"final loss {escape(format_value(s['final_loss']))}.</p>" + _traceback_html(run))


def run_text(run: Run) -> str:
    """A Run as plain text: its repr, and a failed run's traceback below it."""
    return repr(run) + (f"\n{run.traceback}" if run.traceback else "")


def _traceback_html(run: Run) -> str:
    if not run.traceback:
        return ""
    return f'<pre style="white-space:pre-wrap">{escape(run.traceback)}</pre>'
