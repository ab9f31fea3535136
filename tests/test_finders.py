"""The learning-rate finder: bit-identical to a hand-written lr sweep, AMP-aware (a skipped step
is tried again at the same lr), and everything it touched put back however it ends."""
import contextlib
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError

import amp_magics
from amp_magics.errors import AmpUsageError
from amp_magics.tuning.findings import LrFinding, lr_schedule, suggestions
from recipes import assert_same_state, make_data, make_model

BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)"


def hand_written_lr_sweep(data, lrs, dtype, scaler=None, model=None):
    """The range test written out: set lr_k on the group, one AMP recipe step; a step the
    scaler skipped is tried again at the same lr. Returns (lr, loss, skipped) per step."""
    model = model or make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out, k, i = [], 0, 0
    while k < len(lrs):
        for group in opt.param_groups:
            group["lr"] = lrs[k]
        x, y = data[i % len(data)]
        i += 1
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
            skipped = False
        else:
            scaler.scale(loss).backward()
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped = scaler.get_scale() < before
        out.append((lrs[k], loss.item(), skipped))
        k += not skipped
    return out, model


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def find(model, opt, data, **kwargs):
    def step(batch):
        x, y = batch
        return F.cross_entropy(model(x), y)
    return amp_magics.find_lr(step, model=model, optimizer=opt, data=data, progress=False,
                              **kwargs)


def test_losses_are_bit_identical_to_a_hand_written_lr_sweep():
    data = make_data(n=7)  # fewer batches than steps: the finder cycles the data
    model = make_model()
    finding = find(model, sgd(model), data, dtype="bf16", start=1e-4, end=0.5, steps=20)
    assert finding.status == "finished" and finding.stop_reason == "all 20 steps ran"
    expected, _ = hand_written_lr_sweep(data, lr_schedule(1e-4, 0.5, 20), torch.bfloat16)
    assert [(r["lr"], r["loss"], r["skipped"]) for r in finding.records] == expected
    assert finding.precision == "bf16" and len(finding.records) == 20


def test_a_step_the_scaler_skips_is_tried_again_at_the_same_lr():
    """Real GradScaler overflow: at 2**40 the gradients overflow fp16 (the loss is finite), the
    scale halves each time until they fit; none of those steps advances the lr."""
    data = make_data(n=10)
    model = make_model()
    finding = find(model, sgd(model), data, dtype="fp16", init_scale=2.0**40, start=1e-3,
                   end=0.1, steps=10)
    lrs = lr_schedule(1e-3, 0.1, 10)
    expected, _ = hand_written_lr_sweep(data, lrs, torch.float16,
                                        torch.amp.GradScaler("cpu", init_scale=2.0**40))
    got = [(r["lr"], r["loss"], r["skipped"]) for r in finding.records]
    assert got == expected
    skipped = [r for r in finding.records if r["skipped"]]
    assert finding.records[0]["skipped"] and all(math.isfinite(r["loss"]) for r in skipped)
    for this, following in zip(finding.records, finding.records[1:]):
        if this["skipped"]:  # the next step tries the same lr again
            assert following["lr"] == this["lr"]
    assert finding.applied_steps == 10 and len(finding.records) == 10 + len(skipped)
    assert all(r["smoothed"] is None for r in skipped)  # never used for a suggestion
    assert f"({len(skipped)} skipped by the loss scaler, each tried again)" in repr(finding)


def test_a_batch_that_overflows_the_forward_pass_is_skipped_not_the_end():
    data = make_data(n=12, overflow_at=(3,))  # batch 3's loss is inf/NaN in fp16
    model = make_model()
    finding = find(model, sgd(model), data, dtype="fp16", start=1e-3, end=0.1, steps=15)
    third = finding.records[3]
    assert third["skipped"] and not math.isfinite(third["loss"])
    assert finding.records[4]["lr"] == third["lr"] and not finding.records[4]["skipped"]
    assert finding.applied_steps == 15 and finding.status == "finished"


