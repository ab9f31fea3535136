"""--search / amp_magics.search: Optuna's sampler and pruner over trials that each train as a
--sweep run with the same values would, a study that resumes from its journal file, and
nothing left RUNNING however a trial ends."""
import math
import re
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F
from IPython.core.error import UsageError

import amp_magics
from amp_magics.errors import AmpUsageError
from recipes import assert_same_state, make_data, make_model

optuna = pytest.importorskip("optuna")

BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)\n"


def objects():
    model = make_model()
    return model, torch.optim.SGD(model.parameters(), lr=0.1), make_data(n=8)


def step_of(model):
    def step(batch):
        x, y = batch
        return F.cross_entropy(model(x), y)
    return step


def run_search(model, opt, data, **kwargs):
    kwargs = {"dtype": "bf16", "epochs": 2, "seed": 0, "progress": False, **kwargs}
    return amp_magics.search(step_of(model), model=model, optimizer=opt, data=data, **kwargs)


@pytest.fixture
def nb(ip, tmp_path):
    model, opt, data = objects()
    ip.user_ns.update(model=model, optimizer=opt, train_loader=data, F=F, torch=torch)
    ip.run_line_magic("config", f"AmpMagics.study_dir = {str(tmp_path / 'studies')!r}")
    return ip


def test_a_trial_trains_exactly_as_a_sweep_run_with_its_values(nb):
    start = {k: v.clone() for k, v in nb.user_ns["model"].state_dict().items()}
    nb.run('%%amp_train --dtype fp16 --seed 1 --sweep "lr=0.05; momentum=0.9" -o swept\n'
           + BODY)
    assert_same_state(nb.user_ns["model"].state_dict(), start)  # a sweep puts it back
    nb.run('%%amp_train --dtype fp16 --seed 1 --search "lr=0.05; momentum=0.9" --sampler grid '
           f'--trials 1 --keep best -o found\n{BODY}')
    found = nb.user_ns["found"]
    trial, run = found.trials[0], nb.user_ns["swept"].runs[0]
    assert trial.state == "COMPLETE" and trial.params == {"lr": 0.05, "momentum": 0.9}
    for key in ("loss", "scale", "skipped", "lr"):
        assert [r[key] for r in trial.run.history] == [r[key] for r in run.history], key
    assert found.best_params == trial.params and found.best_run is trial.run
    # --keep best: the model holds the trial's weights, not the start's
    assert not all(torch.equal(v, start[k]) for k, v in nb.user_ns["model"].state_dict().items())


def test_a_diverging_lr_is_pruned_with_its_reason_not_failed():
    model, opt, data = objects()
    found = run_search(model, opt, data, space={"lr": [1e4]}, trials=1, dtype="fp32")
    (trial,) = found.trials
    assert trial.state == "PRUNED" and found.status == "finished"
    assert re.search(r"loss is (nan|inf)", trial.reason), trial.reason
    assert "pruned by the search" in trial.run.notes[-1]


def test_a_diverging_lr_under_fp16_is_pruned_though_the_scaler_skips_its_steps(tmp_path):
    """fp16: a NaN loss makes every step skipped; MAX_NONFINITE_IN_A_ROW of them in a row (the
    learning-rate finder's rule) is divergence, and no value from before it is the objective."""
    from amp_magics.tuning.findings import MAX_NONFINITE_IN_A_ROW

    model, opt, data = objects()
    kept = dict(space={"lr": [1e4]}, trials=1, dtype="fp16", study="s", study_dir=str(tmp_path))
    found = run_search(model, opt, data, **kept)
    (trial,) = found.trials
    assert trial.state == "PRUNED" and found.status == "finished" and found.best is None
    assert re.search(rf"loss is nan for {MAX_NONFINITE_IN_A_ROW} steps in a row", trial.reason)
    assert trial.value is None and trial.steps == 1 + MAX_NONFINITE_IN_A_ROW
    skipped = {r["step"] for r in trial.run.history if r["skipped"]}
    assert skipped and not skipped & {step for step, _ in trial.reports}
    (resumed,) = run_search(model, opt, data, **kept).trials  # read back from the journal
    assert resumed.state == "PRUNED" and resumed.value is None


