"""TrainingObjects: one claim, one state_dict, one exact snapshot of what training changes."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amp_magics.ownership import Owned
from amp_magics.training import scaler as scalers
from amp_magics.training.objects import TrainingObjects, order_generators
from recipes import assert_same_state, plain


def make_objects(user_scaler=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-3},
                             {"params": model[3].parameters(), "lr": 1e-2}])
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if user_scaler else None
    return TrainingObjects(model, (opt,), scheduler, scaler)


def loader(seed=3):
    dataset = torch.utils.data.TensorDataset(torch.randn(40, 8), torch.randint(0, 3, (40,)))
    return torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def train_a_little(objects, data, scaler=None):
    """What a finder or a sweep trial does to the objects (and the generators)."""
    model, (opt,), scheduler = objects.model, objects.optimizers, objects.scheduler
    scaler = scaler or objects.scaler
    model.train()
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scheduler.step()
    random.random(), np.random.rand()


def everything(objects, data):
    """All of the state a snapshot must restore, as comparable values."""
    model, (opt,) = objects.model, objects.optimizers
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "modes": [m.training for m in model.modules()],
            "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            "opt": opt.state_dict(), "scheduler": objects.scheduler.state_dict(),
            "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
            "order": [g.get_state() for g in order_generators(data)],
            "scaler": (objects.scaler.state_dict() if objects.scaler is not None else
                       scalers.scaler_for(opt) and scalers.scaler_for(opt).state_dict())}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key in ("state", "opt", "scheduler"):
            assert_same_state(a[key], b[key])
        elif key == "grads":
            assert [g is None for g in a[key]] == [g is None for g in b[key]]
            assert all(torch.equal(x, y) for x, y in zip(a[key], b[key]) if x is not None)
        elif key == "rng":
            assert torch.equal(a[key][0], b[key][0]) and a[key][1] == b[key][1]
            assert np.array_equal(a[key][2], b[key][2])
        elif key == "order":
            assert all(torch.equal(x, y) for x, y in zip(a[key], b[key]))
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("user_scaler", [False, True])
def test_restore_puts_back_everything_training_changed(user_scaler):
    objects, data = make_objects(user_scaler), loader()
    objects.model.eval()  # a mode that training changes
    objects.model[0].weight.grad = torch.ones_like(objects.model[0].weight)  # one grad, rest None
    before = everything(objects, data)
    snapshot = objects.snapshot(data)
    scaler = objects.scaler or scalers.persistent_scaler(objects.optimizers[0], "cpu", {})
    train_a_little(objects, data, scaler)
    snapshot.restore()
    assert_same(everything(objects, data), before)
    assert scalers.scaler_for(objects.optimizers[0]) is None  # the detour's scaler is forgotten
    # restored twice, from the same copy: a second trial starts from the same state again
    train_a_little(objects, data, scaler)
    snapshot.restore()
    assert_same(everything(objects, data), before)


def test_training_after_a_restore_equals_training_without_the_detour():
    """The next epoch's order, dropout and the weights come out as if nothing had run."""
    reference, ref_data = make_objects(), loader()
    scaler = torch.amp.GradScaler("cpu")
    torch.manual_seed(7)
    train_a_little(reference, ref_data, scaler)

    objects, data = make_objects(), loader()
    torch.manual_seed(7)
    snapshot = objects.snapshot(data)
    train_a_little(objects, data, torch.amp.GradScaler("cpu", init_scale=4.0))  # a detour
    snapshot.restore()
    train_a_little(objects, data, torch.amp.GradScaler("cpu"))
    assert_same_state(objects.model.state_dict(), reference.model.state_dict())
    assert_same_state(objects.optimizers[0].state_dict(), reference.optimizers[0].state_dict())


def test_state_dict_round_trips_into_fresh_objects():
    objects = make_objects(user_scaler=True)
    train_a_little(objects, loader())
    state = objects.state_dict()
    fresh = make_objects(user_scaler=True)
    fresh.load_state_dict(state)
    assert_same_state(fresh.model.state_dict(), objects.model.state_dict())
    assert_same_state(fresh.optimizers[0].state_dict(), objects.optimizers[0].state_dict())
    assert fresh.scheduler.state_dict() == objects.scheduler.state_dict()
    assert fresh.scaler.state_dict() == objects.scaler.state_dict()
    with pytest.raises(ValueError, match="holds 1 optimizer"):
        TrainingObjects(fresh.model, (*fresh.optimizers, fresh.optimizers[0])).load_state_dict(
            state)