def test_divergence_stops_the_test_and_says_why():
    data = make_data(n=12)
    model = make_model()
    finding = find(model, sgd(model), data, dtype="fp32", start=1e-3, end=1e4, steps=60)
    assert finding.status == "finished" and finding.applied_steps < 60
    assert "exceeded 4x its minimum" in finding.stop_reason or "was nan" in finding.stop_reason \
        or "was inf" in finding.stop_reason, finding.stop_reason
    assert set(finding.suggestions) >= {"valley", "steep", "minimum/10"}
    assert finding.suggestion == finding.suggestions["valley"]
    assert 1e-3 <= finding.suggestion <= 1e4


def everything(model, opt, scheduler, data, scaler):
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "modes": [m.training for m in model.modules()],
            "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            "opt": opt.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].tolist()),
            "order": data.generator.get_state()}


def assert_unchanged(before, after):
    assert_same_state(after["state"], before["state"])
    assert after["modes"] == before["modes"]
    assert [g is None for g in after["grads"]] == [g is None for g in before["grads"]]
    assert all(torch.equal(a, b) for a, b in zip(after["grads"], before["grads"]) if a is not None)
    assert_same_state(after["opt"], before["opt"])
    assert after["scheduler"] == before["scheduler"] and after["scaler"] == before["scaler"]
    assert torch.equal(after["rng"][0], before["rng"][0]) and after["rng"][1:] == before["rng"][1:]
    assert torch.equal(after["order"], before["order"])


def setup_objects():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1),
                                torch.nn.Linear(16, 3))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-3},
                             {"params": model[2].parameters(), "lr": 1e-2}])
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 3)
    dataset = torch.utils.data.TensorDataset(torch.randn(48, 8), torch.randint(0, 3, (48,)))
    data = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True,
                                       generator=torch.Generator().manual_seed(5))
    return model, opt, scheduler, data


FINDERS = {"lr": lambda step, **kw: amp_magics.find_lr(step, steps=10, **kw),
           "batch size": amp_magics.find_batch_size}


@pytest.mark.parametrize("finder", FINDERS)
@pytest.mark.parametrize("ending", ["finished", "interrupted", "failed"])
def test_everything_is_as_before_however_it_ends(finder, ending):
    model, opt, scheduler, data = setup_objects()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model.eval()
    model[0].weight.sum().backward()  # gradients the user has: kept, the others stay None
    calls = []

    def step(batch, step, epoch):
        calls.append(step)
        if len(calls) == 5 and ending == "interrupted":
            raise KeyboardInterrupt  # the notebook's second interrupt: stop at once
        if len(calls) == 5 and ending == "failed":
            raise RuntimeError("the user's step broke")
        x, y = batch
        return F.cross_entropy(model(x), y)

    before = everything(model, opt, scheduler, data, scaler)
    raises = {"failed": RuntimeError, "interrupted": KeyboardInterrupt}.get(ending)
    with pytest.raises(raises) if raises else contextlib.nullcontext() as stopped:
        finding = FINDERS[finder](step, model=model, optimizer=opt, data=data, dtype="fp16",
                                  scaler=scaler, scheduler=scheduler, progress=False)
    if ending == "interrupted":  # outside IPython, Ctrl-C goes on, carrying the finding
        finding = stopped.value.finding
        assert finding.stop_reason == {"lr": "interrupted after 4 steps",
                                       "batch size": "interrupted by the user"}[finder]
    if ending != "failed":
        assert finding.status == ending
    assert_unchanged(before, everything(model, opt, scheduler, data, scaler))


def test_training_after_the_finder_equals_training_without_it():
    def train(model, opt, scheduler, data):
        def step(batch):
            x, y = batch
            return F.cross_entropy(model(x), y)
        return amp_magics.train(step, model=model, optimizer=opt, data=data, scheduler=scheduler,
                                epochs=2, dtype="bf16", progress=False)

    reference = setup_objects()
    torch.manual_seed(3)
    train(*reference)
    objects = setup_objects()
    torch.manual_seed(3)
    model, opt, scheduler, data = objects
    find(model, opt, data, steps=8, dtype="bf16", seed=99)  # even a seed is undone
    train(*objects)
    assert_same_state(objects[0].state_dict(), reference[0].state_dict())
    assert_same_state(objects[1].state_dict(), reference[1].state_dict())


