"""Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) there is no parent: each process trains
its rank directly, and only rank 0 reports and saves."""
from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..tensors import StepFn
from ..training.engine import prepare
from ..training.options import TrainOptions
from ..training.routing import routed_to
from ..training.run import Run
from ..training.view import View
from .arrivals import StoreArrivals
from .rank import STARTUP_TIMEOUT, RankContext, attach_rank, mark_arrivals, setup_rank


def torchrun_command(script: str, world: int) -> str:
    return f"torchrun --standalone --nproc-per-node {world} {script}"


def torchrun_context() -> RankContext | None:
    """This process's rank when it was started by torchrun (WORLD_SIZE > 1), else None."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    return RankContext.on(rank, size, local, torch.cuda.is_available())


_groups_made = itertools.count()  # the same on every rank: each calls train() as often


@contextlib.contextmanager
def joined_process_group(ctx: RankContext, timeout: float) -> Iterator[Any]:
    """Join torchrun's process group, initialising it when the script has not (its
    collectives then give up after `timeout` seconds), and yield the group's store (None for
    the script's own group). A group we make meets under keys of its own in torchrun's store:
    a group made again later (another train(), the script's own init_process_group) would
    otherwise read this one's stale addresses and hang."""
    started = not dist.is_initialized()
    store = None
    if started:
        store, rank, world = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"amp_magics/{next(_groups_made)}", store)
        _all_ranks_here(store, rank, world)
        dist.init_process_group(ctx.backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout))
    try:
        yield store
        if started:  # no rank closes its connections while another still uses them
            dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()


def _all_ranks_here(store: Any, rank: int, world: int) -> None:
    """Wait until every rank has come this far, for up to the start-up timeout: the group's
    connect gives up after --timeout, which is for collectives, and torchrun's ranks each
    import and build on their own, seconds apart on a loaded machine."""
    store.add("here", 1)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while (here := store.add("here", 0)) < world:
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: only {here} of {world} ranks joined the process "
                               f"group within {STARTUP_TIMEOUT:.0f} s")
        time.sleep(0.01)


class AgreedStop:
    """Ctrl-C under torchrun reaches every rank itself (from the terminal, and again from
    torchrun's agent, which forwards it): the ranks must still stop at one step boundary, or
    one waits forever for the others' gradients. At each boundary every rank launches an
    all-reduce of its stop request and reads the one launched at the previous boundary
    (long done by then: no wait), so all of them decide at the same step.
    A Ctrl-C more than `SAME_PRESS` seconds after the first interrupts at once."""

    SAME_PRESS = 0.5  # seconds: the agent's forwarded signal follows the terminal's

    def __init__(self, run: Run, ctx: RankContext):
        self.run = run
        self.group = ctx.cpu_group()
        self.asked = torch.zeros(1, dtype=torch.int64)  # this rank saw Ctrl-C
        self.reduced = torch.zeros(1, dtype=torch.int64)
        self.pending: Any = None  # the all-reduce launched at the last boundary
        self.first_signal: float | None = None

    def __call__(self, step: int) -> bool:
        if self.pending is not None:
            self.pending.wait()
            if self.reduced.item() > 0:
                self.pending = None
                self.run.stop_reason = "sigint"  # a script's train() raises after the stop
                self.run.request_stop()
                return True
        self.reduced.copy_(self.asked)
        self.pending = dist.all_reduce(self.reduced, group=self.group, async_op=True)
        return False

    def close(self) -> None:
        """Wait for the last boundary's all-reduce (every rank launched it)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None

    def on_sigint(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.first_signal is None:
            self.first_signal = now
            self.asked[0] = 1
        elif now - self.first_signal > self.SAME_PRESS:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def handling_sigint(self, enabled: bool) -> Iterator[None]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self.on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


class RankTraining:
    """One torchrun process's rank, trained as `execute()` is called: it joins the process
    group, trains its shard through DDP and leaves the group; rank 0 reports (its `views`).
    `run` is the Run once training has been prepared (None if it failed before)."""

    def __init__(self, step_fn: StepFn, options: TrainOptions, views: Sequence[View],
                 ctx: RankContext):
        self.step_fn, self.options, self.ctx = step_fn, options, ctx
        self.views = list(views) if ctx.rank == 0 else []
        self.run: Run | None = None

    def release(self) -> None:
        """Nothing to let go: the rank claims the model only inside execute()."""

    def execute(self) -> None:
        __tracebackhide__ = True
        with joined_process_group(self.ctx, self.options.timeout) as store:
            rank_options, release = setup_rank(self.options, self.ctx)
            try:
                training = prepare(self.step_fn, rank_options, self.views)
                self.run = training.run
                attach_rank(training, rank_options, self.ctx)
                training.stop_check = stop = AgreedStop(training.run, self.ctx)
                arrivals = self._arrivals(store, training, rank_options)
                with stop.handling_sigint(self.options.handle_sigint), \
                        _naming_the_late(arrivals, self.options.timeout):
                    training.execute()
                stop.close()
            finally:
                release()

    def _arrivals(self, store: Any, training: Any, rank_options: TrainOptions
                  ) -> StoreArrivals | None:
        """Marks where this rank is, to name the ranks it waited for if a collective gives
        up; only in a group we made (whose store we hold)."""
        if store is None:
            return None
        arrivals = StoreArrivals(store, self.ctx.rank, self.ctx.world_size, self.options.timeout)
        # through our DDP only: a script's own DDP has no route to mark its calls on
        mark_arrivals(training, rank_options, arrivals.marker(training),
                      through_ddp=routed_to(rank_options.model) is not None)
        return arrivals


@contextlib.contextmanager
def _naming_the_late(arrivals: StoreArrivals | None, timeout: float) -> Iterator[None]:
    """A collective that gave up after --timeout (gloo says it timed out; NCCL's watchdog
    ends the process itself) gets a note naming the ranks this one waited for. The error
    stays the one raised: a note, never a new error, so a failure of the step is never
    blamed on another rank."""
    try:
        yield
    except RuntimeError as e:
        timed_out = "timed out" in str(e).lower() or "timeout" in str(e).lower()
        stall = arrivals.stall() if arrivals is not None and timed_out else None
        if stall is not None:
            note = f"amp_magics: {stall.words(timeout)}; torchrun's agent ends every rank"
            if hasattr(e, "add_note"):
                e.add_note(note)
            else:  # Python before 3.11: in the message itself
                e.args = (f"{e}\n{note}",)
        raise
