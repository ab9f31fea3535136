"""%%amp_train, %amp_stop, %amp_wait and %amp_runs: a thin IPython adapter over the engine.

It parses flags (generated from the TrainOptions fields, plus the magic's own), finds the
notebook's objects by name, compiles the cell body once through IPython's own pipeline,
picks the view (live dashboard or text line) and hands over to
`distributed.prepare_training(...).execute()`.
"""
from __future__ import annotations

import re
import sys
import time
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Enum, Float, Unicode

from ..formatting import format_bytes
from ..training import registry
from ..training.options import DIAGNOSIS, DISPLAY, Option, OptionSpec, option_specs
from ..training.view import View
from ..tuning.plan import SearchPlan
from .args import generated_flags, parse
from .notebook import CellStep, resolve_objects, usage_errors

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from ..training.registry import RunList
    from ..training.run import Run
    from ..tuning.showdown import Showdown
    from ..tuning.sweep import Sweep
    from ..views.dashboard import Picture


def _flag(name: str, default: Any = None, kind: type = str, **how: Any) -> OptionSpec:
    return OptionSpec(name, Option(**how), default, kind)


# %%amp_train's own flags, beside the options it builds a TrainOptions from
MAGIC_FLAGS = [
    _flag("output", short="-o", help="store the Run in this notebook variable", group=DISPLAY,
          metavar="NAME",
          doc="store the `Run` (or the `Sweep`, `Search`, showdown or finding) in the "
              "notebook variable NAME"),
    _flag("no_plot", False, bool, help="one-line text progress instead of plots", group=DISPLAY,
          doc="a one-line text progress instead of the dashboard"),
    _flag("background", False, bool, group=DISPLAY,
          help="train in a background thread; the cell returns at once (stop: %amp_stop)",
          doc="train in a thread; the cell returns the `Run` at once and other cells run "
              "meanwhile. A failure keeps its traceback (the cell's lines, a rank's own under "
              "`--nproc`) as `run.traceback`, shown below the cell's notice of how the run "
              "ended and by `%amp_wait`/`%amp_stop`. With `--search`, the whole search (`-o` "
              "gets the `Search`; Stop or "
              "`%amp_stop` ends it after the current step, that trial counted as "
              "interrupted). Executed headless (`nbconvert --execute`, papermill), a run that "
              "ends between two cells gets its saved snapshot when the next cell starts; end "
              "the notebook with `%amp_wait` so that none is still live when it is saved"),
    _flag("sweep", help='one run per setting from the same start, e.g. "lr=1e-3,1e-2; clip=0.5,1"',
          group=DIAGNOSIS, metavar="SPEC",
          doc='one run per setting, all from the same starting state: `"lr=1e-4,3e-4,1e-3"`, '
              'a grid with `;` (`"lr=1e-3,1e-2; weight_decay=0,0.01"`); keys: any numeric '
              "optimizer hyperparameter, `accum`, `clip`, `init_scale`, `dtype`"),
    _flag("compare", metavar="PRECISIONS", group=DIAGNOSIS,
          help="time each precision from the same start, e.g. fp32,bf16,fp16 (with --steps)",
          doc="precision showdown, e.g. `fp32,bf16,fp16` with `--steps 50`: median step time, "
              "peak memory, loss gap to fp32, skipped steps, and a verdict"),
    _flag("find_lr", metavar="START,END", bare="1e-7,10", group=DIAGNOSIS,
          help="learning-rate range test over --steps N (default 100) steps from START to END "
               "(default 1e-7,10); everything is put back afterwards",
          doc="learning-rate range test: `--steps N` (default 100) applied steps with the lr "
              "rising log-linearly from START to END (default `1e-7,10`) on every param group "
              "(ratios kept); a step the loss scaler skips is tried again at the same lr; stops "
              "when the smoothed loss exceeds 4x its minimum or is not finite; suggests valley, "
              "steep, minimum/10 and slide (see below). Model, gradients, optimizers, scaler, "
              "scheduler, RNG and the data's order are as before, however it ends"),
    _flag("find_batch_size", metavar="MAX", bare="", group=DIAGNOSIS,
          help="the largest batch size (up to MAX) whose 3-step trial fits in memory with "
               "--headroom (10%) left free; with --compare, per precision",
          doc="the largest batch size (up to MAX) that trains with headroom: from `--data`'s "
              "own batch size (a DataLoader, or a Dataset from 1), halving while it does not "
              "fit, doubling while it fits, then bisecting; each trial trains 3 whole optimizer "
              "steps on the same loader re-made with that size (sampler, shuffle, collate_fn, "
              "workers, generator kept) from the same start. It fits when its peak memory "
              "leaves `--headroom` (10%) of the device's memory or of `--max-memory` free; "
              "out of memory is recognised by its type, and cleaned up. With `--compare "
              "fp32,bf16`, one answer "
              "per precision. `-o` gives `.batch_size`, `.trials` and `.loader` (re-made with "
              "the answer); everything is put back afterwards"),
    _flag("max_memory", metavar="SIZE|PCT", group=DIAGNOSIS,
          help="with --find-batch-size: the memory a trial may peak at, e.g. 6GiB or 80% "
               "(default: the device's memory; on the CPU the RAM available)",
          doc="with `--find-batch-size`: the memory limit, e.g. `6GiB`, `500MB` or `80%` of the "
              "device's (default: the GPU's memory; on the CPU, the RAM available at the "
              "start). On the CPU memory is counted exactly as tensor bytes (model, gradients, "
              "optimizer state, what a step keeps for backward), and a trial that the last one "
              "predicts over the limit is not run"),
    _flag("headroom", metavar="PCT", group=DIAGNOSIS,
          help="with --find-batch-size: the share of the memory the answer leaves free "
               "(default 10%)",
          doc="with `--find-batch-size`: the share of the memory limit the answer leaves free, "
              "e.g. `20%` (default `10%`): what later steps, a longer sequence or another "
              "process may still need"),
]


