"""Status and %amp_check results as 80-column text (terminals) and as HTML (notebooks).

Pure functions. The HTML needs no JavaScript and carries its own inline styles, so it looks the
same in JupyterLab, VS Code and Colab. Every value placed in HTML is escaped: process names on a
shared server are chosen by other users.
"""
from __future__ import annotations

import textwrap
import time
from typing import TYPE_CHECKING

from ..formatting import Html, escape, format_bytes, table_html

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..system.doctor import Check
    from ..system.gpu import Status

WIDTH = 80
NA = "n/a"
_GIB = 1 << 30


# --- shared formatting -----------------------------------------------------------------------

def _sizes(used: int | None, total: int | None) -> str:
    if used is None or total is None:
        return NA
    return f"{used / _GIB:.1f} / {total / _GIB:.1f} GiB"


def _or_na(value, fmt: str = "{}") -> str:
    return NA if value is None else fmt.format(value)


def _power(gpu) -> str:
    if gpu.power_draw is None:
        return NA
    limit = f" / {gpu.power_limit:.0f}" if gpu.power_limit is not None else ""
    return f"{gpu.power_draw:.0f}{limit} W"


def _mig(gpu) -> str:
    if gpu.mig_enabled is None:
        return NA
    mode = "on" if gpu.mig_enabled else "off"
    if gpu.mig_pending != gpu.mig_enabled:
        mode += f" ({'on' if gpu.mig_pending else 'off'} after reset)"
    return mode


def _capability(gpu) -> str:
    return "{}.{}".format(*gpu.capability) if gpu.capability else NA


def _fraction(used, total) -> float | None:
    return used / total if used is not None and total else None


def _torch_headline(mem) -> str:
    where = f" (GPU {mem.gpu_index})" if mem.gpu_index is not None else ""
    return f"This kernel's PyTorch memory on {mem.device}{where}:"


def _torch_held(mem) -> str:
    return (f"allocated {format_bytes(mem.allocated, NA)}, "
            f"reserved {format_bytes(mem.reserved, NA)}, peak {format_bytes(mem.peak, NA)}")


def _torch_gap(mem) -> str:
    if mem.other_memory is None:
        return mem.other_label
    return (f"+ {format_bytes(mem.other_memory, NA)} {mem.other_label} "
            f"(NVML counts {format_bytes(mem.nvml_used, NA)})")


def _recommendation(rec) -> str:
    return f"Recommendation: --dtype auto picks {rec.dtype} on {rec.device}: {rec.reason}"


def _host_facts(host, this_process: bool = True) -> list[tuple[str, str]]:
    usable = f", {host.usable_cpus} usable here" if host.usable_cpus not in (None, host.logical_cpus) else ""
    bf16 = (f"native ({', '.join(host.bf16_flags)})" if host.bf16_flags
            else "not native: bf16 autocast is emulated, slower than fp32")
    fp16 = (f"native ({', '.join(host.fp16_flags)})" if host.fp16_flags
            else "not native: fp16 autocast is emulated, slow")
    ram = (f"{format_bytes(host.ram_available, NA)} available of {format_bytes(host.ram_total, NA)}"
           if host.ram_total is not None else NA)
    facts = [
        ("CPU", f"{host.cpu_model} ({_or_na(host.logical_cpus)} logical CPUs{usable})"),
        ("bf16", bf16),
        ("fp16", fp16),
        ("AMX", {None: "unknown", True: "yes", False: "no"}[host.amx]),
        ("torch", f"{host.torch_threads} thread{'s' * (host.torch_threads != 1)}"
         if host.torch_threads is not None
         else "not imported in this process"),
        ("RAM", ram),
        ("process", f"{format_bytes(host.process_rss, NA)} resident"),
    ]
    return facts if this_process else [f for f in facts if f[0] not in _PROCESS_FACTS]


# Facts about the process that probes (torch in it, its memory): they describe the kernel in
# a notebook, but only the status command itself in a terminal, so `amp-magics status` omits them.
_PROCESS_FACTS = ("torch", "process")


def _host_line(host, this_process: bool = True) -> str:
    return (f"Host: {host.cpu_model}, {_or_na(host.logical_cpus)} CPUs, RAM "
            f"{format_bytes(host.ram_available, NA)} free of {format_bytes(host.ram_total, NA)}"
            + (f", this process {format_bytes(host.process_rss, NA)}" if this_process else ""))


