"""The PyTorch "Automatic Mixed Precision examples" loops, written out by hand.

They are the oracle: %%amp_train and amp_magics.train must end bit-identical to them.
"""
import torch
import torch.nn.functional as F


def make_model(seed=0, hidden=16):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 3))


def make_data(n=12, batch=4, overflow_at=(), seed=1):
    """Batches of (x, y); batches listed in `overflow_at` overflow fp16 in the forward pass."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        x = torch.randn(batch, 8, generator=g)
        if i in overflow_at:
            x = x * 1e6
        data.append((x, torch.randint(0, 3, (batch,), generator=g)))
    return data


def plain(model, opt, data, epochs=1, dtype=torch.float16, scaler=None):
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(model(x), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()


def fp32(model, opt, data, epochs=1):
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()


def clipping(model, opt, data, scaler, max_norm, params=None):
    """`params`: what to clip (default all of the model's parameters)."""
    for x, y in data:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters() if params is None else params,
                                       max_norm)
        scaler.step(opt)
        scaler.update()


def accumulation(model, opt, data, scaler, iters_to_accumulate):
    for i, (x, y) in enumerate(data):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
            loss = loss / iters_to_accumulate
        scaler.scale(loss).backward()
        if (i + 1) % iters_to_accumulate == 0:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()


def two_optimizers(model, opt0, opt1, data, scaler):
    for x, y in data:
        opt0.zero_grad()
        opt1.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt0)
        scaler.step(opt1)
        scaler.update()


def assert_same_state(a, b):
    """Parameters, buffers and optimizer state bit-identical (torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b
