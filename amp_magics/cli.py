"""`amp-magics status` and `amp-magics check`: %gpu_status and %amp_check for SSH sessions."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .system import gpu
from .views.status import checks_text, status_text

_HOME, _CLEAR_SCREEN = "\x1b[H", "\x1b[2J"  # cursor to the top left; erase the screen
_CLEAR_ROW, _CLEAR_BELOW = "\x1b[K", "\x1b[J"  # erase to the end of the row / of the screen


def _indices(text: str) -> list[int]:
    try:
        return gpu.parse_indices(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amp-magics", description="GPU status and AMP environment checks, as in the notebook magics.",
        allow_abbrev=False)  # a typo is an error, never another flag's prefix
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="GPUs, processes, memory and the dtype advice",
                                 allow_abbrev=False)
    status.add_argument("--watch", nargs="?", const=1.0, type=float, metavar="S",
                        help="redraw every S seconds (default 1) until Ctrl-C; with --json, "
                             "one JSON object per line")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("-i", "--index", type=_indices, metavar="0,2",
                        help="only these GPUs, numbered as nvidia-smi numbers them")
    check = commands.add_parser("check", help="check torch, CUDA, the driver and AMP itself",
                                allow_abbrev=False)
    check.add_argument("--export", metavar="PATH", help="also write a conda environment file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(parser, args.export)
    if args.watch is not None and not args.watch > 0:
        parser.error(f"--watch needs a positive number of seconds, got {args.watch:g}")
    try:
        if args.watch is None:
            _print_status(args.index, args.json, watching=False)
            return 0
        first = True
        while True:
            _print_status(args.index, args.json, watching=args.watch, first=first)
            first = False
            time.sleep(args.watch)
    except ValueError as e:  # a GPU index that does not exist
        parser.error(str(e))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `amp-magics status --json | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush is quiet
        return 0


def _print_status(indices, as_json: bool, watching: float | bool, first: bool = True) -> None:
    """One status; `watching` (seconds between refreshes) adds the time of this refresh, so a
    frozen screen is never mistaken for an idle GPU."""
    status = gpu.probe(indices)
    if as_json:  # watching: one object per line, a stream other tools can read
        print(json.dumps(status.to_dict(), indent=None if watching else 2), flush=True)
        return
    text = status_text(status, this_process=False)  # this command's own process is no news
    if not watching:
        print(text, flush=True)
        return
    updated = time.strftime("%H:%M:%S", time.localtime(status.taken_at))
    text = f"Updated {updated}, every {watching:g} s (Ctrl-C to stop)\n{text}"
    if sys.stdout.isatty():  # redrawn over the last frame, row by row: no flicker, and no
        # frames pushed into the scrollback (as a full-screen erase does in some terminals)
        rows = "".join(row + _CLEAR_ROW + "\n" for row in text.split("\n"))
        print((_CLEAR_SCREEN if first else "") + _HOME + rows + _CLEAR_BELOW, end="", flush=True)
    else:
        print(text, end="\n\n", flush=True)


def _check(parser: argparse.ArgumentParser, export: str | None) -> int:
    from .system import doctor, environment  # imports torch only when asked to check

    folder = os.path.dirname(os.path.abspath(export)) if export else ""
    if export and (os.path.isdir(export) or not os.access(folder, os.W_OK | os.X_OK)):
        # before the checks (a smoke test of AMP among them), not after
        parser.error(f"cannot write {export}: give a file in a folder that exists and is "
                     "writable")
    report = doctor.run_checks()
    print(checks_text(report.checks))
    if export:
        try:
            path = environment.export_environment(export)
        except OSError as e:
            parser.error(f"cannot write {export}: {e}")
        print(f"Wrote {path}")
        print(f"Rebuild it elsewhere with: conda env create -f {os.path.basename(path)}")
    return 0 if report.ok else 1
