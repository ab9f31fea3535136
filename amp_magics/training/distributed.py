"""Training on several processes with DistributedDataParallel: `--nproc N` / `nproc=N`.

From a notebook, N worker processes are forked through torch's own process starter (a cell
body and notebook-defined classes cannot be pickled for spawn). Each rank joins a process
group on 127.0.0.1 (gloo on the CPU, NCCL with one GPU per rank), moves the model to its
device, routes the model's calls through DistributedDataParallel, reads its shard of the data
and runs the ordinary engine. Ranks send their records to the notebook process, which merges
them into one Run (loss averaged over ranks, samples summed, each rank's memory) for the
views. Every rank stops at one step boundary they agree on; rank 0's final state is loaded
back into the notebook's model, optimizers, scaler and scheduler.

Under torchrun (WORLD_SIZE, RANK, LOCAL_RANK set) there is no parent: each process trains its
rank directly and only rank 0 reports and saves.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import io
import itertools
import os
import queue as queue_module
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .. import ownership
from ..errors import AmpUsageError
from ..tensors import StepFn, plain_module, tensors_in
from .engine import prepare, stop_on_sigint
from .options import TrainOptions
from .routing import route_through
from .run import Run, next_name, register
from .scaler import persistent_scaler
from .telemetry import RunBooks
from .view import View, notify

RANK_GRACE_SECONDS = 10.0  # after a rank fails: time for the others to stop on their own
STARTUP_TIMEOUT = 120.0  # seconds for every rank to join the process group


class RankFailed(RuntimeError):
    """A rank of a `--nproc` run raised or was killed; the message holds its traceback."""


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


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


def check_fork_safe(options: TrainOptions, world: int, script_hint: str) -> None:
    """Refuse before forking what would break or hang a forked worker."""
    if torch.cuda.is_initialized():
        raise AmpUsageError(
            "--nproc forks worker processes, and CUDA is already initialised in this kernel "
            "(the model is on a GPU, or a CUDA call already ran): a forked process cannot use "
            "that CUDA context. Either restart the kernel and keep the model on the CPU until "
            "this cell (each worker moves it to its own GPU), or run it as a script: "
            f"{script_hint}")
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


def torchrun_command(script: str, world: int) -> str:
    return f"torchrun --standalone --nproc-per-node {world} {script}"


def torchrun_context() -> RankContext | None:
    """This process's rank when it was started by torchrun (WORLD_SIZE > 1), else None."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return RankContext(rank, size, local, device, "nccl" if cuda else "gloo")


# -- one rank --------------------------------------------------------------------------------
def setup_rank(options: TrainOptions, ctx: RankContext) -> tuple[TrainOptions, Callable[[], None]]:
    """The options this rank trains with: the model on its device and called through DDP, the
    optimizers' state on that device, its shard of the data, checkpoints only on rank 0.
    Returns them and the function that undoes the routing and frees DDP (call it before the
    process group is destroyed)."""
    model = plain_module(options.model)
    if ctx.cuda:
        torch.cuda.set_device(ctx.device)
    model.to(ctx.device)  # parameters keep their identity: the optimizers still hold them
    for opt in options.optimizers:
        opt.load_state_dict(opt.state_dict())  # casts the state onto the parameters' device
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[ctx.local_rank] if ctx.cuda else None)
    release = route_through(model, ddp)
    first = ctx.rank == 0
    start_epoch = 0
    if options.resume is not None:  # a shuffled shard resumes with the checkpoint's epoch order
        start_epoch = torch.load(options.resume, map_location="cpu", weights_only=False)["epoch"]
    return dataclasses.replace(
        options, data=shard(options.data, ctx, start_epoch), nproc=1,
        val=shard(options.val, ctx) if options.val is not None else None,
        checkpoint=options.checkpoint if first else None,
        every=options.every if first else None), release


class EpochSampled:
    """A DataLoader re-made over a DistributedSampler; each pass is the next epoch
    (set_epoch, so a shuffled order differs per epoch and agrees across ranks)."""

    def __init__(self, loader: torch.utils.data.DataLoader,
                 sampler: torch.utils.data.distributed.DistributedSampler, epoch: int = 0):
        self.loader, self.sampler, self.epoch = loader, sampler, epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)


class Strided:
    """Batches r, r+N, r+2N, ... of any iterable, whole rounds of N only, so every rank takes
    the same number of steps (a rank with one batch more would wait forever for the others)."""

    def __init__(self, data: Iterable, rank: int, world: int):
        self.data, self.rank, self.world = data, rank, world

    def __len__(self) -> int:
        return len(self.data) // self.world  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        it = iter(self.data)
        while True:
            chunk = list(itertools.islice(it, self.world))
            if len(chunk) < self.world:
                return
            yield chunk[self.rank]


