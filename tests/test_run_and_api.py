"""The Run object and the Python API without IPython."""
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import amp_magics
from amp_magics.tensors import batch_placer, batch_size, tensors_in, to_device
from amp_magics.errors import AmpUsageError
from amp_magics.precision import PrecisionError, resolve
from amp_magics.training.run import Run
from amp_magics.views.run_summary import run_html
from recipes import make_data, make_model


def quick_run(**kw):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(batch):
        x, y = batch
        return F.cross_entropy(model(x), y)
    return amp_magics.train(step, model=model, optimizer=opt, data=make_data(), progress=False,
                            **kw)


def test_history_fields_and_summary():
    run = quick_run(dtype="fp16", epochs=2)
    keys = {"step", "epoch", "loss", "scale", "skipped", "lr", "time", "samples"}
    assert all(keys <= r.keys() for r in run.history)
    assert all(isinstance(r["loss"], float) and isinstance(r["skipped"], bool)
               for r in run.history)
    times = [r["time"] for r in run.history]
    assert times == sorted(times)
    s = run.summary
    assert s["steps"] == 24 and s["skipped_steps"] == 0
    assert s["best_loss"] == min(r["loss"] for r in run.history)
    assert s["final_loss"] == run.history[-1]["loss"]
    assert s["samples_per_s"] > 0 and s["peak_memory"] > 0
    assert run in amp_magics.runs()


def test_save_and_load_round_trip(tmp_path):
    run = quick_run(dtype="fp32")
    run.history[3]["loss"] = math.nan  # non-finite values survive too
    path = run.save(tmp_path / "run.json")
    back = Run.load(path)
    assert back.name == run.name and back.status == "finished"
    assert back.history[:3] == run.history[:3] and math.isnan(back.history[3]["loss"])
    assert back.summary["steps"] == run.summary["steps"]
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temp file left behind
    (tmp_path / "other.json").write_text(json.dumps({"x": 1}))
    (tmp_path / "text.json").write_text("not json at all")
    (tmp_path / "list.json").write_text("[1, 2]")
    for name in ("other.json", "text.json", "list.json"):
        with pytest.raises(ValueError, match=f"{name} is not a saved amp_magics Run"):
            Run.load(tmp_path / name)


def test_repr_html_escapes_user_strings():
    run = quick_run(dtype="fp32", name="<img src=x onerror=alert(1)>")
    page = run_html(run)
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "steps" in repr(run) and run.name in repr(run)


def test_to_pandas():
    frame = quick_run(dtype="fp32").to_pandas()
    assert list(frame["step"]) == list(range(12))


def test_nested_batches_move_to_the_device():
    Pair = __import__("collections").namedtuple("Pair", "x y")
    batch = {"a": [torch.ones(2, 3), (torch.zeros(2), "label")], "b": Pair(torch.ones(5), 3)}
    moved = to_device(batch, torch.device("meta"))
    assert moved["a"][0].device.type == "meta" and moved["a"][1][0].device.type == "meta"
    assert moved["a"][1][1] == "label" and isinstance(moved["b"], Pair)
    assert moved["b"].x.device.type == "meta" and moved["b"].y == 3
    assert batch_size(batch) == 2 and batch_size(["no tensors"]) == 0


