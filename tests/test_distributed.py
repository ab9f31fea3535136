"""--nproc N: DistributedDataParallel from the notebook (forked ranks, gloo on the CPU) and
under torchrun, bit-identical to a hand-written DDP AMP loop."""
import contextlib
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from IPython.core.error import UsageError
from torch.multiprocessing import start_processes

import amp_magics
from amp_magics.distributed.launcher import RankFailed
from amp_magics.views.run_summary import peak_memory_source
from recipes import assert_same_state, make_data, make_model, plain

BODY = "x, y = batch\nloss = F.cross_entropy(model(x), y)"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ddp_accumulation(ddp, opt, data, scaler, k):
    """The DDP docs' accumulation recipe: no_sync() over all but each window's last micro-batch
    (the epoch's last batch closes a shorter window)."""
    for i, (x, y) in enumerate(data):
        closes = (i + 1) % k == 0 or i + 1 == len(data)
        with contextlib.nullcontext() if closes else ddp.no_sync():
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(ddp(x), y) / k
            scaler.scale(loss).backward()
        if closes:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()


def _reference_rank(rank, meeting, dtype, data, epochs, path, loader_args, accum=1):
    """The hand-written DDP AMP loop, one rank: the same fork, gloo, DDP with defaults (met
    through a file: no port to pick)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{meeting}", rank=rank, world_size=2)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    scaler = torch.amp.GradScaler("cpu") if dtype == torch.float16 else None
    if loader_args is None:
        batches, sampler = data[rank::2], None
    else:
        dataset, batch_size = loader_args
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=2, rank=rank, shuffle=True)
        batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        if accum > 1:
            ddp_accumulation(ddp, opt, batches, scaler, accum)
        else:
            plain(ddp, opt, batches, dtype=dtype, scaler=scaler)
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None}, path)
    del ddp  # before the group: a Reducer outliving a gloo group can hang its teardown
    dist.destroy_process_group()


def reference(tmp_path, dtype, data=None, epochs=1, loader_args=None, accum=1):
    path = str(tmp_path / "reference.pt")
    start_processes(_reference_rank, args=(tmp_path / "meeting", dtype, data, epochs, path,
                                           loader_args, accum),
                    nprocs=2, start_method="fork")
    return torch.load(path, weights_only=False)


def no_children_left():
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


@pytest.fixture
def nb(ip):
    model = make_model()
    ip.user_ns.update(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                      F=F, torch=torch, os=os, time=time, signal=signal)
    return ip


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_two_processes_equal_a_hand_written_ddp_loop(nb, tmp_path, dtype):
    data = make_data(n=16, overflow_at=(4, 11) if dtype == "fp16" else ())
    nb.user_ns["train_loader"] = data
    nb.run(f"%%amp_train --dtype {dtype} --nproc 2 -o run\n{BODY}")
    run = nb.user_ns["run"]
    ref = reference(tmp_path, torch.float16 if dtype == "fp16" else torch.bfloat16, data)
    assert run.status == "finished" and len(run.history) == 8 and run.device == "cpu x2"
    assert_same_state(nb.user_ns["model"].state_dict(), ref["model"])  # rank 0's state is back
    assert_same_state(nb.user_ns["optimizer"].state_dict(), ref["opt"])
    if dtype == "fp16":
        skipped = [r["step"] for r in run.history if r["skipped"]]
        assert skipped == [2, 5]  # batches 4 and 11 are rank 0's 3rd and rank 1's 6th
        from amp_magics.training.scaler import scaler_for
        assert scaler_for(nb.user_ns["optimizer"]).state_dict() == ref["scaler"]
    assert all(r["samples"] == 8 for r in run.history)  # 4 per rank, summed
    # peak memory is per process, as labelled: the highest rank's, each rank named; the sum
    # only under its own name
    ranks = run.rank_peaks("rss")
    assert sorted(ranks) == [0, 1] and run.summary["peak_memory"] == max(ranks.values())
    assert re.search(r"the highest of 2 ranks: rank 0 [\d.]+ MiB, rank 1 [\d.]+ MiB",
                     peak_memory_source(run))
    last = run.memory[-1]
    assert last["rss all ranks"] == last["rss rank0"] + last["rss rank1"] > last["rss"]
    assert no_children_left()


def test_accumulation_all_reduces_once_per_window_as_the_ddp_recipe(nb, tmp_path, monkeypatch):
    """--accum 5 over 24 batches per rank: windows of 5, 5, 5, 5 and 4, all-reduced only at
    their last micro-batch (DDP's no_sync recipe: 19 deferred micro-batches per rank),
    bit-identical to that recipe, fp16 overflow included."""
    data = make_data(n=48, batch=16, overflow_at=(4,))
    ref = reference(tmp_path, torch.float16, data, accum=5)
    deferred = tmp_path / "deferred"
    no_sync = torch.nn.parallel.DistributedDataParallel.no_sync

    def counted(ddp):  # in the forked ranks: one line per micro-batch kept local
        with open(deferred, "a") as f:
            f.write(f"{dist.get_rank()}\n")
        return no_sync(ddp)
    monkeypatch.setattr(torch.nn.parallel.DistributedDataParallel, "no_sync", counted)
    nb.user_ns["train_loader"] = data
    nb.run(f"%%amp_train --dtype fp16 --nproc 2 --accum 5 -o run\n{BODY}")
    run = nb.user_ns["run"]
    assert run.status == "finished" and len(run.history) == 5
    assert sorted(deferred.read_text().split()) == ["0"] * 19 + ["1"] * 19
    assert_same_state(nb.user_ns["model"].state_dict(), ref["model"])
    assert_same_state(nb.user_ns["optimizer"].state_dict(), ref["opt"])
    assert no_children_left()


class Shorter:
    """Batches whose len() promises more than they hold."""

    def __init__(self, batches, promised):
        self.batches, self.promised = batches, promised

    def __len__(self):
        return self.promised

    def __iter__(self):
        return iter(self.batches)


def test_data_shorter_than_its_len_fails_clearly_rather_than_diverge(nb):
    # 8 batches said to be 10: each rank expects 5 and gets 4, the last window's gradients
    # kept local; stepping then would leave the ranks' weights apart
    nb.user_ns["train_loader"] = Shorter(make_data(n=8), 10)
    with pytest.raises(RankFailed, match=r"(?s)rank \d of 2 failed.*the data ended before its "
                                         r"len\(\) said.*drop --accum"):
        nb.run(f"%%amp_train --dtype bf16 --nproc 2 --accum 3 -o run\n{BODY}")
    assert amp_magics.runs()[-1].wall_time < 60  # timed from its start, not the clock's zero
    assert no_children_left()


def test_a_shuffled_dataloader_shards_with_a_distributed_sampler(nb, tmp_path):
    dataset = torch.utils.data.TensorDataset(torch.randn(40, 8), torch.randint(0, 3, (40,)))
    nb.user_ns["train_loader"] = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True)
    nb.run(f"%%amp_train --dtype bf16 --nproc 2 --epochs 2 -o run\n{BODY}")
    ref = reference(tmp_path, torch.bfloat16, epochs=2, loader_args=(dataset, 4))
    assert len(nb.user_ns["run"].history) == 10
    assert_same_state(nb.user_ns["model"].state_dict(), ref["model"])


INDEXED = "x, y, i = batch\nwith open(f\"{seen}.{os.environ['RANK']}\", 'a') as f:\n" \
          "    f.write(' '.join(map(str, i.tolist())) + '\\n')\nloss = F.cross_entropy(model(x), y)"


def seen_batches(seen, rank):
    return [list(map(int, line.split())) for line in open(f"{seen}.{rank}").read().splitlines()]


def test_the_users_sampler_is_kept_and_its_batches_dealt_to_the_ranks(nb, tmp_path):
    """A WeightedRandomSampler: every rank sees batches the sampler drew (never an index
    of weight 0), rank r the batches r, r+2, ... of the one sequence it draws. A custom
    batch sampler: its own batches, dealt the same way."""
    n = 40
    dataset = torch.utils.data.TensorDataset(torch.randn(n, 8), torch.randint(0, 3, (n,)),
                                             torch.arange(n))
    weights = torch.tensor([float(k % 2) for k in range(n)])  # even indices never drawn

    def weighted():
        sampler = torch.utils.data.WeightedRandomSampler(
            weights, 32, generator=torch.Generator().manual_seed(5))
        return torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
    drawn = [b[2].tolist() for b in weighted()]
    seen = tmp_path / "seen"
    nb.user_ns.update(train_loader=weighted(), seen=str(seen))
    nb.run(f"%%amp_train --dtype bf16 --nproc 2 -o run\n{INDEXED}")
    assert len(nb.user_ns["run"].history) == 4
    assert seen_batches(seen, 0) == drawn[0::2] and seen_batches(seen, 1) == drawn[1::2]
    assert all(k % 2 for batch in drawn for k in batch)

    batches = [[3, 1], [4, 1], [5, 9], [2, 6], [5, 3]]  # five: the fifth goes to no rank
    nb.user_ns["train_loader"] = torch.utils.data.DataLoader(dataset, batch_sampler=batches)
    nb.user_ns["seen"] = str(tmp_path / "custom")
    nb.run(f"%%amp_train --dtype bf16 --nproc 2 -o run\n{INDEXED}")
    assert seen_batches(tmp_path / "custom", 0) == [[3, 1], [5, 9]]
    assert seen_batches(tmp_path / "custom", 1) == [[4, 1], [2, 6]]
    assert any("the last 1 batch(es) of the epoch went to no rank" in note
               for note in nb.user_ns["run"].notes)


def test_a_sampler_that_the_ranks_draw_differently_is_refused(nb):
    """Without a generator, a sampler draws from the global RNG: a step body that draws
    differently per rank makes the ranks' orders part, which is named, not trained on."""
    dataset = torch.utils.data.TensorDataset(torch.randn(40, 8), torch.randint(0, 3, (40,)))
    sampler = torch.utils.data.WeightedRandomSampler(torch.ones(40), 32)
    nb.user_ns["train_loader"] = torch.utils.data.DataLoader(dataset, batch_size=4,
                                                             sampler=sampler)
    with pytest.raises(RankFailed, match="the ranks drew different batches"):
        nb.run(f"%%amp_train --dtype bf16 --nproc 2 --epochs 2 -o run\n"
               f"torch.rand(int(os.environ['RANK']) + 1)\n{BODY}")
    assert no_children_left()


@pytest.mark.parametrize("every", [None, 4])
def test_checkpoints_during_the_run_hold_the_history_merged_over_ranks(nb, tmp_path, every):
    """The checkpoint of epoch 0's end (or of step 4, --every 4), copied by rank 0 at step 10
    before the next one replaces it, holds the losses averaged over ranks and the samples
    summed, as the Run does, not rank 0's own."""
    ckpt, copy = tmp_path / "run.pt", tmp_path / "mid.pt"
    nb.user_ns.update(train_loader=make_data(n=16), val_loader=make_data(n=4, seed=2),
                      shutil=__import__("shutil"))
    nb.run(f"%%amp_train --dtype bf16 --nproc 2 --epochs 2 --val val_loader "
           f"--checkpoint {ckpt} {'' if every is None else f'--every {every}'} -o run\n"
           f"if step == 10 and os.environ['RANK'] == '0':\n"
           f"    shutil.copy({str(ckpt)!r}, {str(copy)!r})\n{BODY}")
    run = nb.user_ns["run"]
    mid = torch.load(copy, weights_only=True)
    assert mid["step"] == 8  # the last one written before step 10
    assert mid["history"] == run.history[:8] and mid["history"][0]["samples"] == 8
    # --every 4: written at step 8 before the epoch's validation
    assert mid["val_history"] == run.val_history[:1 if every is None else 0]
    final = torch.load(ckpt, weights_only=True)  # --every 4 also lands on the last step, 16
    assert final["history"] == run.history and final["val_history"] == run.val_history
    assert len(run.val_history) == 2  # the last epoch's validation came after that step


def test_a_resumed_run_keeps_the_merged_history_of_its_checkpoint(nb, tmp_path):
    """Resumed from a checkpoint of --nproc 2: the steps before it keep the records the
    checkpoint holds (merged over ranks once: not merged again, samples not summed twice), in
    the Run and in the checkpoints, and the history is that of a run never stopped."""
    ckpt = tmp_path / "run.pt"
    nb.user_ns["train_loader"] = make_data(n=16)
    for name, flags in (("whole", "--epochs 2"), ("first", f"--epochs 1 --checkpoint {ckpt}"),
                        ("resumed", f"--epochs 2 --resume {ckpt} --checkpoint {ckpt}")):
        model = make_model()
        nb.user_ns.update(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))
        nb.run(f"%%amp_train --dtype bf16 --nproc 2 {flags} -o {name}\n{BODY}")

    def losses(history):
        return [(r["step"], r["loss"], r["samples"]) for r in history]
    whole = losses(nb.user_ns["whole"].history)
    assert len(whole) == 16 and whole[0][2] == 8
    assert losses(nb.user_ns["resumed"].history) == whole
    assert losses(torch.load(ckpt, weights_only=True)["history"]) == whole


