"""`amp_magics.train`: the Python entry point, for notebooks and scripts alike."""
from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional

from .training import registry
from .training.options import TrainOptions, checked_output_path, option_specs, split_keywords
from .training.run import Run
from .training.view import View

if TYPE_CHECKING:
    from .tuning.findings import BatchSizeFinding, LrFinding, Search


def train(step_fn: Callable[..., Any], *, progress: bool = True, observers: Sequence[View] = (),
          save: Optional[str] = None, **options: Any) -> Run:
    """Train a model with automatic mixed precision; return the Run.

    step_fn(batch) -> loss, or step_fn(batch, step, epoch) -> loss. It may also return a dict
    with "loss" and the names given in `log`. It runs under torch.autocast; the engine does
    backward, GradScaler, clipping, the optimizer and scheduler steps, as PyTorch's AMP recipes.

    The options are those of %%amp_train, as keywords (model, optimizer and data are
    required; each is listed below and in the README's table). Besides them: progress (a text
    line when no observers are given); observers (View objects); save (path: the Run's JSON,
    written when the run ends however it ends, before an error or Ctrl-C goes on to the
    caller).

    On Ctrl-C the run ends after the current optimizer step with status "interrupted" (a
    second Ctrl-C stops at once) and the checkpoint is written. Inside IPython the Run is
    returned; elsewhere (a script) KeyboardInterrupt is then raised with the Run as its `.run`,
    so that the process ends as on any Ctrl-C (exit status 130). An exception in step_fn or in
    the data marks the run "failed" and is re-raised.
    """
    __tracebackhide__ = True
    from .distributed import prepare_training
    from .distributed.torchrun import torchrun_context

    options = TrainOptions.from_keywords("train", options)
    save = checked_output_path(save, "save", "run.json") if save is not None else None
    training = prepare_training(step_fn, options, _views(progress, observers))
    ranked = torchrun_context()
    if ranked is not None and ranked.rank != 0:
        save = None  # under torchrun, rank 0 saves
    try:
        training.execute()
    except BaseException:
        if save is not None and training.run is not None:
            _save_quietly(training.run, save)  # the error that ended the run is what the caller sees
        raise
    return _finished(training.run, save, options.checkpoint)


def find_lr(step_fn: Callable[..., Any], *, start: float = 1e-7, end: float = 10.0,
            steps: int = 100, progress: bool = True, observers: Sequence[View] = (),
            **options: Any) -> LrFinding:
    """The learning-rate range test: `steps` applied optimizer steps with the lr rising
    log-linearly from `start` to `end` (a step the loss scaler skips is tried again at the same
    lr), stopped early when the smoothed loss exceeds 4x its minimum or is not finite. Returns
    an LrFinding: `.records`, `.suggestions` (valley, steep, minimum/10, slide, each with its
    rule), `.suggestion`, `.apply()`. The model, gradients, optimizers, scaler, scheduler, RNG
    and the data's order are put back afterwards, however it ends (Ctrl-C in a script: the
    KeyboardInterrupt goes on with the finding as its `.finding`). The options are
    `amp_magics.train`'s that apply (dtype, accum, clip, init_scale or scaler, seed, move...).
    """
    __tracebackhide__ = True
    from .tuning.findings import LrFinding
    from .tuning.lr_finder import range_test

    finding = LrFinding.new(start, end, steps)
    options = TrainOptions.from_keywords("find_lr", options)
    views = _views(progress, observers)
    range_test(step_fn, options, finding, views)
    if progress and not observers:
        print(repr(finding))
    try:
        _raise_if_interrupted(finding.run, None, None)
    except KeyboardInterrupt as stop:  # a script's Ctrl-C: it carries what was found
        stop.finding = finding
        raise
    return finding


