"""`amp-magics status` and `amp-magics check`: %gpu_status and %amp_check for SSH sessions."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .system import gpu
from .views.status import checks_text, status_text

_CLEAR = "\x1b[H\x1b[2J"


def _indices(text: str) -> list[int]:
    try:
        return gpu.parse_indices(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amp-magics", description="GPU status and AMP environment checks, as in the notebook magics.")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="GPUs, processes, memory and the dtype advice")
    status.add_argument("--watch", nargs="?", const=1.0, type=float, metavar="S",
                        help="redraw every S seconds (default 1) until Ctrl-C; with --json, "
                             "one JSON object per line")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("-i", "--index", type=_indices, metavar="0,2",
                        help="only these GPUs, numbered as nvidia-smi numbers them")
    check = commands.add_parser("check", help="check torch, CUDA, the driver and AMP itself")
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
        while True:
            _print_status(args.index, args.json, watching=True)
            time.sleep(args.watch)
    except ValueError as e:  # a GPU index that does not exist
        parser.error(str(e))
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # `amp-magics status --json | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush is quiet
        return 0


def _print_status(indices, as_json: bool, watching: bool) -> None:
    status = gpu.probe(indices)
    if as_json:  # watching: one object per line, a stream other tools can read
        print(json.dumps(status.to_dict(), indent=None if watching else 2), flush=True)
    elif watching and sys.stdout.isatty():
        print(_CLEAR + status_text(status), flush=True)
    else:
        print(status_text(status), end="\n\n" if watching else "\n", flush=True)


def _check(parser: argparse.ArgumentParser, export: str | None) -> int:
    from .system import doctor, environment  # imports torch only when asked to check

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
