"""%%amp_train and amp_magics.train end bit-identical to the PyTorch AMP recipe loops."""
import pytest
import torch
import torch.nn.functional as F

import amp_magics
from recipes import (accumulation, assert_same_state, clipping, fp32, make_data, make_model,
                     plain, two_optimizers)

BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)\n"


def adam(model):
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def via_magic(ip, flags, model, optimizer, data, optimizer_names="optimizer"):
    ip.user_ns.update(model=model, optimizer=optimizer, train_loader=data, F=F)
    if isinstance(optimizer, (list, tuple)):
        ip.user_ns.update({f"opt{i}": o for i, o in enumerate(optimizer)})
    ip.run(f"%%amp_train --optimizer {optimizer_names} {flags} -o run\n{BODY}")
    return ip.user_ns["run"]


def via_api(model, optimizer, data, **kw):
    def step(batch):
        x, y = batch
        return F.cross_entropy(model(x), y)
    return amp_magics.train(step, model=model, optimizer=optimizer, data=data, progress=False,
                            **kw)


@pytest.fixture(params=["magic", "api"])
def trainer(request, ip):
    """Runs the same training through the magic or the Python API."""
    def run(flags, api_kwargs, model, optimizer, data):
        if request.param == "magic":
            names = "opt0,opt1" if isinstance(optimizer, list) else "optimizer"
            return via_magic(ip, flags, model, optimizer, data, names)
        return via_api(model, optimizer, data, **api_kwargs)
    return run


def test_plain_fp16_with_real_overflow(trainer):
    data = make_data(overflow_at=(2, 7))
    ref_model = make_model()
    ref_opt = adam(ref_model)
    ref_scaler = torch.amp.GradScaler("cpu")
    plain(ref_model, ref_opt, data, epochs=2, scaler=ref_scaler)

    model = make_model()
    opt = adam(model)
    run = trainer("--dtype fp16 --epochs 2", dict(dtype="fp16", epochs=2), model, opt, data)

    assert_same_state(model.state_dict(), ref_model.state_dict())
    assert_same_state(opt.state_dict(), ref_opt.state_dict())
    from amp_magics.training.scaler import scaler_for
    assert_same_state(scaler_for(opt).state_dict(), ref_scaler.state_dict())

    assert run.status == "finished" and len(run.history) == 24
    skipped = [r["step"] for r in run.history if r["skipped"]]
    assert skipped == [2, 7, 14, 19]
    for k in skipped:
        assert run.history[k + 1]["scale"] == run.history[k]["scale"] / 2
    assert run.history[0]["scale"] == 2.0**16


def test_clipping_with_unscale(trainer):
    data = make_data(overflow_at=(3,))
    ref_model, model = make_model(), make_model()
    ref_opt, opt = adam(ref_model), adam(model)
    scaler = torch.amp.GradScaler("cpu")
    clipping(ref_model, ref_opt, data, scaler, max_norm=0.5)

    run = trainer("--dtype fp16 --clip 0.5", dict(dtype="fp16", clip=0.5), model, opt, data)

    assert_same_state(model.state_dict(), ref_model.state_dict())
    assert_same_state(opt.state_dict(), ref_opt.state_dict())
    assert [r["skipped"] for r in run.history].count(True) == 1
    assert "grad_norm" in run.history[0]


def test_gradient_accumulation(trainer):
    data = make_data(n=12, overflow_at=(5,))
    ref_model, model = make_model(), make_model()
    ref_opt, opt = adam(ref_model), adam(model)
    scaler = torch.amp.GradScaler("cpu")
    accumulation(ref_model, ref_opt, data, scaler, iters_to_accumulate=3)

    run = trainer("--dtype fp16 --accum 3", dict(dtype="fp16", accum=3), model, opt, data)

    assert_same_state(model.state_dict(), ref_model.state_dict())
    assert_same_state(opt.state_dict(), ref_opt.state_dict())
    assert len(run.history) == 4
    assert [r["skipped"] for r in run.history] == [False, True, False, False]
    # The recorded loss is the mean of the window's micro-batch losses, before division.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        first = [F.cross_entropy(make_model()(x), y).float().item() for x, y in data[:3]]
    assert run.history[0]["loss"] == pytest.approx(sum(first) / 3, rel=1e-6)
    assert run.history[0]["samples"] == 12