def test_stop_from_the_notebook_stops_every_rank_together(nb):
    nb.user_ns["train_loader"] = make_data(n=8)
    run = nb.run(f"%%amp_train --dtype bf16 --nproc 2 --epochs 100000 --background -o run\n"
                 f"time.sleep(0.005)\n{BODY}")
    deadline = time.monotonic() + 60
    while len(run.history) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    nb.run("%amp_stop --wait 60")
    assert run.status == "interrupted" and len(run.history) >= 5
    assert no_children_left()
    steps = len(run.history)
    # the notebook's model is rank 0's after that many steps: a plain DDP-free check is that
    # training it further in one process works at once (ownership released) and moves it
    before = {k: v.clone() for k, v in nb.user_ns["model"].state_dict().items()}
    assert not all(torch.equal(before[k], v) for k, v in make_model().state_dict().items())
    nb.run(f"%%amp_train --dtype bf16 --steps 2 -o after\n{BODY}")
    assert nb.user_ns["after"].status == "finished" and steps >= 5


def test_an_exception_in_one_rank_fails_the_run_with_its_traceback(nb, capsys):
    nb.user_ns["train_loader"] = make_data(n=16)
    before = {k: v.clone() for k, v in nb.user_ns["model"].state_dict().items()}
    with pytest.raises(Exception) as failed:
        nb.run(f"%%amp_train --dtype bf16 --nproc 2 -o run\n"
               f"if step == 3 and int(os.environ['RANK']) == 1:\n"
               f"    raise ValueError('rank one broke')\n{BODY}")
    text = str(failed.value)
    assert "rank 1 of 2 failed" in text and "ValueError: rank one broke" in text
    assert "line 3" in text  # the cell's own line numbers
    assert "_worker" not in text and "launcher.py" not in text  # no frame of ours
    # IPython shows the rank's traceback, not the notebook process's frames that watched it
    assert failed.value._render_traceback_() == [f"RankFailed: {text}"]
    run = nb.user_ns["run"]
    assert run.status == "failed"
    assert no_children_left()
    after = nb.user_ns["model"].state_dict()
    assert len(run.history) == 3  # steps 0-2 completed on both ranks
    assert any(not torch.equal(before[k], after[k]) for k in before)  # rank 0's state is back