def test_batch_placer_keeps_batches_already_there_and_moves_the_rest():
    x, y = torch.ones(4, 3), torch.zeros(4)
    on_cpu, to_meta = batch_placer(torch.device("cpu")), batch_placer(torch.device("meta"))
    same, n = on_cpu((x, y))
    assert same[0] is x and same[1] is y and n == 4
    moved, n = to_meta((x, y))
    assert [t.device.type for t in moved] == ["meta", "meta"] and n == 4
    # what the quick test does not cover goes the general way, with the same answers
    for batch, size in [((torch.tensor(2.0), x), 1), ((x, "label"), 4), (([x], y), 4),
                        ((), 0), ({"x": x}, 4)]:
        placed, n = to_meta(batch)
        assert n == size == batch_size(batch)
        assert all(t.device.type == "meta" for t in tensors_in(placed))
    kept, n = batch_placer(torch.device("meta"), move=False)((x, y))
    assert kept[0] is x and n == 4


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("loss_of, message", [
    (lambda out: out.sum(0), "must be a scalar"),  # checked only when backward fails
    (lambda out: torch.tensor(1.0, requires_grad=True), "has no grad_fn"),  # a leaf trains nothing
])
@pytest.mark.parametrize("from_step", [0, 2])
def test_a_loss_that_is_not_one_is_named_without_torchs_error(dtype, loss_of, message,
                                                             from_step):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def step(batch):
        calls.append(1)
        x, y = batch
        out = model(x)
        return loss_of(out) if len(calls) > from_step else F.cross_entropy(out, y)
    with pytest.raises(AmpUsageError, match=message) as e:
        amp_magics.train(step, model=model, optimizer=opt, data=make_data(), dtype=dtype,
                         progress=False, name="bad_loss")
    assert e.value.__suppress_context__ or e.value.__context__ is None
    run = amp_magics.runs()[-1]
    assert run.name.startswith("bad_loss") and len(run.history) == from_step
    assert not any("during the optimizer step" in note for note in run.notes)


def test_step_function_with_step_and_epoch():
    seen = []
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(batch, step, epoch):
        seen.append((step, epoch))
        x, y = batch
        return {"loss": F.cross_entropy(model(x), y), "width": x.shape[1]}
    run = amp_magics.train(step, model=model, optimizer=opt, data=make_data(n=3), epochs=2,
                           log=["width"], progress=False)
    assert seen == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]
    assert all(r["width"] == 8.0 for r in run.history)
    # one name as a string, as the flag writes it: a name, not its letters
    run = amp_magics.train(step, model=model, optimizer=opt, data=make_data(n=3), log="width",
                           progress=False)
    assert all(r["width"] == 8.0 for r in run.history)


def test_last_short_accumulation_window_still_steps():
    run = quick_run(dtype="fp32", accum=5)  # 12 batches: windows of 5, 5, 2
    assert len(run.history) == 3 and run.total_steps == 3
    assert [r["samples"] for r in run.history] == [20, 20, 8]


def test_generator_data_is_read_once_with_a_note():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = (b for b in make_data(n=4))
    run = amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                           optimizer=opt, data=data, epochs=3, progress=False)
    assert len(run.history) == 4 and any("exhausted" in n for n in run.notes)


def test_api_usage_errors():
    with pytest.raises(AmpUsageError, match="nn.Module"):
        amp_magics.train(lambda b: b, model="net", optimizer=None, data=[1], progress=False)
    with pytest.raises(AmpUsageError, match="either your own scaler"):
        quick_run(dtype="fp16", scaler=torch.amp.GradScaler("cpu"), init_scale=4.0)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"^train\(\) missing keyword argument\(s\) data=: .*"
                                        "data=train_loader"):
        amp_magics.train(lambda b: b, model=model, optimizer=torch.optim.SGD(model.parameters()))
    with pytest.raises(TypeError, match=r"^search\(\) missing keyword argument space=: "):
        amp_magics.search(lambda b: b, model=model, optimizer=torch.optim.SGD(model.parameters()))
    with pytest.raises(TypeError, match=r"^search\(\) missing keyword argument\(s\) data=: "):
        amp_magics.search(lambda b: b, model=model, space="lr=0.1,0.2",
                          optimizer=torch.optim.SGD(model.parameters()))


def test_bf16_refused_on_a_gpu_without_it(monkeypatch):
    # Hardware boundary: no GPU here, so report a Turing card's capability.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(PrecisionError, match="bf16 needs compute capability 8.0"):
        resolve("bf16", "cuda")
    assert resolve("auto", "cuda").name == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve("auto", "cuda").name == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 1))
    assert resolve("auto", "cuda").name == "fp32"