def find_batch_size(step_fn: Callable[..., Any], *, max_size: Optional[int] = None,
                    max_memory: Optional[str] = None, headroom: Optional[float] = None,
                    compare: Optional[str] = None,
                    progress: bool = True, **options: Any) -> BatchSizeFinding:
    """The largest batch size that trains with headroom: from `data`'s own batch size (a
    DataLoader, or a Dataset: from 1), halving while it does not fit, doubling while it fits
    (up to `max_size`), then bisecting; each trial trains 3 whole optimizer steps from the
    same starting state on the loader re-made with that size (its sampler, collate_fn, workers
    and generator kept). It fits when its peak memory leaves `headroom` percent (default 10;
    the finding's `.headroom` is that share, 0.1) of the device's memory free (or of `max_memory`: "6GiB", "80%"); out of memory is
    recognised by type and cleaned up.
    `compare="fp32,bf16"` answers for each precision. Returns a BatchSizeFinding: `.batch_size`,
    `.trials`, `.searches` (per precision), `.loader` (re-made with the answer). Everything is
    put back afterwards, however it ends (Ctrl-C in a script: the KeyboardInterrupt goes on with
    the finding as its `.finding`). The options are `amp_magics.train`'s that apply (dtype,
    accum, clip...).
    """
    __tracebackhide__ = True
    from .tuning.batch_size import find_batch_size as run

    options = TrainOptions.from_keywords("find_batch_size", options)
    precisions = tuple(p.strip() for p in compare.split(",") if p.strip()) if compare else ()
    report = (lambda finding, trial: print(f"batch {trial.batch_size}: {trial.result}",
                                           flush=True)) if progress else None
    finding = run(step_fn, options, max_size=max_size, max_memory=max_memory,
                  headroom=headroom, precisions=precisions, on_trial=report)
    if progress:
        print(repr(finding))
    if finding.status == "interrupted" and not _in_ipython():  # a script's Ctrl-C goes on
        stop = KeyboardInterrupt("find_batch_size interrupted: its trials so far are on "
                                 "this exception's .finding")
        stop.finding = finding
        raise stop
    return finding


def search(step_fn: Callable[..., Any], *, progress: bool = True,
           observers: Sequence[View] = (), **keywords: Any) -> Search:
    """Search `space` ({"lr": "log(1e-5,1e-1)", "weight_decay": [0, 1e-4]}, or --search's
    text) with Optuna: `trials` finished trials, each from the same starting state and trained
    as `--sweep` would with its values, pruned on the live curve, the study kept in
    `study_dir/<study>.journal` with `study=` (a re-run continues it). Returns a Search:
    `.best_params`, `.best_run`, `.trials`, `.study`, `.to_pandas()`. With `progress`, how it
    searches (sampler, pruner, startup trials, warm-up) is printed first, then one line per
    trial and a summary. Ctrl-C ends the search after the current step (that
    trial FAIL, tried again first on resume); in a script the KeyboardInterrupt then goes on
    with the Search as its `.search`. The remaining keywords are `amp_magics.train`'s.
    """
    __tracebackhide__ = True
    from .tuning.plan import SearchPlan
    from .tuning.search import prepare_search

    plan, options = split_keywords("search", keywords, SearchPlan, TrainOptions)
    if "space" not in plan:  # as Python says it, and what goes there
        raise TypeError('search() missing keyword argument space=: what to search, e.g. '
                        'space="lr=log(1e-5,1e-1); weight_decay=0,1e-4"')
    plan, options = SearchPlan(**plan), TrainOptions.from_keywords("search", options)
    report = (lambda found, trial: print(trial.line(), flush=True)) if progress else None
    searching = prepare_search(step_fn, options, plan, [*observers, *registry.kernel_views()],
                               report)
    if progress:  # how it searches (sampler, pruner, warm-up), before the first trial
        print("\n".join(searching.result.header()), flush=True)
    found = searching.execute()
    if progress:
        print(found.lines()[-1])
    if found.status == "interrupted":
        try:
            _raise_if_interrupted(found.trials[-1].run, None, None)
        except KeyboardInterrupt as stop:  # a script's Ctrl-C: it carries the search
            stop.search = found
            raise
    return found


