"""Elastic resume: a mid-epoch position recorded as a bitmap of consumed sample ids, and the
interrupted epoch finished by another plan (world size, workers, batch size) with every
remaining sample read exactly once. Loader level here; the trainer and torchrun below."""
import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL, child_env, read_metrics, run_folder, torchrun_cmd

from common.errors import CheckpointError
from engine.resume import elastic_record, start_position
from pipeline.elastic import pack, planned_ids, remainder_steps, remaining_ids, shard_offsets, unpack
from pipeline.info import load_info
from pipeline.loader import StreamLoader
from pipeline.plan import train_plan
from pipeline.stream import ShardStream

SEED, EPOCH = 7, 3


class LabelBatches:
    """A batch builder that decodes nothing (the ids are what these tests look at)."""

    def __init__(self, batch_size):
        self.batch_size = batch_size

    def new(self, memory):
        self.labels = []

    def add(self, i, data, label, rng):
        self.labels.append(label)

    def finish(self, n):
        return torch.tensor(self.labels), torch.tensor(self.labels)


def loader(split, *, world, rank, workers, batch):
    ds = ShardStream(split, LabelBatches(batch), batch_size=batch, train=True, seed=SEED, world_size=world,
                     rank=rank, num_workers=workers, shuffle_buffer=16)
    return StreamLoader(ds, num_workers=workers, pin_memory=False)


def consume(ld, n=None):
    """Iterate `n` batches (all: None) of the loader's current epoch; the loader's own id record."""
    it = iter(ld)
    got = 0
    for _ in it if n is None else range(n):
        if n is not None:
            next(it)
        got += 1
    del it
    return got, ld.consumed_ids(got)


