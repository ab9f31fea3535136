"""Random flag strings for every magic the extension registers: the outcome is a result or a
UsageError, never another exception, and a UsageError never leaves the model changed.

Lines mix plausible flags (each magic's own flag names with values of the kind they take:
choices, numbers, notebook names) with abbreviations, unknown flags, quotes, unicode and noise.
Paths only ever point into a temporary folder, and every training run is cut to at most two
steps. The bugs it found in other modules are pinned by the regression tests at the end.

Deterministic: conftest's "ci" profile sets derandomize=True and no example database, so the
inputs follow from each test's name and a CI failure means the code changed. To search afresh
locally: HYPOTHESIS_PROFILE=explore python -m pytest tests/test_hostile_flags.py
"""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, find, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError
from IPython.core.magic_arguments import parse_argstring

from amp_magics.magics.diagnose import DiagnoseMagics, stop_memory_tracking
from amp_magics.magics.gpu import GpuMagics, StatusWatch
from amp_magics.magics.train import AmpMagics
from amp_magics.training.registry import runs, stop_background_runs
from recipes import make_data, make_model

BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)\n"
CLASSES = (AmpMagics, GpuMagics, DiagnoseMagics)
MAGICS = sorted((kind, name) for cls in CLASSES for kind, table in cls.magics.items()
                for name in table)
TMP = "@TMP@"  # replaced by the test's temporary folder
PATH_FLAGS = ("checkpoint", "resume", "export")

# Characters str.splitlines() breaks on would end a line magic and start Python code.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
text = st.text(st.characters(blacklist_characters=LINE_BREAKS, blacklist_categories=("Cs",)),
               max_size=10)
notebook_names = st.sampled_from(
    ["model", "optimizer", "train_loader", "val", "sched", "scaler", "one", "torch", "F", "nope",
     "model.0", "model.weight", "model.0.weight", "optimizer.state", "train_loader.x", "run",
     "1model", "mödel", "model,optimizer", ",", "In", "Out", "__builtins__"])
numbers = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "2", "-1", "2**14", "2.**16", "2**1000", "1e309", "-0.0", "1/0",
                     "0x10", "1_000", "nan", "inf", "-inf", "٣", "1e-300", "10**10",
                     str(2**63), str(2**64), str(-(2**63) - 1), "99999999999999999999999"]))
small_numbers = st.one_of(st.integers(-2, 4).map(str), st.sampled_from(["0.5", "2**14", "1e-3"]))
words = st.sampled_from(["auto", "fp16", "bf16", "fp32", "on", "off", "FP16", "0,1", "0,-1"])
anything = st.one_of(notebook_names, numbers, words, text)
plain_mostly = st.sampled_from(["{}"] * 12 + ["'{}'", '"{}"', "'{}", '"{}', "{}\\", "'{}'x"])
odd_flags = st.sampled_from(["--frobnicate", "-x", "--", "-", "---model", "--mod", "--dt", "--no",
                             "-o", "-h", "--help", "--ＭＯＤＥＬ"])
FITTING_NAMES = {
    "model": ["model", "model.0"], "optimizer": ["optimizer", "optimizer,optimizer"],
    "data": ["train_loader", "val"], "val": ["val"], "scheduler": ["sched"], "scaler": ["scaler"],
    "batch": ["one"], "output": ["run", "1x"], "name": ["r", "é 1"], "log": ["loss", "acc", "x"],
    "plot": ["run1", "r"], "sweep": ["lr=0.1,0.2", "clip=0,1", "'lr=1e-3; clip=1'", "lr="],
    "compare": ["fp32,bf16", "fp32,fp16", "fp32"],
    **{flag: [f"{TMP}/file", f"{TMP}/missing/file", TMP] for flag in PATH_FLAGS},
}


def plausible(draw, action):
    """Mostly a value of the kind the flag takes (a choice, a number, a notebook name)."""
    if draw(st.integers(0, 5)) == 3:
        return draw(anything)
    if action.choices:
        return draw(st.sampled_from(list(action.choices)))
    if action.type not in (None, str):
        return draw(st.one_of(small_numbers, small_numbers, numbers))
    return draw(st.sampled_from(FITTING_NAMES.get(action.dest, ["model", "nope", "model.0"])))


@st.composite
def flag_lines(draw, magic):
    actions = magic.parser._actions
    options = [a for a in actions if a.option_strings]
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        roll = draw(st.integers(0, 9))
        if roll < 7 and options:
            action = draw(st.sampled_from(options))
            flag = draw(st.sampled_from(action.option_strings))
            if action.nargs == 0 and roll < 6:
                parts.append(flag)
                continue
        else:  # an unknown flag, or a bare value (a positional, where the magic has one)
            flag = draw(odd_flags) if roll < 9 else ""
            action = draw(st.sampled_from(actions))
        value = draw(plain_mostly).format(plausible(draw, action))
        parts.append(f"{flag}{draw(st.sampled_from([' ', ' ', '=']))}{value}" if flag else value)
    return " ".join(parts)