@pytest.mark.parametrize("killed", [1, 0])
def test_a_rank_killed_by_a_signal_is_a_clear_failure_and_the_work_is_kept(nb, tmp_path,
                                                                           killed):
    """Killed at step 3 (before its gradient exchange): the other rank fails there too, and
    the notebook holds the weights after steps 0-2, from rank 0 or, when rank 0 was killed,
    from rank 1; the history has exactly those 3 steps."""
    nb.user_ns["train_loader"] = data = make_data(n=16)
    with pytest.raises(Exception, match=f"rank {killed} was killed by SIGKILL"):
        nb.run(f"%%amp_train --dtype bf16 --nproc 2 --refresh 0.01 -o run\n"
               f"if step == 3 and int(os.environ['RANK']) == {killed}:\n"
               f"    os.kill(os.getpid(), 9)\n{BODY}")
    run = nb.user_ns["run"]
    assert run.status == "failed"
    assert no_children_left()
    ref = reference(tmp_path, torch.bfloat16, data[:6])  # 3 steps on each rank
    assert_same_state(nb.user_ns["model"].state_dict(), ref["model"])
    assert_same_state(nb.user_ns["optimizer"].state_dict(), ref["opt"])
    assert [r["step"] for r in run.history] == [0, 1, 2]
    copied = [n for n in run.notes if "rank 0 ended without a consistent state" in n]
    assert len(copied) == (killed == 0) and (killed == 1 or "rank 1's, after step 2" in copied[0])
    nb.run(f"%%amp_train --dtype bf16 --steps 1 -o again\n{BODY}")  # the kernel is fine