def test_an_interrupted_epoch_is_finished_exactly_once_on_other_plans(demo_shards):
    """2 ranks x 2 workers x batch 4 consume 5 steps; 1 rank x 2 workers x batch 4 continues and is
    interrupted in turn; 3 ranks x 1 worker x batch 3 finish. Every planned sample is read once
    over the three, but for fewer than one last global batch; the next epoch is a whole one."""
    split = load_info(str(demo_shards)).split("train")
    total = sum(split.lengths)
    planned = planned_ids(split.lengths, seed=SEED, epoch=EPOCH, world_size=2, batch_size=4)
    seen, bitmaps = [], []
    for rank in range(2):
        ld = loader(split, world=2, rank=rank, workers=2, batch=4)
        ld.set_epoch(EPOCH)
        _, ids = consume(ld, 5)
        assert ids.size == 5 * 4
        seen += ids.tolist()
        bitmaps.append(ld.consumed_bitmap(5))
    first = np.bitwise_or(*bitmaps)
    assert np.flatnonzero(unpack(first, total)).tolist() == sorted(seen)
    assert len(set(seen)) == len(seen) and set(seen) <= set(planned.tolist())

    # 2 -> 1: half of the remainder, then a checkpoint's cumulative bitmap
    remaining = remaining_ids(planned, unpack(first, total))
    one = loader(split, world=1, rank=0, workers=2, batch=4)
    one.set_epoch(EPOCH, remainder=remaining, consumed=first)
    assert one.remaining() == remainder_steps(remaining.size, 1, 4) == (total // 8 * 8 - 40) // 4
    _, ids = consume(one, 4)
    assert set(ids.tolist()) <= set(remaining.tolist()) and not set(ids.tolist()) & set(seen)
    seen += ids.tolist()
    second = one.consumed_bitmap(4)
    assert np.flatnonzero(unpack(second, total)).tolist() == sorted(seen)

    # 1 -> 3: the rest, each sample once over the three ranks
    remaining = remaining_ids(planned, unpack(second, total))
    steps = remainder_steps(remaining.size, 3, 3)
    rest = []
    for rank in range(3):
        ld = loader(split, world=3, rank=rank, workers=1, batch=3)
        ld.set_epoch(EPOCH, remainder=remaining, consumed=second)
        assert ld.remaining() == steps and len(ld) == sum(split.lengths) // 9  # len(): a whole epoch's
        n, ids = consume(ld)
        assert n == steps and ids.size == steps * 3
        rest += ids.tolist()
        assert np.array_equal(unpack(ld.consumed_bitmap(n), total), unpack(pack(seen + ids.tolist(), total), total))
    assert sorted(rest) == sorted(remaining[:steps * 9].tolist())  # the epoch's order decides what is dropped
    everything = seen + rest
    assert len(everything) == len(set(everything))
    dropped = set(planned.tolist()) - set(everything)
    assert len(dropped) < 3 * 3 and not set(everything) - set(planned.tolist())


def test_the_epoch_after_a_remainder_is_a_whole_one_in_persistent_workers(demo_shards):
    split = load_info(str(demo_shards)).split("train")
    offsets = shard_offsets(split.lengths)
    planned = planned_ids(split.lengths, seed=SEED, epoch=EPOCH, world_size=1, batch_size=4)
    remaining = planned[20:]
    ld = loader(split, world=1, rank=0, workers=2, batch=4)
    ld.set_epoch(EPOCH, remainder=remaining)
    n, ids = consume(ld)
    assert n == remaining.size // 4 and sorted(ids.tolist()) == sorted(remaining[:n * 4].tolist())
    with pytest.raises(ValueError, match="before the loader's workers start"):
        ld.set_epoch(EPOCH, remainder=remaining)  # the workers (persistent) are running now
    ld.set_epoch(EPOCH + 1)
    assert ld.remaining() == len(ld)
    n, ids = consume(ld)
    whole = []
    for w in range(2):
        plan = train_plan(split.lengths, seed=SEED, epoch=EPOCH + 1, world_size=1, rank=0, num_workers=2,
                          worker=w, batch_size=4)
        whole += [int(offsets[p.shard]) + p.skip + k for p in plan.pieces for k in range(p.take)]
    assert n == len(ld) and sorted(ids.tolist()) == sorted(whole)


# ---------------------------------------------------------------- whole runs: torchrun, signals, lost nodes
BATCH = 4  # 120 demo samples: 15 steps per epoch on 2 processes, 30 on one


def trace(path):
    """{epoch: [ids of each batch handed to the trainer]} of a STREAM_TRACE_IDS file, per pid."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            epoch, _, _, pid, *ids = map(int, line.split())
            out.setdefault(epoch, []).extend(ids)
    return out


def consumed_of(pos):
    el = pos["elastic"]
    bits = np.frombuffer(base64.b64decode(el["consumed"]), np.uint8)
    return set(np.flatnonzero(unpack(bits, el["samples"])).tolist())


def last_position(out):
    return torch.load(os.path.join(out, "last.pth"), weights_only=True)["position"]


def wait_for(proc, out, starts, past):
    """Until the `starts`-th start of the run in `out` has logged a train row with step > past."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended early: {proc.communicate()[1][-3000:]}")
        try:
            rows = read_metrics(out)
        except (OSError, ValueError):
            rows = []
        configs = [i for i, r in enumerate(rows) if r["kind"] == "config"]
        if len(configs) == starts and any(r["kind"] == "train" and r["step"] > past for r in rows[configs[-1]:]):
            return
        time.sleep(0.02)
    pytest.fail(f"no step past {past} came")


def start(cmd, env):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)


def finish(proc, timeout=300):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"a run hung:\n{err[-3000:]}")
    return proc.returncode, out, err


def single_cmd(args):
    return [sys.executable, os.path.join(ROOT, "train_stream.py"), *args]


