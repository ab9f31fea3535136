"""Schedulers next to a loss scaler that skips steps: the recipe's default (the scheduler steps
after every optimizer step, skipped or not) without torch's false warning, and
--skip-aware-scheduler (it steps only after steps that happened), against hand-written loops."""
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError

import amp_magics
from recipes import assert_same_state, make_data, make_model

BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)"
FALSE_WARNING = "before `optimizer.step()`"
OVERFLOWS = (0, 4)  # the very first step is skipped: the case torch warns about


def setup(fused=False):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, **({"fused": True} if fused else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 0.9 ** n)
    return model, opt, sched


def hand_written(data, skip_aware, fused=False):
    """The recipe loop; skip-aware: step the scheduler only when the scale did not drop."""
    model, opt, sched = setup(fused)
    scaler = torch.amp.GradScaler("cpu")
    lrs = []
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        lrs.append(opt.param_groups[0]["lr"])
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if not skip_aware or scaler.get_scale() >= before:
            sched.step()
    return model, sched, lrs


def train(via, ip, data, fused=False, **kw):
    model, opt, sched = setup(fused)
    if via == "magic":
        ip.user_ns.update(model=model, optimizer=opt, sched=sched, train_loader=data, F=F)
        flags = " --skip-aware-scheduler" if kw.get("skip_aware_scheduler") else ""
        ip.run(f"%%amp_train --dtype fp16 --scheduler sched{flags} -o run\n{BODY}")
        run = ip.user_ns["run"]
    else:
        def step(batch):
            x, y = batch
            return F.cross_entropy(model(x), y)
        run = amp_magics.train(step, model=model, optimizer=opt, data=data, dtype="fp16",
                               scheduler=sched, progress=False, **kw)
    return model, sched, run


@pytest.mark.parametrize("via", ["magic", "api"])
def test_skip_aware_scheduler_steps_only_after_real_steps(via, ip):
    data = make_data(n=10, overflow_at=OVERFLOWS)
    ref_model, ref_sched, ref_lrs = hand_written(data, skip_aware=True)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        model, sched, run = train(via, ip, data, skip_aware_scheduler=True)
    assert [r["skipped"] for r in run.history] == [i in OVERFLOWS for i in range(10)]
    assert [r["lr"] for r in run.history] == ref_lrs
    assert [r["scheduler_stepped"] for r in run.history] == [i not in OVERFLOWS
                                                             for i in range(10)]
    assert sched.last_epoch == ref_sched.last_epoch == 8
    assert_same_state(model.state_dict(), ref_model.state_dict())
    assert not [w for w in shown if FALSE_WARNING in str(w.message)]
    assert not [n for n in run.notes if "false alarm" in n]  # nothing to explain


@pytest.mark.parametrize("via", ["magic", "api"])
def test_the_default_is_the_recipe_without_its_false_warning(via, ip):
    data = make_data(n=10, overflow_at=OVERFLOWS)
    with warnings.catch_warnings(record=True) as bare:
        warnings.simplefilter("always")
        ref_model, ref_sched, ref_lrs = hand_written(data, skip_aware=False)
    assert [w for w in bare if FALSE_WARNING in str(w.message)]  # torch does warn here
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        model, sched, run = train(via, ip, data)
    assert not [w for w in shown if FALSE_WARNING in str(w.message)]
    assert [r["lr"] for r in run.history] == ref_lrs
    assert sched.last_epoch == ref_sched.last_epoch == 10
    assert_same_state(model.state_dict(), ref_model.state_dict())
    assert "scheduler_stepped" not in run.history[0]
    assert [n for n in run.notes if "false alarm" in n and "--skip-aware-scheduler" in n]


def test_no_note_when_the_first_step_was_real(ip):
    model, sched, run = train("api", ip, make_data(n=6, overflow_at=(3,)))
    assert not [n for n in run.notes if "false alarm" in n]


def test_other_warnings_of_the_first_scheduler_step_still_show(ip):
    class Noisy(torch.optim.lr_scheduler.LambdaLR):
        def step(self, *args, **kwargs):
            warnings.warn("the user's own scheduler warning", UserWarning)
            return super().step(*args, **kwargs)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = Noisy(opt, lambda n: 1.0)
    with pytest.warns(UserWarning, match="the user's own scheduler warning"):
        amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                         optimizer=opt, data=make_data(n=2, overflow_at=(0,)), dtype="fp16",
                         scheduler=sched, progress=False)


def test_fused_optimizers_are_skip_aware_too(ip):
    """A fused optimizer is always called and skips on the device: found_inf is read."""
    data = make_data(n=8, overflow_at=OVERFLOWS)
    try:
        ref_model, ref_sched, ref_lrs = hand_written(data, skip_aware=True, fused=True)
    except RuntimeError as e:  # a torch build without fused Adam on the CPU
        pytest.skip(f"fused Adam unavailable here: {e}")
    model, sched, run = train("api", ip, data, fused=True, skip_aware_scheduler=True)
    assert [r["lr"] for r in run.history] == ref_lrs
    assert sched.last_epoch == ref_sched.last_epoch == 6
    assert_same_state(model.state_dict(), ref_model.state_dict())


def test_hooks_are_removed_when_the_run_ends(ip):
    model, sched, run = train("api", ip, make_data(n=3), skip_aware_scheduler=True)
    assert not sched.optimizer._optimizer_step_post_hooks


@pytest.mark.parametrize("scheduler, message", [
    (None, "needs a scheduler"),
    ("plateau", "does not apply to ReduceLROnPlateau"),
    ("other", "drives an optimizer that is not trained here"),
])
def test_skip_aware_scheduler_refuses_what_it_cannot_do(ip, scheduler, message):
    model, opt, _ = setup()
    other = torch.optim.SGD(make_model().parameters(), lr=0.1)
    ip.user_ns.update(model=model, optimizer=opt, train_loader=make_data(), F=F,
                      plateau=torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
                      other=torch.optim.lr_scheduler.StepLR(other, 1))
    flag = f" --scheduler {scheduler}" if scheduler else ""
    with pytest.raises(UsageError, match=message):
        ip.run(f"%%amp_train --skip-aware-scheduler{flag}\n{BODY}")


def test_a_true_warning_is_kept():
    """A scheduler of an optimizer this run does not train really is stepped first: torch's
    warning stands, and no note explains it away."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    other = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=re.escape(FALSE_WARNING)):
        run = amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                               optimizer=opt, data=make_data(n=2, overflow_at=(0,)),
                               dtype="fp16", scheduler=torch.optim.lr_scheduler.StepLR(other, 1),
                               progress=False)
    assert not [n for n in run.notes if "false alarm" in n]