def parsed(magic, line):
    try:
        return parse_argstring(magic, line)
    except (UsageError, ValueError):
        return None


def inside(path, folder) -> bool:
    return path is None or path.strip("'\"").startswith(folder)


def fresh_notebook(ip):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ip.user_ns.update(
        model=model, optimizer=optimizer, train_loader=make_data(n=4), val=make_data(n=2),
        sched=torch.optim.lr_scheduler.StepLR(optimizer, 1), scaler=torch.amp.GradScaler("cpu"),
        one=make_data(n=1)[0], F=F, torch=torch)
    return model


def outcome(ip, source):
    """Run `source`; a UsageError is fine if the model is untouched, anything else fails."""
    model = fresh_notebook(ip)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        result = ip.run(source)
    except UsageError:
        stop_background_runs()  # a run started before the error must not move it
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), source
        return
    finally:
        stop_background_runs()
        stop_memory_tracking(ip)
    if isinstance(result, StatusWatch):
        result.stop()


@pytest.fixture
def nb(ip):
    return ip


@pytest.mark.parametrize("kind, name", MAGICS)
@settings(max_examples=45, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_flags_give_a_result_or_a_usage_error(nb, tmp_path_factory, kind, name, data):
    magic = getattr(next(c for c in CLASSES if name in c.magics[kind]), name)
    line = data.draw(flag_lines(magic), label="flags")
    if name == "amp_train":
        line += " --steps 1"
    folder = str(tmp_path_factory.mktemp("flags"))
    line = line.replace(TMP, folder)
    args = parsed(magic, line)
    if args is not None:  # never touch files outside the temporary folder; keep runs short
        assume(all(inside(getattr(args, f, None), folder) for f in PATH_FLAGS))
        assume((getattr(args, "steps", None) or 0) <= 2)
    outcome(nb, f"%%{name} {line}\n{BODY}" if kind == "cell" else f"%{name} {line}")


def test_the_search_is_the_same_on_every_run():
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci":
        pytest.skip("exploring on purpose")
    assert settings().derandomize and settings().database is None


def test_every_magic_is_covered():
    assert {n for _, n in MAGICS} >= {"amp_train", "amp_stop", "gpu_status", "amp_check",
                                      "amp_memory", "amp_doctor"}
    assert ("line", "amp_memory") in MAGICS and ("cell", "amp_memory") in MAGICS


def test_strategy_reaches_real_runs_and_usage_errors():
    """The generator is not all noise: it writes lines that parse, and lines that do not."""
    fixed = settings(derandomize=True, database=None, max_examples=200,
                     suppress_health_check=list(HealthCheck))
    lines = flag_lines(AmpMagics.amp_train)
    long_and_fine = find(lines, lambda ln: ln.count("--") >= 2
                         and parsed(AmpMagics.amp_train, ln) is not None, settings=fixed)
    refused = find(lines, lambda ln: parsed(AmpMagics.amp_train, ln) is None, settings=fixed)
    assert parsed(AmpMagics.amp_train, long_and_fine) is not None
    assert parsed(AmpMagics.amp_train, refused) is None


# -- bugs this test found in other modules, kept as regression tests -----------------------------
@pytest.mark.parametrize("source", ["%amp_stop 'run1", "%%amp_train --name 'x\n" + BODY,
                                    "%gpu_status --watch '1", "%amp_check --export 'x",
                                    "%amp_runs --plot 'r", "%amp_memory --model 'model",
                                    "%%amp_doctor --batch 'one\n" + BODY])
def test_unclosed_quote_is_a_usage_error(nb, source):
    fresh_notebook(nb)
    with pytest.raises(UsageError, match="No closing quotation"):
        nb.run(source)


@pytest.mark.parametrize("flags, message", [
    ("--seed 18446744073709551616", "--seed must be"),
    ("--accum " + str(2**64), "--accum must be"),
    ("--dtype fp16 --growth-interval 99999999999999999999999", "--growth-interval must be"),
    ("--log x", "--log x: a logged value must be a number"),
    ("--log model", "--log model: a logged value must be a number")])
def test_out_of_range_flags_are_usage_errors(nb, flags, message):
    model = fresh_notebook(nb)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UsageError, match=message):
        nb.run(f"%%amp_train --steps 1 {flags}\n{BODY}")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(r.done for r in runs())  # no Run left "running" by the error


def test_checkpoint_into_an_existing_folder_is_a_usage_error(nb, tmp_path):
    """Found by the search above (`--checkpoint @TMP@`): a folder given as the checkpoint file
    trained, then failed with IsADirectoryError when saving."""
    model = fresh_notebook(nb)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UsageError):
        nb.run(f"%%amp_train --steps 1 --checkpoint {tmp_path}\n{BODY}")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(r.done for r in runs())