def shard(data: Iterable, ctx: RankContext, start_epoch: int = 0) -> Iterable:
    """This rank's part of the data (see the README's --nproc section)."""
    loader = torch.utils.data.DataLoader
    if isinstance(data, loader) and isinstance(data.dataset, torch.utils.data.IterableDataset):
        return data  # a stream shards itself by rank (checked by `same_stream_on_every_rank`)
    if isinstance(data, loader) and data.batch_size is not None:
        shuffle = isinstance(data.sampler, torch.utils.data.RandomSampler)
        sampler = torch.utils.data.distributed.DistributedSampler(
            data.dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
            drop_last=data.drop_last)
        remade = loader(data.dataset, batch_size=data.batch_size, sampler=sampler,
                        num_workers=data.num_workers, collate_fn=data.collate_fn,
                        pin_memory=data.pin_memory, drop_last=data.drop_last,
                        timeout=data.timeout, worker_init_fn=data.worker_init_fn,
                        persistent_workers=data.persistent_workers,
                        prefetch_factor=data.prefetch_factor if data.num_workers else None)
        return EpochSampled(remade, sampler, start_epoch)
    return Strided(data, ctx.rank, ctx.world_size)


def same_stream_on_every_rank(data: Iterable, ctx: RankContext) -> bool:
    """For a DataLoader over an IterableDataset: do all ranks read the same first batch?"""
    try:
        first = next(iter(data))
    except StopIteration:
        first = None
    tensors = list(tensors_in(first))
    mark = float(sum(t.double().sum().item() for t in tensors)) if tensors else 0.0
    marks: list = [None] * ctx.world_size
    dist.all_gather_object(marks, mark)
    return len(set(marks)) == 1


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


class RankRelay(View):
    """A rank's view: sends its new records, memory, notes and end to the notebook process."""

    def __init__(self, channel: Any, rank: int):
        self.channel, self.rank = channel, rank
        self.sent = [0, 0, 0, 0]  # history, val_history, notes, alarms

    def _send_new(self, run: Run) -> None:
        seen = self.sent
        new = (run.history[seen[0]:], run.val_history[seen[1]:], run.notes[seen[2]:],
               run.alarms[seen[3]:])
        self.sent = [len(run.history), len(run.val_history), len(run.notes), len(run.alarms)]
        memory = run.memory[-1] if run.memory else {}
        self.channel.put(("records", self.rank, new, memory, run.epoch))

    def on_start(self, run: Run) -> None:
        self.channel.put(("hello", self.rank, {
            "precision": run.precision, "precision_reason": run.precision_reason,
            "scaler_settings": run.scaler_settings, "total_steps": run.total_steps,
            "steps_per_epoch": run.steps_per_epoch}))

    def on_refresh(self, run: Run) -> None:
        self._send_new(run)

    def on_end(self, run: Run) -> None:
        self._send_new(run)
        self.channel.put(("end", self.rank, run.status, run.error))


class _ChannelWriter(io.TextIOBase):
    """A rank's stdout/stderr: lines go to the notebook, which prints them as `[rankN] ...`."""

    def __init__(self, channel: Any, rank: int):
        self.channel, self.rank, self.buffer_ = channel, rank, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buffer_ += text
        *lines, self.buffer_ = self.buffer_.split("\n")
        for line in lines:
            self.channel.put(("out", self.rank, line))
        return len(text)

    def flush(self) -> None:
        if self.buffer_:
            self.channel.put(("out", self.rank, self.buffer_))
            self.buffer_ = ""


