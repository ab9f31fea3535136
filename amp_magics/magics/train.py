"""%%amp_train and %amp_stop: a thin IPython adapter over the engine.

It parses flags, finds the notebook's objects by name, compiles the cell body once through
IPython's own pipeline, picks the view (live dashboard or text line) and hands over to
`engine.prepare(...).execute()`.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, argument_group, magic_arguments
from traitlets import Enum, Float

from .. import precision
from .args import names, number, parse
from .notebook import CellStep, lookup, lookup_optimizers, scheduler_types, usage_errors

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

    from ..training.run import Run, RunList
    from ..training.sweeps import Showdown, Sweep
    from ..views.dashboard import Picture


@magics_class
class AmpMagics(Magics):
    """Mixed-precision training magics. Settings: `%config AmpMagics.refresh_seconds = 1.0`."""

    refresh_seconds = Float(0.5, help="Seconds between dashboard refreshes.").tag(config=True)
    view = Enum(["auto", "dashboard", "text"], default_value="auto",
                help="auto: the live dashboard in a Jupyter kernel, a text line in a terminal."
                ).tag(config=True)

    _background: dict = {}  # Run -> Thread, for %amp_stop and unloading

    def __init__(self, shell: InteractiveShell | None = None, **kwargs: Any):
        super().__init__(shell=shell, **kwargs)
        if shell is not None and self not in shell.configurables:
            shell.configurables.append(self)

    # -- %%amp_train ------------------------------------------------------------------
    @magic_arguments()
    @argument_group("what to train")
    @argument("--model", default="model", help="nn.Module to train (default: model)")
    @argument("--optimizer", default="optimizer",
              help="optimizer name, or several comma-separated (default: optimizer)")
    @argument("--data", default="train_loader",
              help="iterable of batches, e.g. a DataLoader (default: train_loader)")
    @argument("--val", help="validation iterable, evaluated at each epoch end")
    @argument("--scheduler", help="LR scheduler, stepped after each optimizer step")
    @argument("--skip-aware-scheduler", action="store_true",
              help="step --scheduler only after optimizer steps the loss scaler did not skip "
                   "(free with ordinary optimizers; one sync per step with fused ones)")
    @argument_group("how long")
    @argument("--epochs", type=int, help="passes over --data (default 1; unlimited with --steps)")
    @argument("--steps", type=int, help="stop after this many optimizer steps")
    @argument_group("precision")
    @argument("--dtype", default="auto", choices=precision.CHOICES,
              help="autocast precision; auto picks by hardware (default: auto)")
    @argument("--init-scale", type=number, help="GradScaler initial scale, e.g. 2**14")
    @argument("--growth-interval", type=int, help="GradScaler growth interval (steps)")
    @argument("--growth-factor", type=float, help="GradScaler growth factor")
    @argument("--backoff-factor", type=float, help="GradScaler backoff factor")
    @argument("--scaler", help="your own torch.amp.GradScaler to use instead")
    @argument_group("the step")
    @argument("--accum", type=int, default=1,
              help="micro-batches per optimizer step (gradient accumulation; loss divided by it)")
    @argument("--clip", type=float, help="max gradient norm of the parameters the optimizers "
              "step (unscale_ then clip_grad_norm_)")
    @argument("--log", default="", help="other scalars of the body to record, comma-separated")
    @argument("--seed", type=int, help="seed torch, random and numpy before training")
    @argument("--no-move", action="store_true",
              help="do not move batch tensors to the model's device")
    @argument("--compile", action="store_true",
              help="train through torch.compile(model), compiled once per model and reused by "
                   "re-runs; the model itself stays the plain module")
    @argument("--compile-mode", metavar="MODE",
              help="torch.compile mode: default, reduce-overhead, max-autotune, "
                   "max-autotune-no-cudagraphs (implies --compile)")
    @argument("--keep-grads", action="store_true",
              help="keep the last step's gradients (by default freed when the run ends)")
    @argument_group("checkpoints")
    @argument("--checkpoint", metavar="PATH",
              help="save model, optimizer, scaler, scheduler, RNG and history here (atomic)")
    @argument("--every", type=int, metavar="N",
              help="checkpoint every N optimizer steps (default: at each epoch end)")
    @argument("--resume", metavar="PATH", help="continue from a --checkpoint file")
    @argument_group("processes")
    @argument("--nproc", default="1", metavar="N|auto",
              help="train on N processes with DistributedDataParallel (gloo on the CPU, one GPU "
                   "each with NCCL); auto: one per visible GPU (default 1)")
    @argument_group("runs and display")
    @argument("--name", help="name of this run (default run1, run2, ...)")
    @argument("-o", "--output", help="store the Run in this notebook variable")
    @argument("--refresh", type=float, help="seconds between view refreshes (default 0.5)")
    @argument("--no-plot", action="store_true", help="one-line text progress instead of plots")
    @argument("--background", action="store_true",
              help="train in a background thread; the cell returns at once (stop: %%amp_stop)")
    @argument_group("tuning and diagnosis")
    @argument("--sweep", metavar="SPEC",
              help='one run per setting from the same start, e.g. "lr=1e-3,1e-2; clip=0,1"')
    @argument("--keep", choices=("start", "best"), default="start",
              help="after --sweep: restore the start (default) or keep the best run's weights")
    @argument("--compare", metavar="PRECISIONS",
              help="time each precision from the same start, e.g. fp32,bf16,fp16 (with --steps)")
    @argument("--diagnose", action="store_true",
              help="at the first skipped step or non-finite loss, re-run that batch with hooks "
                   "and name the module that overflows (costs one sync per step until then)")
    @cell_magic
    def amp_train(self, line: str, cell: str) -> Run | Sweep | Showdown | None:
        """Run the cell body as ONE training step, for every batch, with automatic mixed precision.

        The body sees `batch`, `step` and `epoch` and must assign `loss`. Example:

            %%amp_train --model net --optimizer opt --data train_loader --epochs 2 -o run
            x, y = batch
            loss = F.cross_entropy(net(x), y)
        """
        __tracebackhide__ = True
        from ..training.distributed import prepare_training
        from ..training.options import TrainOptions

        args = parse(self.amp_train, line)
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"-o {args.output}: not a valid Python name, e.g. -o run")
        log_names = names(args.log)
        objects = self._resolve_objects(args)
        step = CellStep(self.shell, cell, log_names)
        several = bool(args.sweep or args.compare)
        if several:
            self._check_several(args)
        with usage_errors():
            options = TrainOptions(
                **objects, epochs=args.epochs, steps=args.steps, dtype=args.dtype,
                accum=args.accum, clip=args.clip, seed=args.seed, log=log_names,
                skip_aware_scheduler=args.skip_aware_scheduler, compile=args.compile,
                compile_mode=args.compile_mode,
                move=not args.no_move, keep_grads=args.keep_grads, init_scale=args.init_scale,
                growth_interval=args.growth_interval, growth_factor=args.growth_factor,
                backoff_factor=args.backoff_factor, checkpoint=args.checkpoint,
                every=args.every, resume=args.resume, diagnose=args.diagnose, name=args.name,
                refresh_seconds=(args.refresh if args.refresh is not None
                                 else self.refresh_seconds),
                nproc=_nproc(args.nproc), config=self._flags(args))
            if several:
                return self._several_runs(args, step, options)
            view = self._view(args)
            # from here on the run owns the model
            training = prepare_training(step, options, [view])
        run = training.run
        if args.output:
            self.shell.user_ns[args.output] = run
        if args.background:
            try:
                view.show(run)
                thread = threading.Thread(target=self._train_quietly,
                                          args=(training, step, log_names),
                                          name=f"amp_train {run.name}", daemon=True)
                AmpMagics._background[run] = thread
                thread.start()
            except BaseException:
                AmpMagics._background.pop(run, None)
                training.release()
                raise
            return run
        try:
            with usage_errors():
                training.execute()
        finally:
            self._export_logged(step, log_names)

    @staticmethod
    def _check_several(args):
        conflicts = [flag for flag, given in (("--background", args.background),
                     ("--checkpoint", args.checkpoint), ("--resume", args.resume),
                     ("--nproc", args.nproc not in ("1", 1)),
                     ("--sweep with --compare", args.sweep and args.compare)) if given]
        if conflicts:
            raise UsageError(f"--sweep/--compare cannot be combined with {', '.join(conflicts)}")
        if args.compare and args.steps is None:
            raise UsageError("--compare needs --steps N, e.g. --steps 50")

    def _several_runs(self, args, step, options):
        """--sweep and --compare: several runs from one starting state, then a table."""
        __tracebackhide__ = True
        import dataclasses

        from ..tensors import model_device
        from ..training import sweeps

        view = self._view(args, several=True)
        options = dataclasses.replace(options, name=args.name or
                                      ("sweep" if args.sweep else "compare"))
        try:
            if args.sweep:
                settings = sweeps.parse_sweep(args.sweep, options.optimizers, number)
                result = sweeps.sweep(step, settings, options, [view],
                                      keep_best=args.keep == "best")
            else:
                precisions = sweeps.parse_compare(args.compare, model_device(options.model))
                result = sweeps.showdown(step, precisions, options, [view])
        finally:
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
            from ..views.dashboard import end_notices

            end_notices(training.run)  # the cell's "started ..." notice says how it ended

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
    def amp_stop(self, line: str) -> None:
        """Stop background %%amp_train runs cleanly after their current optimizer step."""
        args = parse(self.amp_stop, line)
        targets = self._background_runs(args.name)
        if not targets:
            if args.name is None:
                print("no background run is running: nothing to stop")
            return
        for run, _ in targets:
            run.request_stop()
        for run, thread in targets:
            thread.join(args.wait)
            state = run.status if not thread.is_alive() else "still finishing its step"
            print(f"{run.name}: {state} after {len(run.history)} steps")

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
            for run, thread in targets:
                thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        except KeyboardInterrupt:
            print("stopped waiting; the run goes on (stop it with %amp_stop)")
        for run, thread in targets:
            state = run.status if not thread.is_alive() else "still running"
            print(f"{run.name}: {state} after {len(run.history)} steps")
        if not targets and args.name is None:
            print("no background run is running")

    def _background_runs(self, name):
        """(run, thread) of the background runs called `name` (all when None) still going.

        A finished run of that name is reported, not an error; an unknown name is."""
        from ..training.run import runs

        targets = [(r, t) for r, t in list(AmpMagics._background.items()) if name in (None, r.name)]
        if name is not None and not targets:
            done = [r for r in runs() if r.name == name]
            if not done:
                running = ", ".join(r.name for r in AmpMagics._background) or "none"
                raise UsageError(f"no run named {name!r} (background runs going: {running})")
            print(f"{name}: already {done[-1].status} after {len(done[-1].history)} steps")
        return targets

    # -- %amp_runs --------------------------------------------------------------------
    @magic_arguments()
    @argument("--plot", nargs="+", metavar="NAME", help="overlay these runs in one picture")
    @argument("--clear", action="store_true", help="forget this session's finished runs")
    @line_magic
    def amp_runs(self, line: str) -> RunList | Picture | None:
        """This session's runs as a table; --plot overlays chosen runs; --clear forgets them."""
        from ..training.run import RunList, forget_runs, runs

        args = parse(self.amp_runs, line)
        if args.clear:
            print(f"forgot {forget_runs()} run(s)")
            return None
        every = runs()
        if not args.plot:
            return RunList(every)
        known = {r.name: r for r in every}  # names are unique (training.run.register)
        missing = [n for n in args.plot if n not in known]
        if missing:
            raise UsageError(f"no run named {', '.join(map(repr, missing))}; runs this "
                             f"session: {', '.join(known) or 'none'}")
        first, *others = (known[n] for n in args.plot)
        return first.plot(*others)

    @classmethod
    def stop_background_runs(cls, wait: float = 10.0) -> None:
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
        # Earlier runs of this very model object, whatever it was called then: `--model net`
        # bound to another network is another model.
        model = lookup(self.shell.user_ns, args.model, "--model", object, "a model")
        earlier = [r for r in runs() if r.done and r.same_model(model)]
        return Dashboard(earlier_runs=earlier, stoppable=args.background)

    def _flags(self, args) -> dict:
        flags = {k: v for k, v in vars(args).items()
                 if v not in (None, False, "") and k not in ("output", "refresh", "no_plot",
                                                             "background", "keep", "sweep",
                                                             "compare")}
        return {"flags": flags, "model_name": args.model}

    def _resolve_objects(self, args) -> dict:
        import torch

        ns = self.shell.user_ns
        found = {
            "model": lookup(ns, args.model, "--model", torch.nn.Module, "an nn.Module"),
            "optimizer": lookup_optimizers(ns, args.optimizer),
            "data": lookup(ns, args.data, "--data", Iterable, "an iterable of batches"),
        }
        if args.val:
            found["val"] = lookup(ns, args.val, "--val", Iterable, "an iterable of batches")
        if args.scheduler:
            found["scheduler"] = lookup(ns, args.scheduler, "--scheduler", scheduler_types(),
                                        "an LR scheduler")
        if args.scaler:
            found["scaler"] = lookup(ns, args.scaler, "--scaler", torch.amp.GradScaler,
                                     "a GradScaler")
        return found


def _nproc(text: str) -> int | str:
    """--nproc N or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--nproc {text}: give a number of processes or auto") from None