def test_every_rank_killed_leaves_the_objects_and_a_history_without_steps(nb):
    """No rank leaves a state (each killed at step 4): the notebook's objects stay as before
    the run, so its history holds none of the steps the ranks trained, and a note says so."""
    nb.user_ns["train_loader"] = make_data(n=16)
    before = {k: v.clone() for k, v in nb.user_ns["model"].state_dict().items()}
    with pytest.raises(RankFailed, match="was killed by SIG"):
        nb.run(f"%%amp_train --dtype bf16 --nproc 2 --refresh 0.01 -o run\n"
               f"time.sleep(0.03)  # the steps before are reported\n"
               f"if step == 4:\n"
               f"    os.kill(os.getpid(), 9)\n{BODY}")
    run = nb.user_ns["run"]
    assert run.status == "failed"
    assert no_children_left()
    assert_same_state(nb.user_ns["model"].state_dict(), before)
    assert run.history == [] and run.val_history == []
    lost = [n for n in run.notes if n.startswith("no rank left a consistent state")]
    assert len(lost) == 1 and re.search(r"the [1-4] optimizer step\(s\) the ranks trained",
                                        lost[0]), run.notes


def test_a_rank_ignores_a_ctrl_c_of_its_own(nb):
    """A terminal's Ctrl-C reaches every process, each at its own moment: a rank that stopped
    on its own would leave the others waiting for its gradients. Only the notebook process's
    request stops the ranks (at one step), so a rank's own SIGINT changes nothing."""
    nb.user_ns["train_loader"] = make_data(n=16)
    nb.run("%%amp_train --dtype bf16 --nproc 2 --timeout 5 -o run\n"
           "if step == 3 and int(os.environ['RANK']) == 1:\n"
           "    os.kill(os.getpid(), signal.SIGINT)\n" + BODY)
    run = nb.user_ns["run"]
    assert run.status == "finished" and len(run.history) == 8, (run.status, run.notes)


def test_a_checkpoint_resumes_only_on_as_many_processes_as_wrote_it(nb, tmp_path):
    """Each process's part of an epoch depends on how many there are: resumed on another
    number, batches where the checkpoint stood would be skipped or trained twice."""
    nb.user_ns["train_loader"] = make_data(n=8)
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    nb.run(f"%%amp_train --dtype bf16 --steps 3 --checkpoint {one}\n{BODY}")
    nb.run(f"%%amp_train --dtype bf16 --nproc 2 --steps 2 --checkpoint {two}\n{BODY}")
    before = {k: v.clone() for k, v in nb.user_ns["model"].state_dict().items()}
    for path, flags, written, now in ((one, "--nproc 2", 1, 2), (two, "", 2, 1)):
        with pytest.raises(UsageError, match=rf"written by a run on {written} process\(es\) "
                                             rf"and this one has {now}: .* Resume with "
                                             rf"--nproc {written}"):
            nb.run(f"%%amp_train --dtype bf16 {flags} --resume {path}\n{BODY}")
        assert_same_state(nb.user_ns["model"].state_dict(), before)  # nothing loaded
    assert no_children_left()


def test_reduce_lr_on_plateau_steps_alike_on_every_rank_with_the_merged_loss(nb):
    """Each rank validates its own shard: stepped with its own loss, the ranks' learning rates
    would drift apart. Stepped with the loss averaged over ranks (the one the run records),
    they move together, and the notebook's scheduler has seen those losses."""
    data = make_data(n=8)
    x, y = make_data(n=1, batch=32, seed=5)[0]
    val = [(x, y), (x, (y + 1) % 3)]  # rank 0 learns its val labels; rank 1's get worse
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(nb.user_ns["optimizer"], patience=0,
                                                         factor=0.5)
    nb.user_ns.update(train_loader=data, val_loader=val, plateau=plateau, dist=dist)
    nb.run("%%amp_train --dtype bf16 --nproc 2 --epochs 5 --val val_loader --scheduler plateau "
           "--log spread -o run\n" + BODY + "\n"
           "lrs = torch.tensor([optimizer.param_groups[0]['lr']] * 2)\n"
           "lrs[1] = -lrs[1]\n"
           "dist.all_reduce(lrs, op=dist.ReduceOp.MAX)  # the highest lr and -(the lowest)\n"
           "spread = (lrs[0] + lrs[1]).item()")
    run = nb.user_ns["run"]
    assert run.status == "finished" and len(run.val_history) == 5
    assert all(r["spread"] == 0 for r in run.history)
    assert plateau.best == pytest.approx(min(v["val_loss"] for v in run.val_history))


def failure_of_a_hung_rank(nb, point, hang="if step == 2 and int(os.environ['RANK']) == 1:",
                           flags="", where_it_was=r"line 3"):
    """Rank 1 sleeps under --timeout 3 (in the cell, at step 2, by default): the run fails
    naming it, the `point` where rank 0 had got to and waited, and where rank 1 was (the
    cell's time.sleep line), with every rank ended. Returns the run."""
    started = time.monotonic()
    with pytest.raises(RankFailed) as failed:
        nb.run(f"%%amp_train --dtype bf16 --nproc 2 --timeout 3 {flags} -o run\n"
               f"{hang}\n"
               f"    time.sleep(600)\n{BODY}")
    took = time.monotonic() - started
    text = str(failed.value)
    assert f"rank 1 did not reach {point} within --timeout 3 s " \
           "(rank 0 had got there and waited)" in text, text
    assert re.search(f"Where rank 1 was:\n.*{where_it_was}", text), text
    assert 3 <= took < 30
    assert no_children_left()
    return nb.user_ns["run"]


def test_a_hung_rank_is_named_after_the_timeout_and_every_rank_ended(nb, tmp_path):
    nb.user_ns["train_loader"] = data = make_data(n=16)
    run = failure_of_a_hung_rank(nb, "step 2's gradient exchange")
    assert run.status == "failed" and run.error == "rank 1 did not arrive (timeout)"
    ref = reference(tmp_path, torch.bfloat16, data[:4])  # steps 0 and 1 completed
    assert_same_state(nb.user_ns["model"].state_dict(), ref["model"])
    assert [r["step"] for r in run.history] == [0, 1]