def _worker(rank: int, world: int, port: int, device_type: str, channel: Any, requested: Any,
            stop_at: Any, state_path: str, step_fn: StepFn, options: TrainOptions,
            claim: ownership.Claim) -> None:
    """One forked rank (runs in the child process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the notebook process decides when to stop
    _die_with_parent()
    claim.step_lock = threading.RLock()  # the parent's may have been held by another thread
    torch.set_num_threads(max(1, torch.get_num_threads() // world))  # share the cores
    sys.stdout = _ChannelWriter(channel, rank)
    sys.stderr = _ChannelWriter(channel, rank)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    cuda = device_type == "cuda"
    ctx = RankContext(rank, world, rank, torch.device("cuda", rank) if cuda else
                      torch.device("cpu"), "nccl" if cuda else "gloo")
    dist.init_process_group(ctx.backend, rank=rank, world_size=world,
                            timeout=_timedelta(STARTUP_TIMEOUT))
    training, release = None, None
    try:
        rank_options, release = setup_rank(options, ctx)
        training = prepare(step_fn, rank_options, [RankRelay(channel, rank)], claim)
        training.stop_check = StopAgreement(requested, stop_at)
        data = rank_options.data
        if isinstance(data, torch.utils.data.DataLoader) and same_stream_on_every_rank(data, ctx):
            training.run.notes.append(
                "every rank read the same first batch: this IterableDataset does not shard "
                "itself, so each rank trains on the same items. Split the stream by "
                "torch.distributed.get_rank() and get_world_size() in its __iter__.")
        training.execute()
    except BaseException as e:
        channel.put(("error", rank, _user_traceback(e)))
        traceback.clear_frames(e.__traceback__)  # they hold DDP, freed before the group
        raise
    finally:
        if rank == 0 and training is not None and not training.amp.in_update:
            _save_state(state_path, training)
        sys.stdout.flush()
        sys.stderr.flush()
        channel.close()
        channel.join_thread()
        if release is not None:
            release()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _save_state(path: str, training: Any) -> None:
    """Rank 0's model, optimizers, scaler and scheduler as after its last completed step."""
    o, amp = training.options, training.amp
    torch.save({"model": plain_module(o.model).state_dict(),
                "optimizers": [opt.state_dict() for opt in o.optimizers],
                "scaler": amp.scaler.state_dict() if amp.scaler is not None else None,
                "scheduler": o.scheduler.state_dict() if o.scheduler is not None else None},
               path)