def amp_train_flags() -> list[OptionSpec]:
    """Every flag of %%amp_train, in the parser's order (the README's table is made of it)."""
    return option_specs() + MAGIC_FLAGS + option_specs(SearchPlan)


@magics_class
class AmpMagics(Magics):
    """Mixed-precision training magics. Settings: `%config AmpMagics.refresh_seconds = 1.0`."""

    refresh_seconds = Float(0.5, help="Seconds between dashboard refreshes.").tag(config=True)
    study_dir = Unicode("amp_studies", help="Folder of --study's journal files.").tag(config=True)
    view = Enum(["auto", "dashboard", "text"], default_value="auto",
                help="auto: the live dashboard in a Jupyter kernel, a text line in a terminal."
                ).tag(config=True)

    def __init__(self, shell: InteractiveShell | None = None, **kwargs: Any):
        super().__init__(shell=shell, **kwargs)
        if shell is not None and self not in shell.configurables:
            shell.configurables.append(self)
        if getattr(shell, "kernel", None) is not None:  # its runs, for JupyterLab's status bar
            from ..lab.runs_file import RunsFile, this_kernel_id

            kernel_id = this_kernel_id()
            registry.set_kernel_views([RunsFile(kernel_id)] if kernel_id else [])

    @staticmethod
    def _with_kernel_views(views: list) -> list:
        return views + registry.kernel_views()

    # -- %%amp_train ------------------------------------------------------------------
    @generated_flags((option_specs(), True), (MAGIC_FLAGS, False),
                     (option_specs(SearchPlan), True))
    @cell_magic
    def amp_train(self, line: str, cell: str) -> Run | Sweep | Showdown | None:
        """Run the cell body as ONE training step, for every batch, with automatic mixed precision.

        The body sees `batch`, `step` and `epoch` and must assign `loss`. Example:

            %%amp_train --model net --optimizer opt --data train_loader --epochs 2 -o run
            x, y = batch
            loss = F.cross_entropy(net(x), y)
        """
        __tracebackhide__ = True
        args = parse(self.amp_train, line)
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"-o {args.output}: not a valid Python name, e.g. -o run")
        _check_modes(args)
        options = self._options(args)
        step = CellStep(self.shell, cell, options.log)
        if args.find_lr:
            return self._find_lr(args, step, options)
        if args.find_batch_size is not None:
            return self._find_batch_size(args, step, options)
        if hasattr(args, "space"):
            return self._search(args, step, options)
        if args.sweep is not None or args.compare:
            return self._several_runs(args, step, options)
        view = self._view(args, options.model)
        with usage_errors():  # from here on the run owns the model
            training = _prepare_training(step, options, self._with_kernel_views([view]))
        if args.output:
            self.shell.user_ns[args.output] = training.run
        if args.background:
            return self._start_background(training, view, step)
        try:
            with usage_errors():
                training.execute()
        except BaseException as e:
            self._keep_traceback(training.run, e)
            raise
        finally:
            self._export_logged(step)

    def _options(self, args: Any) -> Any:
        """The TrainOptions the flags ask for, the notebook's objects looked up by name."""
        from ..training.options import TrainOptions

        given = {spec.name: getattr(args, spec.name) for spec in option_specs()
                 if hasattr(args, spec.name)}
        finds_batch_size = args.find_batch_size is not None
        given.update(resolve_objects(self.shell.user_ns, given, dataset_data=finds_batch_size))
        if finds_batch_size:
            from ..tuning.batch_size import checked_loader

            with usage_errors():
                given["data"] = checked_loader(given["data"])
        given.setdefault("refresh_seconds", self.refresh_seconds)
        with usage_errors():
            return TrainOptions(**given, config={"model_name": args.model})

    def _start_background(self, training: Any, view: Any, step: CellStep) -> Run:
        run = training.run
        try:
            view.show(run)
            registry.start_background(run, lambda: self._train_quietly(training, step))
        except BaseException:
            training.release()
            raise
        return run

    def _several_runs(self, args, step, options):
        """--sweep and --compare: several runs from one starting state, then a table."""
        __tracebackhide__ = True
        import dataclasses

        from ..tensors import model_device
        from ..tuning import showdown, sweep

        view = self._view(args, options.model, several=True)
        options = dataclasses.replace(options, name=options.name or
                                      ("sweep" if args.sweep is not None else "compare"))
        panel = None
        try:
            with usage_errors():
                if args.sweep is not None:
                    settings = sweep.parse_sweep(args.sweep, options.optimizers)
                    panel = _TrialsPanel(view, f"<p>setting 0 of {len(settings)}: the first "
                                               "is training...</p>")
                    result = sweep.sweep(step, settings, options, self._with_kernel_views([view]),
                                         keep_best=getattr(args, "keep", "start") == "best",
                                         on_run=panel)
                else:
                    precisions = showdown.parse_compare(args.compare, model_device(options.model))
                    result = showdown.showdown(step, precisions, options,
                                               self._with_kernel_views([view]))
        finally:
            if panel is not None:  # its table is the cell's result: the chart stays above
                panel.close(keep=True, table=False)
            view.finish()
        if args.output:
            self.shell.user_ns[args.output] = result
        return result

    def _find_lr(self, args, step, options):
        """--find-lr: the range test, drawn live; the model is left as it was."""
        __tracebackhide__ = True
        from ..tuning.findings import LrFinding
        from ..tuning.lr_finder import range_test
        from ..views.reporter import ConsoleReporter

        start, end = _lr_range(args.find_lr)
        with usage_errors():
            finding = LrFinding.new(start, end, options.steps or 100)
        view = self._view(args, options.model)
        if not isinstance(view, ConsoleReporter):
            from ..views.dashboard import FinderDashboard

            view = FinderDashboard(finding)
        with usage_errors():
            range_test(step, options, finding, self._with_kernel_views([view]))
        registry.add_finding(finding)
        if args.output:
            self.shell.user_ns[args.output] = finding
        return finding

    def _find_batch_size(self, args, step, options):
        """--find-batch-size: trials shown as they run; the model is left as it was."""
        __tracebackhide__ = True
        from ..tuning.batch_size import find_batch_size
        from ..views.reporter import ConsoleReporter

        largest = _count(args.find_batch_size, "--find-batch-size") if args.find_batch_size \
            else None
        precisions = tuple(p.strip() for p in (args.compare or "").split(",") if p.strip())
        live = None if isinstance(self._view(args, options.model), ConsoleReporter) else \
            _LivePanel()
        try:
            with usage_errors():
                finding = find_batch_size(
                    step, options, max_size=largest, max_memory=args.max_memory,
                    headroom=args.headroom, precisions=precisions,
                    on_trial=live or _print_trial)
        finally:
            if live is not None:
                live.close()
        registry.add_finding(finding)
        if args.output:
            self.shell.user_ns[args.output] = finding
        return finding

    def _search(self, args, step, options):
        """--search: trials drawn as they train, a trials panel above; the model ends as
        --keep says. With --background the trials train in a thread and the cell returns."""
        __tracebackhide__ = True
        import dataclasses

        from ..tuning.search import prepare_search
        from ..views.reporter import ConsoleReporter

        plan = SearchPlan(**{s.name: getattr(args, s.name) for s in option_specs(SearchPlan)
                             if hasattr(args, s.name)}, study_dir=self.study_dir)
        view = self._view(args, options.model, several=True)
        text = isinstance(view, ConsoleReporter)
        options = dataclasses.replace(options, name=options.name or plan.study or "search")
        panel = _TrialsPanel(view)
        with usage_errors():  # from here on the search owns the model
            searching = prepare_search(step, options, plan,
                                       self._with_kernel_views([] if text else [view, panel]),
                                       panel)
        found = searching.result
        if args.output:
            self.shell.user_ns[args.output] = found
        if args.background:
            return self._start_background_search(searching, view, panel)
        try:
            panel.start(found)
            with usage_errors():
                searching.execute()
        finally:
            searching.release()  # done by execute(), unless what came before it failed
            panel.close()  # the result below shows the trials
            if not text:
                view.finish()
        registry.add_finding(found)
        return found

    def _start_background_search(self, searching, view, panel) -> None:
        """The search's trials in a thread; its live views are put on screen from here (the
        cell's thread) first, and %amp_stop, %amp_wait and Stop reach it by its name."""
        found = searching.result
        try:
            panel.start(found, background=True)
            if not panel.text:
                view.stoppable, view.on_stop = True, found.request_stop
                view.show()
            registry.add_finding(found)
            registry.start_background(found, lambda: self._search_quietly(searching, view, panel))
        except BaseException:
            searching.release()
            raise

    def _search_quietly(self, searching, view, panel):
        # The trial's dashboard and the panel show a failure; a thread has nowhere to raise.
        try:
            searching.execute()
        except BaseException:
            pass
        finally:
            panel.close(keep=True)  # nothing else will show the trials: it stays, static
            if panel.text:
                print(searching.result.lines()[-1], flush=True)
            else:
                view.finish()

    def _train_quietly(self, training, step):
        __tracebackhide__ = True  # not in the traceback the run keeps
        # A thread has nowhere to raise: the run keeps the traceback, which the cell's
        # notice shows below how the run ended, and %amp_wait prints.
        try:
            training.execute()
        except BaseException as e:
            self._keep_traceback(training.run, e)
        finally:
            self._export_logged(step)
            from ..views.dashboard import end_notices

            end_notices(training.run, last=True)  # the cell's notice says how it ended

    def _keep_traceback(self, run, error: BaseException) -> None:
        """A failed run keeps the traceback IPython shows for it in the foreground (the cell's
        lines, our frames hidden by __tracebackhide__, a --nproc rank's own traceback as its
        RankFailed renders it), without colours."""
        if run.status != "failed":
            return
        formatter = self.shell.InteractiveTB
        render = getattr(error, "_render_traceback_", None)
        lines = render() if render else formatter.structured_traceback(
            type(error), error, error.__traceback__, tb_offset=0)
        run.traceback = _COLOURS.sub("", formatter.stb2text(lines)).strip()

    def _export_logged(self, step):
        for name in step.log_names:
            if name in step.namespace:
                self.shell.user_ns[name] = step.namespace[name]

    # -- %amp_stop --------------------------------------------------------------------
    @magic_arguments()
    @argument("name", nargs="?", help="run to stop (default: every background run)")
    @argument("--wait", type=float, default=10.0,
              help="seconds to wait for the current step to finish (default 10)")
    @line_magic
    def amp_stop(self, line: str) -> None:
        """Stop background %%amp_train runs cleanly after their current optimizer step."""
        args = parse(self.amp_stop, line)
        targets = self._background_runs(args.name)
        for run, _ in targets:
            run.request_stop()
        for _, done in targets:
            done.wait(args.wait)
        if not self._tell_endings(args.name, targets, "still finishing its step") \
                and args.name is None:
            print("no background run is running: nothing to stop")

    # -- %amp_wait --------------------------------------------------------------------
    @magic_arguments()
    @argument("name", nargs="?", help="run to wait for (default: every background run)")
    @argument("--timeout", type=float, help="give up waiting after this many seconds")
    @line_magic
    def amp_wait(self, line: str) -> None:
        """Wait until background %%amp_train runs end, without stopping them."""
        args = parse(self.amp_wait, line)
        if args.timeout is not None and not args.timeout > 0:
            raise UsageError("--timeout must be a positive number of seconds")
        targets = self._background_runs(args.name)
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        try:
            for run, done in targets:
                done.wait(None if deadline is None else max(deadline - time.monotonic(), 0))
        except KeyboardInterrupt:
            print("stopped waiting; the run goes on (stop it with %amp_stop)")
        if not self._tell_endings(args.name, targets, "still running") and args.name is None:
            print("no background run is running")

    def _tell_endings(self, name, targets, going_on: str) -> int:
        """How each of `targets` ended, or `going_on` for one still going; with no NAME, also
        every background run that ended before it was asked about (each is told once). The
        number of runs told of."""
        ended = registry.take_ended(None if name is None else [r for r, _ in targets])
        for run in ended:
            _report(run, run.status)
        told = {id(r) for r in ended}
        still = [r for r, _ in targets if id(r) not in told]
        for run in still:
            _report(run, going_on)
        return len(ended) + len(still)

    def _background_runs(self, name):
        """(run, done) of the background runs (or searches) called `name` (all when None)
        still going; a search is found by a trial's name too (refusals name the trial).

        A finished run of that name is reported, not an error; an unknown name is."""
        going = registry.background_runs()
        targets = [(r, d) for r, d in going if name is None or name in _names(r)]
        if name is not None and not targets:
            ended = [r for r in [*registry.runs(), *registry.findings()]
                     if getattr(r, "name", None) == name]
            if not ended:
                running = ", ".join(r.name for r, _ in going) or "none"
                raise UsageError(f"no run named {name!r} (background runs going: {running})")
            _report(ended[-1], f"already {ended[-1].status}")
            registry.take_ended(ended[-1:])  # told now: not again by the next %amp_wait
        return targets

    # -- %amp_runs --------------------------------------------------------------------
    @magic_arguments()
    @argument("--plot", nargs="+", metavar="NAME", help="overlay these runs in one picture")
    @argument("--clear", action="store_true", help="forget this session's finished runs")
    @line_magic
    def amp_runs(self, line: str) -> RunList | Picture | None:
        """This session's runs as a table; --plot overlays chosen runs; --clear forgets them."""
        args = parse(self.amp_runs, line)
        if args.clear:
            print(f"forgot {registry.forget_runs()} run(s)")
            return None
        every = registry.runs()
        if not args.plot:
            return registry.RunList(every, registry.findings())
        known = {r.name: r for r in every}  # names are unique (registry.register)
        missing = [n for n in args.plot if n not in known]
        if missing:
            raise UsageError(f"no run named {', '.join(map(repr, missing))}; runs this "
                             f"session: {', '.join(known) or 'none'}")
        from ..views.dashboard import overlay_picture

        return overlay_picture([known[n] for n in args.plot])

    # -- helpers ----------------------------------------------------------------------
    def _view(self, args, model, several=False):
        from ..views.reporter import ConsoleReporter

        in_kernel = getattr(self.shell, "kernel", None) is not None
        if args.no_plot or self.view == "text" or (self.view == "auto" and not in_kernel):
            # a notebook redraws the row at "\r"; a terminal is asked; a file gets plain lines
            return ConsoleReporter(stream=sys.stdout, inline=True if in_kernel else None)
        from ..views.dashboard import Dashboard

        if several:
            return Dashboard(several=True)
        # Earlier runs of this very model object, whatever it was called then: `--model net`
        # bound to another network is another model.
        earlier = [r for r in registry.runs() if r.done and r.history and r.same_model(model)]
        return Dashboard(earlier_runs=earlier, stoppable=args.background)


