"""%%amp_train in a real IPython shell: IPython pipeline, namespaces, errors, interrupts."""
import os
import re
import signal
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError

import readme_flags
from amp_magics.magics.args import parse
from amp_magics.magics.diagnose import DiagnoseMagics
from amp_magics.magics.train import AmpMagics
from recipes import assert_same_state, fp32, make_data, make_model

BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)\n"


@pytest.fixture
def nb(ip):
    """A notebook with model, optimizer and train_loader defined, as a user would."""
    model = make_model()
    ip.user_ns.update(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      train_loader=make_data(), F=F, torch=torch)
    return ip


def reference_after(steps, data=None):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fp32(model, opt, (data or make_data())[:steps])
    return model


def test_percent_lines_run_through_ipython(nb):
    calls = []
    nb.register_magic_function(lambda line: calls.append(line), "line", "count_me")
    nb.run(f"%%amp_train --dtype fp32\n%count_me hi\n{BODY}")
    assert calls == ["hi"] * 12


def test_traceback_shows_the_cells_own_lines(nb, capsys):
    cell = "%%amp_train --dtype fp32\nx, y = batch\nboom = 1 / (step - 2)\n" + BODY
    with pytest.raises(ZeroDivisionError):
        nb.run(cell)
    shown = capsys.readouterr().out
    assert "boom = 1 / (step - 2)" in shown
    assert "line 3" in shown
    assert "engine.py" not in shown and "magics.py" not in shown


def test_body_names_stay_private_except_logged(nb):
    nb.run("%%amp_train --dtype fp32 --log acc -o run\n"
           "x, y = batch\nout = model(x)\nacc = (out.argmax(1) == y).float().mean()\n"
           "loss = F.cross_entropy(out, y)\n")
    ns = nb.user_ns
    assert "out" not in ns and "x" not in ns and "loss" not in ns and "batch" not in ns
    assert isinstance(ns["acc"], torch.Tensor)
    history = ns["run"].history
    assert all(0.0 <= r["acc"] <= 1.0 for r in history)


def test_step_and_epoch_are_bound(nb):
    nb.run("%%amp_train --dtype fp32 --epochs 2 --log epoch_seen,step_seen -o run\n"
           "epoch_seen = epoch\nstep_seen = step\n" + BODY)
    history = nb.user_ns["run"].history
    assert [r["step_seen"] for r in history] == list(range(24))
    assert [r["epoch_seen"] for r in history] == [0] * 12 + [1] * 12


def test_a_model_frozen_whole_is_named_as_the_cause(nb):
    nb.user_ns["model"].requires_grad_(False)
    with pytest.raises(UsageError, match="every parameter the optimizers step is frozen"):
        nb.run(f"%%amp_train\n{BODY}")


@pytest.mark.parametrize("flags, message", [
    ("--model net", "no variable named 'net'"),
    ("--model train_loader", "not an nn.Module"),
    ("--optimizer model", "not an optimizer"),
    ("--model adam", "--model adam is an Adam, not an nn.Module"),
    ("--data model", "a model, not an iterable of batches"),
    ("--data optimizer", "not an iterable of batches"),
    ("--epochs 0", "--epochs must be a positive"),
    ("--steps -3", "--steps must be a positive"),
    ("--accum 0", "--accum must be a positive"),
    ("--clip -1", "--clip must be a positive max gradient norm"),
    ("--clip 0", r"no clipping\), got 0"),
    ("--dtype fp8", "invalid choice"),
    ("--frobnicate 3", "unrecognized arguments: --frobnicate 3\n"),
    ("--epoch 2", r"unrecognized arguments: --epoch 2 \(did you mean --epochs\?\)"),
    ("--init-scale banana", "invalid number value"),
    ("--init-scale 2**14 --dtype fp32", "scaler settings only apply"),
    ("--init-scale -4 --dtype fp16", "--init-scale must be positive"),
    ("--data empty", "empty"),
    ("--scheduler model", "not an LR scheduler"),
    ("--optimizer optimizer,optimizer", "the same optimizer, given twice"),
    ('--sweep ""', "--sweep is empty"),
])
def test_bad_flags_give_usage_errors(nb, flags, message):
    nb.user_ns["empty"] = []
    nb.user_ns["adam"] = torch.optim.Adam(nb.user_ns["model"].parameters())
    before = {k: v.clone() for k, v in nb.user_ns["model"].state_dict().items()}
    with pytest.raises(UsageError, match=message):
        nb.run(f"%%amp_train {flags}\n{BODY}")
    assert_same_state(nb.user_ns["model"].state_dict(), before)


