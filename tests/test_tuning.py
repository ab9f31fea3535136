"""Sweeps, the precision showdown and the run registry."""
import math
import re
import statistics

import pytest
import torch
import torch.nn.functional as F

import amp_magics
from IPython.core.error import UsageError

from recipes import assert_same_state, make_data, make_model

from amp_magics.tuning.showdown import LOSS_GAP, SAME_SPEED
from amp_magics.formatting import format_percent

BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)\n"


@pytest.fixture
def nb(ip):
    model = make_model()
    ip.user_ns.update(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      train_loader=make_data(n=8, overflow_at=(3,)),
                      val_loader=make_data(n=2, seed=7), F=F, torch=torch)
    return ip


def test_each_sweep_run_equals_an_independent_run_from_the_same_start(nb):
    start = {k: v.clone() for k, v in nb.user_ns["model"].state_dict().items()}
    nb.run('%%amp_train --dtype fp16 --seed 1 --sweep "lr=0.05,0.2; momentum=0,0.9" -o sw\n'
           + BODY)
    sweep = nb.user_ns["sw"]
    assert [r.status for r in sweep.runs] == ["finished"] * 4
    assert_same_state(nb.user_ns["model"].state_dict(), start)  # back to the start

    for setting, run in zip(sweep.settings, sweep.runs):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=setting["lr"], momentum=setting["momentum"])
        nb.user_ns.update(model=model, optimizer=opt)
        nb.run(f"%%amp_train --dtype fp16 --seed 1 -o alone\n{BODY}")
        alone = nb.user_ns["alone"]
        for key in ("loss", "scale", "skipped", "lr"):
            mine, theirs = [r[key] for r in run.history], [r[key] for r in alone.history]
            assert len(mine) == len(theirs) == 8
            assert all(a == b or (a != a and b != b) for a, b in zip(mine, theirs)), key


def test_sweep_table_and_keep_best(nb):
    nb.run('%%amp_train --dtype fp32 --val val_loader --keep best '
           '--sweep "lr=0.001,0.3; clip=0.5" -o sw\n' + BODY)
    sweep = nb.user_ns["sw"]
    scores = [r.val_history[-1]["val_loss"] for r in sweep.runs]
    assert sweep.best == scores.index(min(scores)) and sweep.criterion == "validation loss"
    frame = sweep.to_pandas()
    assert list(frame["lr"]) == [0.001, 0.3] and list(frame["clip"]) == [0.5, 0.5]
    page = sweep._repr_html_()
    assert page.count("<tr") == 3 and "font-weight:bold" in page

    # --keep best: the model holds the best run's final weights; re-running that setting from
    # the same start reproduces them.
    kept = {k: v.clone() for k, v in nb.user_ns["model"].state_dict().items()}
    model = make_model()
    nb.user_ns.update(model=model, optimizer=torch.optim.SGD(
        model.parameters(), lr=sweep.settings[sweep.best]["lr"]))
    nb.run(f"%%amp_train --dtype fp32 --clip 0.5\n{BODY}")
    assert_same_state(model.state_dict(), kept)


@pytest.mark.parametrize("spec, message", [
    ("betas=0.9", "cannot set 'betas'"),
    ("nesterov=1", "cannot set 'nesterov'"),
    ("colour=red", "cannot set 'colour'"),
    ("lr=", "has no values"),
    ("lr=abc", "lr=abc: not a number"),
    ("accum=1.5", "must be a whole number"),
    ("dtype=fp8", "choose from"),
    ("lr", "is not KEY=V1,V2"),
    ("lr=1; lr=2", "names 'lr' twice"),
    (";", "--sweep is empty"),
    ("clip=1,-1", "clip=-1.0: --clip"),  # refused before clip=1 trains
    ("accum=2,0", "accum=0: --accum"),
    ("lr=0.1,-0.1", r"lr=-0.1: SGD refuses it \(Invalid learning rate: -0.1\)"),
    ("dtype=fp16,bf16; init_scale=1024",  # refused before the fp16 run trains
     "init_scale: scaler settings only apply .* the runs with dtype=bf16 use bf16"),
])
def test_bad_sweep_specs(nb, spec, message):
    start = {k: v.clone() for k, v in nb.user_ns["model"].state_dict().items()}
    runs = len(amp_magics.runs())
    with pytest.raises(UsageError, match=message):
        nb.run(f'%%amp_train --sweep "{spec}"\n{BODY}')
    assert_same_state(nb.user_ns["model"].state_dict(), start)
    assert len(amp_magics.runs()) == runs  # nothing trained


