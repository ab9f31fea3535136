"""memory.py and %amp_memory: exact byte counts, one measured step that leaves no trace,
live tensors by notebook name, per-cell tracking."""
import re
import time

import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError

from amp_magics.errors import AmpUsageError
from amp_magics.magics.diagnose import stop_memory_tracking
from amp_magics.diagnostics.memory import (PeakMemory, SavedForBackward, forward_sum_step,
                                          largest_tensors, model_memory, step_activation_memory)
from recipes import make_data, make_model

MiB = 2**20
BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)\n"


def adam_after_one_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 10), torch.nn.BatchNorm1d(10))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 100)).sum().backward()
    opt.step()
    return model, opt


def test_parameter_grad_optimizer_and_buffer_bytes_are_exact():
    model, opt = adam_after_one_step()
    report = model_memory(model, [opt])
    params = (100 * 10 + 10 + 10 + 10) * 4  # Linear weight + bias, BatchNorm weight + bias
    assert report.by_category["parameters"] == {"float32": params}
    assert report.by_category["gradients"] == {"float32": params}
    # Adam: exp_avg and exp_avg_sq per parameter, plus a float32 scalar `step` per parameter.
    assert report.by_category["optimizer state"] == {"float32": 2 * params + 4 * 4}
    assert report.by_category["buffers"] == {"float32": 2 * 10 * 4, "int64": 8}
    assert report.total() == 4 * params + 16 + 88
    assert "optimizer state" in repr(report) and "Adam" in repr(report)


def test_shared_parameters_are_counted_once():
    emb = torch.nn.Embedding(50, 8)
    tied = torch.nn.Linear(8, 50, bias=False)
    tied.weight = emb.weight  # the same Parameter
    copy = torch.nn.Linear(8, 50, bias=False)
    copy.weight = torch.nn.Parameter(emb.weight.detach())  # another Parameter, same storage
    view = torch.nn.Module()
    view.first_rows = torch.nn.Parameter(emb.weight.detach()[:25])  # a view into it
    model = torch.nn.ModuleList([emb, tied, copy, view])
    assert model_memory(model).by_category["parameters"] == {"float32": 50 * 8 * 4}


def test_saved_activations_are_exact_and_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.BatchNorm1d(50),
                                torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(50, 10))
    x = torch.randn(32, 100)
    model(x).sum().backward()  # grads from "earlier training"
    grads = [p.grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad_values = [g.clone() for g in grads]
    rng = torch.get_rng_state()

    report = step_activation_memory(forward_sum_step(model), model, (x,), "bf16")

    assert [s.precision for s in report.steps] == ["fp32", "bf16"]
    assert all(s.peak is not None and s.seconds > 0 for s in report.steps)
    for k, v in model.state_dict().items():  # parameters and BatchNorm statistics
        assert torch.equal(v, before[k]), k
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(g, v) for g, v in zip(grads, grad_values))
    assert torch.equal(torch.get_rng_state(), rng)  # dropout draws were rewound


def test_kept_for_backward_counts_what_autograd_saves():
    model = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10))
    report = step_activation_memory(forward_sum_step(model), model, torch.randn(32, 100), "fp32")
    # The input and weights are held anyway; the step adds the ReLU output, 32 x 50 float32
    # (saved by ReLU and by the second Linear: one storage).
    assert [s.saved for s in report.steps] == [32 * 50 * 4]
    assert "fp32 only" in report.note