def test_a_trial_ending_in_non_finite_skipped_steps_is_not_scored_by_earlier_ones():
    model, opt, _ = objects()
    data = make_data(n=8, overflow_at=(6, 7))  # fp16: the last two losses are NaN, skipped
    found = run_search(model, opt, data, space={"lr": [0.05]}, trials=1, dtype="fp16",
                       epochs=1, prune="none")
    (trial,) = found.trials
    assert trial.state == "PRUNED" and trial.value is None and found.best is None
    assert "last 2 steps" in trial.reason


def test_a_seeded_search_repeats_and_the_model_ends_where_it_started():
    values = []
    for _ in range(2):
        model, opt, data = objects()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        found = run_search(model, opt, data, space="lr=log(1e-3,1); momentum=0,0.5,0.9",
                           trials=4, seed=11)
        values.append([t.params for t in found.trials])
        assert_same_state(model.state_dict(), start) and opt.param_groups[0]["lr"] == 0.1
    assert values[0] == values[1] and len({str(v) for v in values[0]}) > 1


def test_pruning_reports_come_every_n_steps_and_never_from_a_skipped_one():
    model, opt, _ = objects()
    data = make_data(n=8, overflow_at=(3,))  # fp16: step 3 is skipped
    found = run_search(model, opt, data, space={"lr": [0.05]}, trials=1, dtype="fp16",
                       report_every=2, epochs=1, prune="none")
    (trial,) = found.trials
    skipped = {r["step"] for r in trial.run.history if r["skipped"]}
    assert skipped == {3}
    assert [step for step, _ in trial.reports] == [1, 4, 5, 7]  # 3 was due, reported at 4
    assert math.isfinite(trial.value) and trial.value == pytest.approx(trial.reports[-1][1])