class HangingStream(torch.utils.data.IterableDataset):
    """Each rank's half of `batches`; rank 1's read of its third batch never returns."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        rank = dist.get_rank()
        for i, batch in enumerate(self.batches[rank::2]):
            if rank == 1 and i == 2:
                time.sleep(600)
            yield batch


def test_a_rank_hung_reading_its_stream_or_validating_at_the_end_is_named(nb):
    """Where the others wait in a collective of ours, not DDP's: the check that every rank
    has a batch of a stream, the history merge after the last epoch's validation."""
    nb.user_ns["train_loader"] = torch.utils.data.DataLoader(HangingStream(make_data(n=16)),
                                                             batch_size=None)
    run = failure_of_a_hung_rank(nb, "step 2's batch check", hang="if False:",
                                 where_it_was=r"test_distributed.py\", line \d+ in __iter__")
    assert [r["step"] for r in run.history] == [0, 1]
    nb.user_ns.update(train_loader=make_data(n=8), val_loader=make_data(n=4))
    run = failure_of_a_hung_rank(
        nb, "the history merge after 4 steps", flags="--val val_loader",
        hang="if not torch.is_grad_enabled() and int(os.environ['RANK']) == 1:")
    assert [r["step"] for r in run.history] == [0, 1, 2, 3]


def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_a_rank_hung_before_its_forward_is_named_where_ddp_forward_waits(nb):
    """DDP's forward has collectives of its own (a BatchNorm's buffers, broadcast from rank 0
    in each forward): rank 0 waits there, not at the gradient exchange, for a rank that hangs
    before calling the model. That rank is named after --timeout all the same."""
    model = bn_model()
    nb.user_ns.update(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                      train_loader=make_data(n=16))
    run = failure_of_a_hung_rank(nb, "step 2's forward")
    assert run.status == "failed" and run.error == "rank 1 did not arrive (timeout)"
    assert [r["step"] for r in run.history] == [0, 1]


class Branchy(torch.nn.Module):
    """A model whose second head is used only when asked: its parameters get no gradient in
    a step that leaves it out, which plain DDP refuses at the next step."""

    def __init__(self):
        super().__init__()
        self.body, self.spare = make_model(), torch.nn.Linear(3, 3)

    def forward(self, x, spare=False):
        out = self.body(x)
        return self.spare(out) if spare else out


def test_ddp_options_find_unused_parameters_and_static_graph(nb):
    for flags in ("--find-unused-parameters", "--static-graph",
                  "--find-unused-parameters --static-graph"):
        model = Branchy()
        nb.user_ns.update(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          train_loader=make_data(n=8))
        nb.run(f"%%amp_train --dtype bf16 --nproc 2 {flags} -o run\n{BODY}")
        assert nb.user_ns["run"].status == "finished" and len(nb.user_ns["run"].history) == 4
    model = Branchy()
    nb.user_ns.update(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RankFailed, match="find_unused_parameters=True"):  # DDP's own advice
        nb.run(f"%%amp_train --dtype bf16 --nproc 2 -o run\n{BODY}")
    with pytest.raises(UsageError, match="--static-graph: DistributedDataParallel's option, "
                                         "for several processes: add --nproc N"):
        nb.run(f"%%amp_train --static-graph\n{BODY}")
    assert no_children_left()


def test_cuda_already_initialised_is_refused_before_forking(nb, monkeypatch):
    nb.user_ns["train_loader"] = make_data()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(UsageError) as refused:
        nb.run(f"%%amp_train --nproc 2\n{BODY}")
    text = str(refused.value)
    assert "restart the kernel" in text and "torchrun --standalone --nproc-per-node 2" in text
    assert not multiprocessing.active_children()


def test_what_nproc_cannot_combine_with(nb):
    nb.user_ns["train_loader"] = make_data()
    with pytest.raises(UsageError, match="--nproc"):
        nb.run(f'%%amp_train --nproc 2 --sweep "lr=0.1,0.2"\n{BODY}')
    with pytest.raises(UsageError, match="--diagnose"):
        nb.run(f"%%amp_train --nproc 2 --diagnose\n{BODY}")
    with pytest.raises(UsageError, match="a number of processes or auto"):
        nb.run(f"%%amp_train --nproc two\n{BODY}")


class UnevenStream(torch.utils.data.IterableDataset):
    """A stream that shards itself by rank, unevenly: rank r yields `counts[r]` of its
    batches r, r+2, r+4, ..."""

    def __init__(self, batches, counts):
        self.batches, self.counts = batches, counts

    def __iter__(self):
        rank = dist.get_rank()
        return iter(self.batches[rank::2][:self.counts[rank]])


def test_an_uneven_stream_stops_every_rank_with_the_shortest(nb, tmp_path):
    data = make_data(n=16)
    nb.user_ns["train_loader"] = torch.utils.data.DataLoader(UnevenStream(data, (5, 3)),
                                                             batch_size=None)
    nb.run(f"%%amp_train --dtype bf16 --nproc 2 --timeout 30 -o run\n{BODY}")
    run = nb.user_ns["run"]
    assert run.status == "finished" and len(run.history) == 3
    assert any("the stream of rank 1 ended after 3 batches while rank 0 still had some" in n
               for n in run.notes), run.notes
    ref = reference(tmp_path, torch.bfloat16, data[:6])
    assert_same_state(nb.user_ns["model"].state_dict(), ref["model"])
    # a list of 7 batches: whole rounds of 2, the 7th left out, and said
    nb.user_ns["train_loader"] = data[:7]
    nb.run(f"%%amp_train --dtype bf16 --nproc 2 -o run\n{BODY}")
    assert "the last 1 batch(es) of the epoch went to no rank" in nb.user_ns["run"].notes[-1]
    assert no_children_left()


SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, torch.nn.functional as F
    sys.path.insert(0, {tests!r})
    import amp_magics
    from amp_magics.training import checkpoint
    from recipes import make_data, make_model
    torch.set_num_threads(1)
    writes = []
    save = checkpoint.save_checkpoint
    checkpoint.save_checkpoint = lambda *a, **k: (
        writes.append((k["step"], [r["loss"] for r in k["history"]])), save(*a, **k))
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                           optimizer=opt, data=make_data(n=16), dtype="bf16", epochs=2,
                           checkpoint={ckpt!r}, save={saved!r})
    if int(os.environ["RANK"]) == 0:
        torch.save(model.state_dict(), {out!r})
        print("checkpoints written at steps", [step for step, _ in writes])
        print("CHECKPOINTS" + json.dumps(writes))
""")


TESTS = os.path.join(ROOT, "tests")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2"]


def torchrun(tmp_path, template, **fields):
    """`template` filled in (the tests folder, then `fields`) and run by torchrun on 2 ranks,
    which must succeed."""
    script = tmp_path / "script.py"
    script.write_text(template.format(tests=TESTS, **fields))
    done = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)  # a guard against a hang only
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_the_same_call_runs_under_torchrun_with_the_losses_of_nproc(nb, tmp_path):
    out, ckpt, saved = tmp_path / "model.pt", tmp_path / "ckpt.pt", tmp_path / "run.json"
    done = torchrun(tmp_path, SCRIPT, out=str(out), ckpt=str(ckpt), saved=str(saved))
    text = done.stdout + done.stderr
    assert text.count("finished: 16 steps") == 1  # only rank 0 reports
    assert "checkpoints written at steps [8, 16]" in text  # each epoch's end, the last once
    ref = reference(tmp_path, torch.bfloat16, make_data(n=16), epochs=2)
    assert_same_state(torch.load(out), ref["model"])
    # the losses are those of --nproc 2: averaged over ranks, in the Run saved=, the
    # checkpoint and the final line alike
    nb.user_ns["train_loader"] = make_data(n=16)
    nb.run(f"%%amp_train --dtype bf16 --nproc 2 --epochs 2 -o run\n{BODY}")
    losses = [r["loss"] for r in nb.user_ns["run"].history]
    assert [r["loss"] for r in amp_magics.Run.load(str(saved)).history] == losses
    assert [r["loss"] for r in torch.load(ckpt, weights_only=False)["history"]] == losses
    # the checkpoint of epoch 0's end too
    written = json.loads(done.stdout.split("CHECKPOINTS", 1)[1].splitlines()[0])
    assert written == [[8, losses[:8]], [16, losses]]
    assert f"final loss {losses[-1]:.4g}" in text


# END_OF_A_DDP_SCRIPT: a script that built a DDP model ends with a barrier, as a script of
# its own should. On torch 2.13 a gloo group that served DDP outlives destroy_process_group
# (its worker threads live on), and a rank that reaches interpreter shutdown while such a
# thread still holds its last collective aborts ("terminate called without an active
# exception", SIGABRT: seen once in 30 plain-torch scripts, none after a barrier).
UNEVEN_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist, torch.nn.functional as F
    sys.path.insert(0, {tests!r})
    import amp_magics
    from recipes import make_data, make_model
    from test_distributed import UnevenStream
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)  # the script's own DDP
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.utils.data.DataLoader(UnevenStream(make_data(n=16), (5, 3)), batch_size=None)
    run = amp_magics.train(lambda b: F.cross_entropy(ddp(b[0]), b[1]), model=ddp,
                           optimizer=opt, data=data, dtype="bf16")
    if dist.get_rank() == 0:
        torch.save(model.state_dict(), {out!r})
        print("\\n".join(run.notes))
    listed = amp_magics.train(lambda b: F.cross_entropy(ddp(b[0]), b[1]), model=ddp,
                              optimizer=opt, data=make_data(n=16)[:7], dtype="bf16",
                              progress=False)  # 7 batches for 2 ranks: the 7th to none
    if dist.get_rank() == 0:
        print("LIST", listed.status, len(listed.history), listed.notes[-1])
    del ddp
    dist.barrier()  # see END_OF_A_DDP_SCRIPT
    dist.destroy_process_group()
""")


def test_torchrun_with_an_uneven_stream_and_the_scripts_own_ddp_model(tmp_path):
    out = tmp_path / "model.pt"
    done = torchrun(tmp_path, UNEVEN_SCRIPT, out=str(out))
    assert "the stream of rank 1 ended after 3 batches while rank 0 still had some" in \
        done.stdout, done.stdout[-2000:]
    ref = reference(tmp_path, torch.bfloat16, make_data(n=16)[:6])
    assert_same_state(torch.load(out), ref["model"])
    assert "LIST finished 3 the last 1 batch(es) of the epoch went to no rank" in done.stdout


AGAIN_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, torch.nn.functional as F, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    import amp_magics
    from recipes import make_data, make_model
    torch.set_num_threads(1)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):  # train, train again: train() makes and ends the group each time
        amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                         optimizer=opt, data=make_data(n=4), dtype="bf16", progress=False)
    dist.init_process_group("gloo")  # then the script's own group
    total = torch.ones(1)
    dist.all_reduce(total)
    print(f"RANK {{dist.get_rank()}} own group: {{total.item():.0f}}", flush=True)
    dist.destroy_process_group()