@pytest.mark.parametrize("spec, message", [
    ("fp32", "at least two"),
    ("fp32,fp64", "choose from fp32, fp16, bf16"),
    ("fp32,fp32", "twice"),
])
def test_bad_compare_specs(nb, spec, message):
    with pytest.raises(UsageError, match=message):
        nb.run(f"%%amp_train --compare {spec} --steps 3\n{BODY}")
    with pytest.raises(UsageError, match="--compare needs --steps"):
        nb.run(f"%%amp_train --compare fp32,bf16\n{BODY}")


def test_a_seeded_shuffling_loader_gives_every_setting_the_same_batches(nb):
    """The loader draws its order from its own generator: each sweep run and each precision
    of --compare starts from the same order, so identical settings train identically."""
    dataset = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 3, (32,)))
    nb.user_ns["train_loader"] = torch.utils.data.DataLoader(
        dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))
    nb.run(f'%%amp_train --dtype fp32 --sweep "lr=0.05,0.05" -o sw\n{BODY}')
    first, second = ([r["loss"] for r in run.history] for run in nb.user_ns["sw"].runs)
    assert first == second
    nb.run(f"%%amp_train --compare fp32,bf16 --steps 6 --log seen -o cmp\n{BODY}"
           "seen = x[0, 0]\n")
    fp32, bf16 = ([r["seen"] for r in run.history] for run in nb.user_ns["cmp"].runs.values())
    assert fp32 == bf16 and len(set(fp32)) == 6  # the same six batches, in the same order


def test_compare_reports_each_precision_and_restores_the_model(nb):
    start = {k: v.clone() for k, v in nb.user_ns["model"].state_dict().items()}
    nb.run(f"%%amp_train --compare fp32,bf16,fp16 --steps 8 -o cmp\n{BODY}")
    showdown = nb.user_ns["cmp"]
    rows = showdown.rows()
    assert [r["precision"] for r in rows] == ["fp32", "bf16", "fp16"]
    assert all(r["median step ms"] > 0 for r in rows)
    memory = showdown.memory_label  # what it measured: not the runs' "peak memory"
    assert memory == "memory kept for backward"
    assert all(r[memory] > 0 for r in rows) and "exact" in showdown.peak_method
    assert rows[0][LOSS_GAP] == 0.0 and rows[2]["skipped"] == 1
    verdicts = showdown.verdicts()
    assert [v.split(":")[0] for v in verdicts] == ["bf16", "fp16"]
    assert "1 skipped step" in verdicts[1] and "skipped" not in verdicts[0]

    # The verdict's numbers are the measured ones: step times from each run's own history
    # (median of the step-to-step intervals after the warm-up), the peaks and losses in the table.
    def measured_ms(run):
        times = [r["time"] for r in run.history]
        return statistics.median([b - a for a, b in zip(times, times[1:])][showdown.warmup:]) * 1e3

    base_ms = measured_ms(showdown.runs["fp32"])
    for verdict, row in zip(verdicts, rows[1:]):
        ms = measured_ms(showdown.runs[row["precision"]])
        assert row["median step ms"] == pytest.approx(ms)
        found = re.search(r": ([\d.e+]+)x (faster|slower)", verdict)
        if found:
            number, direction = found.groups()
            assert direction == ("faster" if base_ms >= ms else "slower"), (verdict, base_ms, ms)
            ratio = base_ms / ms if direction == "faster" else ms / base_ms
            assert float(number) == pytest.approx(ratio, rel=0.05), (verdict, base_ms, ms)
            assert abs(ms / base_ms - 1) >= SAME_SPEED
        else:  # within SAME_SPEED: "about as fast as fp32 (3% slower)", never "1x slower"
            percent, direction = re.search(
                r": about as fast as fp32 \((\d+)% (faster|slower)\)", verdict).groups()
            assert direction == ("faster" if base_ms >= ms else "slower"), (verdict, base_ms, ms)
            assert int(percent) == round(abs(ms / base_ms - 1) * 100)
        change = 1 - row[memory] / rows[0][memory]
        assert f"{abs(change):.0%} {'less' if change >= 0 else 'more'} {memory}" in verdict
        gap = row[LOSS_GAP]  # the same number and format as the table's column
        said = (f"final loss within {format_percent(gap)} of fp32" if math.isfinite(gap)
                else "loss not finite")
        assert said in verdict and f">{format_percent(gap)}<" in showdown._repr_html_()
    assert_same_state(nb.user_ns["model"].state_dict(), start)


def test_amp_runs_lists_plots_and_clears(nb):
    nb.run(f"%%amp_train --dtype fp32 --name first\n{BODY}")
    nb.run(f"%%amp_train --dtype fp32 --name '<i>second</i>'\n{BODY}")
    table = nb.run("%amp_runs")
    names = [row["run"] for row in table.rows()]
    assert names[-2:] == ["first", "<i>second</i>"]
    assert "&lt;i&gt;second" in table._repr_html_() and "<i>second" not in table._repr_html_()
    overlay = nb.run("%amp_runs --plot first '<i>second</i>'")
    assert "data:image/svg+xml;base64," in overlay.html and "<svg" not in overlay.html
    assert "&lt;i&gt;second&lt;/i&gt;" in overlay.html
    with pytest.raises(UsageError, match="no run named 'nope'"):
        nb.run("%amp_runs --plot nope")
    nb.run("%amp_runs --clear")
    assert nb.run("%amp_runs").rows() == []