def test_tensors_traced_by_torch_compile_are_not_probed(recwarn):
    """Under torch.compile the saved-tensor hook can see FakeTensors (torch versions differ in
    when); reading one's data pointer makes torch warn to the user. They hold no memory: skipped."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    model = torch.nn.Linear(4, 4)
    counter = SavedForBackward(model)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(2, 4, requires_grad=True))
        with counter.watching(x) as saved:
            torch.relu(x * 2).sum()
            torch.relu(torch.randn(2, 4, requires_grad=True)).sum()  # fake as well, in the mode
    assert saved == {} and counter.most == 0
    assert not [w for w in recwarn if "FakeTensor" in str(w.message)]


def test_cpu_step_peak_sees_a_large_activation():
    model = torch.nn.Sequential(torch.nn.Linear(64, 4096), torch.nn.ReLU(),
                                torch.nn.Linear(4096, 1))
    x = torch.randn(1024, 64)
    step = step_activation_memory(forward_sum_step(model), model, x, "fp32").steps[0]
    assert step.saved == 1024 * 4096 * 4  # 16 MiB
    # RSS is approximate, but the step's peak cannot be below what it kept nor wildly above.
    assert 15 * MiB < step.peak < 200 * MiB
    assert "approximate" in step.method


def test_rss_sampler_used_where_the_high_water_mark_cannot_be_reset(monkeypatch):
    from amp_magics.diagnostics import memory

    monkeypatch.setattr(memory, "_reset_high_water_mark", lambda: False)
    memory._release_freed_memory()  # else the block may reuse heap memory that is resident
    peak = PeakMemory("cpu").start()
    # 96 MiB: above glibc's largest dynamic mmap threshold (32 MiB), so the block is always
    # fresh pages, never heap memory an earlier test left resident.
    block = torch.ones(96 * MiB // 4)
    time.sleep(0.05)  # sampling sees spikes that last; it can miss ones shorter than the GIL switch
    del block
    measured = peak.stop()
    assert "sampled" in peak.method
    assert measured["peak"] > 72 * MiB


@pytest.fixture
def nb(ip):
    model = make_model()
    ip.user_ns.update(model=model, optimizer=torch.optim.Adam(model.parameters()),
                      train_loader=make_data(), F=F, torch=torch)
    yield ip
    stop_memory_tracking(ip)


def test_line_magic_reports_model_and_fp32_vs_amp_step(nb):
    overview = nb.run("%amp_memory --dtype bf16")
    assert overview.model.optimizers == ["Adam"]
    assert overview.model.by_category["parameters"] == {"float32": (8 * 16 + 16 + 16 * 3 + 3) * 4}
    assert [s.precision for s in overview.step.steps] == ["fp32", "bf16"]
    assert "kept for backward" in repr(overview) and "<table" in overview._repr_html_()


def test_cell_magic_measures_the_step_body(nb):
    overview = nb.run("%%amp_memory --dtype fp32\n" + BODY)
    (step,) = overview.step.steps
    assert step.precision == "fp32" and step.saved > 0
    assert all(p.grad is None for p in nb.user_ns["model"].parameters())
    assert "loss" not in nb.user_ns  # the body ran in a private namespace


def test_top_finds_big_tensors_by_notebook_name(nb):
    nb.run("big = torch.zeros(8 * 2**20)\nwide = torch.nn.Linear(1024, 2048)")
    top = nb.run("%amp_memory --top 3").top
    assert (top[0].name, top[0].bytes, top[0].shape) == ("big", 32 * MiB, (8 * 2**20,))
    assert (top[1].name, top[1].bytes) == ("wide.weight", 8 * MiB)
    assert "wide.weight" in repr(top)


def test_largest_tensors_names_optimizer_state():
    model, opt = adam_after_one_step()
    names = {t.name for t in largest_tensors({"net": model, "opt": opt}, 1000)}
    assert {"net.0.weight", "net.0.weight.grad", "net.1.running_mean",
            "opt.state[net.0.weight]['exp_avg']"} <= names


def test_track_prints_one_line_per_cell_until_off(nb, capsys):
    nb.run("%amp_memory --track on")
    nb.run("block = torch.ones(16 * 2**20)")  # 64 MiB
    nb.run("z = 1")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[amp_memory]")]
    assert len(lines) == 2
    growth = re.search(r"RSS \+([\d.]+) MiB", lines[0])
    assert growth and float(growth.group(1)) > 60
    nb.run("%amp_memory --track off")
    nb.run("z = 2")
    assert "[amp_memory]" not in capsys.readouterr().out
    assert not stop_memory_tracking(nb)


def test_unload_helper_removes_the_callbacks(nb):
    before = {e: list(nb.events.callbacks[e]) for e in ("pre_run_cell", "post_run_cell")}
    nb.run("%amp_memory --track on")
    nb.run("%amp_memory --track on")  # twice: still one pair of callbacks
    assert len(nb.events.callbacks["post_run_cell"]) == len(before["post_run_cell"]) + 1
    assert stop_memory_tracking(nb)
    assert {e: list(nb.events.callbacks[e]) for e in before} == before


@pytest.mark.parametrize("line, message", [
    ("--dtype fp8", "invalid choice"),
    ("--top 0", "--top needs a positive"),
    ("--top lots", "invalid int value"),
    ("--track maybe", "invalid choice"),
    ("--track on --top 3", "used alone"),
    ("--model net", "no variable named 'net'"),
    ("--model train_loader", "not an nn.Module"),
    ("--optimizer model", "not an optimizer"),
    ("--optimizer ,", "needs at least one name"),
    ("--data model", "a model, not an iterable"),
    ("--data stream", "one-shot iterator"),
    ("--data empty", "is empty"),
    ("--frobnicate 3", "unrecognized arguments"),
    ("--model 'model", "No closing quotation"),
])
def test_bad_flags_are_usage_errors(nb, line, message):
    nb.user_ns.update(stream=iter(make_data()), empty=[])
    with pytest.raises(UsageError, match=message):
        nb.run(f"%amp_memory {line}")


def test_cell_form_needs_data_and_a_loss(nb):
    nb.user_ns["loader"] = nb.user_ns.pop("train_loader")
    with pytest.raises(UsageError, match="no variable named 'train_loader'"):
        nb.run("%%amp_memory\nloss = model(batch[0]).sum()\n")
    with pytest.raises(UsageError, match="never assigned `loss`"):
        nb.run("%%amp_memory --data loader\nout = model(batch[0])\n")


# -- dict batches (Hugging Face) in the line form --------------------------------------------
class Keywords(torch.nn.Module):
    """forward(input_ids, labels=None) returning a dict, like a Hugging Face model."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.head = torch.nn.Linear(8, 20)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.emb(input_ids))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return out