""")


def test_train_again_and_then_the_scripts_own_group_under_torchrun(tmp_path):
    done = torchrun(tmp_path, AGAIN_SCRIPT)
    assert "RANK 0 own group: 2" in done.stdout and "RANK 1 own group: 2" in done.stdout


COMPILED_SCRIPT = textwrap.dedent("""
    import json, os, sys, torch, torch.nn.functional as F, torch.distributed as dist
    import torch._dynamo.utils
    sys.path.insert(0, {tests!r})
    import amp_magics
    from recipes import make_data, make_model, plain
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # the script's: train() joins it, the reference reuses it
    rank = dist.get_rank()
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = amp_magics.train(lambda b: F.cross_entropy(model(b[0]), b[1]), model=model,
                           optimizer=opt, data=make_data(n=16), dtype="bf16", compile=True)
    breaks = list(torch._dynamo.utils.counters["graph_break"])
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    ref = make_model()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    ddp = torch.nn.parallel.DistributedDataParallel(torch.compile(ref))
    plain(ddp, ref_opt, make_data(n=16)[rank::2], dtype=torch.bfloat16)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 ref.state_dict().values()))
    ours = [b for b in breaks if "amp_magics" in b or "routing" in b]
    print(f"RANK {{rank}} same={{same}} compiled_graphs={{compiled}} our_breaks={{len(ours)}} "
          f"compile_s={{run.history[0].get('compile_s') is not None}}", flush=True)
    del ddp
    dist.barrier()  # see END_OF_A_DDP_SCRIPT
    dist.destroy_process_group()
""")


def test_compile_under_torchrun_compiles_the_model_without_breaks_of_ours(tmp_path):
    done = torchrun(tmp_path, COMPILED_SCRIPT)
    for rank in (0, 1):  # as DDP(torch.compile(model)); the model's forward really compiled
        assert f"RANK {rank} same=True compiled_graphs=1 our_breaks=0 compile_s=True" in \
            done.stdout, done.stdout[-2000:]


INTERRUPTED_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch, torch.nn.functional as F
    sys.path.insert(0, {tests!r})
    import amp_magics
    from recipes import make_data, make_model
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def step(batch, step, epoch):
        if step == 20 and rank == 0:
            open({marker!r}, "w").close()
        time.sleep(0.005 * (1 + rank))  # the ranks reach each boundary at different times
        return F.cross_entropy(model(batch[0]), batch[1])

    try:
        amp_magics.train(step, model=model, optimizer=opt, data=make_data(n=16),
                         dtype="bf16", epochs=100000, nproc={nproc}, timeout=30)
    except KeyboardInterrupt as stopped:
        run = stopped.run
        print(f"RANK {{rank}} {{run.status}} after {{len(run.history)}} steps", flush=True)
        raise
""")


@pytest.mark.parametrize("launcher", ["torchrun", "nproc"])
def test_ctrl_c_to_the_process_group_stops_every_rank_at_one_step(tmp_path, launcher):
    """As a terminal sends Ctrl-C: to every process of the group (torchrun's agent then
    forwards it once more). Every rank ends interrupted at the same step, exit status 130."""
    marker, script = tmp_path / "started", tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_SCRIPT.format(tests=TESTS, marker=str(marker),
                                                nproc=1 if launcher == "torchrun" else 2))
    command = [*(TORCHRUN if launcher == "torchrun" else [sys.executable]), str(script)]
    started = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(started.pid, signal.SIGINT)
        out, _ = started.communicate(timeout=90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started.pid, signal.SIGKILL)
    ended = re.findall(r"RANK (\d) (\w+) after (\d+) steps", out)
    expected = 2 if launcher == "torchrun" else 1  # --nproc: the script's one process
    assert len(ended) == expected and {status for _, status, _ in ended} == {"interrupted"}, \
        out[-3000:]
    assert len({steps for _, _, steps in ended}) == 1 and int(ended[0][2]) >= 20
    assert "failed" not in out and "Connection closed" not in out, out[-3000:]
    if launcher == "nproc":
        assert started.returncode in (130, -signal.SIGINT)
        assert out.count("note: interrupted after") == 1, out  # one note, the notebook process's


def test_routing_lets_ddp_go_before_the_group_is_destroyed():
    """A Reducer that outlives its gloo group can abort the process at exit (seen under
    torchrun): putting the class back must free DDP at once, without a gc pass."""
    import gc
    import weakref

    from amp_magics.training.routing import route_through
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    gc.disable()
    try:
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        release = route_through(model, ddp)
        model(torch.randn(4, 8)).sum().backward()  # through DDP: its Reducer is in use
        freed = weakref.ref(ddp)
        del ddp
        assert freed() is not None  # the routing holds it while it routes
        release()
        assert freed() is None and type(model) is type(make_model())
    finally:
        gc.enable()
        dist.destroy_process_group()


def test_the_rank_behind_is_named_by_where_it_stands_not_by_how_often_it_marked():
    """A rank may call the model more often than another (rank 0 printing a prediction, say):
    its extra marks must neither look like a stall nor hide the rank that really hangs."""
    from types import SimpleNamespace

    from amp_magics.distributed.arrivals import ArrivalBoard

    board = ArrivalBoard(2, multiprocessing.get_context("fork"))
    steps = [SimpleNamespace(step=0, amp=SimpleNamespace(micro=0)) for _ in range(2)]
    marks = [board.marker(r, steps[r]) for r in (0, 1)]
    for step in range(3):  # both train steps 0..2; rank 0 calls the model twice per step
        for r, rank in enumerate(marks):
            steps[r].step = step
            rank.forward()
            if r == 0:
                rank.forward()
            rank.exchange(step)
    assert board.stall(0.0, 5) is None and board.stall(10.0, 5) is None  # a long pause
    steps[0].step = 3
    marks[0].forward()
    marks[0].forward()
    marks[0].exchange(3)  # rank 1 hangs before its forward of step 3; rank 0 waits there
    assert board.stall(20.0, 5) is None
    stall = board.stall(30.0, 5)
    assert (stall.late, stall.waiting, stall.step, stall.where) == ((1,), (0,), 3,
                                                                    "gradient exchange")
    assert stall.words(5) == ("rank 1 did not reach step 3's gradient exchange within "
                              "--timeout 5 s (rank 0 had got there and waited)")