def test_apply_sets_the_suggestion_on_every_group_keeping_ratios():
    """A scheduler given to the finder is not stepped (the finder sets the lr), but apply()
    moves its base lrs too, so its schedule starts from the suggestion."""
    model, opt, scheduler, data = setup_objects()
    finding = find(model, opt, data, steps=12, dtype="bf16", start=1e-4, end=1.0,
                   scheduler=scheduler)
    assert scheduler.state_dict()["last_epoch"] == 0
    lr = finding.apply("minimum/10")
    assert lr == finding.suggestions["minimum/10"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr, lr * 10])
    assert scheduler.base_lrs == pytest.approx([lr, lr * 10])
    with pytest.raises(AmpUsageError, match="no 'nope' suggestion"):
        finding.apply("nope")


def test_the_groups_keep_their_ratios_during_the_test():
    model, opt, _, data = setup_objects()
    seen = []

    def step(batch):
        seen.append([g["lr"] for g in opt.param_groups])
        x, y = batch
        return F.cross_entropy(model(x), y)
    amp_magics.find_lr(step, model=model, optimizer=opt, data=data, steps=6, start=1e-3,
                       end=1e-1, dtype="bf16", progress=False)
    lrs = lr_schedule(1e-3, 1e-1, 6)
    assert seen == [[lr, lr * 10.0] for lr in lrs]


def test_the_rules_on_a_known_curve():
    lrs = [10 ** (-5 + 5 * k / 99) for k in range(100)]
    # falls steepest around lr 1e-3, lowest at 1e-1, then climbs
    losses = [3 - math.tanh((math.log10(lr) + 3) * 2) + max(0.0, math.log10(lr) + 1) ** 2 * 8
              for lr in lrs]
    found = suggestions(lrs, losses)
    lowest = lrs[losses.index(min(losses[10:95]))]
    assert found["minimum/10"] == pytest.approx(lowest / 10)
    assert 10 ** -3.3 < found["steep"] < 10 ** -2.7
    assert 1e-4 < found["valley"] < lowest
    assert set(found) == {"valley", "steep", "minimum/10", "slide"}
    assert suggestions([1e-3], [1.0]) == {}
    # steep as fastai picks it: the lr where the steepest segment starts
    assert suggestions([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0], [3, 2.9, 2.8, 1.0, 0.9, 5])[
        "steep"] == 1e-2


@pytest.mark.parametrize("kwargs, message", [
    ({"start": 1, "end": 1e-3}, "0 < START < END"),
    ({"steps": 3}, "at least 5"),
    ({"val": [(torch.zeros(1, 8), torch.zeros(1, dtype=torch.long))]}, "does not take --val"),
    ({"checkpoint": "x.pt"}, "does not take --checkpoint"),
    ({"nproc": 2}, "runs in this process"),
])
def test_bad_input_is_refused_before_anything_changes(kwargs, message):
    model = make_model()
    opt = sgd(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AmpUsageError, match=message):
        find(model, opt, make_data(), **kwargs)
    assert_same_state(model.state_dict(), before)
    assert opt.param_groups[0]["lr"] == 0.1


def test_a_one_shot_iterator_is_refused_by_both_finders_and_left_unread():
    """A generator cannot be cycled nor put back: refused before a batch is taken."""
    model = make_model()
    data = make_data()
    batches = (batch for batch in data)
    with pytest.raises(AmpUsageError, match=r"--data is a one-shot iterator \(generator\)"):
        find(model, sgd(model), batches)
    with pytest.raises(AmpUsageError, match="varies a DataLoader's batch size: --data is a "
                                            "generator"):
        amp_magics.find_batch_size(oom_above(model, 8), model=model, optimizer=sgd(model),
                                   data=batches, progress=False)
    assert next(batches) is data[0]


def test_a_frozen_first_group_is_refused_not_trained():
    """lr 0 in the first group and not in the others: ratios to it cannot be kept."""
    model = make_model()
    params = list(model.parameters())
    opt = torch.optim.SGD([{"params": params[:2], "lr": 0.0}, {"params": params[2:]}], lr=0.1)
    with pytest.raises(AmpUsageError, match="the first is 0"):
        find(model, opt, make_data())
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.1]


@pytest.fixture
def nb(ip):
    model = make_model()
    ip.user_ns.update(model=model, optimizer=sgd(model), train_loader=make_data(n=8), F=F,
                      torch=torch)
    return ip