def test_missing_name_lists_the_candidates(nb):
    nb.user_ns["encoder"] = torch.nn.Linear(2, 2)
    with pytest.raises(UsageError) as e:
        nb.run(f"%%amp_train --model net\n{BODY}")
    assert "encoder, model" in str(e.value) and "--model NAME" in str(e.value)


@pytest.mark.parametrize("line", ["--epoch 3", "--dtyp bf16", "--no-pl", "--back"])
def test_a_prefix_of_a_flag_is_refused_not_guessed(nb, line):
    with pytest.raises(UsageError, match="unrecognized arguments"):
        nb.run(f"%%amp_train {line}\n{BODY}")
    with pytest.raises(UsageError, match="unrecognized arguments"):
        nb.run("%amp_stop --wai 1")


def test_unknown_flag_shows_usage(nb):
    with pytest.raises(UsageError) as e:
        nb.run(f"%%amp_train --frobnicate\n{BODY}")
    assert "unrecognized arguments: --frobnicate" in str(e.value)
    assert "%amp_train [--model NAME]" in str(e.value)


@pytest.mark.parametrize("body, message", [
    ("x, y = batch\nlost = F.cross_entropy(model(x), y)\n", "never assigned `loss`"),
    ("x, y = batch\nloss = F.cross_entropy(model(x), y, reduction='none')\n",
     "must be a scalar"),
    ("x, y = batch\nwith torch.no_grad():\n    loss = F.cross_entropy(model(x), y)\n",
     "has no grad_fn"),
    ("loss = 3.0\n", "must be a torch.Tensor"),
])
def test_bad_bodies_give_usage_errors(nb, body, message):
    with pytest.raises(UsageError, match=message):
        nb.run(f"%%amp_train --dtype fp32 -o run\n{body}")
    assert nb.user_ns["run"].status == "failed"


def test_the_readme_flag_table_is_generated_from_the_options():
    """The table is the options' own definitions (TrainOptions fields and the magic's flags):
    regenerate it with `python tests/readme_flags.py` when an option changes."""
    from amp_magics.magics.args import flag_table
    from amp_magics.magics.train import amp_train_flags

    start, end = readme_flags.amp_train_table()
    written = readme_flags.README.read_text().splitlines()[start:end]
    assert written == flag_table(amp_train_flags()).splitlines(), (
        "README's %%amp_train table is stale: run python tests/readme_flags.py")


@pytest.mark.parametrize("name, at_least", [
    ("amp_train", 30), ("amp_stop", 1), ("amp_runs", 2), ("amp_memory", 6), ("amp_doctor", 5)])
def test_every_flag_the_readme_documents_is_accepted(name, at_least):
    magic = next(getattr(cls, table[name]) for cls in (AmpMagics, DiagnoseMagics)
                 for table in cls.magics.values() if name in table)
    readme_flags.assert_accepted(magic, name, at_least)


def test_readme_values_mean_what_the_readme_says():
    """A few flags whose documented value is parsed, not passed through."""
    args = parse(AmpMagics.amp_train, '--init-scale 2**14 --sweep "lr=1e-3; clip=1" '
                                      "--optimizer a,b -o run --no-move")
    assert args.init_scale == 2.0**14 and args.sweep == "lr=1e-3; clip=1"
    assert args.optimizer == "a,b" and args.output == "run" and args.move is False
    assert parse(AmpMagics.amp_train, "--log a,b,").log == ("a", "b")  # names, not text
    # IPython leaves quotes on: they come off before a flag's value is parsed
    assert parse(AmpMagics.amp_train, '--log "acc, top5"').log == ("acc", "top5")
    assert parse(AmpMagics.amp_train, "--dtype 'fp16' --clip '1.5'").dtype == "fp16"
    with pytest.raises(UsageError, match="invalid int value: 'x'"):
        parse(AmpMagics.amp_train, "--accum x")
    assert parse(AmpMagics.amp_runs, "--plot first second").plot == ["first", "second"]


# Hand-written: what `%%amp_train?` must tell a user about each flag.
HELP = [("--accum", "micro-batches per optimizer step"), ("--clip", "clip_grad_norm_"),
        ("--no-move", "do not move batch tensors"), ("--init-scale", "2**14"),
        ("--resume", "continue from a --checkpoint file"), ("--background", "background thread"),
        ("--keep", "keep the best run's weights"), ("-o", "notebook variable"),
        ("--diagnose", "name the module that overflows"), ("--compare", "each precision"),
        ("--dtype", "auto picks by hardware")]