def two_group_optimizer(model, backbone_lr=0.001, head_lr=0.1):
    return torch.optim.SGD([{"params": model[0].parameters(), "lr": backbone_lr},
                            {"params": model[2].parameters(), "lr": head_lr}], lr=head_lr)


def test_a_sweep_keeps_the_ratios_of_param_groups(nb):
    model = nb.user_ns["model"]
    opt = two_group_optimizer(model)
    nb.user_ns["optimizer"] = opt
    nb.run(f'%%amp_train --dtype bf16 --sweep "lr=0.01,0.02" -o sw\n{BODY}')
    sweep = nb.user_ns["sw"]
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.1]  # back to the start
    for run, lr in zip(sweep.runs, (0.01, 0.02)):
        assert run.config["set"]["lr"] == pytest.approx([lr, lr * 100])
        assert any("param groups kept their ratios: lr set to" in n for n in run.notes)
        assert run.history[0]["lr"] == lr

    # each run equals an independent run whose groups were set with the same ratio
    ref = make_model()
    ref_opt = two_group_optimizer(ref, 0.02, 2.0)
    nb.user_ns.update(model=ref, optimizer=ref_opt)
    nb.run(f"%%amp_train --dtype bf16 -o alone\n{BODY}")
    assert [r["loss"] for r in nb.user_ns["alone"].history] == \
        [r["loss"] for r in sweep.runs[1].history]


def test_a_sweep_refuses_ratios_it_cannot_keep(nb):
    model = nb.user_ns["model"]
    opt = torch.optim.SGD([{"params": model[0].parameters(), "weight_decay": 0.0},
                           {"params": model[2].parameters(), "weight_decay": 0.01}], lr=0.1)
    nb.user_ns["optimizer"] = opt
    with pytest.raises(UsageError, match="ratios cannot be kept"):
        nb.run(f'%%amp_train --dtype bf16 --sweep "weight_decay=0.1" -o sw\n{BODY}')


def test_a_sweep_says_where_it_stands_after_each_setting(nb, capsys):
    nb.run('%%amp_train --dtype fp32 --sweep "lr=0.001,0.01,0.1" -o sw\n' + BODY)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("setting ")]
    assert [ln.split(" · ")[0] for ln in lines] == [f"setting {i} of 3" for i in (1, 2, 3)]
    assert "ETA" in lines[0] and "ETA" not in lines[-1]
    best = nb.user_ns["sw"].settings[nb.user_ns["sw"].best]
    assert f"(lr={best['lr']:g})" in lines[-1]


def test_a_sweep_shows_the_searchs_trials_panel_live_and_in_its_snapshot(nb, monkeypatch):
    import base64

    from amp_magics.views import dashboard

    panels, published = [], []
    monkeypatch.setattr(dashboard.LiveHtml, "update", lambda self, html: panels.append(html))
    monkeypatch.setattr(nb.display_pub, "publish",
                        lambda data, *args, **kwargs: published.append(data))
    magics = nb.magics_manager.registry["AmpMagics"]
    magics.view = "dashboard"
    try:
        nb.run('%%amp_train --dtype fp32 --val val_loader --sweep "lr=0.001,0.3" -o sw\n' + BODY)
    finally:
        magics.view = "text"
    sweep = nb.user_ns["sw"]
    best = sweep.best
    # live: after each setting, the panel a search shows (curves, progress, table)
    assert len(panels) == 2 and all('class="amp-search"' in p for p in panels)
    assert "setting 1 of 2" in panels[0] and "setting 2 of 2" in panels[1]
    assert "<svg" in panels[1] and "every setting (highlighted: the best)" in panels[1]
    # the snapshot left in the saved notebook: the same panel, its chart an image
    kept = [d["text/html"] for d in published if 'class="amp-search"' in d.get("text/html", "")]
    assert kept and "<svg" not in kept[-1] and "setting 2 of 2" in kept[-1]
    (chart,) = re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', kept[-1])
    svg = base64.b64decode(chart).decode()
    curves = re.findall(r'class="series" data-series="([^"]+)"', svg)
    assert sorted(curves) == sorted([f"setting {best} (best)", f"setting {1 - best}"])
    assert "Trials: validation loss" in svg
    assert sweep.trial_records()[best].reports == [
        (v["step"], v["val_loss"]) for v in sweep.runs[best].val_history]
