"""`--search` / `amp_magics.search`: a sampler that learns from earlier trials (Optuna, an
optional extra), a pruner watching the live curves, and a study that resumes from its file.

Every trial starts from the same starting state and trains exactly as a `--sweep` run with the
same values would (tuning/sweep.train_setting). Its objective is the validation loss at each
epoch end with `val`, else the smoothed train loss (or the smoothed `--log` scalar named by
`objective`). Intermediate values go to the pruner every `report_every` optimizer steps (or at
epoch ends with `val`), never from a step the loss scaler skipped; a non-finite loss prunes the
trial with that reason (under fp16, MAX_NONFINITE_IN_A_ROW skipped steps in a row, as the
learning-rate finder reads them), and a diverged trial has no objective. Ctrl-C, Stop or an
exception end the current trial as FAIL with its reason, never RUNNING; a study resumed from
its journal marks trials a dead kernel left RUNNING as failed, and tries the values of failed
trials again first.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import AmpUsageError
from ..tensors import StepFn
from ..training.objects import Loan, TrainingObjects
from ..training.options import TrainOptions
from ..training.registry import unique_group
from ..training.view import View
from .findings import MAX_NONFINITE_IN_A_ROW, SMOOTHING, Search, TrialRecord, Trials
from .hyperparameters import check_values
from .plan import PRUNERS, SAMPLERS, SearchPlan
from .space import Dimension, parse_space
from .sweep import train_setting

STARTUP_TRIALS = 5  # trials the median and percentile pruners let finish before pruning
PATIENCE = 2  # reports in a row the pruner must find hopeless before a trial is pruned
INSTALL = 'pip install "amp_magics[search]" (or pip install optuna)'


def checked_plan(plan: SearchPlan, space: dict[str, Dimension]) -> None:
    if plan.sampler not in SAMPLERS:
        raise AmpUsageError(f"--sampler {plan.sampler}: choose from {', '.join(SAMPLERS)}")
    if plan.prune not in PRUNERS:
        raise AmpUsageError(f"--prune {plan.prune}: choose from {', '.join(PRUNERS)}")
    if plan.direction not in ("minimize", "maximize"):
        raise AmpUsageError(f"--direction {plan.direction}: minimize or maximize")
    if plan.keep not in ("start", "best"):
        raise AmpUsageError(f"--keep {plan.keep}: start or best")
    if isinstance(plan.trials, bool) or not isinstance(plan.trials, int) or plan.trials < 1:
        raise AmpUsageError(f"--trials must be a positive whole number, got {plan.trials!r}")
    if plan.report_every is not None and not (isinstance(plan.report_every, int)
                                              and plan.report_every >= 1):
        raise AmpUsageError("--report-every must be a positive number of optimizer steps")
    if plan.sampler == "grid" and any(d.kind != "choice" for d in space.values()):
        raise AmpUsageError("--sampler grid needs a list of values for every key, e.g. "
                            '"lr=1e-3,1e-2; clip=0.5,1": it cannot grid log() or uniform()')
    if plan.study is not None and not plan.study.replace("-", "_").isidentifier():
        raise AmpUsageError(f"--study {plan.study}: a name of letters, digits, _ and -")


def check_search_options(options: TrainOptions, plan: SearchPlan) -> None:
    refused = [flag for flag, given in (("--checkpoint", options.checkpoint),
                                        ("--resume", options.resume),
                                        ("--nproc", options.nproc not in (1, "1"))) if given]
    if refused:
        raise AmpUsageError(f"--search trains its trials one after another in this process "
                            f"from the same start: drop {', '.join(refused)}")
    if plan.objective is not None and plan.objective not in options.log:
        raise AmpUsageError(f"--objective {plan.objective} is a scalar the body records: add "
                            f"--log {plan.objective}")
    if plan.objective is not None and options.val is not None:
        raise AmpUsageError(
            f"--objective {plan.objective} and --val: the validation pass computes only the "
            "loss (the body's --log values are not kept there), so with --val the objective "
            f"is the validation loss; drop --objective for it, or drop --val to optimise the "
            f"smoothed train {plan.objective}")


def require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise AmpUsageError(f"--search is built on Optuna, which is not installed: {INSTALL}"
                            ) from None
    return optuna


def prepare_search(step_fn: StepFn, options: TrainOptions, plan: SearchPlan,
                   views: Sequence[View] = (),
                   on_trial: Callable[[Search, TrialRecord], None] | None = None) -> Searching:
    """Check everything, own the model and open the study, without training yet: `.execute()`
    runs the trials (in this thread or a background one) and lets the model go. Bad input
    raises AmpUsageError, and `ownership.Owned` when a run trains the model, before anything
    changes."""
    optuna = require_optuna()
    space = parse_space(plan.space, options.optimizers)
    checked_plan(plan, space)
    check_search_options(options, plan)
    check_values("--search", options, {
        key: d.choices if d.kind == "choice" else (d.low, d.high) for key, d in space.items()})
    every = plan.report_every or _a_tenth_of_a_trial(options)
    name = unique_group(options.name or (plan.study or "search"))
    objects, held = TrainingObjects.of(options), contextlib.ExitStack()
    loan = held.enter_context(objects.borrowed(name, options.data))
    try:  # owned first: a refused search leaves its study as it was
        study, journal = _study(optuna, plan, space, options, every)
        result = Search(_objective_words(plan, options), plan.direction, plan.trials,
                        journal=journal, study=study, name=name)
        result.trials = Trials(_recover(optuna, study))
        if plan.sampler == "grid":  # every setting once, queued as a sweep would run them
            result.target = min(plan.trials,
                                len(result.finished) + _queue_grid(optuna, study, space))
        result.setup = _describe(study, plan, options, every)
    except BaseException:
        held.close()
        raise
    return Searching(optuna, step_fn, options, plan, space, every, list(views), on_trial,
                     objects, loan, held, result)


INTERRUPTED = "interrupted: tried again first on resume"


class Searching:
    """A prepared search: the model owned (`loan`), the study open (`result.study`)."""

    def __init__(self, optuna: Any, step_fn: StepFn, options: TrainOptions, plan: SearchPlan,
                 space: dict[str, Dimension], every: int, views: list[View],
                 on_trial: Callable[[Search, TrialRecord], None] | None,
                 objects: TrainingObjects, loan: Loan, held: contextlib.ExitStack,
                 result: Search):
        self.optuna, self.step_fn, self.options, self.plan = optuna, step_fn, options, plan
        self.space, self.every, self.views, self.on_trial = space, every, views, on_trial
        self.objects, self.loan, self.held, self.result = objects, loan, held, result
        self.asked: tuple[Any, TrialRecord] | None = None  # a trial not yet told its end

    def execute(self) -> Search:
        """The trials, until enough finished, one failed, or a stop; then the model is put
        back (or keeps the best trial's state) and let go, however it ends."""
        __tracebackhide__ = True
        result, loan = self.result, self.loan
        try:
            while len(result.finished) < result.target and result.status == "running":
                if result.stop_requested:  # Stop came between two trials
                    result.status, result.stop_reason = "interrupted", "stopped between trials"
                    break
                record = self._trial()
                if self.plan.keep == "best" and record is result.best:
                    with loan.claim.step_lock:  # a measurement waits, as between steps
                        loan.returned = self.objects.snapshot(self.options.data)
                if self.on_trial is not None:
                    self.on_trial(result, record)
            if result.status == "running":
                result.status = "finished"
        except BaseException as e:
            self._ended_by(e)
            raise
        finally:
            self.release()
        return result

    def _ended_by(self, error: BaseException) -> None:
        """Ended by an error or a Ctrl-C, in a trial or around one (asking the study, drawing,
        the journal): the search says how, and no trial is left RUNNING."""
        result, interrupted = self.result, isinstance(error, KeyboardInterrupt)
        reason = "interrupted" if interrupted else f"{type(error).__name__}: {error}"
        if self.asked is not None and self.asked[1].state == "RUNNING":
            trial, record = self.asked
            with contextlib.suppress(Exception):  # the journal itself may be what failed
                _tell(self.optuna, result.study, trial, record, "FAIL",
                      INTERRUPTED if interrupted else reason)
        if result.status == "running":
            result.status = "interrupted" if interrupted else "failed"
            result.stop_reason = reason

    def release(self) -> None:
        """Put the model back and let it go (also for a search that never executes)."""
        with self.loan.claim.step_lock:
            self.held.close()

    def _trial(self) -> TrialRecord:
        __tracebackhide__ = True
        optuna, study, result = self.optuna, self.result.study, self.result
        trial = study.ask()
        record = TrialRecord(trial.number, {}, "RUNNING")
        self.asked = trial, record
        record.params = setting = {key: d.suggest(trial) for key, d in self.space.items()}
        result.trials.append(record)
        with self.loan.claim.step_lock:
            self.loan.start.restore()
        watch = TrialWatch(trial, record, self.plan, self.options, self.every, result)
        # the user's step failing ends the trial, and the search (execute's _ended_by)
        record.run = train_setting(self.step_fn, setting, self.options, [*self.views, watch],
                                   self.loan.claim, result.name, watch.attach)
        if record.run.status == "interrupted" and not watch.pruned:  # Ctrl-C or Stop
            _tell(optuna, study, trial, record, "FAIL", INTERRUPTED)
            result.status, result.stop_reason = "interrupted", f"trial {trial.number} interrupted"
        elif watch.pruned or record.value is None or not math.isfinite(record.value):
            _tell(optuna, study, trial, record, "PRUNED",
                  watch.pruned or f"the objective is {record.value}: no finite value")
        else:
            _tell(optuna, study, trial, record, "COMPLETE")
        return record


def _tell(optuna: Any, study: Any, trial: Any, record: TrialRecord, state: str,
          reason: str = "") -> None:
    record.state, record.reason = state, reason
    if reason:
        trial.set_user_attr("reason", reason)
    if state == "PRUNED" and record.run is not None:
        record.run.notes.append(f"pruned by the search: {reason}")
    trial.set_user_attr("steps", record.steps)
    states = optuna.trial.TrialState
    if state == "COMPLETE":
        study.tell(trial, record.value)
    else:
        study.tell(trial, state=getattr(states, state))


class TrialWatch(View):
    """Watches one trial's run: smooths its objective over the steps that trained, reports it
    to the pruner every `report_every` steps (or each validation with val), and stops the
    run when the pruner says so, or once it diverged: a non-finite loss on a step that
    trained, or MAX_NONFINITE_IN_A_ROW skipped ones in a row (the lr finder's rule)."""

    def __init__(self, trial: Any, record: TrialRecord, plan: SearchPlan, options: TrainOptions,
                 every: int, search: Search):
        self.trial, self.record, self.plan, self.search = trial, record, plan, search
        self.validated = options.val is not None
        self.field = plan.objective or "loss"
        self.every = every
        self.seen = self.val_seen = self.applied = 0
        self.average, self.smoothed, self.pending = 0.0, None, False
        self.pruned = ""  # why, once pruned
        self.diverged = False
        self.streak: list = []  # (step, name, value) of the skipped non-finite steps in a row
        self.books = None

    def attach(self, training: Any) -> None:
        """Refresh right after every `report_every`-th step, so the pruner sees each report
        as it happens (between reports the run pays nothing)."""
        if self.validated:
            return
        books, record = training.books, training.amp.recorder.record
        steps = [0]

        def watched(step: tuple) -> None:
            record(step)
            steps[0] += 1
            if steps[0] % self.every == 0:
                books.next_refresh = 0.0
        training.amp.recorder.record = watched

    def on_start(self, run: Any) -> None:
        self.record.run = run  # first, then the flag: a Stop between them still lands
        if self.search.stop_requested:
            run.request_stop()

    def on_refresh(self, run: Any) -> None:
        self._read(run)

    def on_end(self, run: Any) -> None:
        self._read(run)
        self.record.steps = len(run.history)
        if self.streak and run.status == "finished":  # too short a streak to tell: no score
            step, name, value = self.streak[0]
            self._diverged(run, step, f"{name} is {value} at its last {len(self.streak)} "
                                      f"steps (from step {step}, skipped by the loss scaler): "
                                      "it may have diverged")
        if self.diverged or self.streak:  # what it scored before that is no objective
            self.record.value = None
        elif self.validated:
            self.record.value = run.val_history[-1]["val_loss"] if run.val_history else None
        else:
            self.record.value = self.smoothed

    def _read(self, run: Any) -> None:
        new, self.seen = run.history[self.seen:], len(run.history)
        for r in new:
            self.pending = self.pending or (r["step"] + 1) % self.every == 0
            value = r.get(self.field)
            bad = next(((name, v) for name, v in (("loss", r["loss"]), (self.field, value))
                        if v is None or not math.isfinite(v)), None)
            if r["skipped"]:  # trained nothing: its report waits for the next step that did
                # one non-finite loss can be a passing fp16 overflow; a few in a row, not
                self.streak = self.streak + [(r["step"], *bad)] if bad else []
                if len(self.streak) >= MAX_NONFINITE_IN_A_ROW:
                    step, name, first = self.streak[0]
                    return self._diverged(run, step, (
                        f"{name} is {first} for {len(self.streak)} steps in a row from step "
                        f"{step} (each skipped by the loss scaler): diverged, or the forward "
                        "pass overflows fp16"))
                continue
            if bad:
                return self._diverged(run, r["step"], f"{bad[0]} is {bad[1]} at step {r['step']}")
            self.streak = []
            self.applied += 1
            self.average = SMOOTHING * self.average + (1 - SMOOTHING) * value
            self.smoothed = self.average / (1 - SMOOTHING ** self.applied)
            if self.pending and not self.validated:
                self.pending = False
                self._report(run, self.smoothed, r["step"])
        if self.validated:
            for v in run.val_history[self.val_seen:]:
                self._report(run, v["val_loss"], v["step"])
            self.val_seen = len(run.val_history)
        return None

    def _diverged(self, run: Any, step: int, reason: str) -> None:
        if not self.pruned:
            self.diverged = True
            self.trial.set_user_attr("diverged_at", step)  # a resumed study scores it None
        self._prune(run, reason)

    def _report(self, run: Any, value: float, step: int) -> None:
        if self.pruned:
            return
        self.trial.report(value, step)
        self.record.reports.append((step, value))
        if self.trial.should_prune():
            self._prune(run, f"pruned at step {step}: {self.field} {value:.4g} not among the "
                             "better trials at that step")

    def _prune(self, run: Any, reason: str) -> None:
        if not self.pruned:
            self.pruned = reason
            run.request_stop()


# -- the study --------------------------------------------------------------------------------
def _a_tenth_of_a_trial(options: TrainOptions) -> int:
    """The default report interval: a tenth of a trial's optimizer steps (50 for a stream)."""
    total = options.total_steps
    return max(1, total // 10) if total else 50


def _study(optuna: Any, plan: SearchPlan, space: dict[str, Dimension],
           options: TrainOptions, every: int) -> tuple[Any, str | None]:
    """Create the study, or load it from its journal file and go on with it."""
    storage, journal = None, None
    if plan.study is not None:
        os.makedirs(plan.study_dir, exist_ok=True)
        journal = os.path.abspath(os.path.join(plan.study_dir, f"{plan.study}.journal"))
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(journal))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=plan.study or "search", storage=storage,
                                direction=plan.direction, load_if_exists=True,
                                sampler=_sampler(optuna, plan, space, options.seed, 0),
                                pruner=_pruner(optuna, plan, every))
    if study.direction.name.lower() != plan.direction:
        raise AmpUsageError(f"--study {plan.study} was made to {study.direction.name.lower()}: "
                            f"give --direction {study.direction.name.lower()}, or another name")
    # a resumed seeded search goes on with its sampler, never replaying earlier values
    study.sampler = _sampler(optuna, plan, space, options.seed, len(study.trials))
    return study, journal


