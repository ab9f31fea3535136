"""training/alarms.py: alarms for skips that persist and a collapsing loss scale, never for
GradScaler's normal search for a scale, and advice that changes overflow (never --clip)."""
import math

import torch
import torch.nn.functional as F

import amp_magics
from amp_magics.training import alarms
from recipes import make_data, make_model

OVERFLOW_ADVICE = ("--dtype bf16", "keep the overflowing module in fp32",
                   "`with torch.autocast('cpu', enabled=False):`", "`%%amp_doctor`", "--diagnose")


def rec(step, skipped, scale, loss=1.0):
    return {"step": step, "loss": loss, "scale": scale, "skipped": skipped}


def feed(records, chunk=5, device="cpu"):
    """Records in refresh-sized chunks through one Alarms, as RunBooks does: {kind: message}
    of every alarm raised, first message of each kind."""
    watch, history, raised = alarms.Alarms(device), [], {}
    for i in range(0, len(records), chunk):
        new = records[i:i + chunk]
        history.extend(new)
        for kind, message in watch.check(new, history).items():
            raised.setdefault(kind, message)
    return raised


def search_then_clean(first=30, settled=18, clean=8):
    """GradScaler searching down from 2**first: skipped until 2**settled fits, then clean."""
    records = [rec(i, True, 2.0 ** (first - i)) for i in range(first - settled)]
    return records + [rec(len(records) + i, False, 2.0**settled) for i in range(clean)]


def test_the_search_for_a_scale_raises_nothing():
    records = search_then_clean()  # 12 skips (2**30 .. 2**19), then 8 clean steps at 2**18
    assert sum(r["skipped"] for r in records[-20:]) == 12  # what tripped the old alarm
    for chunk in (1, 3, 5, 20):
        assert feed(records, chunk) == {}


def test_skips_that_persist_after_the_search_raise_the_alarm():
    records = search_then_clean(first=16, settled=13, clean=2)  # 3 search skips, 2 clean
    for i in range(15):  # then 12 of 15 steps skipped, the scale hovering at 2**12..2**13
        records.append(rec(len(records), i % 5 != 0, 2.0 ** (12 + (i % 5 == 0))))
    assert set(feed(records)) == {"skipping"}  # raised at a refresh part-way, too
    raised = feed(records, chunk=len(records))
    assert set(raised) == {"skipping"}
    text = raised["skipping"]
    assert text.startswith("12 of the last 17 steps were skipped by the GradScaler (not counting "
                           "its initial search for a loss scale)")
    assert all(a in text for a in OVERFLOW_ADVICE) and "--clip" not in text
    # the same tail with only half of it skipped: no alarm
    half = search_then_clean(first=16, settled=13, clean=2)
    half += [rec(len(half) + i, i % 2 == 0, 2.0**12) for i in range(16)]
    assert feed(half) == {}


def test_a_non_finite_loss_skipped_from_the_first_step_is_no_search():
    """A forward-pass overflow makes every step skip whatever the scale: those skips count."""
    records = [rec(i, True, 2.0 ** (16 - i), loss=math.nan) for i in range(12)]
    raised = feed(records, chunk=4)
    assert set(raised) == {"nonfinite", "skipping"}
    assert raised["skipping"].startswith("12 of the last 12 steps were skipped")
    assert raised["nonfinite"].startswith("loss is nan at step 0: the forward pass overflowed "
                                          "fp16, or training diverged.")
    for text in raised.values():
        assert all(a in text for a in OVERFLOW_ADVICE) and "--clip" not in text
    assert "try a lower learning rate" in raised["nonfinite"]


def test_a_scale_collapsing_toward_one_raises_the_alarm_at_two():
    records = [rec(i, True, 2.0 ** (8 - i)) for i in range(7)]  # 256 .. 4
    assert feed(records) == {}
    records.append(rec(7, True, 2.0))
    raised = feed(records)
    assert set(raised) == {"scale"}
    text = raised["scale"]
    assert text.startswith("loss scale collapsed to 2 at step 7 (from 256): fp16 overflows even "
                           "with almost no loss scaling, so the GradScaler cannot help.")
    assert all(a in text for a in OVERFLOW_ADVICE) and "--clip" not in text


