"""`--nproc N` from a notebook: fork N ranks, watch them, stop them together, copy back.

Ranks are forked through torch's own process starter (a cell body and notebook-defined
classes cannot be pickled for spawn). Each joins a process group on 127.0.0.1 (gloo on the
CPU, NCCL with one GPU per rank), trains its shard through the ordinary engine and tells the
notebook process how it goes (protocol.py), which merges the records into one Run for the
views (merge.py). Every rank stops at one step boundary they agree on; rank 0's final state
is loaded back into the notebook's objects.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .. import ownership
from .._torch_compat import plain_module
from ..errors import AmpUsageError
from ..precision import SCALER_DEFAULTS
from ..tensors import StepFn
from ..training.engine import checked_views, finish_run, new_run, prepare, stop_on_sigint
from ..training.objects import TrainingObjects
from ..training.options import TrainOptions
from ..training.registry import register
from ..training.run import Run
from ..training.scaler import persistent_scaler
from ..training.telemetry import RunBooks
from ..training.view import View
from . import protocol
from .merge import RecordMerger
from .rank import RankContext, setup_rank
from .sharding import same_stream_on_every_rank
from .torchrun import torchrun_command

RANK_GRACE_SECONDS = 10.0  # after a rank fails: time for the others to stop on their own
STARTUP_TIMEOUT = 120.0  # seconds for every rank to join the process group


class RankFailed(RuntimeError):
    """A rank of a `--nproc` run raised or was killed; the message holds its traceback,
    `summary` what failed in a line."""

    def __init__(self, message: str, summary: str):
        super().__init__(message)
        self.summary = summary


# -- before anything starts --------------------------------------------------------------------
def world_size(nproc: int | str) -> int:
    """`--nproc N`, or `auto`: one process per visible GPU (counted through NVML, which unlike
    torch.cuda does not initialise CUDA in the notebook process)."""
    if nproc == "auto":
        from ..system import gpu

        count = len(gpu.probe().gpus)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            count = min(count, len([v for v in visible.split(",") if v.strip()]))
        if count == 0:
            raise AmpUsageError("--nproc auto starts one process per GPU, and no GPU is visible: "
                                "give a number instead (--nproc 2 trains two CPU processes)")
        return count
    return int(nproc)


def device_type_for_ranks(model: torch.nn.Module) -> str:
    """Where the ranks train: one GPU each when GPUs are visible, else the CPU. Read through
    NVML so the notebook process never initialises CUDA before forking."""
    if any(p.device.type not in ("cpu", "meta") for p in model.parameters()):
        return next(p.device.type for p in model.parameters())
    if not torch.backends.cuda.is_built():
        return "cpu"
    from ..system import gpu

    return "cuda" if gpu.probe().gpus else "cpu"


def check_fork_safe(options: TrainOptions, world: int) -> None:
    """Refuse before forking what would break or hang a forked worker."""
    if torch.cuda.is_initialized():
        raise AmpUsageError(
            "--nproc forks worker processes, and CUDA is already initialised in this kernel "
            "(the model is on a GPU, or a CUDA call already ran): a forked process cannot use "
            "that CUDA context. Either restart the kernel and keep the model on the CPU until "
            "this cell (each worker moves it to its own GPU), or run it as a script: "
            f"{torchrun_command('train.py', world)}")
    if options.diagnose:
        raise AmpUsageError("--diagnose re-runs a batch in one process: drop it with --nproc, "
                            "or diagnose with --nproc 1 first")
    if isinstance(options.model, torch.nn.parallel.DistributedDataParallel):
        raise AmpUsageError("give the plain model: --nproc wraps it in DistributedDataParallel")
    if plain_module(options.model) is not options.model:
        raise AmpUsageError("--nproc trains the plain model: pass the module itself, not "
                            "torch.compile(model)")
    if world < 1:
        raise AmpUsageError(f"--nproc must be a positive number of processes, got {world}")


def rendezvous(world: int) -> dist.TCPStore:
    """The ranks' meeting point: a store this process serves on a port the system picked
    (port 0) and holds, so no other program can take the port between choosing and use."""
    return dist.TCPStore("127.0.0.1", 0, world_size=world, is_master=True,
                         timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT),
                         wait_for_workers=False)


# -- one forked rank (runs in the child process) ------------------------------------------------
class StopAgreement:
    """Every rank stops before the same step: the first rank to see the stop request picks
    the next step boundary for all. Ranks are at most one step apart (each step's gradients
    are all-reduced), so all of them still reach it. A shared counter, no collective."""

    def __init__(self, requested: Any, stop_at: Any):
        self.requested, self.stop_at = requested, stop_at

    def __call__(self, step: int) -> bool:
        if not self.requested.value:
            return False
        with self.stop_at.get_lock():
            if self.stop_at.value < 0:
                self.stop_at.value = step + 1
            return step >= self.stop_at.value


@contextlib.contextmanager
def _rank_process(rank: int, world: int, port: int, channel: Any):
    """The forked process made a rank: its own signals, threads and output, its env."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the notebook process decides when to stop
    with contextlib.suppress(Exception):  # Linux only; elsewhere the parent cleans up
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    torch.set_num_threads(max(1, torch.get_num_threads() // world))  # share the cores
    sys.stdout = protocol.ChannelWriter(channel, rank)
    sys.stderr = protocol.ChannelWriter(channel, rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        channel.close()
        channel.join_thread()


def _worker(rank: int, world: int, port: int, device_type: str, channel: Any, requested: Any,
            stop_at: Any, state_path: str, step_fn: StepFn, options: TrainOptions,
            claim: ownership.Claim) -> None:
    claim.step_lock = threading.RLock()  # the parent's may have been held by another thread
    ctx = RankContext.on(rank, world, rank, device_type == "cuda")
    with _rank_process(rank, world, port, channel):
        timeout = datetime.timedelta(seconds=STARTUP_TIMEOUT)
        store = dist.TCPStore("127.0.0.1", port, world_size=world, is_master=False,
                              timeout=timeout)
        dist.init_process_group(ctx.backend, store=store, rank=rank, world_size=world,
                                timeout=timeout)
        training, release = None, None
        try:
            rank_options, release = setup_rank(options, ctx)
            training = prepare(step_fn, rank_options, [protocol.RankRelay(channel, rank)], claim)
            training.stop_check = StopAgreement(requested, stop_at)
            _note_unsharded_stream(training, rank_options.data, ctx)
            training.execute()
        except BaseException as e:
            channel.put(protocol.Failure(rank, protocol.user_traceback(e)))
            traceback.clear_frames(e.__traceback__)  # they hold DDP, freed before the group
            raise
        finally:
            if rank == 0 and training is not None and not training.amp.in_update:
                torch.save(training.objects.state_dict(), state_path)  # after its last step
            if release is not None:
                release()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _note_unsharded_stream(training: Any, data: Any, ctx: RankContext) -> None:
    if isinstance(data, torch.utils.data.DataLoader) and same_stream_on_every_rank(data, ctx):
        training.run.notes.append(
            "every rank read the same first batch: this IterableDataset does not shard "
            "itself, so each rank trains on the same items. Split the stream by "
            "torch.distributed.get_rank() and get_world_size() in its __iter__.")


# -- the notebook's side -------------------------------------------------------------------
class DistributedTraining:
    """A `--nproc N` run seen from the notebook: `execute()` forks the ranks, shows their
    merged records, stops them together and loads rank 0's final state back."""

    def __init__(self, step_fn: StepFn, options: TrainOptions, views: list[View], world: int,
                 device_type: str, claim: ownership.Claim, run: Run):
        self.step_fn, self.options, self.views = step_fn, options, views
        self.world, self.device_type, self.claim, self.run = world, device_type, claim, run
        self.merger = RecordMerger(world, options.log)
        self.books = RunBooks(run, self.merger, torch.device("cpu"), views,
                              options.refresh_seconds, self.merger.sample_memory)
        self.hello = False  # rank 0 has said how it trains
        self.rank_errors: dict[int, str] = {}  # rank -> its traceback, first reported first
        self.handlers = {protocol.Hello: self._on_hello, protocol.Records: self._on_records,
                         protocol.Output: self._on_output, protocol.Failure: self._on_failure,
                         protocol.Ended: lambda message: None}  # its records came before

    def release(self) -> None:
        self.claim.release()

    def execute(self) -> None:
        __tracebackhide__ = True
        try:
            self._execute()
        finally:
            self.release()

    def _execute(self) -> None:
        __tracebackhide__ = True
        mp = multiprocessing.get_context("fork")
        channel = mp.Queue()
        requested, stop_at = mp.Value("b", 0), mp.Value("q", -1)
        fd, state_path = tempfile.mkstemp(prefix=".amp_nproc_", suffix=".pt")
        os.close(fd)
        os.unlink(state_path)  # rank 0 writes it only when it has a consistent state
        store = rendezvous(self.world)  # held until the ranks have ended
        processes = torch.multiprocessing.start_processes(
            _worker, args=(self.world, store.port, self.device_type, channel, requested,
                           stop_at, state_path, self.step_fn, self.options, self.claim),
            nprocs=self.world, join=False, start_method="fork")
        try:
            status, error = self._watch(processes, channel, requested)
        finally:
            for p in processes.processes:
                if p.is_alive():
                    p.kill()
                p.join()
            self._receive(channel)
            channel.close()
            del store
        if status == "finished" and self.run.stop_requested:
            status = "interrupted"
        self._load_state(state_path)
        with contextlib.suppress(Exception):
            self.books.refresh(self.merger.done_step)
        finish_run(self.run, status, None if error is None else error.summary, self.views,
                   " on every rank: the notebook's objects hold rank 0's state after its last "
                   "completed step")
        if error is not None:
            raise error

    def _watch(self, processes: Any, channel: Any, requested: Any
               ) -> tuple[str, BaseException | None]:
        """Until every rank has ended: (status, the error that ended the run)."""
        from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

        try:
            # The first Ctrl-C (the notebook's interrupt) stops every rank at one boundary; a
            # second one ends the wait, and the caller ends the ranks.
            with stop_on_sigint(self.run, self.options.handle_sigint):
                self._wait_for_rank0(channel, processes)
                self.books.start()
                while True:
                    self._receive(channel)
                    if self.run.stop_requested:
                        requested.value = 1
                    if processes.join(timeout=0.05, grace_period=RANK_GRACE_SECONDS):
                        return "finished", None
                    if time.perf_counter() >= self.books.next_refresh:
                        self.books.refresh(self.merger.done_step)
        except KeyboardInterrupt:
            return "interrupted", None
        except RankFailed as e:
            return "failed", e
        except (ProcessRaisedException, ProcessExitedException) as e:
            return "failed", self._rank_failure(e, channel)

    def _rank_failure(self, e: Exception, channel: Any) -> RankFailed:
        """The error of the first rank that failed (the others fail because it left)."""
        from torch.multiprocessing.spawn import ProcessRaisedException

        failed_rank = e.error_index
        if isinstance(e, ProcessRaisedException):  # the first rank to report broke first
            self._receive(channel)
            failed_rank = next(iter(self.rank_errors), failed_rank)
            detail = self.rank_errors.get(failed_rank) or getattr(e, "msg", str(e))
        elif e.signal_name:
            detail = f"rank {failed_rank} was killed by {e.signal_name}"
        else:
            detail = f"rank {failed_rank} exited with code {e.exit_code}"
        return RankFailed(f"rank {failed_rank} of {self.world} failed:\n{detail}",
                          f"rank {failed_rank} failed")

    def _receive(self, channel: Any) -> None:
        protocol.receive(channel, self.handlers)

    def _on_hello(self, message: protocol.Hello) -> None:
        if message.rank == 0:
            for key in ("precision", "precision_reason", "scaler_settings", "total_steps",
                        "steps_per_epoch"):
                setattr(self.run, key, getattr(message, key))
            self.hello = True

    def _on_records(self, message: protocol.Records) -> None:
        self.run.val_history += self.merger.add(message.rank, message.history,
                                                message.val_history, message.memory)
        if message.rank == 0:
            self.run.epoch = message.epoch
            self.run.notes += [n for n in message.notes if n not in self.run.notes]
            self.run.alarms += [a for a in message.alarms if a not in self.run.alarms]

    def _on_output(self, message: protocol.Output) -> None:
        print(f"[rank{message.rank}] {message.line}")

    def _on_failure(self, message: protocol.Failure) -> None:
        self.rank_errors.setdefault(message.rank, message.traceback)

    def _wait_for_rank0(self, channel: Any, processes: Any) -> None:
        """Until rank 0 says which precision it trains in (the views show it from the start),
        or a rank ends (join raises when it failed)."""
        deadline = time.perf_counter() + STARTUP_TIMEOUT
        while not self.hello:
            self._receive(channel)
            if processes.join(timeout=0.02, grace_period=RANK_GRACE_SECONDS):
                return
            if time.perf_counter() > deadline:  # never hang: the caller ends the ranks
                raise RankFailed(f"the {self.world} ranks did not start training within "
                                 f"{STARTUP_TIMEOUT:.0f} s (process group on 127.0.0.1); "
                                 "nothing was trained", "the ranks did not start")

    def _load_state(self, path: str) -> None:
        """Rank 0's final state into the notebook's objects; without one (rank 0 died inside
        an optimizer step) they stay as before the run, and the run says so."""
        if not os.path.exists(path):
            self.run.notes.append("rank 0 left no consistent state: the notebook's model, "
                                  "optimizers and scaler are as before this run")
            return
        try:  # a file rank 0 wrote a moment ago: trusted, and it holds the RNG's tuples
            state = torch.load(path, map_location="cpu", weights_only=False)
        finally:
            os.unlink(path)
        o = self.options
        scaler = o.scaler
        if state["scaler"] is not None and scaler is None:
            scaler = persistent_scaler(o.optimizers[0], self.device_type,
                                       {**SCALER_DEFAULTS, **o.scaler_settings})
        TrainingObjects.of(o).with_scaler(scaler).load_state_dict(state)


def prepare_distributed(step_fn: StepFn, options: TrainOptions, views: Sequence[View],
                        world: int) -> DistributedTraining:
    """Check, own the model, register the Run; `.execute()` forks and trains."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # torch.cuda checks: no init
    check_fork_safe(options, world)
    device_type = device_type_for_ranks(options.model)
    views = checked_views(views)
    claim = TrainingObjects.of(options).claim(options.name or "a run")
    try:
        run = new_run(options, device=f"{device_type} x{world}", precision=options.dtype,
                      nproc=world)
        run.ranks = world
        register(run)
        claim.run = run
    except BaseException:
        claim.release()
        raise
    return DistributedTraining(step_fn, options, views, world, device_type, claim, run)