def _sampler(optuna: Any, plan: SearchPlan, space: dict[str, Dimension], seed: int | None,
             done: int) -> Any:
    seed = None if seed is None else (seed + done) % 2**32
    samplers = optuna.samplers
    if plan.sampler == "grid":  # the grid is queued (_queue_grid); GridSampler cannot ask/tell
        return samplers.RandomSampler(seed=seed)
    if plan.sampler == "cmaes":
        try:
            import cmaes  # noqa: F401  (Optuna's CMA-ES needs it)
        except ImportError:
            raise AmpUsageError("--sampler cmaes needs the cmaes package: pip install cmaes"
                                ) from None
        return samplers.CmaEsSampler(seed=seed)
    return (samplers.RandomSampler if plan.sampler == "random" else samplers.TPESampler)(seed=seed)


def _pruner(optuna: Any, plan: SearchPlan, every: int) -> Any:
    pruners = optuna.pruners
    warmup = 2 * every
    base = {"median": lambda: pruners.MedianPruner(STARTUP_TRIALS, warmup),
            "percentile": lambda: pruners.PercentilePruner(25.0, STARTUP_TRIALS, warmup),
            "hyperband": lambda: pruners.HyperbandPruner(min_resource=warmup),
            "none": lambda: None}[plan.prune]()
    if base is None:
        return pruners.NopPruner()
    with warnings.catch_warnings():  # "PatientPruner is experimental": it is what we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return pruners.PatientPruner(base, PATIENCE)


