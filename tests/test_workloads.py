"""Real workloads' edges: streaming data, frozen layers with --clip, failing schedulers, the
gradients a run leaves, compiled models' checkpoints."""
import math

import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError

import amp_magics
from amp_magics.errors import AmpUsageError
from recipes import assert_same_state, clipping, make_data, make_model

BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)"


class Stream(torch.utils.data.IterableDataset):
    """Samples streamed from a generator, sharded across DataLoader workers by the dataset
    itself (as webdataset and HF streaming datasets do)."""

    def __init__(self, n=48, seed=3):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        start, step = (info.id, info.num_workers) if info else (0, 1)
        for i in range(start, len(self.x), step):
            yield self.x[i], self.y[i]


def stream_loader(workers=2):
    return torch.utils.data.DataLoader(Stream(), batch_size=4, num_workers=workers)


def hand_loop(model, opt, data, epochs=1, dtype=torch.bfloat16):
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()


@pytest.mark.parametrize("via", ["magic", "api"])
def test_streaming_dataloader_with_workers_trains_exactly(ip, via):
    loader = stream_loader()
    with pytest.raises(TypeError):
        len(loader)  # what crashed the emptiness check before
    model, ref = make_model(), make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    hand_loop(ref, ref_opt, stream_loader(), epochs=2)
    if via == "magic":
        ip.user_ns.update(model=model, optimizer=opt, train_loader=loader, F=F)
        ip.run(f"%%amp_train --dtype bf16 --epochs 2 -o run\n{BODY}")
        run = ip.user_ns["run"]
    else:
        run = amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                               optimizer=opt, data=loader, dtype="bf16", epochs=2,
                               progress=False)
    assert run.status == "finished" and len(run.history) == 24
    assert run.total_steps is None and run.steps_per_epoch is None  # no ETA for a stream
    assert_same_state(model.state_dict(), ref.state_dict())


def frozen_backbone():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU())
    head = torch.nn.Linear(64, 3)
    model = torch.nn.Sequential(backbone, head)  # backbone still requires grad
    return model, head, torch.optim.SGD(head.parameters(), lr=0.5)


def test_clip_with_fp16_clips_what_the_optimizer_steps(ip):
    data = make_data(n=8)
    results = {}
    for dtype in ("fp16", "bf16"):
        model, head, opt = frozen_backbone()
        before = head.weight.detach().clone()
        ip.user_ns.update(model=model, optimizer=opt, train_loader=data, F=F)
        ip.run(f"%%amp_train --dtype {dtype} --clip 1.0 -o run\n{BODY}")
        run = ip.user_ns["run"]
        results[dtype] = (run, (head.weight.detach() - before).norm().item())
    (fp16, moved16), (bf16, moved_bf) = results["fp16"], results["bf16"]
    norms16 = [r["grad_norm"] for r in fp16.history]
    norms_bf = [r["grad_norm"] for r in bf16.history]
    assert all(n < 10 for n in norms16)  # unscaled, not ~32,000
    assert norms16 == pytest.approx(norms_bf, rel=0.1)
    assert moved16 == pytest.approx(moved_bf, rel=0.1)  # the head learns as in bf16
    assert any("no optimizer steps them" in n for n in fp16.notes)

    # ...and exactly what the recipe computes when it clips the optimizer's parameters
    model, head, opt = frozen_backbone()
    clipping(model, opt, data, torch.amp.GradScaler("cpu"), 1.0, params=list(head.parameters()))
    model_fp16 = ip.user_ns["model"]  # the last run was bf16: train the fp16 one again
    model2, head2, opt2 = frozen_backbone()
    ip.user_ns.update(model=model2, optimizer=opt2)
    ip.run(f"%%amp_train --dtype fp16 --clip 1.0\n{BODY}")
    assert_same_state(model2.state_dict(), model.state_dict())
    assert model_fp16 is not model2


def test_an_exhausted_scheduler_leaves_the_books_right(ip):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=12)
    ip.user_ns.update(model=model, optimizer=opt, sched=sched, train_loader=make_data(), F=F)
    ip.run(f"%%amp_train --dtype bf16 --scheduler sched -o run\n{BODY}")
    assert len(ip.user_ns["run"].history) == 12
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="Tried to step"):
        ip.run(f"%%amp_train --dtype bf16 --scheduler sched -o again\n{BODY}")
    again = ip.user_ns["again"]
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert changed and len(again.history) == 1  # one update happened, and it is on the books
    assert again.status == "failed"
    assert any("scheduler failed after optimizer step 0" in n for n in again.notes)