def test_question_mark_help_explains_each_flag(nb, capsys):
    nb.run("%%amp_train?\n")
    shown = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "Run the cell body as ONE training step" in shown
    options = shown[shown.index("what to train:"):]
    entries = {}  # "--flag": its help text, the lines up to the next flag joined
    for entry in re.split(r"\n  (?=-)", options)[1:]:
        flags, _, text = entry.partition("  ")
        for flag in re.findall(r"(?:^|, )(-{1,2}[\w-]+)", flags):
            entries[flag] = " ".join((flags + " " + text).split())
    for flag, meaning in HELP:
        assert meaning in entries.get(flag, ""), (flag, entries.get(flag))


def test_ctrl_c_stops_after_the_current_step(nb, capsys):
    nb.user_ns.update(os=os, signal=signal)
    nb.run("%%amp_train --dtype fp32 -o run\n"
           "if step == 3:\n    os.kill(os.getpid(), signal.SIGINT)\n" + BODY)
    run = nb.user_ns["run"]
    assert run.status == "interrupted"
    assert len(run.history) == 4  # step 3 completed, then the run ended
    assert_same_state(nb.user_ns["model"].state_dict(), reference_after(4).state_dict())
    assert "interrupted after 4" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_keyboard_interrupt_mid_step_drops_that_step(nb):
    nb.run("%%amp_train --dtype fp32 -o run\n" + BODY +
           "if step == 5:\n    raise KeyboardInterrupt\n")
    run = nb.user_ns["run"]
    assert run.status == "interrupted" and len(run.history) == 5
    assert_same_state(nb.user_ns["model"].state_dict(), reference_after(5).state_dict())
    assert all(p.grad is None for p in nb.user_ns["model"].parameters())


def test_error_in_body_keeps_the_run_and_the_kernel(nb):
    with pytest.raises(RuntimeError, match="bad batch"):
        nb.run("%%amp_train --dtype fp32 -o run\n" + BODY +
               "if step == 6:\n    raise RuntimeError('bad batch')\n")
    run = nb.user_ns["run"]
    assert run.status == "failed" and "bad batch" in run.error
    assert len(run.history) == 6
    assert_same_state(nb.user_ns["model"].state_dict(), reference_after(6).state_dict())
    nb.run(f"%%amp_train --dtype fp32 -o again\n{BODY}")  # the kernel trains again
    assert nb.user_ns["again"].status == "finished"


def test_error_in_the_data_iterator(nb):
    data = make_data()

    def batches():
        for i, b in enumerate(data):
            if i == 4:
                raise OSError("disk went away")
            yield b

    class Loader:
        def __iter__(self):
            return batches()

    nb.user_ns["train_loader"] = Loader()
    with pytest.raises(OSError, match="disk went away"):
        nb.run(f"%%amp_train --dtype fp32 -o run\n{BODY}")
    run = nb.user_ns["run"]
    assert run.status == "failed" and len(run.history) == 4
    assert_same_state(nb.user_ns["model"].state_dict(), reference_after(4).state_dict())


def test_validation_restores_each_modules_mode(nb):
    model = nb.user_ns["model"]
    model[1].eval()  # a user-frozen submodule must stay as it was
    nb.user_ns["val_loader"] = make_data(n=3, seed=9)
    nb.run("%%amp_train --dtype fp32 --epochs 2 --val val_loader --log mode -o run\n"
           "mode = float(model.training)\n" + BODY)
    run = nb.user_ns["run"]
    assert [v["epoch"] for v in run.val_history] == [0, 1]
    assert all(r["mode"] == 1.0 for r in run.history)
    assert model.training and not model[1].training
    with torch.no_grad():
        expected = sum(F.cross_entropy(model(x), y).item() for x, y in make_data(n=3, seed=9)) / 3
    assert run.val_history[-1]["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_scheduler_is_stepped_like_the_recipe(nb):
    model = nb.user_ns["model"]
    opt = nb.user_ns["optimizer"]
    nb.user_ns["sched"] = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    nb.run(f"%%amp_train --dtype fp32 --scheduler sched -o run\n{BODY}")
    lrs = [r["lr"] for r in nb.user_ns["run"].history]
    assert lrs == [0.1] * 4 + [0.05] * 4 + [0.025] * 4

    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=4, gamma=0.5)
    for x, y in make_data():
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        ref_sched.step()
    assert_same_state(model.state_dict(), ref.state_dict())