def _check_modes(args) -> None:
    """--sweep, --compare, --find-lr, --find-batch-size and --search: one at a time
    (--compare may go with --find-batch-size: an answer per precision), in one process, in
    the foreground (a search may run in the background)."""
    finds_batch_size = args.find_batch_size is not None
    for flag in ("max_memory", "headroom"):
        if getattr(args, flag) is not None and not finds_batch_size:
            name = "--" + flag.replace("_", "-")
            raise UsageError(f"{name} goes with --find-batch-size: add it, or drop {name}")
    searches = hasattr(args, "space")
    if getattr(args, "keep", "start") != "start" and not (searches or args.sweep is not None):
        raise UsageError("--keep goes with --sweep or --search: add one, or drop --keep")
    plan_flags = [s.flag for s in option_specs(SearchPlan)
                  if hasattr(args, s.name) and s.name not in ("space", "keep")]
    if plan_flags and not searches:
        raise UsageError(f"{', '.join(plan_flags)} go{'es' * (len(plan_flags) == 1)} with "
                         "--search: add it, or drop them")
    modes = [flag for flag, given in (("--find-batch-size", finds_batch_size),
                                      ("--sweep", args.sweep is not None),
                                      ("--compare", args.compare and not finds_batch_size),
                                      ("--find-lr", args.find_lr), ("--search", searches)) if given]
    if not modes:
        return
    conflicts = [flag for flag, given in (("--background", args.background and not searches),
                 ("--checkpoint", getattr(args, "checkpoint", None)),
                 ("--resume", getattr(args, "resume", None)),
                 ("--nproc", getattr(args, "nproc", 1) != 1)) if given]
    conflicts += modes[1:]
    if conflicts:
        raise UsageError(f"{modes[0]} cannot be combined with {', '.join(conflicts)}")
    if args.compare and not finds_batch_size and getattr(args, "steps", None) is None:
        raise UsageError("--compare needs --steps N, e.g. --steps 50")