def test_dict_batch_is_passed_as_keywords_and_its_loss_used():
    model = Keywords()
    ids = torch.randint(0, 20, (4, 6))
    seen = []
    model.register_forward_hook(lambda m, args, kwargs, out: seen.append(sorted(kwargs)), with_kwargs=True)
    step = forward_sum_step(model)
    loss = step({"input_ids": ids, "labels": ids})
    assert seen == [["input_ids", "labels"]]
    assert torch.allclose(loss, model(ids, ids)["loss"])  # the model's own loss, not a sum
    logits_sum = step({"input_ids": ids})  # no labels: the logits, summed
    assert torch.allclose(logits_sum, model(ids)["logits"].float().sum())


def test_tuple_output_sums_its_first_floating_tensor():
    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            return torch.argmax(x, 1), self.lin(x)

    model, x = Pair(), torch.randn(5, 3)
    assert torch.allclose(forward_sum_step(model)((x,)), model.lin(x).sum())


@pytest.mark.parametrize("batch, message", [
    ({"input_ids": 0, "mask": 1, "extra": 2}, r"takes no argument named 'mask', 'extra' \(it takes input_ids, labels\)"),
    ({"labels": 0}, r"has no 'input_ids', which Keywords.forward needs"),
    ({0: 1}, "keys that are not names"),
])
def test_dict_batch_the_forward_cannot_take_is_refused_before_the_call(batch, message):
    with pytest.raises(AmpUsageError, match=message) as e:
        forward_sum_step(Keywords())(batch)
    assert "%%amp_memory cell" in str(e.value)


def test_forward_with_var_keywords_takes_every_name():
    class Anything(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, **inputs):
            return self.lin(inputs["a"] + inputs["b"])

    a, b = torch.randn(2, 3), torch.randn(2, 3)
    assert forward_sum_step(Anything())({"a": a, "b": b}).shape == ()


def test_output_without_a_floating_tensor_is_refused():
    class Names(torch.nn.Module):
        def forward(self, x):
            return {"ids": x.long(), "name": "text"}

    with pytest.raises(AmpUsageError, match="the model returned a dict, not a tensor"):
        forward_sum_step(Names())(torch.randn(2))


def test_line_magic_measures_a_hugging_face_model_on_dict_batches(ip):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, use_cache=False)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 100, (16, 12))
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]
    loader = torch.utils.data.DataLoader(rows, batch_size=4)
    assert isinstance(next(iter(loader)), dict)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ip.user_ns.update(model=model, loader=loader)

    overview = ip.run("%amp_memory --model model --data loader --dtype bf16")

    assert [s.precision for s in overview.step.steps] == ["fp32", "bf16"]
    assert all(s.saved > 0 and s.peak is not None for s in overview.step.steps)
    assert "kept for backward" in repr(overview)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
