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
import faulthandler
import gc
import glob
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .. import ownership
from .._torch_compat import plain_module
from ..errors import AmpUsageError
from ..precision import SCALER_DEFAULTS
from ..tensors import StepFn
from ..training.checkpoint import check_same_world, read_checkpoint
from ..training.engine import checked_views, finish_run, new_run, prepare, stop_on_sigint
from ..training.objects import TrainingObjects
from ..training.options import TrainOptions
from ..training.registry import register
from ..training.run import Run
from ..training.scaler import persistent_scaler
from ..training.telemetry import RunBooks
from ..training.view import View
from . import protocol
from .arrivals import ArrivalBoard, Stall
from .merge import RecordMerger
from .rank import STARTUP_TIMEOUT, RankContext, attach_rank, mark_arrivals, setup_rank
from .sharding import EvenStream, same_stream_on_every_rank
from .torchrun import torchrun_command

RANK_GRACE_SECONDS = 10.0  # after a rank fails: time for the others to stop on their own


class RankFailed(RuntimeError):
    """A rank of a `--nproc` run raised or was killed; the message holds its traceback,
    `summary` what failed in a line."""

    def __init__(self, message: str, summary: str):
        super().__init__(message)
        self.summary = summary

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of the notebook process's frames, which only say that
        the ranks were watched: the message holds the failing rank's own traceback."""
        return [f"{type(self).__name__}: {self}"]


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


class RankFiles:
    """Files the ranks leave for the notebook process, named from one temporary path: each
    rank's state after its last completed step (`state.RANK.STEP`) and where a hung rank
    was (`stack.RANK`)."""

    def __init__(self, base: str):
        self.base = base

    def state(self, rank: int, step: int) -> str:
        return f"{self.base}.state.{rank}.{step}"

    def stack(self, rank: int) -> str:
        return f"{self.base}.stack.{rank}"

    def best_state(self) -> tuple[str, int, int] | None:
        """(path, rank, steps) of the state with the most steps, the lowest rank's of those."""
        found = []
        for path in glob.glob(glob.escape(self.base) + ".state.*"):
            rank, step = path.rsplit(".", 2)[-2:]
            found.append((-int(step), int(rank), path))
        if not found:
            return None
        step, rank, path = min(found)
        return path, rank, -step


@dataclass
class Shared:
    """What the notebook process and every rank share: the message channel, the stop
    request, the gradient-exchange marks and the files ranks leave."""

    channel: Any
    requested: Any
    stop_at: Any
    board: ArrivalBoard
    files: RankFiles

    @classmethod
    def made(cls, world: int, mp: Any, base: str) -> Shared:
        return cls(mp.Queue(), mp.Value("b", 0), mp.Value("q", -1), ArrivalBoard(world, mp),
                   RankFiles(base))


