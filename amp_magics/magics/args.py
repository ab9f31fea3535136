"""Flag parsing shared by every magic: IPython's magic_arguments, made strict and friendly,
and parsers generated from option specs (training.options.OptionSpec)."""
from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Callable, Sequence
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import MagicArgumentParser, parse_argstring

from ..training.options import OptionSpec


def parse(magic: Any, line: str) -> argparse.Namespace:
    """Parse `line` for `magic`; every problem is a UsageError that ends with the usage.
    Flags are never abbreviated: `--epoch 3` is an error, not `--epochs 3`."""
    magic.parser.allow_abbrev = False
    usage = magic.parser.format_usage()
    try:
        args = parse_argstring(magic, line)
    except UsageError as e:
        hint = _did_you_mean(usage, line) if "unrecognized" in str(e) else ""
        raise UsageError(f"{e}{hint}\n{usage}") from None
    except ValueError as e:  # the splitter's own errors, e.g. an unclosed quote
        raise UsageError(f"cannot split the flags ({e}): close every quote\n{usage}") from None
    # IPython splits flags without removing quotes: --sweep "lr=1e-3; clip=1" keeps them.
    for key, value in vars(args).items():
        setattr(args, key, [_unquote(v) for v in value] if isinstance(value, list)
                else _unquote(value))
    return args


def _did_you_mean(usage: str, line: str) -> str:
    """A hint for the first flag in `line` that the `usage` does not list, if one is close."""
    known = re.findall(r"--[a-z][\w-]*", usage)
    for word in line.split():
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            close = difflib.get_close_matches(flag, known, n=1)
            if close:
                return f" (did you mean {close[0]}?)"
    return ""


def _unquote(value):
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def generated_flags(*sections: tuple[Sequence[OptionSpec], bool]) -> Callable:
    """A magic's parser made from option specs, in place of @magic_arguments decorators.

    Each section is (specs, given_only): with given_only, a flag that is not given is absent
    from the parsed namespace (the option keeps the default its own definition gives); a
    notebook object's flag always has its default name (`--model model`)."""
    def decorate(func: Callable) -> Callable:
        parser = MagicArgumentParser(func.__name__, description=func.__doc__)
        parser.allow_abbrev = False
        groups: dict[str, Any] = {}
        for specs, given_only in sections:
            for spec in specs:
                if spec.flag is None:
                    continue
                if spec.option.group not in groups:
                    groups[spec.option.group] = parser.add_argument_group(spec.option.group)
                _add(groups[spec.option.group], spec, given_only)
        func.parser = parser
        func.__doc__ = parser.format_help()
        return func
    return decorate


def _add(group: Any, spec: OptionSpec, given_only: bool) -> None:
    o = spec.option
    kwargs: dict[str, Any] = {"dest": spec.name, "help": o.help.replace("%", "%%")}
    if o.magic_default is not None:
        kwargs["default"] = o.magic_default
    elif given_only:
        kwargs["default"] = argparse.SUPPRESS
    else:
        kwargs["default"] = spec.default
    if spec.kind is bool:
        kwargs["action"] = "store_false" if spec.default else "store_true"
    else:
        kwargs.update(metavar=None if o.choices else o.metavar, choices=o.choices,
                      type=_unquoting(o.parse or (spec.kind if spec.kind is not object else str)))
        if o.bare is not None:
            kwargs.update(nargs="?", const=o.bare)
    group.add_argument(*filter(None, (o.short, spec.flag)), **kwargs)


def _unquoting(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """`convert` after the quotes IPython leaves on (`--log "acc,top5"`); argparse names it
    in errors ("invalid int value")."""
    def parse(text: str) -> Any:
        return convert(_unquote(text))
    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def flag_usage(spec: OptionSpec) -> str:
    """How the README writes a flag: `--dtype auto|fp16`, `-o NAME`, `--output NAME`."""
    o = spec.option
    arg = "|".join(o.choices) if o.choices else (o.metavar or "")
    if o.bare is not None:
        arg = f"[{arg}]"
    return ", ".join(f"`{name}{' ' + arg if arg else ''}`".replace("|", "\\|")
                     for name in filter(None, (o.short, spec.flag)))


def flag_table(specs: Sequence[OptionSpec]) -> str:
    """The README's reference table of these flags, grouped as the parser groups them."""
    groups: dict[str, list[OptionSpec]] = {}
    for spec in specs:
        if spec.flag is not None:
            groups.setdefault(spec.option.group, []).append(spec)
    rows = ["| flag | meaning |", "|---|---|"]
    rows += [f"| {flag_usage(s)} | {_escaped(s.option.doc or s.option.help)} |"
             for group in groups.values() for s in group]
    return "\n".join(rows)


def _escaped(text: str) -> str:
    return text.replace("|", "\\|")  # a table cell