def test_a_run_frees_its_gradients_unless_asked(ip):
    model = make_model()
    ip.user_ns.update(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      train_loader=make_data(), F=F)
    ip.run(f"%%amp_train --dtype bf16 --steps 3\n{BODY}")
    assert all(p.grad is None for p in model.parameters())
    ip.run(f"%%amp_train --dtype bf16 --steps 3 --keep-grads\n{BODY}")
    assert all(p.grad is not None for p in model.parameters())
    amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                     optimizer=ip.user_ns["optimizer"], data=make_data(), steps=2,
                     progress=False)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("saved_compiled", [True, False])
def test_compiled_and_plain_models_share_checkpoints(tmp_path, saved_compiled):
    """Checkpoints carry the plain module's keys, whichever of the two was trained."""
    ckpt = tmp_path / "ckpt.pt"
    data = make_data()

    def train(compiled, **kw):
        net = make_model()
        model = torch.compile(net, backend="eager") if compiled else net
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        run = amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                               optimizer=opt, data=data, dtype="bf16", progress=False, **kw)
        return net, run

    first, run = train(saved_compiled, checkpoint=str(ckpt), steps=5)
    keys = set(torch.load(ckpt, weights_only=False)["model"])
    assert keys == set(make_model().state_dict()) and not any("_orig_mod" in k for k in keys)
    resumed, run = train(not saved_compiled, resume=str(ckpt), steps=8)
    assert run.status == "finished" and len(run.history) == 8
    straight, _ = train(False, steps=8)
    assert_same_state(resumed.state_dict(), straight.state_dict())


def checkpoint_of_two_steps(ckpt):
    """(model, optimizer, the checkpoint's contents) after 2 steps saved to `ckpt`."""
    net = make_model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    amp_magics.train(lambda b: F.cross_entropy(net(b[0]), b[1]), model=net, optimizer=opt,
                     data=make_data(), dtype="bf16", steps=2, progress=False,
                     checkpoint=str(ckpt))
    return net, opt, torch.load(ckpt, weights_only=False)


def test_an_old_checkpoint_with_compiled_keys_still_loads(tmp_path):
    ckpt = tmp_path / "old.pt"
    net, _, payload = checkpoint_of_two_steps(ckpt)
    payload["model"] = {f"_orig_mod.{k}": v for k, v in payload["model"].items()}
    torch.save(payload, ckpt)  # as earlier versions wrote it for torch.compile(net)
    fresh = make_model(seed=9)
    run = amp_magics.train(lambda b: F.cross_entropy(fresh(b[0]), b[1]), model=fresh,
                           optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1),
                           data=make_data(), dtype="bf16", steps=2, resume=str(ckpt),
                           progress=False)
    assert run.status == "finished"
    assert_same_state(fresh.state_dict(), net.state_dict())


def test_checkpoint_path_checked_before_training(ip, tmp_path):
    model = make_model()
    ip.user_ns.update(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      train_loader=make_data(), F=F)
    with pytest.raises(UsageError, match="is a folder"):
        ip.run(f"%%amp_train --steps 1 --checkpoint {tmp_path}\n{BODY}")
    assert_same_state(model.state_dict(), make_model().state_dict())
    assert math.isfinite(0.0)


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("this checkpoint ran code",))


def test_a_checkpoint_holding_other_objects_is_refused_without_running_them(tmp_path, capsys):
    ckpt = tmp_path / "hostile.pt"
    net, opt, payload = checkpoint_of_two_steps(ckpt)
    payload["history"].append(_RunsCodeWhenUnpickled())
    torch.save(payload, ckpt)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(AmpUsageError, match="holds objects other than tensors"):
        amp_magics.train(lambda b: F.cross_entropy(net(b[0]), b[1]), model=net, optimizer=opt,
                         data=make_data(), dtype="bf16", steps=4, resume=str(ckpt),
                         progress=False)
    assert "ran code" not in capsys.readouterr().out
    assert_same_state(net.state_dict(), before)