def _names(job) -> set:
    """A background run's name; a search's, and its trials' runs'."""
    if getattr(job, "kind", None) != "search":
        return {job.name}
    return {job.name} | {t.run.name for t in list(job.trials) if t.run is not None}


_COLOURS = re.compile(r"\x1b\[[0-9;]*m")  # ANSI colours (SGR) in IPython's tracebacks


def _report(job, state: str) -> None:
    """How a background run (or search) stands, in a line; a failed run's traceback below."""
    print(f"{job.name}: {state} after {_how_far(job)}")
    if getattr(job, "traceback", None):
        print(job.traceback)


def _how_far(job) -> str:
    """ "12 steps"; a search: "3 finished trials" """
    if getattr(job, "kind", None) != "search":
        return f"{len(job.history)} steps"
    return f"{len(job.finished)} finished trial{'s' * (len(job.finished) != 1)}"


def _count(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"{flag} {text}: give a positive whole number, e.g. {flag} 512")
    return value


def _print_trial(finding, trial) -> None:
    """A batch-size finder's trial, in a line (the terminal's form)."""
    peak = f", peak {format_bytes(trial.peak)}" if trial.peak is not None else ""
    print(f"batch {trial.batch_size}: {trial.result}{peak}", flush=True)


class _LivePanel:
    """The batch-size finder's trials so far, a live HTML panel in the cell, redrawn after
    each trial (in the notebook's thread: trials run in the foreground)."""

    def __init__(self):
        self.live = None

    def __call__(self, found, trial) -> None:
        from ..views.finder import batch_finding_html

        html = batch_finding_html(found, live=True)
        if self.live is None:
            from ..views.dashboard import LiveHtml

            self.live = LiveHtml(html)
        else:
            self.live.update(html)

    def close(self) -> None:
        if self.live is not None:
            self.live.close()