def _describe(study: Any, plan: SearchPlan, options: TrainOptions, every: int) -> str:
    warmup = 2 * every
    reports = f"every {every} steps"
    if options.val is not None:  # the validation loss exists only at epoch ends
        given = ""
        if plan.report_every is not None:
            given = f"; --report-every {plan.report_every} " + (
                "is not used" if plan.prune == "none" else "sets only the warm-up")
        reports = f"at each epoch end (with --val{given})"
    if plan.prune == "hyperband":  # no startup trials: its brackets start at once
        when = f"successive halving from {warmup} steps (its minimum resource)"
    else:
        when = f"after {STARTUP_TRIALS} trials and {warmup} warm-up steps"
    prune = ("no pruning" if plan.prune == "none" else
             f"{plan.prune} pruner, patient ({PATIENCE} hopeless reports in a row), {when}")
    seed = "" if options.seed is None else f", seeded {options.seed}"
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    queued = states.count("WAITING")  # the grid's settings and failed trials' retries
    ran = len(states) - queued
    return (f"{plan.sampler} sampler{seed}; {prune}, reports {reports}; {ran} "
            f"trial{'s' * (ran != 1)} run in the study so far"
            + (f", {queued} queued" if queued else ""))


def _objective_words(plan: SearchPlan, options: TrainOptions) -> str:
    if options.val is not None:
        return "validation loss at each epoch end"
    return f"smoothed train {plan.objective or 'loss'}"