def test_init_scale_expression_and_own_scaler(nb):
    nb.run(f"%%amp_train --dtype fp16 --init-scale 2**14 --steps 2 -o run\n{BODY}")
    assert nb.user_ns["run"].history[0]["scale"] == 2.0**14
    nb.user_ns["my_scaler"] = torch.amp.GradScaler("cpu", init_scale=8.0)
    nb.run(f"%%amp_train --dtype fp16 --scaler my_scaler --steps 2 -o run\n{BODY}")
    assert nb.user_ns["run"].history[0]["scale"] == 8.0


def test_overflow_storm_raises_alarms(nb):
    """A NaN storm: every step skipped, the model untouched, alarms raised, the kernel fine."""
    nb.user_ns["train_loader"] = make_data(overflow_at=range(12))
    nb.run(f"%%amp_train --dtype fp16 -o run\n{BODY}")
    run = nb.user_ns["run"]
    assert len(run.history) == 12 and all(r["skipped"] for r in run.history)
    assert run.history[-1]["scale"] == 2.0**16 / 2**11  # halved at every skipped step
    assert_same_state(nb.user_ns["model"].state_dict(), make_model().state_dict())
    text = " ".join(run.alarms)
    assert "loss is nan" in text and "steps were skipped" in text and "--dtype bf16" in text
    assert "--clip" not in text  # clipping does not change GradScaler overflow
    nb.user_ns["train_loader"] = make_data()
    nb.run(f"%%amp_train --dtype fp32 -o again\n{BODY}")
    assert nb.user_ns["again"].status == "finished"


def test_background_run_and_amp_stop(nb, capsys):
    nb.user_ns["train_loader"] = make_data(n=4)
    nb.user_ns["time"] = time
    run = nb.run(f"%%amp_train --dtype fp32 --epochs 100000 --background -o run\n"
                 f"time.sleep(0.002)\n{BODY}")
    assert run is nb.user_ns["run"] and run.status == "running"
    deadline = time.monotonic() + 10
    while len(run.history) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    nb.run("%amp_stop")
    assert run.status == "interrupted" and len(run.history) >= 3
    assert "interrupted after" in capsys.readouterr().out
    nb.run("%amp_stop")  # nothing left to stop: said, not an error
    assert "nothing to stop" in capsys.readouterr().out
    nb.run(f"%amp_stop {run.name}")
    assert f"{run.name}: already interrupted after" in capsys.readouterr().out
    with pytest.raises(UsageError, match="no run named 'nosuch'"):
        nb.run("%amp_stop nosuch")


FAILS_AT_STEP_2 = ("x, y = batch\nif step == 2{rank}:\n    raise ValueError('boom at step 2')\n"
                   "loss = F.cross_entropy(model(x), y)\n")


def test_a_failed_background_run_keeps_and_shows_its_traceback(nb, capsys):
    """A thread has nowhere to raise: the run keeps the traceback the foreground shows (the
    cell's lines, our frames left out), its notice shows it when it ends, %amp_wait prints it."""
    run = nb.run("%%amp_train --dtype fp32 --background -o run\n"
                 + FAILS_AT_STEP_2.format(rank=""))
    nb.run("%amp_wait")
    assert run.status == "failed" and run.error == "ValueError: boom at step 2"
    assert "Cell In[" in run.traceback and "----> 4     raise ValueError('boom at step 2')" \
        in run.traceback and run.traceback.endswith("ValueError: boom at step 2")
    assert "amp_magics" not in run.traceback and "threading" not in run.traceback
    assert capsys.readouterr().out.count(run.traceback) == 2  # the notice, then %amp_wait
    nb.run(f"%amp_wait {run.name}")
    assert f"already failed after 2 steps\n{run.traceback}" in capsys.readouterr().out