def _user_traceback(error: BaseException) -> str:
    """The traceback as the notebook shows it: our own frames (marked with
    __tracebackhide__) left out, the cell's lines as IPython cached them."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)]
    tb, kept = error.__traceback__, []
    for summary in frames:
        if not tb.tb_frame.f_locals.get("__tracebackhide__"):
            kept.append(summary)
        tb = tb.tb_next
    text = "".join(traceback.format_list(kept))
    return f"Traceback (most recent call last):\n{text}" + "".join(
        traceback.format_exception_only(type(error), error))


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):  # Linux only; elsewhere the parent cleans up
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _timedelta(seconds: float):
    import datetime
    return datetime.timedelta(seconds=seconds)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the notebook's side -------------------------------------------------------------------
class RecordMerger:
    """Ranks' records, step by step: once every rank has sent step s, one record with the loss
    averaged over ranks and the samples summed (the rest as rank 0 saw it)."""

    def __init__(self, world: int, log_names: Sequence[str]):
        self.world, self.log_names = world, tuple(log_names)
        self.pending: dict[int, dict[int, dict]] = {}
        self.val_pending: dict[int, dict[int, dict]] = {}
        self.done_step = 0
        self.memory: dict[str, int | None] = {}
        self.ready: list[dict] = []
        self.val_ready: list[dict] = []

    def add(self, rank: int, records: list[dict], val_records: list[dict],
            memory: dict) -> None:
        for record in records:
            self.pending.setdefault(record["step"], {})[rank] = record
        for record in val_records:
            self.val_pending.setdefault(record["epoch"], {})[rank] = record
        for key, value in memory.items():
            if key not in ("time", "step"):
                self.memory[f"{key} rank{rank}"] = value
        while len(self.pending.get(self.done_step, ())) == self.world:
            by_rank = self.pending.pop(self.done_step)
            merged = dict(by_rank[0])
            merged["loss"] = sum(r["loss"] for r in by_rank.values()) / self.world
            merged["samples"] = sum(r["samples"] for r in by_rank.values())
            for name in self.log_names:
                values = [r.get(name) for r in by_rank.values()]
                if all(v is not None for v in values):
                    merged[name] = sum(values) / self.world
            self.ready.append(merged)
            self.done_step += 1
        for epoch in sorted(e for e, v in self.val_pending.items() if len(v) == self.world):
            by_rank = self.val_pending.pop(epoch)
            merged = dict(by_rank[0])
            merged["val_loss"] = sum(r["val_loss"] for r in by_rank.values()) / self.world
            self.val_ready.append(merged)

    def drain(self) -> list[dict]:
        ready, self.ready = self.ready, []
        return ready

    def sample_memory(self) -> dict:
        """Each rank's memory, plus the usual keys: resident memory summed over the ranks (one
        host), device counters the highest of any rank (one GPU each)."""
        sample = dict(self.memory)
        for key in ("allocated", "reserved", "peak", "device_used", "rss"):
            values = [v for k, v in self.memory.items()
                      if k.rpartition(" rank")[0] == key and v is not None]
            if values:
                sample[key] = sum(values) if key == "rss" else max(values)
        return sample


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
        from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException
        from torch.multiprocessing import start_processes
        import multiprocessing

        mp = multiprocessing.get_context("fork")
        channel = mp.Queue()
        requested, stop_at = mp.Value("b", 0), mp.Value("q", -1)
        fd, state_path = tempfile.mkstemp(prefix=".amp_nproc_", suffix=".pt")
        os.close(fd)
        os.unlink(state_path)  # rank 0 writes it only when it has a consistent state
        error: BaseException | None = None
        status, failed_rank, rank_errors = "finished", None, {}
        processes = start_processes(
            _worker, args=(self.world, free_port(), self.device_type, channel, requested,
                           stop_at, state_path, self.step_fn, self.options, self.claim),
            nprocs=self.world, join=False, start_method="fork")
        try:
            # The first Ctrl-C (the notebook's interrupt) stops every rank at one boundary; a
            # second one ends the wait, and the finally below ends the ranks.
            with stop_on_sigint(self.run, self.options.handle_sigint):
                self._wait_for_rank0(channel, rank_errors, processes)
                self.books.start()
                while True:
                    self._receive(channel, rank_errors)
                    if self.run.stop_requested:
                        requested.value = 1
                    if processes.join(timeout=0.05, grace_period=RANK_GRACE_SECONDS):
                        break
                    if time.perf_counter() >= self.books.next_refresh:
                        self._refresh()
        except KeyboardInterrupt:
            status = "interrupted"
        except RankFailed as e:
            status, error = "failed", e
        except (ProcessRaisedException, ProcessExitedException) as e:
            status = "failed"
            failed_rank = e.error_index
            if isinstance(e, ProcessRaisedException):  # the first rank to report broke first:
                self._receive(channel, rank_errors)  # the others fail because it left
                failed_rank = next(iter(rank_errors), failed_rank)
            detail = rank_errors.get(failed_rank) or getattr(e, "msg", str(e))
            if isinstance(e, ProcessExitedException):
                detail = (f"rank {failed_rank} was killed by {e.signal_name}"
                          if e.signal_name else f"rank {failed_rank} exited with code "
                          f"{e.exit_code}")
            error = RankFailed(f"rank {failed_rank} of {self.world} failed:\n{detail}")
        finally:
            for p in processes.processes:
                if p.is_alive():
                    p.kill()
                p.join()
            self._receive(channel, rank_errors)
            channel.close()
        if status == "finished" and self.run.stop_requested:
            status = "interrupted"
        self._load_state(state_path)
        self._finish(status, error, failed_rank)
        if error is not None:
            raise error

    def _receive(self, channel: Any, rank_errors: dict) -> None:
        while True:
            try:
                kind, rank, *payload = channel.get_nowait()
            except (queue_module.Empty, EOFError, OSError, ValueError):
                return
            if kind == "records":
                (history, val_history, notes, alarms), memory, epoch = payload
                self.merger.add(rank, history, val_history, memory)
                if rank == 0:
                    self.run.epoch = epoch
                    self.run.notes += [n for n in notes if n not in self.run.notes]
                    self.run.alarms += [a for a in alarms if a not in self.run.alarms]
                self.run.val_history += self.merger.val_ready
                self.merger.val_ready = []
            elif kind == "hello" and rank == 0:
                for key, value in payload[0].items():
                    setattr(self.run, key, value)
                self.hello = True
            elif kind == "out":
                print(f"[rank{rank}] {payload[0]}")
            elif kind == "error":
                rank_errors[rank] = payload[0]

    def _wait_for_rank0(self, channel: Any, rank_errors: dict, processes: Any) -> None:
        """Until rank 0 says which precision it trains in (the views show it from the start),
        or a rank ends (join raises when it failed)."""
        deadline = time.perf_counter() + STARTUP_TIMEOUT
        while not self.hello:
            self._receive(channel, rank_errors)
            if processes.join(timeout=0.02, grace_period=RANK_GRACE_SECONDS):
                return
            if time.perf_counter() > deadline:  # never hang: the finally ends the ranks
                raise RankFailed(f"the {self.world} ranks did not start training within "
                                 f"{STARTUP_TIMEOUT:.0f} s (process group on 127.0.0.1); "
                                 "nothing was trained")

    def _refresh(self) -> None:
        self.books.refresh(self.merger.done_step)

    def _load_state(self, path: str) -> None:
        """Rank 0's final state into the notebook's objects; without one (rank 0 died inside
        an optimizer step) they stay as before the run, and the run says so."""
        o = self.options
        if not os.path.exists(path):
            self.run.notes.append("rank 0 left no consistent state: the notebook's model, "
                                  "optimizers and scaler are as before this run")
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        finally:
            os.unlink(path)
        plain_module(o.model).load_state_dict(state["model"])
        for opt, opt_state in zip(o.optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        if state["scaler"] is not None:
            scaler = o.scaler or persistent_scaler(o.optimizers[0], self.device_type,
                                                   _scaler_settings(o))
            scaler.load_state_dict(state["scaler"])
        if state["scheduler"] is not None and o.scheduler is not None:
            o.scheduler.load_state_dict(state["scheduler"])

    def _finish(self, status: str, error: BaseException | None, failed_rank: int | None) -> None:
        run = self.run
        with contextlib.suppress(Exception):
            self._refresh()
        run.status = status
        if error is not None:
            run.error = f"rank {failed_rank} failed"
        if status == "interrupted":
            run.notes.append(f"interrupted after {len(run.history)} optimizer step(s) on every "
                             "rank: the notebook's objects hold rank 0's state after its last "
                             "completed step")
        notify(self.views, "on_end", run)


def _scaler_settings(o: TrainOptions) -> dict:
    from ..precision import SCALER_DEFAULTS
    return {**SCALER_DEFAULTS, **o.scaler_settings}


def prepare_distributed(step_fn: StepFn, options: TrainOptions, views: Sequence[View],
                        world: int) -> DistributedTraining:
    """Check, own the model, register the Run; `.execute()` forks and trains."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # torch.cuda checks: no init
    check_fork_safe(options, world, torchrun_command("train.py", world))
    device_type = device_type_for_ranks(options.model)
    for view in views:
        if not isinstance(view, View):
            raise AmpUsageError(f"observers must be amp_magics View objects, got "
                                f"{type(view).__name__}")
    claim = ownership.claim(options.name or "a run", ownership.owned_objects(
        options.model, [*options.optimizers, options.scaler, options.scheduler]))
    try:
        o = options
        run = Run(o.name or next_name(),
                  config={"dtype": o.dtype, "epochs": o.epochs, "steps": o.steps,
                          "accum": o.accum, "clip": o.clip, "seed": o.seed, "nproc": world,
                          "lr": o.optimizers[0].param_groups[0].get("lr"),
                          "optimizer": ", ".join(type(opt).__name__ for opt in o.optimizers),
                          **o.config},
                  device=f"{device_type} x{world}", precision=o.dtype,
                  model_label=type(o.model).__name__, model=o.model)
        run.ranks = world
        register(run)
        claim.run = run
    except BaseException:
        claim.release()
        raise
    return DistributedTraining(step_fn, options, list(views), world, device_type, claim, run)


