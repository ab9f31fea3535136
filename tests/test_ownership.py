"""One model, one owner: a background run cannot be disturbed from the notebook thread.

Real threads, real torch, a real IPython shell. Measurements wait for a step boundary and
leave everything as they found it; anything that would train the model too is refused.
"""
import random
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError

import amp_magics
from amp_magics.errors import AmpUsageError
from amp_magics.ownership import Owned
from recipes import assert_same_state, make_data, make_model, plain

BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)"
SLOW_BODY = "time.sleep(0.002)\n" + BODY  # long enough to be caught mid-run; same arithmetic
EPOCHS = 30


@pytest.fixture
def nb(ip, tmp_path):
    model = make_model()
    ip.user_ns.update(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      train_loader=make_data(), F=F, torch=torch, time=time)
    # A real checkpoint of another model of the same shape, for a --resume attempt.
    other = make_model(seed=5)
    ip.user_ns.update(other=other, other_opt=torch.optim.SGD(other.parameters(), lr=0.1))
    ckpt = tmp_path / "other.pt"
    ip.run(f"%%amp_train --model other --optimizer other_opt --dtype bf16 --steps 2 "
           f"--checkpoint {ckpt}\n{BODY.replace('model(', 'other(')}")
    ip.user_ns["ckpt"] = str(ckpt)
    return ip


def start_background(nb, flags="--dtype bf16", body=SLOW_BODY, epochs=EPOCHS):
    run = nb.run(f"%%amp_train {flags} --epochs {epochs} --background -o bg\n{body}")
    assert run.status == "running"
    return run


REFUSED = {
    "second run": f"%%amp_train --dtype bf16 --steps 3\n{BODY}",
    "same model by another name": f"%%amp_train --model net2 --dtype bf16 --steps 3\n{BODY}",
    "a part of the model": f"%%amp_train --model head --optimizer head_opt --steps 3\n{BODY}",
    "sweep": f'%%amp_train --dtype bf16 --steps 2 --sweep "lr=0.1,0.01"\n{BODY}',
    "compare": f"%%amp_train --steps 2 --compare fp32,bf16\n{BODY}",
    "resume": f"%%amp_train --dtype bf16 --resume {{ckpt}}\n{BODY}",
}
MEASURED = {
    "memory step": "%amp_memory --model model --optimizer optimizer --data train_loader",
    "doctor": f"%%amp_doctor --dtype fp16\n{BODY}",
    "memory cell": f"%%amp_memory --dtype bf16\n{BODY}",
}
READ_ONLY = {
    "memory without a step": "%amp_memory --model model --optimizer optimizer",
    "runs": "%amp_runs",
    "gpu status": "%gpu_status",
}


def test_nothing_disturbs_a_background_run(nb, capsys):
    nb.user_ns["net2"] = nb.user_ns["model"]
    nb.user_ns["head"] = nb.user_ns["model"][2]
    nb.user_ns["head_opt"] = torch.optim.SGD(nb.user_ns["head"].parameters(), lr=0.1)
    run = start_background(nb)
    rng = random.Random(0)
    actions = [*REFUSED.items(), *MEASURED.items(), *READ_ONLY.items()] * 3
    rng.shuffle(actions)
    done_while_running = set()
    for label, source in actions:
        if run.done:
            break
        time.sleep(rng.uniform(0, 0.02))
        before = len(run.history)
        if label in REFUSED:
            with pytest.raises(UsageError, match="being trained by") as refused:
                nb.run(source.format(ckpt=nb.user_ns["ckpt"]))
            assert "%amp_stop" in str(refused.value) and "%amp_wait" in str(refused.value)
        else:
            result = nb.run(source)
            if label == "doctor":
                assert result.precision == "fp16" and result.forward is None
            if label == "memory without a step" and not run.done:
                assert "being written by" in repr(result)
        if not run.done:
            done_while_running.add(label)
        assert len(run.history) >= before
    assert len(done_while_running) >= 6, done_while_running  # most ran mid-run, not after

    nb.run("%amp_wait")
    assert run.status == "finished" and len(run.history) == EPOCHS * 12
    ref_model = make_model()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    plain(ref_model, ref_opt, make_data(), epochs=EPOCHS, dtype=torch.bfloat16)
    assert_same_state(nb.user_ns["model"].state_dict(), ref_model.state_dict())
    assert_same_state(nb.user_ns["optimizer"].state_dict(), ref_opt.state_dict())
    assert f"{run.name}: finished after" in capsys.readouterr().out


def test_a_measurement_pauses_the_run_and_says_so(nb):
    from amp_magics import ownership
    run = start_background(nb)
    while len(run.history) < 2 and not run.done:
        time.sleep(0.01)
    claim = ownership.owner_of([nb.user_ns["model"]])
    with claim.paused("%amp_memory"):
        deadline = time.monotonic() + 30
        while run.paused_for is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert run.paused_for == "%amp_memory"  # the run stopped at its boundary and said why
        steps = -1  # the pause's own refresh drains the steps done before it, then none come
        while len(run.history) != steps and time.monotonic() < deadline:
            steps = len(run.history)
            time.sleep(0.2)
        assert len(run.history) == steps  # ...and takes no step meanwhile
        time.sleep(0.2)
        assert len(run.history) == steps
    nb.run("%amp_stop")
    assert run.paused_for is None and run.status == "interrupted"


@pytest.mark.parametrize("ending", ["stop", "failure", "interrupt"])
def test_every_ending_lets_go_of_the_model(nb, ending):
    if ending == "stop":
        start_background(nb)
        nb.run("%amp_stop")
    elif ending == "failure":
        with pytest.raises(ZeroDivisionError):
            nb.run(f"%%amp_train --dtype bf16\nboom = 1 / (step - 2)\n{BODY}")
    else:  # Ctrl-C arriving mid-step, as the kernel's interrupt does
        nb.run(f"%%amp_train --dtype bf16 -o run\nif step == 2: raise KeyboardInterrupt\n{BODY}")
        assert nb.user_ns["run"].status == "interrupted"
    nb.run(f"%%amp_train --dtype bf16 --steps 2 -o again\n{BODY}")
    assert nb.user_ns["again"].status == "finished"


def test_unloading_lets_go(nb):
    start_background(nb, epochs=100000)
    nb.run_line_magic("unload_ext", "amp_magics")
    nb.run_line_magic("load_ext", "amp_magics")
    nb.run_line_magic("config", "AmpMagics.view = 'text'")
    nb.run(f"%%amp_train --dtype bf16 --steps 2 -o again\n{BODY}")
    assert nb.user_ns["again"].status == "finished"


def test_the_python_api_from_two_threads():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    started, release = threading.Event(), threading.Event()

    def slow_step(batch):
        started.set()
        release.wait(30)
        x, y = batch
        return F.cross_entropy(model(x), y)

    box = {}
    worker = threading.Thread(target=lambda: box.update(run=amp_magics.train(
        slow_step, model=model, optimizer=opt, data=make_data(n=2), dtype="bf16",
        progress=False)))
    worker.start()
    assert started.wait(30)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(Owned, match="being trained by"):
        amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                         optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                         data=make_data(n=2), progress=False)
    assert issubclass(Owned, AmpUsageError)
    assert_same_state(model.state_dict(), before)  # refused: nothing changed
    release.set()
    worker.join(30)
    assert box["run"].status == "finished"
    amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model, optimizer=opt,
                     data=make_data(n=2), progress=False)  # free again