def test_a_low_scale_chosen_up_front_is_no_collapse_until_it_falls():
    records = [rec(i, False, 2.0) for i in range(5)]  # --init-scale 2, clean steps
    assert feed(records) == {}
    records.append(rec(5, True, 2.0))
    records.append(rec(6, False, 1.0))  # fell from the initial 2
    assert set(feed(records)) == {"scale"}


def test_without_a_scaler_a_non_finite_loss_is_divergence():
    records = [rec(0, False, None), rec(1, False, None, loss=math.inf)]
    raised = feed(records)
    assert raised == {"nonfinite": "loss is inf at step 1: training diverged, or a module's "
                                   "values went beyond this precision's range. Try a lower "
                                   "learning rate; `%%amp_doctor` or --diagnose finds the module."}


def test_check_only_reads_the_recent_tail():
    """The pure check: `settled` given, only the last RECENT records are looked at."""
    old = [rec(i, True, 2.0**10) for i in range(100)]  # long ago, all skipped
    tail = [rec(100 + i, False, 2.0**10) for i in range(alarms.RECENT)]
    history = old + tail
    assert alarms.check(tail[-1:], history, settled=0, device="cpu") == {}
    assert "skipping" in alarms.check(old[-1:], old, settled=0, device="cpu")


# --- real training ---------------------------------------------------------------------------

C = 2.0**-2.5  # d loss / d output: overflows fp16 (>= 65520) for scales >= 2**19 only


def linear_loss_run(factor, init_scale, steps=20):
    """fp16 on the CPU with GradScaler; loss = sum(factor * Linear(x)), so the gradient reaching
    the fp16 output of the Linear is exactly factor * scale on every step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = [(0.01 * torch.randn(4, 8),) for _ in range(steps)]
    return amp_magics.train(lambda b: (model(b[0]).float() * factor).sum(), model=model,
                            optimizer=opt, data=data, dtype="fp16", init_scale=init_scale,
                            progress=False)


def test_init_scale_2_30_settles_without_an_alarm():
    run = linear_loss_run(C, 2.0**30)
    assert [r["skipped"] for r in run.history] == [True] * 12 + [False] * 8
    assert [r["scale"] for r in run.history] == [2.0 ** (30 - i) for i in range(12)] + [2.0**18] * 8
    assert all(math.isfinite(r["loss"]) for r in run.history)
    assert run.alarms == [] and run.status == "finished"


def test_gradients_too_large_for_any_scale_collapse_it():
    run = linear_loss_run(2.0**15, 2.0**8, steps=12)  # 2**15 * 2 = 65536: overflows down to 2
    assert [r["skipped"] for r in run.history] == [True] * 8 + [False] * 4
    assert run.history[7]["scale"] == 2.0 and run.history[8]["scale"] == 1.0
    assert len(run.alarms) == 1
    assert run.alarms[0].startswith("loss scale collapsed to 2 at step 7 (from 256)")
    assert all(a in run.alarms[0] for a in OVERFLOW_ADVICE) and "--clip" not in run.alarms[0]


def test_a_forward_overflow_on_every_step_collapses_the_scale():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = make_data(n=10, overflow_at=range(10))  # inputs * 1e6: the forward overflows fp16
    run = amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                           optimizer=opt, data=data, dtype="fp16", init_scale=2.0**8,
                           progress=False)
    assert all(r["skipped"] and not math.isfinite(r["loss"]) for r in run.history)
    assert [r["scale"] for r in run.history] == [2.0 ** (8 - i) for i in range(10)]
    collapse = [a for a in run.alarms if a.startswith("loss scale collapsed to 2 at step 7")]
    assert len(collapse) == 1 and all(a in collapse[0] for a in OVERFLOW_ADVICE)
    assert not any("--clip" in a for a in run.alarms)
    assert len(run.alarms) == 3  # and the non-finite loss, and the skips