def test_the_magic_finds_stores_and_lists_it_apart_from_runs(nb):
    before = {k: v.clone() for k, v in nb.user_ns["model"].state_dict().items()}
    runs_before = len(amp_magics.runs())
    result = nb.run(f"%%amp_train --find-lr 1e-4,1 --steps 12 --dtype bf16 -o lr\n{BODY}")
    finding = nb.user_ns["lr"]
    assert result is finding and isinstance(finding, LrFinding)
    assert finding.start == 1e-4 and finding.end == 1 and finding.applied_steps <= 12
    assert_same_state(nb.user_ns["model"].state_dict(), before)
    assert nb.user_ns["optimizer"].param_groups[0]["lr"] == 0.1
    assert len(amp_magics.runs()) == runs_before  # not a run
    table = nb.run("%amp_runs")
    assert table.findings[-1] is finding and "find-lr" in table._repr_html_()
    html = nb.display_formatter.format(finding)[0]["text/html"]
    assert 'img class="amp-chart"' in html and "<svg" not in html  # reads untrusted
    assert "suggestions" in html and "valley" in html


def test_the_live_chart_marks_the_suggestions_of_the_curve_so_far():
    from amp_magics.views.finder import finding_html

    finding = LrFinding.new(1e-4, 1, steps=40)
    for k, lr in enumerate(lr_schedule(1e-4, 1, 40)[:30]):  # running: 30 of 40 steps so far
        loss = 2.0 - k / 20 if k < 20 else 1.0 + (k - 20) / 4
        finding.records.append({"step": k, "lr": lr, "loss": loss, "smoothed": loss,
                                "skipped": False})
    assert finding.suggestions == {}  # set when the test ends
    live = finding_html(finding, live=True)
    for name, lr in finding.suggest().items():
        assert f"{name} {lr:.2g}" in live  # a labelled mark on the chart
    assert "suggestions from the steps so far" in live and "<svg" in live


@pytest.mark.parametrize("line, message", [
    ("--find-lr 1e-3", "give START,END"),
    ("--find-lr 1,1e-3", "0 < START < END"),
    ("--find-lr --steps 2", "at least 5"),
    ("--find-lr --sweep lr=0.1,0.2", "--sweep cannot be combined with --find-lr"),
    ("--find-lr --background", "--find-lr cannot be combined with --background"),
    ("--find-lr --epochs 2", "does not take --epochs"),
    ("--find-lr --checkpoint c.pt", "--find-lr cannot be combined with --checkpoint"),
    ("--find-lr --val train_loader", "does not take --val"),
])
def test_the_magic_refuses_clearly(nb, line, message):
    nb.user_ns["sched"] = torch.optim.lr_scheduler.StepLR(nb.user_ns["optimizer"], 2)
    with pytest.raises(UsageError, match=message):
        nb.run(f"%%amp_train {line}\n{BODY}")
    assert nb.user_ns["optimizer"].param_groups[0]["lr"] == 0.1


def test_a_model_a_background_run_trains_is_refused(nb):
    nb.user_ns["train_loader"] = make_data(n=8) * 200
    run = nb.run(f"%%amp_train --dtype bf16 --background -o bg\nimport time; time.sleep(0.002)"
                 f"\n{BODY}")
    try:
        with pytest.raises(UsageError, match="being trained by"):
            nb.run(f"%%amp_train --find-lr\n{BODY}")
    finally:
        nb.run("%amp_stop")
    assert run.status == "interrupted"