def _queue_grid(optuna: Any, study: Any, space: dict[str, Dimension]) -> int:
    """Queue every setting of the grid that no trial has finished or is queued for (a failed
    setting's retry included); return how many are queued."""
    states = optuna.trial.TrialState
    taken = {_key(_params(optuna, t)) for t in study.get_trials(deepcopy=False)
             if t.state in (states.COMPLETE, states.PRUNED, states.WAITING)}
    keys = list(space)
    for values in itertools.product(*(space[k].choices for k in keys)):
        params = dict(zip(keys, values))
        if _key(params) not in taken:
            study.enqueue_trial(params)
    return len(study.get_trials(deepcopy=False, states=(states.WAITING,)))


def _params(optuna: Any, trial: Any) -> dict:
    """A trial's values; a queued trial has none yet, only those it was queued with."""
    if trial.state == optuna.trial.TrialState.WAITING:
        return trial.system_attrs.get("fixed_params", {})
    return trial.params


def _key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


LEFT_RUNNING = "left running by a kernel that stopped"


def _recover(optuna: Any, study: Any) -> list[TrialRecord]:
    """A resumed study: trials a dead kernel left RUNNING are marked failed; the values of
    failed trials not tried again yet are queued first. Returns the earlier trials."""
    states = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        study.tell(t.number, state=states.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == states.FAIL and t.number not in retried:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
    trials = [t for t in trials if t.state != states.WAITING]  # queued: not run yet
    return [TrialRecord(t.number, dict(t.params), t.state.name,
                        None if "diverged_at" in t.user_attrs else t.value,
                        t.user_attrs.get("steps", 0),
                        t.user_attrs.get("reason", LEFT_RUNNING if t.state == states.FAIL
                                         else ""))
            for t in trials]