def _clock(status) -> str:
    return time.strftime("%H:%M:%S", time.localtime(status.taken_at))


# --- text ------------------------------------------------------------------------------------

def _printable(text: str) -> str:
    # Terminal escape sequences in a process name must not reach the terminal.
    return "".join(c if c.isprintable() else "?" for c in text)


def _fit(text: str, indent: str = "", hang: str = "    ") -> list[str]:
    return textwrap.wrap(_printable(text), WIDTH, initial_indent=indent,
                         subsequent_indent=indent + hang, break_on_hyphens=False) or [""]


def _clip(text: str, width: int) -> str:
    text = _printable(text)
    return text if len(text) <= width else text[: width - 1] + "~"


def _bar_text(fraction: float | None, width: int = 20) -> str:
    if fraction is None:
        return "[" + " " * width + "]"
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def status_text(status: Status, this_process: bool = True) -> str:
    """The status as 80-column text; `this_process=False` leaves out the facts about the
    probing process (the command line's own torch and memory mean nothing to its reader)."""
    lines: list[str] = []
    if status.gpus:
        lines += _fit(f"Driver {_or_na(status.driver_version)}, supports CUDA "
                      f"{_or_na(status.cuda_driver_version)}  ({_clock(status)})")
        for gpu in status.gpus:
            lines += _gpu_text(gpu)
        for mem in status.torch_memory:
            lines += _fit(_torch_headline(mem))
            lines += _fit(_torch_held(mem), indent="  ")
            lines += _fit(_torch_gap(mem), indent="  ")
        lines += _fit(_host_line(status.host, this_process))
    else:
        lines += _fit(f"No GPU: {status.no_gpu_reason}")
        for label, value in _host_facts(status.host, this_process):
            lines += _fit(f"{label:<8} {value}", hang=" " * 9)
    lines += _fit(_recommendation(status.recommendation))
    for note in status.notes:
        lines += _fit(f"Note: {note}")
    return "\n".join(lines)


def _gpu_text(gpu) -> list[str]:
    lines = [_clip(f"GPU {gpu.index}  {gpu.name}", 44).ljust(45)
             + f"cc {_capability(gpu)}  AMP: {' '.join(gpu.precisions) or 'none'}"]
    used = _fraction(gpu.memory_used, gpu.memory_total)
    lines.append(f"  memory {_bar_text(used)} {_sizes(gpu.memory_used, gpu.memory_total)}"
                 f"   util {_or_na(gpu.utilization, '{}%')}")
    lines.append(f"  temp {_or_na(gpu.temperature, '{} C')}   power {_power(gpu)}   "
                 f"SM {_or_na(gpu.sm_clock, '{} MHz')}   MIG {_mig(gpu)}")
    for p in gpu.processes:
        mark = "  <- this kernel" if p.is_self else ""
        head = f"    {p.pid:>8}  {p.kind:<3} {format_bytes(p.used_memory, NA):>9}  "
        lines.append(head + _clip(p.name, WIDTH - len(head) - len(mark)) + mark)
    if not gpu.processes and not gpu.process_error:
        lines.append("    no processes")
    if gpu.process_error:
        lines += _fit(gpu.process_error, indent="    ")
    return [line[:WIDTH] for line in lines]


def checks_text(checks: Iterable[Check]) -> str:
    lines: list[str] = []
    for check in checks:
        lines += _fit(f"{check.status.upper():<5} {check.name}: {check.detail}", hang=" " * 6)
        if check.fix:
            lines += _fit(f"fix: {check.fix}", indent=" " * 6, hang="     ")
    return "\n".join(lines)


# --- HTML ------------------------------------------------------------------------------------

_STYLE = "font-family:var(--jp-code-font-family,monospace);font-size:12px;line-height:1.5"
_CELL = "padding:2px 8px;text-align:left;vertical-align:middle;white-space:nowrap"
_MUTED = "opacity:.7"


def _table(header: list[str], rows: list[list]) -> str:
    """format.table_html in the status look; cells are escaped there unless they are `Html`."""
    return f'<div style="margin:4px 0">{table_html(header, rows, cell_style=_CELL)}</div>'