def test_python_api_in_a_script_without_ipython():
    script = textwrap.dedent("""
        import sys, torch, torch.nn.functional as F
        import amp_magics
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(5)]
        run = amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                               optimizer=opt, data=data, dtype="fp16")
        assert run.status == "finished", run.status
        assert "IPython" not in sys.modules and "ipywidgets" not in sys.modules
        print("OK", len(run.history))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OK 5" in out.stdout
    assert "finished: 5 steps" in out.stderr  # the console progress line


# -- Ctrl-C and save= (issue 16) -------------------------------------------------------------

def ctrl_c_at(n, dtype="fp32", optimizers=1, scheduler=False, in_ipython=False, **kw):
    """train() with a real SIGINT sent to this process at step n (the engine's handler turns it
    into a stop at the step boundary), outside or inside IPython as asked."""
    import os
    import signal
    from amp_magics import api

    model = make_model()
    params = list(model.parameters())  # dealt out: each optimizer steps its own
    opts = [torch.optim.SGD(params[i::optimizers], lr=0.1) for i in range(optimizers)]

    def step(batch, step, epoch):
        if step == n:
            os.kill(os.getpid(), signal.SIGINT)
        x, y = batch
        return F.cross_entropy(model(x), y)
    sched = torch.optim.lr_scheduler.StepLR(opts[0], 5) if scheduler else None
    real = api._in_ipython
    api._in_ipython = lambda: in_ipython
    try:
        return amp_magics.train(step, model=model, optimizer=opts if optimizers > 1 else opts[0],
                                data=make_data(), dtype=dtype, scheduler=sched, progress=False,
                                **kw)
    finally:
        api._in_ipython = real


def test_ctrl_c_in_a_script_saves_then_raises_keyboard_interrupt_with_the_run(tmp_path):
    with pytest.raises(KeyboardInterrupt) as stopped:
        ctrl_c_at(3, checkpoint=str(tmp_path / "ckpt.pt"), save=tmp_path / "run.json")
    assert type(stopped.value) is KeyboardInterrupt  # exactly: only then does Python exit 130
    run = stopped.value.run
    assert run.status == "interrupted" and len(run.history) == 4
    assert str(stopped.value) == (f"{run.name} interrupted after 4 optimizer step(s); checkpoint "
                                  f"{tmp_path / 'ckpt.pt'} written at the stop; run saved to "
                                  f"{tmp_path / 'run.json'}")
    assert Run.load(tmp_path / "run.json").history == run.history
    checkpoint = torch.load(tmp_path / "ckpt.pt", map_location="cpu", weights_only=False)
    assert checkpoint["step"] == 4
    import signal
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_inside_ipython_returns_the_run():
    run = ctrl_c_at(3, in_ipython=True)
    assert run.status == "interrupted" and len(run.history) == 4


def test_a_requested_stop_returns_the_run_in_a_script():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(batch, step, epoch):
        if step == 2:
            amp_magics.runs()[-1].request_stop()  # as %amp_stop or another thread would
        return F.cross_entropy(model(batch[0]), batch[1])
    run = amp_magics.train(step, model=model, optimizer=opt, data=make_data(), progress=False)
    assert run.status == "interrupted" and len(run.history) == 3


@pytest.mark.parametrize("dtype, optimizers, scheduler, held", [
    ("fp32", 1, False, "model and optimizer"),
    ("fp16", 1, False, "model, optimizer and scaler"),
    ("fp32", 2, True, "model, optimizers and scheduler"),
])
def test_the_interrupt_note_names_what_the_run_has(dtype, optimizers, scheduler, held):
    run = ctrl_c_at(1, dtype=dtype, optimizers=optimizers, scheduler=scheduler, in_ipython=True)
    assert f"interrupted after 2 optimizer step(s): {held} are as after the last completed step" \
        in run.notes


def test_a_saved_run_gets_the_mode_open_gives_a_new_file(tmp_path):
    """Readable by a team sharing the folder where the umask says so (not mkstemp's 0600)."""
    import stat

    (tmp_path / "plain.txt").write_text("")
    quick_run(dtype="fp32", save=tmp_path / "run.json")
    mode = {name: stat.S_IMODE((tmp_path / name).stat().st_mode)
            for name in ("plain.txt", "run.json")}
    assert mode["run.json"] == mode["plain.txt"], mode


def test_save_writes_the_run_however_it_ends(tmp_path):
    run = quick_run(dtype="fp32", save=tmp_path / "out" / "done.json")
    assert Run.load(tmp_path / "out" / "done.json").status == "finished" == run.status
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def failing(batch, step, epoch):
        if step == 2:
            raise ValueError("bad batch")
        return F.cross_entropy(model(batch[0]), batch[1])
    with pytest.raises(ValueError, match="bad batch"):
        amp_magics.train(failing, model=model, optimizer=opt, data=make_data(), progress=False,
                         save=tmp_path / "failed.json")
    failed = Run.load(tmp_path / "failed.json")
    assert failed.status == "failed" and len(failed.history) == 2
    with pytest.raises(AmpUsageError, match="is a folder"):
        quick_run(dtype="fp32", save=tmp_path)


def test_a_mapping_batch_that_is_not_a_dict_is_moved_and_counted():
    """Hugging Face's BatchEncoding is a UserDict: its tensors count as a dict's do."""
    from collections import UserDict

    from amp_magics.tensors import batch_size, map_batch, tensors_in, to_device

    batch = UserDict({"x": torch.randn(4, 8), "y": torch.randint(0, 3, (4,))})
    assert batch_size(batch) == 4 and len(list(tensors_in(batch))) == 2
    moved = to_device(batch, torch.device("cpu"))
    assert type(moved) is UserDict and moved["x"] is batch["x"]
    assert map_batch({"a": [torch.zeros(0, 2), torch.zeros(3, 2)]}, lambda t: t)["a"][1].shape[0] == 3
    assert batch_size({"a": [torch.zeros(0, 2), torch.zeros(3, 2)]}) == 3  # rows, not 0

    model = make_model()
    seen = []

    def step(b):
        seen.append(type(b))
        return F.cross_entropy(model(b["x"]), b["y"])
    data = [UserDict({"x": x, "y": y}) for x, y in make_data(n=3)]
    run = amp_magics.train(step, model=model, optimizer=torch.optim.SGD(model.parameters(), 0.1),
                           data=data, dtype="fp32", progress=False)
    assert seen == [UserDict] * 3 and [r["samples"] for r in run.history] == [4, 4, 4]


def test_an_interrupt_inside_the_optimizer_step_gives_one_true_note():
    """A second Ctrl-C can land inside optimizer.step(): one note says so, none contradicts it."""
    model = make_model()

    class HalfwaySGD(torch.optim.SGD):
        calls = 0

        def step(self, closure=None):
            HalfwaySGD.calls += 1
            if HalfwaySGD.calls == 3:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].add_(1.0)  # one tensor moved already
                raise KeyboardInterrupt
            return super().step(closure)

    opt = HalfwaySGD(model.parameters(), lr=0.1)
    with pytest.raises(KeyboardInterrupt):  # a script: the Ctrl-C goes on
        amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                         optimizer=opt, data=make_data(), dtype="fp32", progress=False)
    run = amp_magics.runs()[-1]
    about_it = [n for n in run.notes if "interrupted" in n or "updated" in n]
    assert len(about_it) == 1 and run.status == "interrupted"
    assert "interrupted after 2 optimizer step(s) and during the next one, which may have " \
           "updated some parameters" in about_it[0]
