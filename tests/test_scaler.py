"""Reading what GradScaler did without a sync (its private state, through _torch_compat),
and the public fallback."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import amp_magics
from amp_magics import _torch_compat
from amp_magics.training import scaler as scalers
from recipes import assert_same_state, make_data, make_model, plain


def train_fp16(data):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def step(batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    run = amp_magics.train(step, model=model, optimizer=opt, data=data, dtype="fp16",
                           progress=False)
    return model, run


def test_private_state_is_where_this_torch_keeps_it():
    data = make_data(overflow_at=(2,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "keeps GradScaler's state differently" warning
        _, run = train_fp16(data)
    assert scalers._private_state_ok is True
    assert [r["step"] for r in run.history if r["skipped"]] == [2]


def test_public_fallback_records_the_same_skips_and_trains_the_same(monkeypatch):
    data = make_data(overflow_at=(2, 7))
    model_private, private = train_fp16(data)

    # A torch whose GradScaler keeps its state elsewhere: found once, said once, then the
    # public path (get_scale before and after update) records the same skips.
    monkeypatch.setattr(scalers, "_private_state_ok", None)
    monkeypatch.setattr(_torch_compat, "keeps_step_state", lambda scaler, optimizers: False)
    with pytest.warns(RuntimeWarning, match="get_scale"):
        model_public, public = train_fp16(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once per process
        train_fp16(data)

    assert_same_state(model_public.state_dict(), model_private.state_dict())
    assert [r["skipped"] for r in public.history] == [r["skipped"] for r in private.history]
    assert [r["scale"] for r in public.history] == [r["scale"] for r in private.history]
    assert sum(r["skipped"] for r in public.history) == 2


def test_recipe_loop_and_engine_agree_on_the_scaler_state():
    data = make_data(overflow_at=(5,))
    ref_model = make_model()
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    ref_scaler = torch.amp.GradScaler("cpu")
    plain(ref_model, ref_opt, data, scaler=ref_scaler)
    model, run = train_fp16(data)
    assert_same_state(model.state_dict(), ref_model.state_dict())
    assert run.history[-1]["scale"] == ref_scaler.get_scale()


def test_snapshot_and_restore_put_the_persistent_scaler_back():
    opt = torch.optim.SGD(make_model().parameters(), lr=0.1)
    assert scalers.snapshot(opt) is None
    scaler = scalers.persistent_scaler(opt, "cpu", {"init_scale": 2.0**10})
    scaler.scale(torch.tensor(1.0))  # the scale tensor is made on first use
    saved = scalers.snapshot(opt)
    scaler.update(new_scale=4.0)
    assert scaler.get_scale() == 4.0
    scalers.restore(opt, saved)
    assert scalers.scaler_for(opt).get_scale() == 2.0**10
    scalers.restore(opt, None)
    assert scalers.scaler_for(opt) is None