@contextlib.contextmanager
def _rank_process(rank: int, world: int, port: int, shared: Shared):
    """The forked process made a rank: its own signals, threads and output, its env."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the notebook process decides when to stop
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked while forking
    with contextlib.suppress(Exception):  # Linux only; elsewhere the parent cleans up
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    stack = open(shared.files.stack(rank), "w")  # noqa: SIM115 (open while the rank lives)
    faulthandler.register(signal.SIGUSR1, file=stack, all_threads=True)  # where a hung rank is
    torch.set_num_threads(max(1, torch.get_num_threads() // world))  # share the cores
    channel = shared.channel
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


def _worker(rank: int, world: int, port: int, device_type: str, shared: Shared,
            step_fn: StepFn, options: TrainOptions, claim: ownership.Claim) -> None:
    __tracebackhide__ = True  # not in the traceback a failing rank sends
    claim.step_lock = threading.RLock()  # the parent's may have been held by another thread
    ctx = RankContext.on(rank, world, rank, device_type == "cuda")
    with _rank_process(rank, world, port, shared):
        store = dist.TCPStore("127.0.0.1", port, world_size=world, is_master=False,
                              timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT))
        # the notebook process names a rank that keeps the others waiting after --timeout;
        # gloo's own timeout comes later, for a wait it cannot see
        dist.init_process_group(ctx.backend, store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(
                                    seconds=options.timeout + RANK_GRACE_SECONDS))
        training, release, failed = None, None, False
        try:
            rank_options, release = setup_rank(options, ctx)
            training = prepare(step_fn, rank_options, [protocol.RankRelay(shared.channel, rank)],
                               claim)
            training.stop_check = StopAgreement(shared.requested, shared.stop_at)
            training.says_where_held = False  # the notebook process knows which rank's it holds
            attach_rank(training, rank_options, ctx)
            mark_arrivals(training, rank_options, shared.board.marker(rank, training),
                          through_ddp=True)
            _note_unsharded_stream(training, rank_options.data, ctx)
            training.execute()
        except BaseException as e:
            failed = True
            shared.channel.put(protocol.Failure(rank, protocol.user_traceback(e)))
            traceback.clear_frames(e.__traceback__)  # they hold DDP, freed before the group
            raise
        finally:
            # rank 0's state goes back to the notebook; when the run failed, every rank's
            # (the lowest live rank's is used if rank 0 died)
            if training is not None and not training.amp.in_update and (rank == 0 or failed):
                _save_state(training, shared.files, rank)
            if release is not None:
                release()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _save_state(training: Any, files: RankFiles, rank: int) -> None:
    """Written whole or not at all: the notebook process may end the rank any moment."""
    writing = f"{files.base}.writing.{rank}"
    torch.save(training.objects.state_dict(), writing)
    os.replace(writing, files.state(rank, training.step))


def _note_unsharded_stream(training: Any, data: Any, ctx: RankContext) -> None:
    if isinstance(data, EvenStream) and same_stream_on_every_rank(data, ctx):
        training.run.notes.append(
            "every rank read the same first batch: this IterableDataset does not shard "
            "itself, so each rank trains on the same items. Split the stream by "
            "torch.distributed.get_rank() and get_world_size() in its __iter__.")


def _cell_frames(stack_file: str) -> str:
    """From a rank's faulthandler dump: the frames the training thread was in below our step
    that are the user's (not torch's or the standard library's), most recent last."""
    try:
        with open(stack_file) as f:
            dump = f.read()
    except OSError:
        return ""
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    skipped = (ours, os.path.dirname(torch.__file__), os.path.dirname(os.__file__))
    for block in dump.split("\n\n"):
        if f"{os.sep}training{os.sep}engine.py" not in block:
            continue  # not the thread that trains
        kept = []
        for line in block.splitlines():  # most recent first, down to our step's frame
            path = line.strip()[len('File "'):]
            if path.startswith(ours):
                break
            if line.strip().startswith("File") and not path.startswith(skipped):
                kept.append(line.strip())
        return "\n".join(f"  {frame}" for frame in reversed(kept))
    return ""