def test_a_notice_shown_after_the_run_failed_still_gets_its_traceback(nb, capsys, monkeypatch):
    """A run that fails at once can have ended when the cell shows its notice, before its
    thread has kept the traceback: the notice is kept and rewritten with it all the same."""
    from amp_magics.training import registry

    kept, keep = threading.Event(), AmpMagics._keep_traceback

    def held(self, run, error):
        kept.wait(60)
        keep(self, run, error)

    monkeypatch.setattr(AmpMagics, "_keep_traceback", held)
    run = nb.run("%%amp_train --dtype fp32 --background -o run\n"
                 + FAILS_AT_STEP_2.format(rank=""))
    deadline = time.monotonic() + 60
    while not run.done and time.monotonic() < deadline:
        time.sleep(0.01)
    nb.run("run")  # shown now: failed, its traceback not kept yet
    assert run.done and run.traceback is None and registry.is_background(run)
    capsys.readouterr()
    kept.set()
    nb.run("%amp_wait")
    assert run.traceback and capsys.readouterr().out.count(run.traceback) == 3  # 2 notices, wait


def test_amp_wait_tells_how_a_run_ended_before_it_was_called(nb, capsys):
    """A run that fails before %amp_wait is typed is told of by it (once), as is one that
    ended before %amp_stop; the next call has nothing left to tell."""
    from amp_magics.training import registry

    nb.run("%amp_wait")  # what earlier tests left untold
    capsys.readouterr()
    run = nb.run("%%amp_train --dtype fp32 --background -o run\n"
                 + FAILS_AT_STEP_2.format(rank=""))
    for _, done in registry.background_runs():
        done.wait(60)
    capsys.readouterr()  # the notice
    nb.run("%amp_wait")
    assert capsys.readouterr().out == f"{run.name}: failed after 2 steps\n{run.traceback}\n"
    nb.run("%amp_wait")
    assert capsys.readouterr().out == "no background run is running\n"
    nb.user_ns["train_loader"] = make_data(n=3)
    again = nb.run(f"%%amp_train --dtype fp32 --background -o again\n{BODY}")
    for _, done in registry.background_runs():
        done.wait(60)
    capsys.readouterr()
    nb.run("%amp_stop")
    assert capsys.readouterr().out == f"{again.name}: finished after 3 steps\n"
    nb.run("%amp_stop")
    assert capsys.readouterr().out == "no background run is running: nothing to stop\n"


def test_a_failed_nproc_background_run_keeps_the_ranks_traceback(nb):
    run = nb.run("%%amp_train --dtype fp32 --nproc 2 --background -o run\n"
                 + FAILS_AT_STEP_2.format(rank=" and torch.distributed.get_rank() == 1"))
    nb.run("%amp_wait --timeout 60")
    assert run.status == "failed" and run.error == "rank 1 failed"
    assert run.traceback.startswith("RankFailed: rank 1 of 2 failed:\nTraceback")
    assert "line 4" in run.traceback and "raise ValueError('boom at step 2')" in run.traceback
    assert run.traceback.endswith("ValueError: boom at step 2")


def test_amp_wait_and_amp_stop_still_wait_after_ctrl_c_in_amp_wait(nb, capsys):
    """They wait on an Event the run's thread sets last, not on Thread.join: a join that
    Ctrl-C interrupted leaves the thread looking ended for good (CPython <= 3.12)."""
    nb.user_ns.update(train_loader=make_data(n=4), time=time)
    run = nb.run(f"%%amp_train --dtype fp32 --epochs 100000 --background -o run\n"
                 f"time.sleep(0.002)\n{BODY}")
    threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)
                    ).start()
    nb.run("%amp_wait")
    assert "stopped waiting; the run goes on" in capsys.readouterr().out
    started = time.monotonic()
    nb.run("%amp_wait --timeout 0.5")
    assert time.monotonic() - started >= 0.45
    assert f"{run.name}: still running after" in capsys.readouterr().out
    nb.run("%amp_stop")
    assert run.status == "interrupted"  # ended before %amp_stop returned
    assert f"{run.name}: interrupted after" in capsys.readouterr().out