@pytest.mark.slow
def test_a_2_1_2_resume_sequence_sees_every_sample_of_the_interrupted_epoch_once(demo_shards, tmp_path):
    """2 processes stopped mid-epoch, 1 process continues and is stopped in the same epoch, 2
    processes finish: over the three, the epoch's samples are each consumed once (but for fewer
    than one global batch at its end), and the steps continue where the samples seen say."""
    lengths = load_info(str(demo_shards)).split("train").lengths
    total = sum(lengths)
    two, one = total // (2 * BATCH), total // BATCH  # steps per epoch
    planned = two * 2 * BATCH
    out = tmp_path / "run"
    args = ["--data_path", str(demo_shards), *SMALL, "-b", str(BATCH), "--epochs", "2", *run_folder(out),
            "--auto-resume", "--checkpoint-interval", "2"]
    traces = [tmp_path / f"trace{k}" for k in range(3)]
    env = [dict(child_env(), STREAM_TRACE_IDS=str(t)) for t in traces]

    a = start(torchrun_cmd(args), env[0])
    wait_for(a, out, 1, 3)
    os.kill(a.pid, signal.SIGTERM)
    rc, _, err = finish(a)
    assert rc != 0 and "stopped (got SIGTERM)" in err, err[-3000:]
    first = last_position(out)
    epoch = first["epoch"]
    assert first["world"] == 2 and 0 < first["step"] < two and not first["elastic"]["remainder"]
    assert epoch == 0 and first["elastic"]["planned"] == planned
    seen_a = consumed_of(first)
    assert len(seen_a) == first["step"] * 2 * BATCH
    assert seen_a <= set(trace(traces[0])[epoch])

    remain = planned - len(seen_a)
    skip = one - remain // BATCH
    b = start(single_cmd(args), env[1])
    wait_for(b, out, 2, skip + 2)
    os.kill(b.pid, signal.SIGTERM)
    rc, stdout, err = finish(b)
    assert rc != 0 and "stopped (got SIGTERM)" in err, err[-3000:]
    assert (f"resume: elastic: world 2 -> 1, steps_per_epoch {two} -> {one}, {remain} of {planned} samples of "
            f"epoch 0 remain, continuing at step {skip}") in stdout, stdout
    second = last_position(out)
    assert second["epoch"] == 0 and second["world"] == 1 and second["elastic"]["remainder"], \
        "the second run must stop inside the interrupted epoch"
    seen_b = consumed_of(second)
    assert seen_a < seen_b and len(seen_b) == len(seen_a) + (second["step"] - skip) * BATCH
    assert seen_b - seen_a <= set(trace(traces[1])[0])

    rc, stdout, err = finish(start(torchrun_cmd(args), env[2]))
    assert rc == 0, err[-3000:]
    remain = planned - len(seen_b)
    steps = remain // (2 * BATCH)
    assert (f"resume: elastic: world 1 -> 2, steps_per_epoch {one} -> {two}, {remain} of {planned} samples of "
            f"epoch 0 remain, continuing at step {two - steps}") in stdout, stdout
    rest = trace(traces[2])[0]
    assert len(rest) == len(set(rest)) == steps * 2 * BATCH  # each once, in whole steps
    assert not set(rest) & seen_b
    epoch_ids = set(planned_ids(lengths, seed=first["elastic"]["seed"], epoch=0, world_size=2,
                                batch_size=BATCH).tolist())
    dropped = epoch_ids - seen_b - set(rest)
    assert len(dropped) < 2 * BATCH and (seen_b | set(rest)) <= epoch_ids
    rows = read_metrics(out)
    starts = [i for i, r in enumerate(rows) if r["kind"] == "config"]
    assert len(starts) == 3
    last_run = [r["step"] for r in rows[starts[-1]:] if r["kind"] == "train"]
    assert last_run == list(range(two - steps + 1, 2 * two + 1))  # the global step counts the samples seen


def descendants(pid):
    """Every process below `pid` (torchrun puts its workers in sessions of their own)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def alive(pid) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_cmd(args, port, host: bool):
    """A torchrun agent of an elastic 1-to-2-node job on this machine (the first hosts the store)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc_per_node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic-test",
            f"--rdzv-conf=is_host={int(host)},last_call_timeout=20", "--max-restarts=2", "--monitor-interval=1",
            os.path.join(ROOT, "train_stream.py"), *args]


