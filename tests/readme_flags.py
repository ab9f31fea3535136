"""The flags README.md documents for each magic, read from its reference tables, with a value
of the documented kind for each, so a test can parse `flag value` with the magic's own parser.

The README is the contract a user reads; the parsers are generated from decorators. Checking the
parser's help against the decorators proves nothing; checking that every flag the README
promises is accepted by the parser, and sets what it says, does.
"""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

# A placeholder in the README's flag column -> a value of that kind for the parser.
PLACEHOLDERS = {
    "NAME": "net", "NAME[,NAME]": "opt1,opt2", "NAME NAME ...": "first second",
    "N": "3", "K": "2", "X": "2.0", "NORM": "1.0", "S": "0.5", "PATH": "ckpt.pt",
    "SPEC": '"lr=1e-3,1e-2"', "PRECISIONS": "fp32,bf16", "a,b": "acc,top5", "0,2": "0,2",
    "MODE": "default", "START,END": "1e-4,1", "MAX": "64", "SIZE": "2GiB", "PCT": "80%",
}


def _cells(row: str) -> list[str]:
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def _usages(cell: str) -> list[str]:
    return [u.replace("\\|", "|") for u in re.findall(r"`([^`]+)`", cell) if u.startswith("-")]


def documented(magic: str) -> list[tuple[str, str | None, list[str]]]:
    """(flag, usage as written, values to try) for each flag the README gives `magic`.

    values: [] for a switch, several for a choice (`auto|fp16`), [None, v] for an optional
    value (`--watch [S]`).
    """
    lines = README.read_text().splitlines()
    if magic == "amp_train":  # its own table: `flag ARG` | meaning
        start = lines.index("### `%%amp_train` reference")
        rows = [ln for ln in lines[start:] if ln.startswith("| `-")]
        usages = [u for row in rows for u in _usages(_cells(row)[0])]
    else:  # the table of the other magics: `%name` | flags, written inside the prose
        rows = [ln for ln in lines if re.match(rf"\| `%%?{magic}[` ]", ln)]
        usages = [u for row in rows for u in _usages(_cells(row)[1])]
    found = []
    for usage in usages:
        flag, _, arg = usage.partition(" ")
        arg = arg.strip()
        if not arg:
            values = []
        elif arg.startswith("[") and arg.endswith("]"):
            values = [None, PLACEHOLDERS[arg[1:-1]]]
        elif "|" in arg:  # choices, or a placeholder or a word (`N|auto`)
            values = [PLACEHOLDERS.get(v, v) for v in arg.split("|")]
        else:
            assert arg in PLACEHOLDERS, f"README: {usage!r}: add a value for {arg!r} to the test"
            values = [PLACEHOLDERS[arg]]
        found.append((flag, usage, values))
    return found


def assert_accepted(magic, name: str, at_least: int):
    """Every flag the README documents for %name exists in the magic's parser, is accepted
    with a value of the documented kind, and changes what the magic receives."""
    from amp_magics.magics.args import parse  # the magics' own strict parsing

    flags = documented(name)
    assert len(flags) >= at_least, f"read only {flags} from the README for %{name}"
    defaults = parse(magic, "")
    for flag, usage, values in flags:
        action = magic.parser._option_string_actions.get(flag)
        assert action is not None, f"README documents `{usage}`; %{name} has no {flag}"
        for value in values or [None]:
            args = parse(magic, flag if value is None else f"{flag} {value}")
            got = getattr(args, action.dest)
            if action.choices:
                assert got == value, (usage, got)
            elif not values:
                assert got is action.const, (usage, got)  # a switch (--no-move: False)
            else:  # a flag not given may be absent (the option keeps its own default)
                assert got not in (None, getattr(defaults, action.dest, None)), (usage, value, got)


def amp_train_table() -> tuple[int, int]:
    """The lines [start, end) of the README's %%amp_train flag table."""
    lines = README.read_text().splitlines()
    start = lines.index("### `%%amp_train` reference")
    start = next(i for i in range(start, len(lines)) if lines[i].startswith("| flag |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return start, end


def write_amp_train_table() -> None:
    """Regenerate the table from the options' definitions: python tests/readme_flags.py"""
    from amp_magics.magics.args import flag_table
    from amp_magics.magics.train import amp_train_flags

    lines = README.read_text().splitlines()
    start, end = amp_train_table()
    lines[start:end] = flag_table(amp_train_flags()).splitlines()
    README.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_amp_train_table()