def _views(progress: bool, observers: Sequence[View]) -> list[View]:
    """The observers (a text progress line if none), and what the kernel adds to every run
    (in JupyterLab, the file its status bar reads)."""
    views = list(observers)
    if progress and not views:
        from .views.reporter import ConsoleReporter

        views.append(ConsoleReporter())
    return views + registry.kernel_views()


def _finished(run: Run, save: Optional[str], checkpoint: Optional[str]) -> Run:
    if save is not None:
        run.save(save)
    _raise_if_interrupted(run, checkpoint, save)
    return run


def _raise_if_interrupted(run: Run, checkpoint: Optional[str], save: Optional[str]) -> None:
    """A script stopped by Ctrl-C ends as on any Ctrl-C (exit status 130); inside IPython, and
    after %amp_stop or Stop, the caller goes on."""
    if (run.status == "interrupted" and getattr(run, "stop_reason", None) is not None
            and not _in_ipython()):  # Ctrl-C: engine.py marks it; %amp_stop and Stop do not
        raise _interrupt(run, checkpoint, save) from None


def _keyword_signature(function: Callable, specs: Sequence) -> inspect.Signature:
    """`function`'s signature with each option as a keyword, for help() and Jupyter's
    tooltips (the options are written once, in TrainOptions)."""
    params = [p for p in inspect.signature(function).parameters.values()
              if p.kind is not p.VAR_KEYWORD]
    own = {p.name for p in params}  # find_lr's `steps` is its own
    params += [inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY,
                                 default=(inspect.Parameter.empty
                                          if spec.default is dataclasses.MISSING
                                          else spec.default))
               for spec in specs if spec.option.keyword and spec.name not in own]
    return inspect.Signature(params, return_annotation=inspect.signature(function).return_annotation)


def _options_doc(specs: Sequence) -> str:
    return "\n".join(f"    {spec.name}: {spec.option.help}" for spec in specs
                     if spec.option.keyword)


def _plan_specs() -> list:
    from .tuning.plan import SearchPlan

    return option_specs(SearchPlan)


for _function, _specs in ((train, option_specs()), (find_lr, option_specs()),
                          (find_batch_size, option_specs()),
                          (search, _plan_specs() + option_specs())):
    _function.__signature__ = _keyword_signature(_function, _specs)
    if _function.__doc__:  # None under python -OO
        _function.__doc__ += "\n    Options:\n" + _options_doc(_specs) + "\n"


def _interrupt(run: Run, checkpoint: Optional[str], saved: Optional[str]) -> KeyboardInterrupt:
    """The Ctrl-C that stopped `run`, to go on to a script's caller. KeyboardInterrupt itself,
    not a subclass: only then does an uncaught one end Python as SIGINT does (status 130)."""
    parts = [f"{run.name} interrupted after {len(run.history)} optimizer step(s)"]
    if checkpoint:  # a second Ctrl-C (or one landing mid-step) stops before the save
        parts.append(f"checkpoint {checkpoint} " + (
            "written at the stop" if getattr(run, "stop_reason", None) == "sigint"
            else "not updated at the stop (it came mid-step)"))
    if saved:
        parts.append(f"run saved to {saved}")
    interrupt = KeyboardInterrupt("; ".join(parts))
    interrupt.run = run
    return interrupt


def _in_ipython() -> bool:
    """An IPython shell or Jupyter kernel is running (it is never imported for this)."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    return get_ipython is not None and get_ipython() is not None


def _save_quietly(run: Run, path: str) -> None:
    import warnings

    try:
        run.save(path)
    except Exception as e:
        warnings.warn(f"could not save {run.name} to {path}: {e!r}", RuntimeWarning,
                      stacklevel=3)