@pytest.mark.slow
def test_a_lost_node_leaves_the_other_to_finish_the_epoch_alone(demo_shards, tmp_path):
    """Two torchrun agents as two nodes (c10d rendezvous, --nnodes=1:2); after a mid-epoch
    checkpoint, kill -9 of every process of the second node: the first restarts alone, resumes
    on 1 process from the checkpoint and finishes, each sample of the epoch seen once."""
    lengths = load_info(str(demo_shards)).split("train").lengths
    two, one = sum(lengths) // (2 * BATCH), sum(lengths) // BATCH
    out = tmp_path / "run"
    args = ["--data_path", str(demo_shards), *SMALL, "-b", str(BATCH), "--epochs", "1", *run_folder(out),
            "--auto-resume", "--checkpoint-interval", "2"]
    port = free_port()
    traces = [tmp_path / "trace-first", tmp_path / "trace-second"]
    agents = [start(agent_cmd(args, port, k == 0), dict(child_env(), STREAM_TRACE_IDS=str(traces[k])))
              for k in range(2)]
    try:
        deadline = time.monotonic() + 300
        while True:  # a checkpoint of both nodes, mid-epoch
            pos = last_position(out) if os.path.exists(out / "last.pth") else {}
            if pos.get("world") == 2 and 2 <= pos["step"] <= two - 4:
                break
            if time.monotonic() > deadline or any(a.poll() is not None for a in agents) or pos.get("step", 0) > two - 4:
                pytest.fail(f"no early mid-epoch checkpoint of 2 nodes: {pos}; "
                            f"{[a.poll() for a in agents]}")
            time.sleep(0.05)
        survivor = descendants(agents[0].pid)
        for p in [agents[1].pid, *descendants(agents[1].pid)]:
            try:
                os.killpg(p, signal.SIGKILL)
            except OSError:
                pass
        # the checkpoint the survivor resumes from: rank 0 may have been writing one at the loss
        while any(map(alive, survivor)):
            if time.monotonic() > deadline:
                pytest.fail("the surviving node's process never noticed the loss")
            time.sleep(0.05)
        shutil.copy(out / "last.pth", tmp_path / "at-loss.pth")
        at_loss = torch.load(tmp_path / "at-loss.pth", weights_only=True)["position"]
        rc, stdout, err = finish(agents[0], timeout=400)
    finally:
        for a in agents:
            for p in [a.pid, *descendants(a.pid)]:
                try:
                    os.killpg(p, signal.SIGKILL)
                except OSError:
                    pass
    assert rc == 0, err[-4000:]
    seen = consumed_of(at_loss)
    planned = two * 2 * BATCH
    remain = planned - len(seen)
    assert (f"resume: elastic: world 2 -> 1, steps_per_epoch {two} -> {one}, {remain} of {planned} samples of "
            f"epoch 0 remain, continuing at step {one - remain // BATCH}") in stdout, \
        ([line for line in stdout.splitlines() if "resume" in line], at_loss)
    with open(traces[0]) as f:
        alone = [list(map(int, line.split()[4:])) for line in f if line.split()[1] == "1"]
    rest = [i for ids in alone for i in ids]
    assert len(rest) == len(set(rest)) == remain // BATCH * BATCH and not set(rest) & seen
    epoch_ids = set(planned_ids(lengths, seed=at_loss["elastic"]["seed"], epoch=0, world_size=2,
                                batch_size=BATCH).tolist())
    assert len(epoch_ids - seen - set(rest)) < BATCH and (seen | set(rest)) <= epoch_ids
    assert last_position(out)["world"] == 1 and torch.load(out / "last.pth", weights_only=True)["epoch"] == 0


# ---------------------------------------------------------------- the resume decision (engine/resume.py)
class FakeLoader:
    def __init__(self, lengths, world, batch, workers=1, elastic=True):
        self.num_workers, self.steps = workers, sum(lengths) // (world * batch)
        self.dataset = type("DS", (), {"lengths": lengths})()
        self.progress = lambda n: None
        if elastic:
            self.consumed_bitmap = lambda n: None

    def __len__(self):
        return self.steps


