"""%%amp_train and %amp_stop: a thin IPython adapter over the engine.

It parses flags, finds the notebook's objects by name, compiles the cell body once through
IPython's own pipeline, picks the view (live dashboard or text line) and hands over to
`engine.prepare(...).execute()`.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Iterable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from traitlets import Enum, Float

from .. import precision
from ..errors import AmpUsageError
from .args import names, number, parse


class CellStep:
    """The cell body compiled once; called as step(batch, step, epoch) for every batch.

    It runs in a private copy of the notebook's namespace, so names it assigns do not leak
    into the notebook (the magic copies back only the names given to --log). Line numbers
    in tracebacks are the cell's own: line 1 is the %%amp_train line.
    """

    def __init__(self, shell, cell: str, log_names=()):
        source = "\n" + shell.transform_cell(cell)
        filename = shell.compile.cache(source, shell.execution_count, raw_code="\n" + cell)
        self.code = shell.compile(source, filename, "exec")
        self.namespace = dict(shell.user_ns)
        self.log_names = tuple(log_names)

    def __call__(self, batch, step, epoch):
        __tracebackhide__ = True
        ns = self.namespace
        ns["batch"], ns["step"], ns["epoch"] = batch, step, epoch
        ns.pop("loss", None)
        exec(self.code, ns)
        if "loss" not in ns:
            raise AmpUsageError("the cell body never assigned `loss`: end it with e.g. "
                                "`loss = F.cross_entropy(model(x), y)`")
        if not self.log_names:
            return ns["loss"]
        return {"loss": ns["loss"], **{n: ns[n] for n in self.log_names if n in ns}}


@magics_class
class AmpMagics(Magics):
    """Mixed-precision training magics. Settings: `%config AmpMagics.refresh_seconds = 1.0`."""

    refresh_seconds = Float(0.5, help="Seconds between dashboard refreshes.").tag(config=True)
    view = Enum(["auto", "dashboard", "text"], default_value="auto",
                help="auto: the live dashboard in a Jupyter kernel, a text line in a terminal."
                ).tag(config=True)

    _background: dict = {}  # Run -> Thread, for %amp_stop and unloading

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        if shell is not None and self not in shell.configurables:
            shell.configurables.append(self)

    # -- %%amp_train ------------------------------------------------------------------
    @magic_arguments()
    @argument("--model", default="model", help="nn.Module to train (default: model)")
    @argument("--optimizer", default="optimizer",
              help="optimizer name, or several comma-separated (default: optimizer)")
    @argument("--data", default="train_loader",
              help="iterable of batches, e.g. a DataLoader (default: train_loader)")
    @argument("--epochs", type=int, help="passes over --data (default 1; unlimited with --steps)")
    @argument("--steps", type=int, help="stop after this many optimizer steps")
    @argument("--dtype", default="auto", choices=precision.CHOICES,
              help="autocast precision; auto picks by hardware (default: auto)")
    @argument("--accum", type=int, default=1,
              help="micro-batches per optimizer step (gradient accumulation; loss divided by it)")
    @argument("--clip", type=float, help="max gradient norm (unscale_ then clip_grad_norm_)")
    @argument("--scheduler", help="LR scheduler, stepped after each optimizer step")
    @argument("--val", help="validation iterable, evaluated at each epoch end")
    @argument("--log", default="", help="other scalars of the body to record, comma-separated")
    @argument("--seed", type=int, help="seed torch, random and numpy before training")
    @argument("--no-move", action="store_true",
              help="do not move batch tensors to the model's device")
    @argument("--init-scale", type=number, help="GradScaler initial scale, e.g. 2**14")
    @argument("--growth-interval", type=int, help="GradScaler growth interval (steps)")
    @argument("--growth-factor", type=float, help="GradScaler growth factor")
    @argument("--backoff-factor", type=float, help="GradScaler backoff factor")
    @argument("--scaler", help="your own torch.amp.GradScaler to use instead")
    @argument("--checkpoint", metavar="PATH",
              help="save model, optimizer, scaler, scheduler, RNG and history here (atomic)")
    @argument("--every", type=int, metavar="N",
              help="checkpoint every N optimizer steps (default: at each epoch end)")
    @argument("--resume", metavar="PATH", help="continue from a --checkpoint file")
    @argument("--diagnose", action="store_true",
              help="at the first skipped step or non-finite loss, re-run that batch with hooks "
                   "and name the module that overflows (costs one sync per step until then)")
    @argument("--name", help="name of this run (default run1, run2, ...)")
    @argument("-o", "--output", help="store the Run in this notebook variable")
    @argument("--refresh", type=float, help="seconds between view refreshes (default 0.5)")
    @argument("--no-plot", action="store_true", help="one-line text progress instead of plots")
    @argument("--background", action="store_true",
              help="train in a background thread; the cell returns at once (stop: %%amp_stop)")
    @argument("--sweep", metavar="SPEC",
              help='one run per setting from the same start, e.g. "lr=1e-3,1e-2; clip=0,1"')
    @argument("--keep", choices=("start", "best"), default="start",
              help="after --sweep: restore the start (default) or keep the best run's weights")
    @argument("--compare", metavar="PRECISIONS",
              help="time each precision from the same start, e.g. fp32,bf16,fp16 (with --steps)")
    @cell_magic
    def amp_train(self, line, cell):
        """Run the cell body as ONE training step, for every batch, with automatic mixed precision.

        The body sees `batch`, `step` and `epoch` and must assign `loss`. Example:

            %%amp_train --model net --optimizer opt --data train_loader --epochs 2 -o run
            x, y = batch
            loss = F.cross_entropy(net(x), y)
        """
        __tracebackhide__ = True
        from ..training.engine import prepare

        args = parse(self.amp_train, line)
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"-o {args.output}: not a valid Python name, e.g. -o run")
        log_names = names(args.log)
        options = self._resolve_objects(args)
        step = CellStep(self.shell, cell, log_names)
        refresh = args.refresh if args.refresh is not None else self.refresh_seconds
        options.update(
            epochs=args.epochs, steps=args.steps, accum=args.accum, clip=args.clip,
            seed=args.seed, log=log_names, move=not args.no_move,
            init_scale=args.init_scale, growth_interval=args.growth_interval,
            growth_factor=args.growth_factor, backoff_factor=args.backoff_factor,
            refresh_seconds=refresh, config=self._flags(args))
        if args.sweep or args.compare:
            return self._several_runs(args, step, options)
        try:
            training = prepare(step, dtype=args.dtype, name=args.name,
                               checkpoint=args.checkpoint, every=args.every,
                               resume=args.resume, diagnose=args.diagnose,
                               observers=[self._view(args)], **options)
        except AmpUsageError as e:
            raise UsageError(str(e)) from None
        run = training.run
        if args.output:
            self.shell.user_ns[args.output] = run
        if args.background:
            for view in training.observers:
                if hasattr(view, "show"):
                    view.show(run)
            thread = threading.Thread(target=self._train_quietly, args=(training, step, log_names),
                                      name=f"amp_train {run.name}", daemon=True)
            AmpMagics._background[run] = thread
            thread.start()
            return run
        try:
            training.execute()
        except AmpUsageError as e:
            raise UsageError(str(e)) from None
        finally:
            self._export_logged(step, log_names)

    def _several_runs(self, args, step, options):
        """--sweep and --compare: several runs from one starting state, then a table."""
        __tracebackhide__ = True
        from ..training import sweeps as tuning

        conflicts = [flag for flag, given in (("--background", args.background),
                     ("--checkpoint", args.checkpoint), ("--resume", args.resume),
                     ("--sweep with --compare", args.sweep and args.compare)) if given]
        if conflicts:
            raise UsageError(f"--sweep/--compare cannot be combined with {', '.join(conflicts)}")
        view = self._view(args, several=True)
        name = args.name or ("sweep" if args.sweep else "compare")
        try:
            if args.sweep:
                settings = tuning.parse_sweep(args.sweep, options["optimizer"][0], number)
                result = tuning.sweep(step, settings, keep_best=args.keep == "best",
                                      dtype=args.dtype, name=name, observers=[view], **options)
            else:
                if args.steps is None:
                    raise UsageError("--compare needs --steps N, e.g. --steps 50")
                from ..training.engine import model_device

                precisions = tuning.parse_compare(args.compare, model_device(options["model"]))
                options = {k: v for k, v in options.items() if k not in ("steps", "epochs")}
                result = tuning.showdown(step, precisions, steps=args.steps, name=name,
                                         observers=[view], **options)
        except AmpUsageError as e:
            raise UsageError(str(e)) from None
        finally:
            if hasattr(view, "finish"):
                view.finish()
        if args.output:
            self.shell.user_ns[args.output] = result
        return result

    def _train_quietly(self, training, step, log_names):
        # The view shows a failure; the exception has nowhere better to go from a thread.
        try:
            training.execute()
        except BaseException:
            pass
        finally:
            self._export_logged(step, log_names)
            AmpMagics._background.pop(training.run, None)

    def _export_logged(self, step, log_names):
        for name in log_names:
            if name in step.namespace:
                self.shell.user_ns[name] = step.namespace[name]

    # -- %amp_stop --------------------------------------------------------------------
    @magic_arguments()
    @argument("name", nargs="?", help="run to stop (default: every background run)")
    @argument("--wait", type=float, default=10.0,
              help="seconds to wait for the current step to finish (default 10)")
    @line_magic
    def amp_stop(self, line):
        """Stop background %%amp_train runs cleanly after their current optimizer step."""
        args = parse(self.amp_stop, line)
        targets = [(r, t) for r, t in list(AmpMagics._background.items())
                   if args.name in (None, r.name)]
        if not targets:
            running = ", ".join(r.name for r in AmpMagics._background) or "none"
            raise UsageError(f"no background run named {args.name!r} (running: {running})"
                             if args.name else "no background run is running")
        for run, _ in targets:
            run.request_stop()
        for run, thread in targets:
            thread.join(args.wait)
            state = run.status if not thread.is_alive() else "still finishing its step"
            print(f"{run.name}: {state} after {len(run.history)} steps")

    # -- %amp_runs --------------------------------------------------------------------
    @magic_arguments()
    @argument("--plot", nargs="+", metavar="NAME", help="overlay these runs in one picture")
    @argument("--clear", action="store_true", help="forget this session's finished runs")
    @line_magic
    def amp_runs(self, line):
        """This session's runs as a table; --plot overlays chosen runs; --clear forgets them."""
        from ..training.run import RunList, forget_runs, runs

        args = parse(self.amp_runs, line)
        if args.clear:
            print(f"forgot {forget_runs()} run(s)")
            return None
        known = {r.name: r for r in runs()}
        if not args.plot:
            return RunList(known.values())
        missing = [n for n in args.plot if n not in known]
        if missing:
            raise UsageError(f"no run named {', '.join(map(repr, missing))}; runs this "
                             f"session: {', '.join(known) or 'none'}")
        first, *others = (known[n] for n in args.plot)
        return first.plot(*others)

    @classmethod
    def stop_background_runs(cls, wait=10.0):
        for run in list(cls._background):
            run.request_stop()
        for thread in list(cls._background.values()):
            thread.join(wait)

    # -- helpers ----------------------------------------------------------------------
    def _view(self, args, several=False):
        from ..views.reporter import ConsoleReporter

        in_kernel = getattr(self.shell, "kernel", None) is not None
        if args.no_plot or self.view == "text" or (self.view == "auto" and not in_kernel):
            return ConsoleReporter(stream=sys.stdout, inline=True)
        from ..views.dashboard import Dashboard
        from ..training.run import runs

        if several:
            return Dashboard(several=True)
        earlier = [r for r in runs() if r.done and r.config.get("model_name") == args.model]
        return Dashboard(earlier_runs=earlier, stoppable=args.background)

    def _flags(self, args) -> dict:
        flags = {k: v for k, v in vars(args).items()
                 if v not in (None, False, "") and k not in ("output", "refresh", "no_plot",
                                                             "background", "keep", "sweep",
                                                             "compare")}
        return {"flags": flags, "model_name": args.model}

    def _resolve_objects(self, args) -> dict:
        import torch

        optimizer_names = names(args.optimizer)
        if not optimizer_names:
            raise UsageError("--optimizer needs at least one name, e.g. --optimizer opt")
        found = {
            "model": self._lookup(args.model, "--model", torch.nn.Module, "an nn.Module"),
            "optimizer": [self._lookup(n, "--optimizer", torch.optim.Optimizer, "an optimizer")
                          for n in optimizer_names],
            "data": self._lookup(args.data, "--data", Iterable, "an iterable of batches"),
        }
        if args.val:
            found["val"] = self._lookup(args.val, "--val", Iterable, "an iterable of batches")
        if args.scheduler:
            found["scheduler"] = self._lookup(args.scheduler, "--scheduler",
                                              _scheduler_types(), "an LR scheduler")
        if args.scaler:
            found["scaler"] = self._lookup(args.scaler, "--scaler", torch.amp.GradScaler,
                                           "a GradScaler")
        return found

    def _lookup(self, name, flag, kind, what):
        """A notebook object by (dotted) name, checked against `kind` ("not `what`")."""
        ns = self.shell.user_ns
        head, *attrs = name.split(".")
        if head not in ns:
            raise UsageError(f"{flag} {name}: no variable named {head!r} in the notebook. "
                             f"{self._candidates(kind, what)} Pass the right one with "
                             f"{flag} NAME.")
        obj = ns[head]
        for attr in attrs:
            if not hasattr(obj, attr):
                raise UsageError(f"{flag} {name}: {type(obj).__name__} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        if (kind is Iterable and isinstance(obj, (str, bytes))) or not isinstance(obj, kind):
            raise UsageError(f"{flag} {name} is a {type(obj).__name__}, not {what}. "
                             f"{self._candidates(kind, what)}")
        return obj

    def _candidates(self, kind, what) -> str:
        label = what.split(" ", 1)[1]  # "an nn.Module" -> "nn.Module"
        if kind is Iterable:
            import torch

            kind = (torch.utils.data.DataLoader, torch.utils.data.Dataset)
            label = "DataLoader"
        found = sorted(k for k, v in self.shell.user_ns.items()
                       if not k.startswith("_") and isinstance(v, kind))
        return (f"{label} objects in the notebook: {', '.join(found)}."
                if found else f"No {label} is defined in the notebook yet.")


def _scheduler_types():
    from torch.optim import lr_scheduler

    return tuple(t for t in (getattr(lr_scheduler, "LRScheduler", None),
                             lr_scheduler.ReduceLROnPlateau) if t is not None)