def test_checkpoint_resume_is_bit_identical(nb, tmp_path):
    """Interrupted at step 7 with a checkpoint, resumed into fresh objects: same end state."""
    dataset = torch.utils.data.TensorDataset(torch.randn(48, 8), torch.randint(0, 3, (48,)))
    body = ("x, y = batch\nloss = F.cross_entropy(F.dropout(model(x), 0.2), y)\n")

    def fresh(loader_seed=0):
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True)
        nb.user_ns.update(model=model, optimizer=opt, sched=sched, train_loader=loader)
        return model, opt

    flags = "--dtype fp16 --epochs 2 --accum 2 --scheduler sched --seed 3"
    ref_model, ref_opt = fresh()
    nb.run(f"%%amp_train {flags} -o ref\n{body}")

    fresh()
    nb.user_ns.update(os=os, signal=signal)
    ckpt = tmp_path / "ckpt.pt"
    nb.run(f"%%amp_train {flags} --checkpoint {ckpt} --every 4 -o part\n"
           "if step == 7 and epoch == 1:\n    os.kill(os.getpid(), signal.SIGINT)\n" + body)
    assert nb.user_ns["part"].status == "interrupted"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]

    model, opt = fresh()
    nb.run(f"%%amp_train {flags} --resume {ckpt} -o resumed\n{body}")
    resumed, ref = nb.user_ns["resumed"], nb.user_ns["ref"]
    assert resumed.status == "finished"
    assert_same_state(model.state_dict(), ref_model.state_dict())
    assert_same_state(opt.state_dict(), ref_opt.state_dict())
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in ref.history]
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in ref.history]


def test_resume_of_a_missing_or_foreign_file(nb, tmp_path):
    with pytest.raises(UsageError, match="no such checkpoint file"):
        nb.run(f"%%amp_train --resume {tmp_path / 'nope.pt'}\n{BODY}")
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(UsageError, match="not an amp_magics checkpoint"):
        nb.run(f"%%amp_train --resume {tmp_path / 'foreign.pt'}\n{BODY}")
    with pytest.raises(UsageError, match="--every N needs --checkpoint"):
        nb.run(f"%%amp_train --every 3\n{BODY}")
    nb.run(f"%%amp_train --steps 1 --checkpoint {tmp_path / 'good.pt'}\n{BODY}")
    whole = (tmp_path / "good.pt").read_bytes()
    for name, content in (("empty.pt", b""), ("cut.pt", whole[:len(whole) // 2]),
                          ("text.pt", b"hello\n")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UsageError, match=f"{name} is not a checkpoint: empty, cut short, or "
                                             "not written by torch.save"):
            nb.run(f"%%amp_train --resume {tmp_path / name}\n{BODY}")


def test_out_of_memory_keeps_the_kernel_usable(nb, capsys):
    """A real allocator failure at step 5: run failed, state as after step 5, advice given."""
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        nb.run("%%amp_train --dtype fp32 -o run\n" + BODY +
               "if step == 5:\n    big = torch.empty(2**60, dtype=torch.uint8)\n")
    shown = capsys.readouterr().out
    assert "big = torch.empty" in shown and "engine.py" not in shown  # freed, still hidden
    run = nb.user_ns["run"]
    assert run.status == "failed" and len(run.history) == 5
    assert_same_state(nb.user_ns["model"].state_dict(), reference_after(5).state_dict())
    assert all(p.grad is None for p in nb.user_ns["model"].parameters())
    note = " ".join(run.notes)
    assert "out of memory at step 5 with a batch of 4" in note
    assert "a batch of 2 with --accum 2" in note
    nb.run(f"%%amp_train --dtype fp32 -o again\n{BODY}")
    assert nb.user_ns["again"].status == "finished"


def test_diagnose_names_the_overflowing_module(nb):
    class Blowup(torch.nn.Module):
        def forward(self, x):
            return x * 1e5  # beyond fp16's 65504 for |x| > 0.65

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), Blowup(), torch.nn.Linear(16, 3))
    nb.user_ns.update(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    nb.run(f"%%amp_train --dtype fp16 --diagnose --steps 3 -o run\n{BODY}")
    run = nb.user_ns["run"]
    assert run.history[0]["skipped"]
    assert run.diagnosis.forward.module == "1"
    assert any(n.startswith("--diagnose: step 0 skipped. `1` (Blowup)") for n in run.notes)
    assert all(not m._forward_hooks for m in model.modules())


def test_output_name_must_be_a_python_name(nb):
    with pytest.raises(UsageError, match="not a valid Python name"):
        nb.run(f"%%amp_train -o 1x\n{BODY}")


def test_a_dataset_is_named_as_what_it_is_with_how_to_batch_it(nb):
    dataset = torch.utils.data.TensorDataset(torch.zeros(4, 8))
    nb.user_ns.update(samples=dataset, loader=torch.utils.data.DataLoader(dataset))
    with pytest.raises(UsageError) as e:
        nb.run(f"%%amp_train --data samples\n{BODY}")
    text = str(e.value)
    assert "samples is a TensorDataset" in text and "DataLoader(samples, batch_size=" in text
    assert "loader (DataLoader), samples (TensorDataset)" in text