def test_interrupted_then_resumed_nothing_left_running_and_the_values_tried_again(tmp_path):
    model, opt, data = objects()
    steps = {"n": 0}

    def step(batch):
        steps["n"] += 1
        if steps["n"] == 30:  # in the second trial: the notebook's second Ctrl-C
            raise KeyboardInterrupt
        x, y = batch
        return F.cross_entropy(model(x), y)
    kwargs = dict(model=model, optimizer=opt, data=data, dtype="bf16", epochs=2, seed=5,
                  study="resumed", study_dir=str(tmp_path), progress=False,
                  space="lr=log(1e-3,1e-1)")
    with pytest.raises(KeyboardInterrupt) as stopped:  # outside IPython, Ctrl-C goes on
        amp_magics.search(step, trials=4, **kwargs)
    first = stopped.value.search
    assert first.status == "interrupted" and [t.state for t in first.trials] == [
        "COMPLETE", "FAIL"]
    assert "interrupted" in first.trials[1].reason
    # a kernel that died in a trial leaves it RUNNING: as a second process would see it
    journal = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(first.journal))
    orphan = optuna.load_study(study_name="resumed", storage=journal).ask(
        {"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)})

    second = amp_magics.search(step, trials=4, **kwargs)
    states = [t.state for t in second.study.get_trials(deepcopy=False)]
    assert "RUNNING" not in {s.name for s in states}
    by_number = {t.number: t for t in second.trials}
    assert by_number[orphan.number].state == "FAIL"
    retries = [t for t in second.study.get_trials(deepcopy=False)
               if "retry_of" in t.user_attrs]
    assert {t.user_attrs["retry_of"] for t in retries} == {1, orphan.number}
    assert retries[0].params == first.trials[1].params  # the interrupted values first
    assert len(second.finished) == 4 and second.status == "finished"


def test_a_resumed_grid_runs_each_setting_once(tmp_path):
    """Interrupted in its second setting, a grid search resumed runs that setting again and
    the third once: no setting twice, nothing queued left over."""
    model, opt, data = objects()
    steps = {"n": 0}

    def step(batch):
        steps["n"] += 1
        if steps["n"] == 12:  # in the second setting
            raise KeyboardInterrupt
        x, y = batch
        return F.cross_entropy(model(x), y)
    kwargs = dict(model=model, optimizer=opt, data=data, dtype="fp32", sampler="grid",
                  space="lr=0.1,0.2,0.3", trials=10, study="grid", study_dir=str(tmp_path),
                  progress=False)
    with pytest.raises(KeyboardInterrupt):
        amp_magics.search(step, **kwargs)
    for _ in range(2):  # resumed, then resumed once more with nothing left to do
        found = amp_magics.search(step, **kwargs)
        done = [(t.params["lr"], t.state.name) for t in found.study.get_trials(deepcopy=False)]
        assert sorted(done) == [(0.1, "COMPLETE"), (0.2, "COMPLETE"), (0.2, "FAIL"),
                                (0.3, "COMPLETE")], done
        assert found.status == "finished" and all(t.state != "WAITING" for t in found.trials)


def test_the_journal_opens_in_another_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the notebook's folder: the journal is shown as typed there
    model, opt, data = objects()
    found = run_search(model, opt, data, space="lr=0.01,0.1", trials=2, study="shared",
                       study_dir="amp_studies")
    assert "study kept in amp_studies/shared.journal" in found.header()
    assert os.path.isabs(found.journal)  # and kept whole: found wherever Python goes next
    code = textwrap.dedent(f"""
        import optuna
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend({found.journal!r}))
        study = optuna.load_study(study_name="shared", storage=storage)
        print(len(study.trials), sorted(t.params["lr"] for t in study.trials))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(maxsplit=1)[0] == "2" and "0.01" in done.stdout


def test_without_optuna_the_message_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    model, opt, data = objects()
    with pytest.raises(AmpUsageError, match=r'pip install "amp_magics\[search\]"'):
        run_search(model, opt, data, space="lr=0.1,0.2")


def test_objective_a_logged_scalar_maximised(nb):
    nb.run('%%amp_train --dtype bf16 --epochs 1 --log acc --search "lr=0.01,0.5" '
           '--sampler grid --trials 2 --objective acc --direction maximize -o found\n'
           "x, y = batch\nlogits = model(x)\nacc = (logits.argmax(1) == y).float().mean()\n"
           "loss = F.cross_entropy(logits, y)")
    found = nb.user_ns["found"]
    assert found.direction == "maximize" and "smoothed train acc" in found.objective
    assert found.best.value == max(t.value for t in found.trials)


@pytest.mark.parametrize("spec, message", [
    ("lr=log(1e-3)", "log\\(\\) takes two bounds"),
    ("lr=log(0,1)", "positive low bound"),
    ("lr=uniform(1,0.1)", "low bound must be below"),
    ("frobs=1,2", "cannot set 'frobs'"),
    ("dtype=uniform(1,2)", "takes a list of choices"),
    ("accum=uniform(1,4)", "takes whole numbers"),
    ("lr", "is not KEY=VALUES"),
    ("lr=0.1; lr=0.2", "names 'lr' twice"),
    ("clip=uniform(-1,1)", "clip=-1.0: --clip"),
    ("accum=1,0", "accum=0: --accum"),
    ("lr=uniform(-1,1)", r"lr=-1.0: SGD refuses it \(Invalid learning rate: -1.0\)"),
])
def test_bad_specs_name_the_part_that_is_wrong(nb, spec, message):
    with pytest.raises(UsageError, match=message):
        nb.run(f'%%amp_train --search "{spec}"\n{BODY}')


@pytest.mark.parametrize("line, message", [
    ('--search "lr=log(1e-3,1)" --sampler grid', "grid needs a list"),
    ("--trials 3", "--trials goes with --search"),
    ("--keep best", "--keep goes with --sweep or --search"),
    ('--search "lr=0.1" --sweep "lr=0.2"', "cannot be combined with --search"),
    ('--search "lr=0.1" --objective acc', "add --log acc"),
    ('--search "lr=0.1" --study "no good"', "a name of letters"),
])
def test_the_magic_refuses_clearly(nb, line, message):
    with pytest.raises(UsageError, match=message):
        nb.run(f"%%amp_train {line}\n{BODY}")


def test_the_magic_keeps_the_study_lists_it_and_draws_the_trials(nb, tmp_path):
    nb.run('%%amp_train --dtype bf16 --epochs 2 --seed 2 --search "lr=log(1e-3,1)" '
           f'--trials 3 --study magic -o found\n{BODY}')
    found = nb.user_ns["found"]
    assert found.journal == str(tmp_path / "studies" / "magic.journal")
    assert len(found.finished) == 3 and nb.run("%amp_runs").findings[-1] is found
    html = nb.display_formatter.format(found)[0]["text/html"]
    assert 'img class="amp-chart"' in html and "<svg" not in html
    assert "trial 3 of 3" in html and "optuna-dashboard" in html
    nb.run(f'%%amp_train --dtype bf16 --epochs 2 --seed 2 --search "lr=log(1e-3,1)" '
           f'--trials 5 --study magic -o more\n{BODY}')
    more = nb.user_ns["more"]
    assert len(more.finished) == 5 and [t.number for t in more.trials][:3] == [0, 1, 2]
    assert {str(t.params) for t in more.trials[3:]}.isdisjoint(
        {str(t.params) for t in found.trials})  # the resumed sampler never replays



def test_the_trials_make_a_table_and_one_number_is_a_choice_of_one():
    model, opt, data = objects()
    found = run_search(model, opt, data, space={"lr": 0.05, "momentum": [0, 0.9]}, trials=2,
                       sampler="grid", epochs=1)
    frame = found.trials.to_pandas()
    assert list(frame["lr"]) == [0.05, 0.05] and sorted(frame["momentum"]) == [0, 0.9]
    assert list(frame.columns[:2]) == ["trial", "lr"] and set(frame["state"]) == {"COMPLETE"}


@pytest.mark.parametrize("space, message", [
    ({"lr": None}, r"lr=None: give a range as text"),
    ({"lr": {"low": 1}}, r"give a range as text, e.g. \"log\(1e-4,1e-1\)\", a list"),
    (["lr"], r"takes a text or a dict, got list"),
])
def test_a_python_space_of_the_wrong_kind_is_refused_clearly(space, message):
    model, opt, data = objects()
    with pytest.raises(AmpUsageError, match=message):
        run_search(model, opt, data, space=space)


def test_a_range_is_refused_where_either_bound_is_a_value_the_optimizer_refuses():
    model, opt, data = objects()
    adadelta = torch.optim.Adadelta(model.parameters())
    with pytest.raises(AmpUsageError, match=r"rho=1.5: Adadelta refuses it \(Invalid rho"):
        run_search(model, adadelta, data, space="rho=uniform(0.5,1.5)")
    assert adadelta.state_dict()["state"] == {}


def test_scaler_settings_without_fp16_are_refused_before_the_study_is_made(tmp_path):
    model, opt, data = objects()
    for space, runs in (("init_scale=1024,4096", "these runs use bf16"),
                        ({"dtype": ["fp16", "bf16"], "init_scale": [1024]},
                         "the runs with dtype=bf16 use bf16")):
        with pytest.raises(AmpUsageError, match=f"init_scale: scaler settings only apply "
                                                f"with a GradScaler.*; {runs}"):
            run_search(model, opt, data, space=space, study="scaled", study_dir=str(tmp_path))
        assert not (tmp_path / "scaled.journal").exists()


def test_the_setup_counts_the_trials_that_ran_not_those_queued(tmp_path):
    model, opt, data = objects()
    fresh = prepared(model, opt, data)  # a grid queues its two settings
    fresh.release()
    assert fresh.result.setup.endswith("; 0 trials run in the study so far, 2 queued")
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "failed.journal")))
    study = optuna.create_study(study_name="failed", storage=storage)
    study.tell(study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1)}),
               state=optuna.trial.TrialState.FAIL)
    resumed = prepared(model, opt, data, space="lr=uniform(1e-3,1e-1)", sampler="tpe",
                       study="failed", study_dir=str(tmp_path))  # its values queued again
    resumed.release()
    assert resumed.result.setup.endswith("; 1 trial run in the study so far, 1 queued")


def test_the_setup_says_how_each_pruner_waits_and_what_val_makes_of_report_every():
    model, opt, data = objects()
    band = run_search(model, opt, data, space={"lr": [0.05]}, trials=1, epochs=1,
                      prune="hyperband")
    assert "after 5 trials" not in band.setup and "successive halving from" in band.setup
    val = run_search(model, opt, data, space={"lr": [0.05]}, trials=1, epochs=1,
                     val=make_data(n=2, seed=7), report_every=3)
    assert "at each epoch end (with --val; --report-every 3 sets only the warm-up)" in val.setup
    assert "6 warm-up steps" in val.setup


def test_the_api_says_how_it_searches_before_the_first_trial(capsys):
    model, opt, data = objects()
    run_search(model, opt, data, space="lr=0.01,0.1", trials=2, sampler="grid", progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("search: smoothed train loss, minimized; grid sampler, seeded 0")
    assert "median pruner" in lines[0] and "5 trials" in lines[0]
    assert [ln.split(" lr=")[0] for ln in lines[1:3]] == ["trial 0", "trial 1"]
    assert lines[-1].startswith("trial 2 of 2")


def test_objective_with_val_is_refused_saying_why(nb):
    nb.user_ns["val_loader"] = make_data(n=2, seed=7)
    with pytest.raises(UsageError, match="the validation pass computes only the loss"):
        nb.run('%%amp_train --val val_loader --log acc --search "lr=0.1" --objective acc\n'
               "x, y = batch\nacc = (model(x).argmax(1) == y).float().mean()\n"
               "loss = F.cross_entropy(model(x), y)")


SLOW_BODY = "time.sleep(0.002)\n" + BODY  # long enough to be caught mid-trial


def wait_for(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition()


def test_a_background_search_leaves_the_notebook_usable_and_stop_ends_it_as_interrupted(
        nb, capsys, tmp_path):
    nb.user_ns["time"] = time
    model = nb.user_ns["model"]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    line = '--dtype bf16 --seed 3 --search "lr=log(1e-3,1e-1)" --study bg'
    assert nb.run(f"%%amp_train {line} --epochs 1000 --trials 5 --background -o found\n"
                  f"{SLOW_BODY}") is None  # the cell returns at once; -o has the Search
    found = nb.user_ns["found"]
    assert found.status == "running" and "median pruner" in capsys.readouterr().out
    wait_for(lambda: found.trials and found.trials[-1].run is not None
             and len(found.trials[-1].run.history) >= 3)
    assert nb.run("1 + 1") == 2  # the notebook goes on meanwhile
    with pytest.raises(UsageError, match="being trained by") as refused:
        nb.run(f"%%amp_train --dtype bf16 --steps 2\n{BODY}")  # the search owns the model
    trial_name = found.trials[-1].run.name
    assert trial_name in str(refused.value)
    nb.run(f"%amp_stop {trial_name}")  # the name the refusal gave reaches the search
    assert f"{found.name}: interrupted after 0 finished trials" in capsys.readouterr().out
    (trial,) = found.trials
    assert found.status == "interrupted" and trial.state == "FAIL"
    assert "interrupted" in trial.reason and 3 <= trial.steps < 8000
    assert {t.state.name for t in found.study.get_trials(deepcopy=False)} == {"FAIL"}
    assert_same_state(model.state_dict(), start)  # --keep start, and the model is free again
    nb.run(f"%%amp_train {line} --epochs 1 --trials 1 -o again\n{BODY}")
    assert nb.user_ns["again"].trials[-1].params == trial.params  # tried again first


def test_a_background_search_draws_its_trials_and_the_running_trials_dashboard(
        nb, monkeypatch):
    from amp_magics.views import dashboard

    shown, panels, published = [], [], []
    monkeypatch.setattr(dashboard.LiveHtml, "update",
                        lambda self, html: panels.append(html))
    show = dashboard.Dashboard.show
    monkeypatch.setattr(dashboard.Dashboard, "show",
                        lambda self, run=None: (shown.append((self, run)), show(self, run)))
    monkeypatch.setattr(nb.display_pub, "publish",
                        lambda data, *args, **kwargs: published.append(data))
    magics = nb.magics_manager.registry["AmpMagics"]
    magics.view = "dashboard"
    try:
        started = time.monotonic()
        nb.run('%%amp_train --dtype bf16 --seed 3 --search "lr=0.01,0.1" --sampler grid '
               f"--trials 2 --background -o found\n{BODY}")
        in_the_cell = len(published)  # displayed from the cell's thread, never the search's
        nb.run("%amp_wait")
        took = time.monotonic() - started
    finally:
        magics.view = "text"
    found = nb.user_ns["found"]
    assert found.status == "finished" and len(found.finished) == 2
    ((view, run),) = shown
    assert run is None and view.stoppable and view.on_stop == found.request_stop
    assert in_the_cell == 2 and all(
        "application/vnd.jupyter.widget-view+json" in d for d in published[:2])
    while_running = [p for p in panels if ">RUNNING<" in p]  # at most every 2 s, per trial
    assert len(while_running) <= 2 * (1 + took / 2), (len(while_running), took)
    after_each = [p for p in panels if ">RUNNING<" not in p]
    assert [p.split(" · ")[0].rsplit(">", 1)[-1] for p in after_each] == [
        "trial 1 of 2", "trial 2 of 2"]  # redrawn once per trial, not per step
    assert all("in the background: %amp_stop" in p for p in panels)  # how to stop it, kept
    final = [d["text/html"] for d in published[2:] if 'class="amp-search"' in d["text/html"]]
    assert final and 'img class="amp-chart"' in final[-1] and "<svg" not in final[-1]
    assert any('class="amp-dashboard"' in d["text/html"] for d in published[2:])


def prepared(model, opt, data, views=(), on_trial=None, **keywords):
    from amp_magics.training.options import TrainOptions, split_keywords
    from amp_magics.tuning.plan import SearchPlan
    from amp_magics.tuning.search import prepare_search

    plan, options = split_keywords("search", {
        "model": model, "optimizer": opt, "data": data, "dtype": "bf16",
        "space": "lr=0.01,0.1", "sampler": "grid", "trials": 2, **keywords},
        SearchPlan, TrainOptions)
    return prepare_search(step_of(model), TrainOptions(**options), SearchPlan(**plan), views,
                          on_trial)


def test_a_stop_as_a_trial_starts_or_between_two_ends_the_search_with_nothing_running():
    class StopAtStart(amp_magics.View):  # runs before the trial's own watch sees the run
        def on_start(self, run):
            searching.result.request_stop()

    model, opt, data = objects()
    searching = prepared(model, opt, data, [StopAtStart()])
    found = searching.execute()
    (trial,) = found.trials
    assert found.status == "interrupted" and trial.state == "FAIL" and trial.steps == 0
    assert "interrupted" in trial.reason
    found = prepared(model, opt, data, on_trial=lambda f, t: f.request_stop()).execute()
    assert [t.state for t in found.trials] == ["COMPLETE"]
    assert (found.status, found.stop_reason) == ("interrupted", "stopped between trials")
    assert "RUNNING" not in {t.state.name for t in found.study.get_trials(deepcopy=False)}


@pytest.mark.parametrize("error, status", [(RuntimeError("drawing failed"), "failed"),
                                           (KeyboardInterrupt(), "interrupted")])
def test_an_error_around_a_trial_ends_the_search_saying_so_with_nothing_running(error, status):
    """Not only the user's step: asking the study, the panel's drawing, a Ctrl-C between."""
    def on_trial(found, trial):
        raise error

    model, opt, data = objects()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    searching = prepared(model, opt, data, on_trial=on_trial)
    with pytest.raises(type(error)):
        searching.execute()
    found = searching.result
    assert found.status == status and found.done
    assert found.stop_reason == ("interrupted" if status == "interrupted"
                                 else "RuntimeError: drawing failed")
    assert "RUNNING" not in {t.state.name for t in found.study.get_trials(deepcopy=False)}
    assert_same_state(model.state_dict(), before)  # put back, as --keep start says

    searching = prepared(model, opt, data)  # the study fails as a trial is asked for
    searching.result.study.ask = lambda: (_ for _ in ()).throw(error)
    with pytest.raises(type(error)):
        searching.execute()
    assert searching.result.status == status

    searching = prepared(model, opt, data)  # asked for, then failing before it trains
    start, calls = searching.loan.start, []

    def restore_fails_once():
        calls.append(1)
        if len(calls) == 1:
            raise error
        type(start).restore(start)  # the model is still put back at the end
    start.restore = restore_fails_once
    with pytest.raises(type(error)):
        searching.execute()
    asked = [t for t in searching.result.study.get_trials(deepcopy=False)
             if t.state.name != "WAITING"]  # (the grid's next setting waits in its queue)
    assert [t.state.name for t in asked] == ["FAIL"] == [t.state for t in searching.result.trials]
    assert_same_state(model.state_dict(), before)


def test_the_panel_draws_the_running_trials_curve_as_it_trains(nb, monkeypatch):
    from amp_magics.magics import train as magic
    from amp_magics.views import dashboard

    panels = []
    nb.user_ns["time"] = time
    monkeypatch.setattr(dashboard.LiveHtml, "update", lambda self, html: panels.append(html))
    monkeypatch.setattr(magic._TrialsPanel, "REDRAW_SECONDS", 0.0)  # at every refresh
    magics = nb.magics_manager.registry["AmpMagics"]
    magics.view = "dashboard"
    try:
        nb.run('%%amp_train --dtype bf16 --seed 3 --search "lr=0.01" --sampler grid --trials 1 '
               f"--epochs 30 --report-every 2 --refresh 0.01 -o found\n{SLOW_BODY}")
    finally:
        magics.view = "text"
    running = [p for p in panels if ">RUNNING<" in p]
    assert running, "no redraw while the trial trained"
    assert 'class="amp-search"' in running[-1] and ">trial 0<" in running[-1]  # its curve
