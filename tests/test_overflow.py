"""overflow.py and %%amp_doctor: the exact module that overflows fp16, forward and backward."""
import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError

from amp_magics.diagnostics.memory import largest_tensors
from amp_magics.diagnostics.overflow import locate_nonfinite

HOSTILE = "<img src=x onerror=alert(1)>"


class Scale(torch.nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def forward_overflow(scale=1e4, middle="2"):
    """Linear -> ReLU -> Scale -> Linear; with all-ones weights and inputs the Linear gives 8,
    which fp16 holds exactly, and Scale(1e4) makes it 80000 > 65504."""
    net = torch.nn.Sequential()
    net.add_module("0", torch.nn.Linear(8, 16))
    net.add_module("1", torch.nn.ReLU(inplace=True))
    net.add_module(middle, Scale(scale))
    net.add_module("3", torch.nn.Linear(16, 3))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
    return net


def backward_overflow():
    """Finite forward (|x| <= 0.08), but Scale(1e3) multiplies the incoming gradient (~1600
    with loss scale 2**16) to ~1.6e6, beyond fp16, before anything upstream sees it."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), Scale(1e3), torch.nn.Linear(16, 3))
    with torch.no_grad():
        net[0].weight.fill_(1e-5)
        net[0].bias.zero_()
        net[2].weight.copy_(0.1 * torch.arange(1.0, 4.0)[:, None].expand(3, 16))
        net[2].bias.zero_()
    return net


BATCH = (torch.ones(4, 8), torch.tensor([0, 1, 2, 0]))


def step_of(net):
    return lambda batch: F.cross_entropy(net(batch[0]), batch[1])


def no_hooks_left(net):
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
        assert not m._forward_hooks_with_kwargs and not m._forward_pre_hooks_with_kwargs
    for p in net.parameters():
        assert not p._backward_hooks


def test_names_the_layer_that_overflows_fp16_forward():
    net = forward_overflow()
    d = locate_nonfinite(step_of(net), net, BATCH, "fp16")
    f = d.forward
    assert (f.module, f.kind, f.tensor, f.problem) == ("2", "Scale", "output", "inf")
    assert f.inputs == (8.0, 8.0) and not f.inputs_nonfinite
    assert "`2` (Scale) overflows fp16" in d.advice and "enabled=False" in d.advice
    assert d.backward is not None  # a non-finite loss poisons every gradient...
    assert "fix the forward pass first" in repr(d)  # ...and the diagnosis says which to fix
    no_hooks_left(net)


def test_values_beyond_fp16_range_in_an_fp32_output_are_flagged():
    class ToFloat(torch.nn.Module):
        def forward(self, x):
            return x.float() * 1e5  # fp32 holds it; the next autocast op would cast it to fp16

    net = torch.nn.Sequential(torch.nn.Linear(8, 4), ToFloat())
    torch.nn.init.constant_(net[0].weight, 1.0)  # output 8 + bias, then 8e5 in fp32
    d = locate_nonfinite(lambda b: net(b[0]).sum(), net, BATCH, "fp16", scale=1)
    assert d.forward.module == "1"
    assert "beyond fp16's max 65504" in d.forward.problem


def test_names_the_layer_whose_gradient_overflows():
    net = backward_overflow()
    d = locate_nonfinite(step_of(net), net, BATCH, "fp16")
    assert d.forward is None
    b = d.backward
    assert (b.module, b.kind, b.tensor, b.problem) == ("1", "Scale", "input gradient", "inf")
    assert "--init-scale 2**14" in d.advice
    assert locate_nonfinite(step_of(net), net, BATCH, "fp16", scale=2**4).backward is None


def healthy():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_healthy_model_reports_nothing_and_the_model_is_unchanged():
    net = healthy()
    batch = (torch.randn(4, 8), BATCH[1])
    step_of(net)(batch).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    state = {k: v.clone() for k, v in net.state_dict().items()}
    d = locate_nonfinite(step_of(net), net, batch, "fp16")
    assert not d.found and d.forward is None and d.backward is None
    assert "No inf/NaN in the fp16 forward or backward" in d.advice
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    no_hooks_left(net)


def test_nan_in_the_data_is_blamed_on_the_data():
    net = forward_overflow(scale=1.0)
    x = BATCH[0].clone()
    x[0, 0] = float("nan")
    d = locate_nonfinite(step_of(net), net, (x, BATCH[1]), "bf16")
    assert d.forward.module == "0" and d.forward.inputs_nonfinite
    assert "check the batch" in d.advice


def test_hooks_removed_and_grads_restored_when_the_step_fails():
    net = forward_overflow()

    def failing(batch):
        net(batch[0])
        raise RuntimeError("user code failed")

    with pytest.raises(RuntimeError, match="user code failed"):
        locate_nonfinite(failing, net, BATCH, "fp16")
    no_hooks_left(net)
    assert all(p.grad is None for p in net.parameters())


def test_hostile_module_name_is_escaped_in_html():
    net = forward_overflow(middle=HOSTILE)
    d = locate_nonfinite(step_of(net), net, BATCH, "fp16")
    assert d.forward.module == HOSTILE and HOSTILE in repr(d)
    page = d._repr_html_()
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    holder = torch.nn.Module()
    holder.add_module(HOSTILE, torch.nn.Linear(1024, 1024))  # 4 MiB: among the largest
    top = largest_tensors({"holder": holder}, 3)  # parameter names carry the module name
    assert f"holder.{HOSTILE}.weight" in [t.name for t in top]
    assert "<img" not in top._repr_html_()


@pytest.fixture
def nb(ip):
    net = forward_overflow()
    ip.user_ns.update(model=net, train_loader=[BATCH], F=F, torch=torch, one=BATCH)
    return ip


BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)\n"


def test_doctor_cell_magic_returns_the_diagnosis(nb):
    d = nb.run("%%amp_doctor --dtype fp16\n" + BODY)
    assert d.forward.module == "2" and d.precision == "fp16" and d.loss_scale == 2**16
    assert d.auto_reason is None and "what --dtype auto" not in repr(d)
    d = nb.run("%%amp_doctor --batch one --dtype fp16 --scale 2**10\n" + BODY)
    assert d.forward.module == "2" and d.loss_scale == 2**10
    nb.user_ns.update(model=healthy(), data=[(torch.randn(4, 8), BATCH[1])])
    assert not nb.run("%%amp_doctor --dtype fp16 --data data\n" + BODY).found


def test_doctor_defaults_to_what_auto_trains_with_and_says_so(nb):
    """No --dtype: the dtype `--dtype auto` picks on the model's device (bf16 or fp32 on a CPU,
    depending on its instructions), named in the output with the reason."""
    from amp_magics.precision import resolve

    auto = resolve("auto", "cpu")
    d = nb.run("%%amp_doctor\n" + BODY)
    assert d.precision == auto.name and d.auto_reason == auto.reason
    assert (f"{auto.name} on cpu (what --dtype auto trains with here: {auto.reason})"
            in repr(d))
    # Scale(1e4) makes 80000: beyond fp16, within bf16's and fp32's range, so not found
    assert not d.found and d.loss_scale == 1
    assert "finds only genuinely non-finite values" in d.advice and "--dtype fp16" in d.advice
    nb.user_ns["model"] = forward_overflow(scale=1e39)  # beyond fp32 too: inf in any dtype
    d = nb.run("%%amp_doctor\n" + BODY)
    assert d.precision == auto.name and d.forward.module == "2" and d.forward.problem == "inf"


def test_doctor_in_fp32_says_it_finds_only_genuine_inf_nan():
    net = forward_overflow()  # 80000: an fp16 overflow, nothing in fp32
    d = locate_nonfinite(step_of(net), net, BATCH, "fp32")
    assert not d.found and d.auto_reason is None
    assert d.advice == ("No inf/NaN in the fp32 forward or backward pass for this batch. fp32 "
                        "finds only genuinely non-finite values, not where fp16 would overflow: "
                        "for that, run with --dtype fp16.")


def test_doctor_with_a_hostile_name_through_the_magic(nb):
    nb.user_ns["model"] = forward_overflow(middle=HOSTILE)
    d = nb.run("%%amp_doctor --dtype fp16\n" + BODY)
    assert d.forward.module == HOSTILE and "<img" not in d._repr_html_()


@pytest.mark.parametrize("line, message", [
    ("--scale 0", "--scale must be a positive finite"),
    ("--scale 2**1000*2**1000", "--scale must be a positive finite"),
    ("--scale lots", "invalid number value"),
    ("--batch nope", "no variable named 'nope'"),
    ("--model train_loader", "not an nn.Module"),
    ("--data model", "a model, not an iterable"),
    ("--dtype fp8", "invalid choice"),
    ("--batch 'one", "No closing quotation"),
])
def test_doctor_bad_flags_are_usage_errors(nb, line, message):
    with pytest.raises(UsageError, match=message):
        nb.run(f"%%amp_doctor {line}\n" + BODY)


def test_doctor_body_without_loss_is_a_usage_error(nb):
    with pytest.raises(UsageError, match="never assigned `loss`"):
        nb.run("%%amp_doctor\nout = model(batch[0])\n")