def test_a_hugging_face_model_on_dict_batches():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100,
                                     n_positions=16, use_cache=False)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 100, (24, 12))
    loader = torch.utils.data.DataLoader(
        [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids],
        batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    order = loader.generator.get_state()
    finding = amp_magics.find_lr(lambda batch: model(**batch).loss, model=model, optimizer=opt,
                                 data=loader, steps=10, dtype="bf16", progress=False)
    assert finding.applied_steps == 10 and finding.suggestion is not None
    assert_same_state(model.state_dict(), before)
    assert opt.state_dict()["state"] == {} and opt.param_groups[0]["lr"] == 3e-4
    assert torch.equal(loader.generator.get_state(), order)


# -- the batch-size finder ------------------------------------------------------------------------
def batch_setup(n=400, **loader_kwargs):
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dataset = torch.utils.data.TensorDataset(torch.randn(n, 8), torch.randint(0, 3, (n,)))
    loader_kwargs = {"batch_size": 8, "shuffle": True,
                     "generator": torch.Generator().manual_seed(1), **loader_kwargs}
    return model, opt, torch.utils.data.DataLoader(dataset, **loader_kwargs)


def oom_above(model, limit):
    """A step whose batches above `limit` samples run out of memory, as CUDA would say it."""
    def step(batch):
        x, y = batch
        if x.shape[0] > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated above {limit})")
        return F.cross_entropy(model(x), y)
    return step


def test_out_of_memory_is_recognised_by_type_and_bisected():
    model, opt, loader = batch_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    order = loader.generator.get_state()
    finding = amp_magics.find_batch_size(oom_above(model, 24), model=model, optimizer=opt,
                                         data=loader, dtype="bf16", progress=False)
    assert finding.batch_size == 24 and finding.status == "finished"
    assert [(t.batch_size, t.result) for t in finding.trials] == [
        (8, "fits"), (16, "fits"), (32, "out of memory"), (24, "fits"), (28, "out of memory"),
        (26, "out of memory"), (25, "out of memory")]
    assert all(t.peak > 0 and t.samples_per_s > 0 for t in finding.trials if t.result == "fits")
    assert_same_state(model.state_dict(), before)
    assert opt.state_dict()["state"] == {} and all(p.grad is None for p in model.parameters())
    assert torch.equal(loader.generator.get_state(), order)
    assert finding.loader.batch_size == 24 and loader.batch_size == 8


def test_halves_from_a_loader_whose_batch_does_not_fit():
    model, opt, loader = batch_setup(batch_size=32)
    finding = amp_magics.find_batch_size(oom_above(model, 6), model=model, optimizer=opt,
                                         data=loader, dtype="bf16", progress=False)
    assert [(t.batch_size, t.result) for t in finding.trials] == [
        (32, "out of memory"), (16, "out of memory"), (8, "out of memory"), (4, "fits"),
        (6, "fits"), (7, "out of memory")]  # 8 is known not to fit: not tried again
    assert finding.batch_size == 6 and "capped" not in repr(finding)


def test_an_answer_the_data_caps_says_so_and_counts_the_samplers_samples():
    """30 of 300 samples drawn: 3 batches of at most 10, whatever the memory allows."""
    model, opt, _ = batch_setup()
    dataset = torch.utils.data.TensorDataset(torch.randn(300, 8), torch.randint(0, 3, (300,)))
    sampler = torch.utils.data.SubsetRandomSampler(range(30))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, drop_last=True)
    finding = amp_magics.find_batch_size(lambda b: F.cross_entropy(model(b[0]), b[1]),
                                         model=model, optimizer=opt, data=loader, dtype="bf16",
                                         progress=False)
    assert finding.batch_size == 10 and [t.batch_size for t in finding.trials] == [4, 8, 10]
    assert "capped by the data (30 samples per epoch fill 3 batches of at most 10), not by " \
           "memory" in repr(finding)
    capped = amp_magics.find_batch_size(lambda b: F.cross_entropy(model(b[0]), b[1]),
                                        model=model, optimizer=opt, data=loader, dtype="bf16",
                                        max_size=6, progress=False)
    assert capped.batch_size == 6 and "capped by --find-batch-size 6" in repr(capped)


def test_an_out_of_memory_trial_has_dropped_its_gradients_when_judged():
    """Before the cache is emptied: the engine drops a failed step's partial gradients."""
    from amp_magics.training.options import TrainOptions
    from amp_magics.tuning.batch_size import find_batch_size

    model, opt, loader = batch_setup()
    model(torch.randn(2, 8)).sum().backward()  # the user's gradients: back afterwards
    batch = {}

    def out_of_memory_in_backward(grad):  # the last layer's gradients exist by then
        if batch["size"] > 16:
            raise torch.OutOfMemoryError("simulated, in the backward")
        return grad
    model[0].weight.register_hook(out_of_memory_in_backward)

    def step(b):
        x, y = b
        batch["size"] = x.shape[0]
        return F.cross_entropy(model(x), y)

    grads_after = {}
    options = TrainOptions(model=model, optimizer=opt, data=loader, dtype="bf16")
    finding = find_batch_size(step, options, on_trial=lambda f, t: grads_after.setdefault(
        (t.batch_size, t.result), [p.grad is None for p in model.parameters()]))
    assert finding.batch_size == 16
    assert all(grads_after[(32, "out of memory")])
    assert all(p.grad is not None for p in model.parameters())