# -- under torchrun ----------------------------------------------------------------------------
@contextlib.contextmanager
def joined_process_group(ctx: RankContext) -> Iterator[None]:
    """Join torchrun's process group, initialising it when the script has not."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(ctx.backend)
    try:
        yield
        if started:  # no rank closes its connections while another still uses them
            dist.barrier()
    finally:
        if started:
            dist.destroy_process_group()


def train_under_torchrun(step_fn: StepFn, options: TrainOptions, views: Sequence[View],
                         ctx: RankContext) -> Run:
    """Each torchrun process trains its rank; rank 0 reports and saves."""
    __tracebackhide__ = True
    if options.compile:
        raise AmpUsageError("compile=True under torchrun is not supported yet: compile the "
                            "model in the script (torch.compile) and pass that")
    with joined_process_group(ctx):
        rank_options, release = setup_rank(options, ctx)
        try:
            training = prepare(step_fn, rank_options, list(views) if ctx.rank == 0 else [])
            training.execute()
        finally:
            release()
    return training.run


def prepare_training(step_fn: StepFn, options: TrainOptions, views: Sequence[View] = ()) -> Any:
    """The training for these options: one process (engine.Training), or --nproc N > 1
    (DistributedTraining). Both have `.run`, `.execute()` and `.release()`."""
    world = world_size(options.nproc)
    if world == 1:
        return prepare(step_fn, options, views)
    return prepare_distributed(step_fn, options, views, world)