class _TrialsPanel(View):
    """A sweep's or a search's trials so far, as views/trials.py draws them (one curve per
    trial, progress, table): a live panel above the running trial's dashboard, redrawn after
    each trial and, as a view of a search's trials, while one trains (its curve so far, at
    most every REDRAW_SECONDS); a line per trial in a terminal (a sweep: its progress line)."""

    REDRAW_SECONDS = 2.0

    def __init__(self, view, first: str | None = None):
        from ..views.reporter import ConsoleReporter

        self.text = isinstance(view, ConsoleReporter)
        self.found = None
        self.drawn = 0.0  # time.monotonic() of the last redraw
        self.note = ""  # above every redraw while it runs: how to stop a background search
        self.live = None if self.text or first is None else _live_html(first)

    def start(self, found, background: bool = False) -> None:
        """A search, before its first trial: how it searches, and how to stop it."""
        self.found = found
        stop = (f"%amp_stop {found.name} (or Stop) ends it after the current step, that trial "
                "counted as interrupted; %amp_wait waits for it" if background else "")
        if self.text:
            print("\n".join(found.header() + ([f"in the background: {stop}"] if stop else [])),
                  flush=True)
            return
        from ..formatting import escape
        from ..views.trials import trials_html

        self.note = f'<p style="opacity:.75">in the background: {escape(stop)}</p>' if stop \
            else ""
        self.live = _live_html(self.note + trials_html(found, live=True))
        self.drawn = time.monotonic()

    def __call__(self, found, trial=None) -> None:
        self.found = found
        if self.text:
            if trial is not None:
                print(trial.line(), flush=True)
            else:  # a sweep's setting
                ended = "" if found.status == "running" else f" · {found.status}"
                print(found.progress() + ended, flush=True)
            return
        self._draw()

    def on_refresh(self, run: Any) -> None:
        if self.found is not None and time.monotonic() - self.drawn >= self.REDRAW_SECONDS:
            self._draw()

    def _draw(self) -> None:
        from ..views.trials import trials_html

        live, self.drawn = self.live, time.monotonic()
        if live is not None:
            live.update(self.note + trials_html(self.found, live=True))

    def close(self, keep: bool = False, table: bool = True) -> None:
        """Removed (the cell's result shows the trials), or with `keep` left as a static
        snapshot, charts as images: a saved notebook keeps it."""
        live, self.live = self.live, None  # a late refresh draws nothing
        if live is None:
            return
        if keep and self.found is not None:
            from ..views.trials import trials_html

            live.close(trials_html(self.found, table=table), self.found.progress())
        else:
            live.close()


def _live_html(html: str) -> Any:
    from ..views.dashboard import LiveHtml

    return LiveHtml(html)


def _lr_range(text: str) -> tuple[float, float]:
    """--find-lr START,END"""
    from ..formatting import number

    parts = text.split(",")
    try:
        start, end = (number(p) for p in parts)
    except ValueError:
        raise UsageError(f"--find-lr {text}: give START,END, two numbers such as 1e-7,10"
                         ) from None
    return start, end


def _prepare_training(step: CellStep, options: Any, views: list) -> Any:
    from ..distributed import prepare_training

    return prepare_training(step, options, views)