def test_a_rank_that_never_marked_is_behind_one_in_its_first_forward():
    from types import SimpleNamespace

    from amp_magics.distributed.arrivals import ArrivalBoard

    board = ArrivalBoard(2, multiprocessing.get_context("fork"))
    board.marker(0, SimpleNamespace(step=0, amp=SimpleNamespace(micro=0))).forward()
    # rank 1 hangs before its first forward; rank 0 waits in DDP's broadcast
    board.stall(0.0, 5)
    stall = board.stall(6.0, 5)
    assert (stall.late, stall.step, stall.where) == ((1,), 0, "forward")


HUNG_SCRIPT = textwrap.dedent("""
    import os, sys, time, torch, torch.nn.functional as F
    sys.path.insert(0, {tests!r})
    import amp_magics
    from recipes import make_data, make_model
    torch.set_num_threads(1)
    model = torch.nn.Sequential(make_model(), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(batch, step, epoch):
        if step == 2 and os.environ["RANK"] == "1":
            time.sleep(60)  # hangs before its forward
        return F.cross_entropy(model(batch[0]), batch[1])
    if os.environ["RANK"] == "1":
        time.sleep(5)  # late to the group: joining waits the start-up timeout, not --timeout
    try:
        amp_magics.train(step, model=model, optimizer=opt, data=make_data(n=16), dtype="bf16",
                         timeout=3, progress=False)
    except RuntimeError as e:
        notes = "".join(getattr(e, "__notes__", []))
        print(f"RANK {{os.environ['RANK']}} {{type(e).__name__}}: {{e}} {{notes}}", flush=True)
        raise
""")


def test_under_torchrun_a_rank_that_keeps_the_others_waiting_is_named(tmp_path):
    """No notebook process watches torchrun's ranks: the ranks that waited --timeout post
    where they were to torchrun's store, and name the one that never came. A rank that
    comes to the group later than --timeout is waited for (the start-up timeout)."""
    script = tmp_path / "hung.py"
    script.write_text(HUNG_SCRIPT.format(tests=TESTS))
    started = time.monotonic()
    done = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode != 0 and time.monotonic() - started < 90
    rank0 = next(line for line in done.stdout.splitlines() if line.startswith("RANK 0 "))
    assert rank0.startswith("RANK 0 RuntimeError: ")  # the collective's own error, kept
    assert "amp_magics: rank 1 did not reach step 2's forward within --timeout 3 s (rank 0 " \
           "had got there and waited)" in rank0, done.stdout[-2000:] + done.stderr[-2000:]
    assert no_children_left()


def test_a_rank_hung_in_its_validation_or_its_stream_is_behind_at_any_epoch_boundary():
    """Across an epoch's end the step stands still: the stream's last check (which finds it
    ended), the validation, the history merge of a checkpoint, the next epoch's first check
    all come at the same step. The ranks are ordered by the points they passed, so a rank
    hung in its validation is behind ranks waiting in the merge, and one hung reading the
    next epoch's stream behind ranks waiting in its check."""
    from types import SimpleNamespace

    from amp_magics.distributed.arrivals import ArrivalBoard

    def through_epoch(rank, steps):  # a stream's checks, then its end
        for step in range(steps):
            trainings[rank].step = step
            marks[rank].batch()
            marks[rank].forward()
            marks[rank].exchange(step)
        trainings[rank].step = steps
        marks[rank].batch()  # finds the stream ended

    board = ArrivalBoard(2, multiprocessing.get_context("fork"))
    trainings = [SimpleNamespace(step=0, amp=SimpleNamespace(micro=0)) for _ in range(2)]
    marks = [board.marker(r, trainings[r]) for r in range(2)]
    for rank in (0, 1):
        through_epoch(rank, 4)
    marks[0].merge()  # rank 1 hangs in its validation; rank 0 waits in the merge
    board.stall(0.0, 5)
    stall = board.stall(6.0, 5)
    assert (stall.late, stall.waiting, stall.where) == ((1,), (0,), "history merge")
    assert stall.words(5).startswith("rank 1 did not reach the history merge after 4 steps ")
    marks[1].merge()
    marks[0].batch()  # the next epoch: rank 1 hangs reading its stream, rank 0 waits
    assert board.stall(7.0, 5) is None
    stall = board.stall(13.0, 5)
    assert (stall.late, stall.step, stall.where) == ((1,), 4, "batch check")
    assert "rank 1 did not reach step 4's batch check within" in stall.words(5)


def test_a_rank_hung_within_an_accumulation_window_is_behind():
    """With --accum the ranks mark each micro-batch's forward and backward: a place counts
    the micro-batch too, so a rank stuck before micro-batch 2 is behind one at its last."""
    from types import SimpleNamespace

    from amp_magics.distributed.arrivals import ArrivalBoard

    board = ArrivalBoard(2, multiprocessing.get_context("fork"))
    trainings = [SimpleNamespace(step=4, amp=SimpleNamespace(micro=0)) for _ in range(2)]
    marks = [board.marker(r, trainings[r]) for r in range(2)]
    for rank, micro_batches in ((0, 4), (1, 2)):  # rank 1 hangs before its 3rd micro-batch
        for micro in range(micro_batches):
            trainings[rank].amp.micro = micro
            marks[rank].forward()
            marks[rank].exchange(4)
    board.stall(0.0, 5)
    stall = board.stall(6.0, 5)
    assert (stall.late, stall.step, stall.micro, stall.where) == ((1,), 4, 3,
                                                                 "gradient exchange")
    assert "step 4's gradient exchange (micro-batch 3)" in stall.words(5)