@pytest.mark.parametrize("misfit, message", [
    ("groups", r"optimizer 1's parameter groups do not fit: it holds groups of \[2, 2\]"),
    ("shape", r"0.weight has shape \(16, 8\), here \(16, 5\)"),
    ("keys", r"missing \['2.bias', '2.weight'\], unexpected \['1.bias'"),
])
def test_a_state_that_does_not_fit_loads_nothing(misfit, message):
    """torch checks each object as it loads it: a misfit found in the optimizer would come
    after the weights had been overwritten."""
    state = make_objects().state_dict()
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5 if misfit == "shape" else 8, 16),
                                *([] if misfit == "keys" else [torch.nn.BatchNorm1d(16)]),
                                torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))
    params = list(model.parameters())
    groups = [{"params": params}] if misfit == "groups" else \
        [{"params": params[:2]}, {"params": params[2:]}]
    objects = TrainingObjects(model, (torch.optim.AdamW(groups),))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        objects.load_state_dict(state)
    assert_same_state(model.state_dict(), before)


def test_claim_covers_the_model_its_parameters_and_the_rest():
    objects = make_objects(user_scaler=True)
    claim = objects.claim("first")
    try:
        for other in (TrainingObjects(objects.model[0], ()),  # a submodule: its parameters
                      TrainingObjects(torch.nn.Linear(1, 1), objects.optimizers),
                      TrainingObjects(torch.nn.Linear(1, 1), (), scaler=objects.scaler)):
            with pytest.raises(Owned, match="first"):
                other.claim("second")
    finally:
        claim.release()
    objects.claim("again").release()


def test_order_generators_finds_each_once():
    shared = torch.Generator()
    dataset = torch.utils.data.TensorDataset(torch.zeros(4, 1))
    sampler = torch.utils.data.RandomSampler(dataset, generator=shared)
    data = torch.utils.data.DataLoader(dataset, sampler=sampler, generator=shared)
    assert order_generators(data) == [shared]
    assert order_generators([1, 2]) == [] and order_generators(None) == []


def test_a_parameter_only_the_optimizer_holds_is_put_back():
    """A learnable temperature handed to the optimizer beside the model: its value too."""
    model = torch.nn.Linear(4, 2)
    temperature = torch.nn.Parameter(torch.ones(()))
    opt = torch.optim.SGD([*model.parameters(), temperature], lr=0.5)
    objects = TrainingObjects(model, (opt,))
    snapshot = objects.snapshot()
    (model(torch.randn(3, 4)).sum() * temperature).backward()
    opt.step()
    assert temperature.item() != 1.0
    snapshot.restore()
    assert temperature.item() == 1.0 and temperature.grad is None
    assert all(t.device.type == "cpu" for t in snapshot.weights.values())  # host copies


def test_a_loan_lets_go_however_it_ends(monkeypatch):
    objects = make_objects()
    weight = objects.model[0].weight.detach().clone()
    with pytest.raises(ZeroDivisionError):
        with objects.borrowed("tool", loader()):
            with torch.no_grad():
                objects.model[0].weight.add_(1.0)
            1 / 0
    assert torch.equal(objects.model[0].weight, weight)  # put back
    objects.claim("free again").release()
    # the snapshot itself fails (out of memory, say): the claim is let go all the same
    from amp_magics.training import objects as objects_module

    def no_memory(*args):
        raise MemoryError("no room for the snapshot")

    monkeypatch.setattr(objects_module.Snapshot, "__init__", no_memory)
    with pytest.raises(MemoryError):
        with objects.borrowed("tool"):
            pass
    objects.claim("free again").release()


def test_a_loan_let_go_by_unloading_does_not_put_back_over_the_next_owner():
    """Unloading the extension frees every claim while a background tool may still finish its
    step; by the time it ends, the model may be another run's: it is not restored then."""
    from amp_magics.ownership import release_all

    objects = make_objects()
    with objects.borrowed("a background search", loader()):
        release_all()  # %unload_ext
        following = objects.claim("the next run")
        with torch.no_grad():
            objects.model[0].weight.fill_(3.0)  # the next owner trains it
        trained = objects.model[0].weight.detach().clone()
    assert torch.equal(objects.model[0].weight, trained)
    following.release()