class FakeDist:
    def __init__(self, world, rank=0):
        self.world, self.rank, self.said = world, rank, []

    def say(self, msg):
        self.said.append(msg)


LENGTHS = [13] * 9 + [9]  # the demo split: 126 samples


def mid_position(consumed, step, world=2, batch=4, remainder=False):
    total = sum(LENGTHS)
    return {"epoch": 1, "step": step, "global_step": 15 + step, "steps_per_epoch": total // (world * batch),
            "world": world, "workers": 1, "batch_size": batch, "progress": [[[step, step * batch, 0]]] * world,
            "elastic": elastic_record([pack(consumed, total)], total=total, seed=SEED, remainder=remainder,
                                      planned=total // (world * batch) * world * batch)}


def test_a_resume_on_another_world_size_continues_the_epoch_at_the_samples_seen():
    planned = planned_ids(LENGTHS, seed=SEED, epoch=1, world_size=2, batch_size=4)
    pos = mid_position(planned[:40], 5)
    data = type("Data", (), {"train": FakeLoader(LENGTHS, 1, 4), "identity": None})()
    d = FakeDist(1)
    epoch, step, progress, el = start_position(pos, "ck.pth", data, d, 4, False)
    assert (epoch, step, progress) == (1, 31 - 80 // 4, None)
    assert el["remainder"].tolist() == planned[40:].tolist() and el["planned"] == 120 and el["seed"] == SEED
    assert np.flatnonzero(unpack(el["consumed"], 126)).tolist() == sorted(planned[:40].tolist())
    assert d.said == ["resume: elastic: world 2 -> 1, steps_per_epoch 15 -> 31, 80 of 120 samples of epoch 1 "
                      "remain, continuing at step 11"]
    # the same plan: exact, carrying the record; a remainder epoch's checkpoint: by ids even on the same plan
    same = type("Data", (), {"train": FakeLoader(LENGTHS, 2, 4), "identity": None})()
    epoch, step, progress, el = start_position(pos, "ck.pth", same, FakeDist(2), 4, False)
    assert (epoch, step, progress, el["remainder"]) == (1, 5, [[5, 20, 0]], None)
    epoch, step, progress, el = start_position(mid_position(planned[:40], 5, remainder=True), "ck.pth", same,
                                               FakeDist(2), 4, False)
    assert (epoch, step, progress) == (1, 15 - 80 // 8, None) and el["remainder"].size == 80


def test_a_resume_that_cannot_finish_the_epoch_says_why_and_a_damaged_record_is_refused():
    planned = planned_ids(LENGTHS, seed=SEED, epoch=1, world_size=2, batch_size=4)
    pos = mid_position(planned[:40], 5)
    dali = type("Data", (), {"train": FakeLoader(LENGTHS, 1, 4, elastic=False), "identity": None})()
    d = FakeDist(1)
    assert start_position(pos, "ck.pth", dali, d, 4, False) == (2, 0, None, None)
    assert d.said[0].endswith("continuing at the start of epoch 2 (this loader cannot read a chosen subset of "
                              "an epoch)")
    data = type("Data", (), {"train": FakeLoader(LENGTHS, 1, 4), "identity": None})()
    old = {k: v for k, v in pos.items() if k != "elastic"}
    d = FakeDist(1)
    assert start_position(old, "ck.pth", data, d, 4, False) == (2, 0, None, None)
    assert "records no consumed samples" in d.said[0]
    for bad in ({"consumed": "not base64!"}, {"samples": 7}, {"consumed": base64.b64encode(b"ab").decode()}):
        with pytest.raises(CheckpointError, match="ck.pth"):
            start_position(dict(pos, elastic=dict(pos["elastic"], **bad)), "ck.pth", data, FakeDist(1), 4, False)