def test_two_optimizers_one_scaler(trainer):
    data = make_data(overflow_at=(4,))
    ref_model, model = make_model(), make_model()
    ref_opts = [torch.optim.SGD(ref_model[0].parameters(), lr=0.1, momentum=0.9),
                adam(ref_model[2])]
    opts = [torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9), adam(model[2])]
    scaler = torch.amp.GradScaler("cpu")
    two_optimizers(ref_model, *ref_opts, data, scaler)

    run = trainer("--dtype fp16", dict(dtype="fp16"), model, opts, data)

    assert_same_state(model.state_dict(), ref_model.state_dict())
    for opt, ref in zip(opts, ref_opts):
        assert_same_state(opt.state_dict(), ref.state_dict())
    assert [r["step"] for r in run.history if r["skipped"]] == [4]


def test_bf16_without_scaler(trainer):
    data = make_data(n=6)
    ref_model, model = make_model(), make_model()
    ref_opt, opt = adam(ref_model), adam(model)
    plain(ref_model, ref_opt, data, dtype=torch.bfloat16)

    run = trainer("--dtype bf16", dict(dtype="bf16"), model, opt, data)

    assert_same_state(model.state_dict(), ref_model.state_dict())
    assert_same_state(opt.state_dict(), ref_opt.state_dict())
    assert run.precision == "bf16"
    assert all(r["scale"] is None and not r["skipped"] for r in run.history)


def test_fp32_is_the_plain_loop(trainer):
    data = make_data()
    ref_model, model = make_model(), make_model()
    ref_opt, opt = adam(ref_model), adam(model)
    fp32(ref_model, ref_opt, data, epochs=2)

    run = trainer("--dtype fp32 --epochs 2", dict(dtype="fp32", epochs=2), model, opt, data)

    assert_same_state(model.state_dict(), ref_model.state_dict())
    assert_same_state(opt.state_dict(), ref_opt.state_dict())
    assert run.precision == "fp32"


def test_rerun_continues_with_the_learned_scale(ip):
    """Two runs of one epoch == one recipe loop of two epochs with one scaler."""
    data = make_data(overflow_at=(1,))
    ref_model, model = make_model(), make_model()
    ref_opt, opt = adam(ref_model), adam(model)
    ref_scaler = torch.amp.GradScaler("cpu")
    plain(ref_model, ref_opt, data, epochs=2, scaler=ref_scaler)

    first = via_magic(ip, "--dtype fp16", model, opt, data)
    second = via_magic(ip, "--dtype fp16", model, opt, data)

    assert_same_state(model.state_dict(), ref_model.state_dict())
    assert second.history[0]["scale"] == first.history[-1]["scale"]
    assert first.name != second.name


def test_steps_and_seeded_shuffling(trainer):
    """--steps stops mid-epoch; --seed makes a shuffled DataLoader repeat the recipe's order."""
    dataset = torch.utils.data.TensorDataset(torch.randn(40, 8), torch.randint(0, 3, (40,)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True)
    ref_model, model = make_model(), make_model()
    ref_opt, opt = adam(ref_model), adam(model)
    torch.manual_seed(5)
    for i, (x, y) in enumerate(loader):
        if i == 7:
            break
        ref_opt.zero_grad()
        F.cross_entropy(ref_model(x), y).backward()
        ref_opt.step()

    run = trainer("--dtype fp32 --steps 7 --seed 5", dict(dtype="fp32", steps=7, seed=5),
                  model, opt, loader)

    assert_same_state(model.state_dict(), ref_model.state_dict())
    assert len(run.history) == 7 and run.total_steps == 7
