"""--compile / compile=True: training through torch.compile(model), bit-identical to the same
compiled hand-written loop, with compile time kept apart and recompilations raising an alarm."""
import time

import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError

import amp_magics
from amp_magics.views.run_summary import summary_rows
from recipes import assert_same_state, make_data, make_model, plain

BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)"


def adam(model):
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def hand_written(data, dtype, hidden=16):
    model = make_model(hidden=hidden)
    opt = adam(model)
    scaler = torch.amp.GradScaler("cpu") if dtype == torch.float16 else None
    plain(torch.compile(model), opt, data, dtype=dtype, scaler=scaler)
    return model


@pytest.fixture
def nb(ip):
    model = make_model()
    ip.user_ns.update(model=model, optimizer=adam(model), F=F, torch=torch)
    return ip


def test_the_magic_equals_a_compiled_hand_written_loop_with_real_overflow(nb, tmp_path):
    data = make_data(n=8, overflow_at=(2,))
    nb.user_ns["train_loader"] = data
    model, cls = nb.user_ns["model"], type(nb.user_ns["model"])
    nb.run(f"%%amp_train --dtype fp16 --compile --checkpoint {tmp_path / 'c.pt'} -o run\n{BODY}")
    run = nb.user_ns["run"]
    assert [r["skipped"] for r in run.history] == [i == 2 for i in range(8)]
    assert_same_state(model.state_dict(), hand_written(data, torch.float16).state_dict())
    # the notebook's model stays the plain module, and so do the checkpoint's keys
    assert type(model) is cls and "_amp_magics_route" not in vars(model)
    saved = torch.load(tmp_path / "c.pt", weights_only=False)["model"]
    assert list(saved) == list(make_model().state_dict())
    assert run.config["settings"]["compile"] is True and run.flags_text() == "dtype=fp16 compile=True"


def test_the_api_compiles_once_per_model_and_keeps_compile_time_apart(nb):
    data = make_data(n=6)
    model = make_model(hidden=20)  # shapes no other test compiled: dynamo cannot reuse code
    opt = adam(model)

    def step(batch):
        x, y = batch
        return F.cross_entropy(model(x), y)
    first = amp_magics.train(step, model=model, optimizer=opt, data=data, dtype="bf16",
                             compile=True, progress=False)
    assert_same_state(model.state_dict(),
                      hand_written(data, torch.bfloat16, hidden=20).state_dict())
    assert first.compiles >= 1 and first.compile_seconds > 0
    assert first.history[0]["compile_s"] > 0
    assert sum(r.get("compile_s", 0) for r in first.history) == pytest.approx(
        first.compile_seconds)
    h = first.history
    assert first.rates()[1] > len(h) / h[-1]["time"]  # compiling is not in steps/s
    assert any("compile time" in label for label, _ in summary_rows(first))
    again = amp_magics.train(step, model=model, optimizer=opt, data=data, dtype="bf16",
                             compile=True, progress=False)
    assert again.compiles == 0 and again.compile_seconds == 0 and not again.alarms


def test_a_batch_of_a_new_shape_recompiles_and_raises_the_alarm(nb):
    data = make_data(n=4) + [(torch.randn(3, 8), torch.randint(0, 3, (3,)))]  # a short last one
    class Net(torch.nn.Module):  # its own forward: no other test made its batch dynamic
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.lin(x)
    model = Net()
    nb.user_ns.update(train_loader=data, model=model, optimizer=adam(model))
    nb.run(f"%%amp_train --dtype bf16 --compile --refresh 0.01 -o run\n{BODY}")
    run = nb.user_ns["run"]
    assert run.recompiles >= 1
    (alarm,) = [a for a in run.alarms if "recompiled" in a]
    assert "new shape" in alarm and "drop_last=True" in alarm
    assert run.history[-1].get("compile_s", 0) > 0  # booked on the step that recompiled


@pytest.mark.parametrize("flags, message", [
    ("--compile-mode fastest", "choose one of default, reduce-overhead"),
    ("--compile --nproc 2", "--compile with --nproc is not supported yet"),
    ("--compile --model compiled", "already compiled"),
])
def test_what_compile_refuses(nb, flags, message):
    nb.user_ns.update(train_loader=make_data(), compiled=torch.compile(nb.user_ns["model"]))
    with pytest.raises(UsageError, match=message):
        nb.run(f"%%amp_train {flags}\n{BODY}")