# -- the notebook's side -------------------------------------------------------------------
class DistributedTraining:
    """A `--nproc N` run seen from the notebook: `execute()` forks the ranks, shows their
    merged records, stops them together and loads rank 0's final state back."""

    def __init__(self, step_fn: StepFn, options: TrainOptions, views: list[View], world: int,
                 device_type: str, claim: ownership.Claim, run: Run, start: int = 0):
        self.step_fn, self.options, self.views = step_fn, options, views
        self.world, self.device_type, self.claim, self.run = world, device_type, claim, run
        self.merger = RecordMerger(world, options.log, start)  # `start`: a resumed run's step
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
        with tempfile.TemporaryDirectory(prefix="amp_nproc_") as folder:
            shared = Shared.made(self.world, mp, os.path.join(folder, "rank"))
            store = rendezvous(self.world)  # held until the ranks have ended
            # the notebook's objects out of the ranks' garbage collections: walking them
            # would copy their pages into every rank (copy-on-write)
            gc.freeze()
            # a Ctrl-C while forking waits in the notebook process; a rank ignores it (a
            # terminal sends it to every process): the notebook process decides when to stop
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                processes = torch.multiprocessing.start_processes(
                    _worker, args=(self.world, store.port, self.device_type, shared,
                                   self.step_fn, self.options, self.claim),
                    nprocs=self.world, join=False, start_method="fork")
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                gc.unfreeze()
            try:
                status, error = self._watch(processes, shared)
            finally:
                for p in processes.processes:
                    if p.is_alive():
                        p.kill()
                    p.join()
                self._receive(shared.channel)
                shared.channel.close()
                del store
            held = self._load_state(shared.files)
        if status == "finished" and self.run.stop_requested:
            status = "interrupted"
        with contextlib.suppress(Exception):
            self.books.refresh(self.merger.done_step)
        finish_run(self.run, status, None if error is None else error.summary, self.views, held)
        if error is not None:
            raise error

    def _watch(self, processes: Any, shared: Shared) -> tuple[str, BaseException | None]:
        """Until every rank has ended: (status, the error that ended the run)."""
        from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

        channel, board, timeout = shared.channel, shared.board, self.options.timeout
        try:
            # The first Ctrl-C (the notebook's interrupt) stops every rank at one boundary; a
            # second one ends the wait, and the caller ends the ranks.
            with stop_on_sigint(self.run, self.options.handle_sigint):
                self._wait_for_rank0(channel, processes)
                self.books.start()
                while True:
                    self._receive(channel)
                    if self.run.stop_requested:
                        shared.requested.value = 1
                    if processes.join(timeout=0.05, grace_period=RANK_GRACE_SECONDS):
                        return "finished", None
                    now = time.perf_counter()
                    stall = board.stall(now, timeout)
                    if stall is not None:
                        return "failed", self._stalled(stall, processes, shared)
                    if now >= self.books.next_refresh:
                        self.books.refresh(self.merger.done_step)
        except KeyboardInterrupt:
            return "interrupted", None
        except RankFailed as e:
            return "failed", e
        except (ProcessRaisedException, ProcessExitedException) as e:
            return "failed", self._rank_failure(e, channel)

    def _stalled(self, stall: Stall, processes: Any, shared: Shared) -> RankFailed:
        """End the ranks that did not arrive, first asking where they were; the ranks that
        waited for them then fail at once and leave their state (copied back)."""
        late = stall.late
        for rank in late:
            os.kill(processes.processes[rank].pid, signal.SIGUSR1)
        time.sleep(0.2)  # faulthandler writes the stacks from a signal handler
        where = {rank: _cell_frames(shared.files.stack(rank)) for rank in late}
        for rank in late:
            processes.processes[rank].kill()
        deadline = time.perf_counter() + RANK_GRACE_SECONDS
        while any(p.is_alive() for p in processes.processes) and time.perf_counter() < deadline:
            self._receive(shared.channel)  # a rank ends only once its messages are read
            time.sleep(0.02)
        names = " and ".join(f"rank {r}" for r in late)
        lines = [f"{stall.words(self.options.timeout)}, so "
                 f"{'it was' if len(late) == 1 else 'they were'} ended, and with "
                 f"{'it' if len(late) == 1 else 'them'} the run."]
        for rank in late:
            if where[rank]:
                lines.append(f"Where rank {rank} was:\n{where[rank]}")
        return RankFailed("\n".join(lines), f"{names} did not arrive (timeout)")

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

    def _load_state(self, files: RankFiles) -> str:
        """The final state of rank 0 (or, when it died, of the lowest rank that went
        furthest) into the notebook's objects, and the history settled to match it; without
        one they stay as before the run. Returns where the objects stand, for the notes."""
        best = files.best_state()
        if best is None:
            self._lose_history()
            return " on every rank: the notebook's objects are as before the run"
        path, rank, steps = best
        # a file a rank wrote a moment ago: trusted, and it holds the RNG's tuples
        state = torch.load(path, map_location="cpu", weights_only=False)
        o = self.options
        scaler = o.scaler
        if state["scaler"] is not None and scaler is None:
            scaler = persistent_scaler(o.optimizers[0], self.device_type,
                                       {**SCALER_DEFAULTS, **o.scaler_settings})
        TrainingObjects.of(o).with_scaler(scaler).load_state_dict(state)
        if rank != 0:
            self.run.notes.append(f"rank 0 ended without a consistent state: the notebook's "
                                  f"objects hold rank {rank}'s, after step {steps - 1} (DDP "
                                  "keeps every rank's weights the same)")
        self._settle_history(steps)
        return (f" on every rank: the notebook's objects hold rank {rank}'s state after its "
                "last completed step")

    def _lose_history(self) -> None:
        """No rank left a state: the objects are as before the run, so is the history."""
        lost = self.merger.discard()
        self.run.history.clear()
        self.run.val_history.clear()
        self.run.notes.append(
            f"no rank left a consistent state: the {lost} optimizer step(s) the ranks trained "
            "(as far as they reported them) were lost with them, so the history holds none, "
            "and the notebook's model, optimizers and scaler are as before this run")

    def _settle_history(self, steps: int) -> None:
        """The history up to the copied state's step: steps not every rank reported (one
        died before sending them) merged from those that did."""
        partial = self.merger.settle(steps)
        if partial:
            span = f"{partial[0]}" if len(partial) == 1 else f"{partial[0]}-{partial[-1]}"
            self.run.notes.append(
                f"step(s) {span}: not every rank reported them before the run ended; their "
                "loss is averaged over the ranks that did, their samples summed over those")


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
        start = _resumed_history(run, options.resume, world)
        register(run)
        claim.run = run
    except BaseException:
        claim.release()
        raise
    return DistributedTraining(step_fn, options, views, world, device_type, claim, run, start)


def _resumed_history(run: Run, path: str | None, world: int) -> int:
    """A resumed run starts with its checkpoint's history, merged over ranks already (the
    ranks send only the steps they train): returns the step they start from."""
    if path is None:
        return 0
    try:
        payload = read_checkpoint(path, mmap=True)  # the weights stay on disk
        check_same_world(payload, world)  # before any process is forked
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise AmpUsageError(f"--resume {path}: {e}") from None
    run.history, run.val_history = payload["history"], payload["val_history"]
    return payload["step"]