def _bar_html(fraction: float | None) -> str:
    if fraction is None:
        return ""
    pct = round(max(0.0, min(1.0, fraction)) * 100)
    color = "#2e7d32" if pct < 70 else "#f9a825" if pct < 90 else "#c62828"
    return (f'<div title="{pct}%" style="display:inline-block;vertical-align:middle;width:80px;'
            f'height:8px;margin-right:6px;background:rgba(128,128,128,.25);border-radius:2px;'
            f'overflow:hidden"><div style="width:{pct}%;height:100%;background:{color}"></div></div>')


def _line(text: str, style: str = "") -> str:
    return f'<div style="{style}">{escape(text)}</div>'


def _gpu_row(g) -> list:
    memory = Html(_bar_html(_fraction(g.memory_used, g.memory_total))
                  + escape(_sizes(g.memory_used, g.memory_total)))
    return [g.index, g.name, _capability(g), " ".join(g.precisions) or "none", memory,
            _or_na(g.utilization, "{}%"), _or_na(g.temperature, "{} °C"), _power(g),
            _or_na(g.sm_clock, "{} MHz"), _mig(g)]


def status_html(status: Status, this_process: bool = True) -> str:
    """The status as HTML; `this_process=False` leaves out the probing process's own facts
    (the Jupyter server's, in the status bar's panel)."""
    parts: list[str] = []
    if status.gpus:
        parts.append(_line(f"Driver {_or_na(status.driver_version)}, supports CUDA "
                           f"{_or_na(status.cuda_driver_version)}, updated {_clock(status)}", _MUTED))
        parts.append(_table(
            ["GPU", "Name", "CC", "AMP", "Memory", "Util", "Temp", "Power", "SM", "MIG"],
            [_gpu_row(g) for g in status.gpus]))
        for gpu in status.gpus:
            parts.append(_processes_html(gpu))
        for mem in status.torch_memory:
            parts.append(f"<div><b>{escape(_torch_headline(mem))}</b></div>")
            parts.append(_line(_torch_held(mem), "padding-left:16px"))
            parts.append(_line(_torch_gap(mem), "padding-left:16px"))
        parts.append(_line(_host_line(status.host, this_process), _MUTED))
    else:
        parts.append(_line(f"No GPU: {status.no_gpu_reason}", "font-weight:bold"))
        parts.append(_table(["", ""], _host_facts(status.host, this_process)))
    rec = status.recommendation
    parts.append(f"<div><b>Recommendation:</b> --dtype auto picks <b>{escape(rec.dtype)}</b>"
                 f" on {escape(rec.device)}: {escape(rec.reason)}</div>")
    parts += [_line(f"Note: {note}", _MUTED) for note in status.notes]
    return f'<div class="amp-gpu-status" style="{_STYLE}">{"".join(parts)}</div>'


def _processes_html(gpu) -> str:
    title = f"Processes on GPU {gpu.index}"
    out = [f'<div style="margin-top:6px"><b>{escape(title)}</b></div>']
    if gpu.processes:
        rows = []
        for p in gpu.processes:
            name = Html(escape(p.name) + (" <b>(this kernel)</b>" if p.is_self else ""))
            rows.append([p.pid, p.kind, name, format_bytes(p.used_memory, NA)])
        out.append(_table(["PID", "Type", "Name", "Memory"], rows))
    elif not gpu.process_error:
        out.append(_line("no processes", _MUTED))
    if gpu.process_error:
        out.append(_line(gpu.process_error, "color:#c62828"))
    return "".join(out)


_BADGE = {"pass": "#2e7d32", "warn": "#e65100", "fail": "#c62828", "info": "#757575"}


def checks_html(checks: Iterable[Check]) -> str:
    rows = []
    for check in checks:
        badge = Html(f'<span style="display:inline-block;min-width:3.5em;text-align:center;'
                     f'color:#fff;border-radius:3px;background:{_BADGE[check.status]}">'
                     f"{escape(check.status.upper())}</span>")
        fix = f'<div style="{_MUTED}">fix: {escape(check.fix)}</div>' if check.fix else ""
        result = Html(f'<div style="white-space:normal">{escape(check.detail)}{fix}</div>')
        rows.append([badge, check.name, result])
    return f'<div class="amp-check" style="{_STYLE}">{_table(["", "Check", "Result"], rows)}</div>'