def test_compare_reports_compile_time_apart_from_the_step_time(nb):
    model = make_model(hidden=24)  # shapes no other test compiled: dynamo cannot reuse code
    nb.user_ns.update(train_loader=make_data(n=6), model=model, optimizer=adam(model))
    nb.run(f"%%amp_train --compare fp32,bf16 --steps 6 --compile -o showdown\n{BODY}")
    showdown = nb.user_ns["showdown"]
    assert all(r["compile s"] > 0 and r["median step ms"] > 0 for r in showdown.rows())
    # bf16 compiles anew (autocast is part of the guards): expected, not a recompile alarm
    assert not [a for run in showdown.runs.values() for a in run.alarms if "recompiled" in a]


def test_a_python_number_that_changes_every_step_is_named_with_its_fix(nb):
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 5)  # a shape no other test compiled

        def forward(self, x, s):
            return self.lin(x) * s
    torch.manual_seed(0)
    model = Scaled()
    nb.user_ns.update(train_loader=make_data(n=4), model=model, optimizer=adam(model))
    nb.run("%%amp_train --dtype fp32 --compile --refresh 0.01 -o run\n"
           "x, y = batch\nloss = F.cross_entropy(model(x, 1.0 + step * 0.1)[:, :3], y)")
    (alarm,) = [a for a in nb.user_ns["run"].alarms if "recompiled" in a]
    assert "s == 1.0" in alarm and "pass it as a tensor" in alarm and "#" not in alarm


def test_validation_and_a_warm_cache_do_not_hide_or_invent_recompiles(nb):
    """Validation compiles anew (eval, no_grad): expected, no alarm. A re-run whose first
    step needs nothing new still alarms on a recompile later in the run."""
    class Net(torch.nn.Module):  # its own forward: dynamo's state for it starts empty
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.lin(x)
    model = Net()
    nb.user_ns.update(train_loader=make_data(n=4), val_loader=make_data(n=2, seed=5),
                      model=model, optimizer=adam(model))
    nb.run(f"%%amp_train --dtype bf16 --compile --val val_loader --epochs 2 -o run\n{BODY}")
    run = nb.user_ns["run"]
    assert run.compiles >= 1 and not run.alarms  # validation may compile anew: expected
    short = (torch.randn(3, 8), torch.randint(0, 3, (3,)))
    nb.user_ns["train_loader"] = make_data(n=4) + [short]
    nb.run(f"%%amp_train --dtype bf16 --compile --refresh 0.01 -o again\n{BODY}")
    again = nb.user_ns["again"]
    assert again.history[0].get("compile_s", 0) == 0  # the cache served the first step
    assert again.recompiles >= 1 and [a for a in again.alarms if "new shape" in a]


class WhileCompiling(amp_magics.View):
    """What the views see before the first step has compiled."""

    def __init__(self):
        self.clock = []

    def on_refresh(self, run):
        if run.compiling:
            self.clock.append((run.wall_time, len(run.memory), len(run.history)))


def test_the_clock_runs_and_memory_is_sampled_while_the_first_step_compiles():
    model = make_model(hidden=22)
    seen = WhileCompiling()

    def step(batch, step, epoch):
        if step == 0:  # a first step that takes its time, as compiling does (a warm cache
            time.sleep(0.6)  # of dynamo's can make the compile itself quick)
        return F.cross_entropy(model(batch[0]), batch[1])
    run = amp_magics.train(step, model=model, optimizer=adam(model), data=make_data(n=4),
                           dtype="bf16", compile=True, refresh_seconds=0.1, observers=[seen])
    assert len(seen.clock) >= 3, seen.clock
    times = [t for t, _, _ in seen.clock]
    assert times == sorted(times) and times[-1] > times[0]  # the elapsed time runs on
    assert all(steps == 0 for _, _, steps in seen.clock)
    during = [m for m in run.memory if m["time"] < run.history[0]["time"]]
    assert len(during) >= 3 and during[0]["time"] < 0.5  # the memory chart starts at 0 s
    assert not run.compiling and run.status == "finished"
