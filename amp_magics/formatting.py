"""Numbers, bytes, durations, paths and HTML tables, formatted one way everywhere (and numbers read
back from flags).

A leaf: pure string functions with no imports from the rest of the package, so data objects
(Run, memory reports) and every view can share them. Everything placed in HTML is escaped
unless it is marked as already-built `Html`.
"""
from __future__ import annotations

import ast
import html
import math
import operator
import os
from collections.abc import Callable, Mapping, Sequence

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


class Html(str):
    """Markup built by our own code (already escaped): tables place it as it is."""


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def format_duration(seconds: float | None) -> str:
    """12s / 3m05s / 1h02m; "—" when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_number(v: float | None) -> str:
    """3 significant digits, thousands separated: 1,234 / 12.3 / 0.00123 / 1.2e-05."""
    if v is None:
        return "—"
    if not math.isfinite(v):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e7):
        return f"{v:.2e}"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def format_scientific(v: float) -> str:
    """1e-04 / 2.5e-04 / 3.14e+07: three significant digits at most, no trailing zeros."""
    if not math.isfinite(v):
        return str(v)
    mantissa, exponent = f"{v:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def format_setting(v: object) -> str:
    """A setting as typed: 0.001 / 1e-05 / 65536 / bf16 (floats in Python's shortest form)."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def format_percent(v: float | None, missing: str = "-") -> str:
    """A fraction as a percentage with two decimals: 0.00379 -> '0.38%'."""
    if v is None:
        return missing
    return f"{v:.2%}" if math.isfinite(v) else "not finite"


def column_format(values: Sequence[object]) -> Callable[[float], str]:
    """One number format for a whole column: `format_scientific` for every number when any
    needs it (below 1e-3 or from 1e7 on), else `format_number`; never a mix of the two."""
    scientific = any(isinstance(v, float) and math.isfinite(v) and v != 0
                     and (abs(v) < 1e-3 or abs(v) >= 1e7) for v in values)
    return format_scientific if scientific else format_number


def format_value(v: object, missing: str = "-") -> str:
    """A measured float (a loss, a rate) to 4 significant digits: 0.6931 / 1.235e+05 / nan;
    anything else as str(); `missing` for None."""
    if v is None:
        return missing
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_bytes(n: float | None, missing: str = "-") -> str:
    """1536 -> '1.5 KiB'; None -> `missing`."""
    if n is None:
        return missing
    for unit in BYTE_UNITS[:-1]:
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} {BYTE_UNITS[-1]}"


def _cell(value: object) -> str:
    return value if isinstance(value, Html) else escape(value)


_CELL_STYLE = "text-align:left;padding:1px 14px 1px 0;vertical-align:middle"


def table_html(headers: Sequence, rows: Sequence[Sequence], caption: str = "",
               highlight: int | None = None, cell_style: str = _CELL_STYLE) -> str:
    """A plain table; every cell is escaped (names can be anything) unless it is `Html`.

    Row `highlight` is shown in bold; `cell_style` is the inline CSS of every th and td.
    """
    cell = f"style='{escape(cell_style)}'"
    head = "".join(f"<th {cell}>{_cell(h)}</th>" for h in headers)
    best = " style='font-weight:bold;background:rgba(30,136,229,.15)'"
    body = "".join(f"<tr{best if i == highlight else ''}>"
                   + "".join(f"<td {cell}>{_cell(c)}</td>" for c in row) + "</tr>"
                   for i, row in enumerate(rows))
    cap = (f"<caption style='caption-side:bottom;text-align:left;opacity:.7'>{escape(caption)}"
           "</caption>" if caption else "")
    return (f"<table class='amp-table' style='border-collapse:collapse;font-size:12px'>{cap}"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def records_html(records: Sequence[dict], caption: str = "", highlight: int | None = None,
                 byte_columns: Sequence[str] = ("peak memory",),
                 formats: Mapping[str, Callable[[object], str]] | None = None) -> str:
    """Dicts with the same keys as a table: byte columns in KiB/MiB/GiB, `formats` as given
    per column, other numbers in one format per column (`column_format`)."""
    if not records:
        return "<p>nothing to show</p>"
    keys = list(records[0])
    given = {key: format_bytes for key in byte_columns}
    given.update(formats or {})
    per_column = {key: given.get(key) or column_format([r.get(key) for r in records])
                  for key in keys}

    def text(key, value):
        if value is None:
            return "-"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)
        if isinstance(value, int) and key not in given:
            return str(value)  # counts (steps, skipped) as they are
        return per_column[key](value)

    rows = [[text(k, v) for k, v in record.items()] for record in records]
    return table_html(keys, rows, caption, highlight)


def summary_table_html(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table of label and value (e.g. views/run_summary.summary_rows)."""
    cells = "".join(
        f'<tr><th style="text-align:left;font-weight:600;padding:1px 16px 1px 0;'
        f'vertical-align:top">{escape(k)}</th>'
        f'<td style="text-align:left;padding:1px 0;overflow-wrap:anywhere">{escape(v)}</td></tr>'
        for k, v in rows)
    return (f'<table class="amp-summary" style="border-collapse:collapse;margin:8px 0 0 0;'
            f'font-size:12px">{cells}</table>')


# -- and back: numbers written in flags and specs ------------------------------------------
_OPERATORS = {ast.Pow: operator.pow, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.Add: operator.add, ast.Sub: operator.sub}


def number(text: str) -> float:
    """A number written as a literal or simple arithmetic: 65536, 2**14, 2.**16, 1e4."""
    def evaluate(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = evaluate(node.left), evaluate(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 1024:
                raise ValueError("exponent too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -evaluate(node.operand)
        raise ValueError(f"not a number: {text!r}")

    try:
        return evaluate(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, OverflowError, ZeroDivisionError) as e:
        raise ValueError(str(e)) from None


def names(text: str) -> tuple[str, ...]:
    """"a, b,c" (a flag's comma-separated names) -> ("a", "b", "c")"""
    return tuple(n.strip() for n in text.split(",") if n.strip())


def short_path(path: str) -> str:
    """A path as a person would type it here: relative when close by, else with ~ for home."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        relative = path
    if not relative.startswith(os.path.join(os.pardir, os.pardir, os.pardir)):
        return relative
    home = os.path.expanduser("~")
    return "~" + path[len(home):] if home != "/" and path.startswith(home + os.sep) else path


def a_or_an(word: str) -> str:
    """"an Adam", "a SGD": the article by the word's first letter (close enough for names)."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"