def test_a_message_that_only_reads_like_out_of_memory_is_the_users_error():
    model, opt, loader = batch_setup()

    def step(batch):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")  # no OOM type
    with pytest.raises(RuntimeError, match="Tried to allocate"):
        amp_magics.find_batch_size(step, model=model, optimizer=opt, data=loader,
                                   dtype="bf16", progress=False)


def test_a_trials_memory_counts_the_gradients_and_the_optimizer_state():
    """On the CPU a trial's peak is the model's tensors plus what a step keeps for backward:
    with Adam that is at least the weights, their gradients and the two moments."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 3))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    _, _, loader = batch_setup(n=48)
    finding = amp_magics.find_batch_size(
        lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
        optimizer=torch.optim.Adam(model.parameters()), data=loader, dtype="fp32",
        max_size=16, progress=False)
    assert [t.batch_size for t in finding.trials] == [8, 16]
    assert all(t.peak >= 4 * weights for t in finding.trials)  # activations are far less


def test_when_no_batch_size_fits_the_answer_says_none():
    model, opt, loader = batch_setup()
    finding = amp_magics.find_batch_size(oom_above(model, 0), model=model, optimizer=opt,
                                         data=loader, dtype="bf16", progress=False)
    assert finding.batch_size is None and finding.answer == "bf16: none"
    assert "  bf16: none (" in repr(finding) and "None" not in repr(finding)


def test_the_answer_leaves_the_headroom_of_max_memory():
    model, opt, loader = batch_setup()
    probe = amp_magics.find_batch_size(oom_above(model, 16), model=model, optimizer=opt,
                                       data=loader, dtype="bf16", progress=False)
    peaks = {t.batch_size: t.peak for t in probe.trials if t.peak}
    limit = peaks[16] + 8  # bytes: 16 fits without headroom, 8 with it, if 10% allows
    finding = amp_magics.find_batch_size(lambda b: F.cross_entropy(model(b[0]), b[1]),
                                         model=model, optimizer=opt, data=loader, dtype="bf16",
                                         max_memory=f"{limit}B", progress=False)
    answer = next(t for t in finding.trials if t.batch_size == finding.batch_size)
    assert answer.peak <= 0.9 * limit
    bigger = [t for t in finding.trials if t.batch_size > finding.batch_size]
    assert bigger and all(t.result != "fits" for t in bigger)
    assert "90% of --max-memory" in repr(finding)


def test_headroom_is_the_users_to_choose():
    model, opt, loader = batch_setup()
    step = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    probe = amp_magics.find_batch_size(step, model=model, optimizer=opt, data=loader,
                                       dtype="bf16", max_size=32, progress=False)
    peaks = {t.batch_size: t.peak for t in probe.trials}
    limit = int(peaks[32] / 0.85)  # 32 fits with 10% headroom, not with 20%
    found = {h: amp_magics.find_batch_size(step, model=model, optimizer=opt, data=loader,
                                           dtype="bf16", max_size=32, max_memory=f"{limit}B",
                                           headroom=h, progress=False) for h in (None, "20%")}
    assert found[None].batch_size == 32 and found["20%"].batch_size < 32
    assert "80% of --max-memory" in repr(found["20%"])
    for headroom, message in ((100, "--headroom 100: give the share"),
                              (0.2, "a percentage, e.g. 20")):
        with pytest.raises(AmpUsageError, match=message):
            amp_magics.find_batch_size(step, model=model, optimizer=opt, data=loader,
                                       headroom=headroom, progress=False)


def test_the_loader_keeps_its_sampler_collate_fn_and_generator():
    calls = []

    def collate(rows):
        calls.append(len(rows))
        return torch.utils.data.default_collate(rows)

    model, opt, _ = batch_setup()
    dataset = torch.utils.data.TensorDataset(torch.randn(300, 8), torch.randint(0, 3, (300,)))
    sampler = torch.utils.data.SubsetRandomSampler(range(0, 300, 2),
                                                   generator=torch.Generator().manual_seed(4))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler,
                                         collate_fn=collate, drop_last=True)
    state = sampler.generator.get_state()
    finding = amp_magics.find_batch_size(oom_above(model, 12), model=model, optimizer=opt,
                                         data=loader, dtype="bf16", max_size=16,
                                         progress=False)
    assert finding.batch_size == 12 and set(calls) >= {4, 8, 12}
    remade = finding.loader
    assert remade.sampler is sampler and remade.collate_fn is collate and remade.drop_last
    assert torch.equal(sampler.generator.get_state(), state)  # its order as before


def test_each_precision_answers_side_by_side():
    model, opt, loader = batch_setup()
    finding = amp_magics.find_batch_size(oom_above(model, 20), model=model, optimizer=opt,
                                         data=loader, compare="fp32,bf16", progress=False)
    assert list(finding.searches) == ["fp32", "bf16"]
    assert [s.batch_size for s in finding.searches.values()] == [20, 20]
    assert "fp32: 20" in repr(finding) and "bf16: 20" in repr(finding)


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long))])


@pytest.mark.parametrize("kwargs, message", [
    ({"data": [(torch.zeros(2, 8), torch.zeros(2, dtype=torch.long))]}, "varies a DataLoader"),
    ({"data": torch.utils.data.DataLoader(_Stream(), batch_size=None)},
     "needs a map-style dataset"),
    ({"max_memory": "lots"}, "give a size with its unit such as 6GiB"),
    ({"max_memory": "10"}, "--max-memory 10: give a size with its unit"),
    ({"compare": "fp8"}, "choose from"),
    ({"max_size": 0}, r"\(max_size=\) 0: give the largest batch size to try as a positive"),
    ({"max_size": "64"}, r"\(max_size=\) '64': give the largest batch size"),
    ({"nproc": 2}, "runs in this process"),
    ({"steps": 50}, "does not take --steps: it runs 3 steps per trial"),
    ({"epochs": 2}, "does not take --epochs: it runs 3 steps per trial"),
])
def test_the_batch_size_finder_refuses_clearly(kwargs, message):
    model, opt, loader = batch_setup()
    with pytest.raises(AmpUsageError, match=message):
        amp_magics.find_batch_size(oom_above(model, 8), **{
            "model": model, "optimizer": opt, "data": loader, "progress": False, **kwargs})


def test_the_magic_finds_a_batch_size_from_a_dataset(nb):
    model, opt, loader = batch_setup(n=200)
    nb.user_ns.update(model=model, optimizer=opt, dataset=loader.dataset,
                      step_fn=oom_above(model, 6))
    finding = nb.run("%%amp_train --data dataset --find-batch-size --dtype bf16 -o bs\n"
                     "loss = step_fn(batch)")
    assert finding is nb.user_ns["bs"] and finding.batch_size == 6
    assert [t.batch_size for t in finding.trials][:4] == [1, 2, 4, 8]  # a Dataset: from 1
    table = nb.run("%amp_runs")
    assert table.findings[-1] is finding and "find-batch-size" in table._repr_html_()
    html = nb.display_formatter.format(finding)[0]["text/html"]
    assert "out of memory" in html and "trials" in html
    with pytest.raises(UsageError, match="--max-memory goes with --find-batch-size"):
        nb.run(f"%%amp_train --max-memory 2GiB\n{BODY}")
    with pytest.raises(UsageError, match="--headroom goes with --find-batch-size"):
        nb.run(f"%%amp_train --headroom 20%\n{BODY}")
    headroom = nb.run("%%amp_train --data dataset --find-batch-size --dtype bf16 --headroom 25%\n"
                      "loss = step_fn(batch)")
    assert headroom.headroom == 0.25 and "75% of" in repr(headroom)
    with pytest.raises(UsageError, match="positive whole number"):
        nb.run(f"%%amp_train --data dataset --find-batch-size 0\n{BODY}")
