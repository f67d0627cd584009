"""Fault injection: killed processes and preemption signals, damaged, missing, oversized
and stalled data, crafted info files and checkpoints, fuzzed tar headers and labels.

Each test asserts the outcome: the run finishes, or stops with one line within a bound, and an
interrupted-then-resumed run ends with the same weights as an uninterrupted one.
"""
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    SMALL,
    child_env,
    copy_shards,
    read_metrics,
    replace_first_image,
    rewrite_shard,
    run_folder,
    run_main,
    torchrun_cmd,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from common.errors import CheckpointError, DataError, DataLoadingError
from dataprep import make_shards, verify_shards
from engine.control import PREEMPTED_EXIT, Control, parse_interval
from engine.dist import Dist
from engine.metrics import Metrics
from model.checkpoint import CheckpointSaver, resume, save_checkpoint
from model.device import Device
from model.factory import create_model
from model.optim import create_optimizer
from pipeline.info import Split, check_local_shards, load_info
from pipeline.jpeg import MAX_PIXELS
from pipeline.loader import create_loader
from pipeline.remote import RemoteOptions
from pipeline.shards import ShardCorrupt, iter_samples
from pipeline.stream import image_and_label
from pipeline.transforms import DecodeError, TrainTransform
from tools.chaos import ShardServer

B, SIZE = 8, 32
BOUND = 60  # seconds a stopped run may take to exit (a few on a quiet machine)
FAST_REMOTE = RemoteOptions(timeout=0.5, retries=1, backoff=0.1)
CPU = Device("cpu")


def set_labels(path, labels):
    """Give the first len(labels) samples of a shard these .cls payloads."""
    todo = list(labels)

    def change(name, data):
        return todo.pop(0) if name.endswith(".cls") and todo else data
    rewrite_shard(path, change)


def one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.startswith("train_stream:")]
    return len(lines) == 1 and "Traceback" not in err


# ---------------------------------------------------------------- processes: preemption and kills
def children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return sorted(kids)


def position(out):
    path = os.path.join(out, "last.pth")
    if not os.path.exists(path):
        return 0
    return torch.load(path, weights_only=True)["position"]["global_step"]


def wait_for_step(proc, out, step, starts):
    """Until this run (the `starts`-th start logged in metrics.jsonl) has logged `step`."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {proc.communicate()[1][-2000:]}")
        try:
            rows = read_metrics(out)
        except (OSError, ValueError):
            rows = []
        configs = [i for i, r in enumerate(rows) if r["kind"] == "config"]
        if len(configs) == starts and any(r["kind"] == "train" and r["step"] >= step for r in rows[configs[-1]:]):
            return
        time.sleep(0.01)
    pytest.fail(f"step {step} never came")


def interrupt(cmd, out, starts, action, after=1):
    """Start cmd, wait until it has trained `after` steps past its checkpoint, do
    `action(proc, pids of its children)`; returns (exit status, stderr, seconds from the action to
    the exit of every process)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            cwd=ROOT, start_new_session=True)
    try:
        wait_for_step(proc, out, position(out) + after, starts)
        ranks = children(proc.pid)
        t0 = time.monotonic()
        action(proc, ranks)
        _, err = proc.communicate(timeout=BOUND)
        while any(os.path.exists(f"/proc/{r}") and open(f"/proc/{r}/stat").read().split()[2] != "Z"
                  for r in ranks) and time.monotonic() - t0 < BOUND:
            time.sleep(0.05)
        return proc.returncode, err, time.monotonic() - t0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of a failed test
        except OSError:
            pass


@pytest.fixture(scope="module")
def chain(ddp_reference, tmp_path_factory):
    """The reference run's command with --auto-resume, on 2 processes, interrupted four ways and
    rerun after each: SIGTERM to torchrun, kill -9 of torchrun, SIGUSR1 to rank 1, kill -9 of
    rank 1; the fifth run finishes."""
    args, _, ref = ddp_reference
    assert ref.returncode == 0, ref.stderr[-3000:]
    base = tmp_path_factory.mktemp("chain")
    out = base / "run"
    cmd = torchrun_cmd([*args, *run_folder(out), "--auto-resume", "--checkpoint-interval", "2"])
    actions = [
        ("SIGTERM to torchrun", lambda p, ranks: os.kill(p.pid, signal.SIGTERM)),
        ("kill -9 torchrun", lambda p, ranks: os.kill(p.pid, signal.SIGKILL)),
        ("SIGUSR1 to rank 1", lambda p, ranks: os.kill(ranks[1], signal.SIGUSR1)),
        ("kill -9 rank 1", lambda p, ranks: os.kill(ranks[1], signal.SIGKILL)),
    ]
    stages = {}
    for k, (name, action) in enumerate(actions):
        before = position(out)
        rc, err, seconds = interrupt(cmd, out, k + 1, action)
        stages[name] = dict(rc=rc, err=err, seconds=seconds, before=before, after=position(out))
        if k == 0:
            shutil.copy(out / "last.pth", base / "mid.pth")  # a mid-epoch checkpoint of 2 processes
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=240)
    stages["finish"] = dict(rc=proc.returncode, err=proc.stderr, out=proc.stdout)
    return out, base / "mid.pth", stages


@pytest.mark.slow
def test_each_interruption_stops_every_rank_with_a_checkpoint_and_one_line(chain):
    _, _, stages = chain
    for name, expect in [("SIGTERM to torchrun", "stopped (got SIGTERM)"),
                         ("kill -9 torchrun", "stopped (the launcher (torchrun) is gone)"),
                         ("SIGUSR1 to rank 1", "stopped (got SIGUSR1)")]:
        s = stages[name]
        ours = [line for line in s["err"].splitlines() if line.startswith("train_stream:")]
        assert ours and expect in ours[0] and len(ours) == 1, (name, s["err"][-3000:])
        assert "--auto-resume" in ours[0] and s["seconds"] < BOUND, name
        assert s["after"] > s["before"], f"{name}: no checkpoint beyond step {s['before']}"
    # torchrun's failure report shows the ranks' status (when it was not itself the one signalled)
    assert f"exitcode  : {PREEMPTED_EXIT}" in stages["SIGUSR1 to rank 1"]["err"]
    killed = stages["kill -9 rank 1"]
    assert killed["rc"] != 0 and killed["seconds"] < BOUND
    assert "train_stream: error: lost another rank" in killed["err"], killed["err"][-3000:]
    assert "[rank0]: Traceback" not in killed["err"]
    assert stages["finish"]["rc"] == 0, stages["finish"]["err"][-3000:]


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_uninterrupted_weights(chain, ddp_reference):
    out, _, _ = chain
    _, ref_dir, _ = ddp_reference
    want = torch.load(ref_dir / "last.pth", weights_only=True)["model"]
    got = torch.load(out / "last.pth", weights_only=True)["model"]
    for key in want:
        assert torch.equal(want[key], got[key]), key
    ref_rows, rows = read_metrics(ref_dir), read_metrics(out)
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == [r["step"] for r in ref_rows if r["kind"] == "train"]  # none twice, none missing
    assert [r["lr"] for r in rows if r["kind"] == "train"] == [r["lr"] for r in ref_rows if r["kind"] == "train"]
    assert [r["epoch"] for r in rows if r["kind"] == "val"] == [0, 1]
    assert [r["kind"] for r in rows].count("config") == 5  # one per start


@pytest.mark.slow
def test_mid_epoch_checkpoint_on_another_world_size_finishes_the_epoch(chain, demo_shards, tmp_path, capsys):
    _, mid, _ = chain
    pos = torch.load(mid, weights_only=True)["position"]
    assert pos["world"] == 2 and 0 < pos["step"] < pos["steps_per_epoch"] and pos["epoch"] == 0
    code, out, err = run_main(["--data_path", str(demo_shards), *SMALL, "--epochs", "2", "--resume", str(mid),
                               *run_folder(tmp_path / "new")], capsys)
    assert code == 0, err
    notice = [line for line in out.splitlines() if line.startswith("resume:") and "resuming at" not in line]
    assert len(notice) == 1 and notice[0].startswith("resume: elastic: world 2 -> 1"), out
    assert {r["epoch"] for r in read_metrics(tmp_path / "new") if r["kind"] == "train"} == {0, 1}


@pytest.mark.slow
def test_mid_epoch_checkpoint_without_a_record_of_samples_resumes_at_the_next_epoch(chain, demo_shards, tmp_path,
                                                                                     capsys):
    """An older checkpoint (no record of the consumed samples) on another world size."""
    _, mid, _ = chain
    state = torch.load(mid, weights_only=True)
    del state["position"]["elastic"]
    old = tmp_path / "old.pth"
    torch.save(state, old)
    code, out, err = run_main(["--data_path", str(demo_shards), *SMALL, "--epochs", "2", "--resume", str(old),
                               *run_folder(tmp_path / "new")], capsys)
    assert code == 0, err
    notice = [line for line in out.splitlines() if line.startswith("resume:") and "resuming at" not in line]
    assert len(notice) == 1 and "world 2 -> 1" in notice[0] and "start of epoch 1" in notice[0], out
    assert "resuming at epoch 1 step 0/" in out
    assert "records no consumed samples" in notice[0]
    assert {r["epoch"] for r in read_metrics(tmp_path / "new") if r["kind"] == "train"} == {1}


@pytest.mark.slow
def test_a_second_signal_exits_at_once():
    code = (f"import os, signal, sys, time; sys.path.insert(0, {ROOT!r})\n"
            "from engine.control import Control\nfrom engine.dist import Dist\nfrom model.device import Device\n"
            "c = Control(Dist(0, 1, 0, 1, Device('cpu')))\nc.install()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\nprint('first', c.poll(), flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(30)\nprint('not reached')\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=BOUND, env=child_env())
    assert r.returncode == 128 + signal.SIGTERM and time.monotonic() - t0 < 25
    assert f"first ({int(signal.SIGTERM)}, False)" in r.stdout and "not reached" not in r.stdout
    assert r.stderr.strip() == "train_stream: second SIGTERM: exiting now, without a checkpoint"


def test_checkpoint_interval_parsing():
    assert parse_interval("500") == ("steps", 500)
    assert parse_interval("10m") == ("seconds", 600) and parse_interval("90s") == ("seconds", 90)
    assert parse_interval(None) is None
    for bad in ("0", "-3", "5x", "m", "1.5"):
        with pytest.raises(ValueError, match="--checkpoint-interval"):
            parse_interval(bad)
    c = Control(Dist(0, 1, 0, 1, CPU), ("steps", 3))
    assert [c.steps_due(s) for s in (1, 2, 3, 6)] == [False, False, True, True]


@pytest.mark.slow
def test_killed_loader_worker_is_one_line_and_the_rerun_completes(demo_shards, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data_path", str(demo_shards), *SMALL, "--epochs", "1", *run_folder(out),
            "--checkpoint-interval", "3", "--auto-resume"]
    cmd = [sys.executable, os.path.join(ROOT, "train_stream.py"), *args]
    rc, err, seconds = interrupt(cmd, out, 1, lambda p, _: os.kill(children(p.pid)[0], signal.SIGKILL), after=4)
    assert position(out) == 3  # the interval checkpoint the rerun continues from
    assert rc == 1 and seconds < BOUND and one_error_line(err), err[-3000:]
    assert "data loading failed: DataLoader worker" in err and "killed by signal: Killed" in err
    code, _, err = run_main(args, capsys)  # the same command again
    assert code == 0, err
    steps = [r["step"] for r in read_metrics(out) if r["kind"] == "train"]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] == 126 // B


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_the_old_file_and_the_next_start_cleans_up(tmp_path):
    path = tmp_path / "last.pth"
    code = (f"import os, sys, time; sys.path.insert(0, {ROOT!r}); os.umask(0o022)\n"
            "import model.checkpoint as c\n"
            f"c.save_checkpoint({str(path)!r}, {{'epoch': 0}})\n"
            "def slow(obj, f):\n    f.write(b'partial'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
            "c.torch.save = slow\n"
            f"c.save_checkpoint({str(path)!r}, {{'epoch': 1}})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.kill()
        proc.wait(timeout=BOUND)
    finally:
        proc.kill()
    leftovers = [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert len(leftovers) == 1 and torch.load(path, weights_only=True) == {"epoch": 0}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    saver = CheckpointSaver(str(tmp_path))
    assert saver.removed == 1 and os.listdir(tmp_path) == ["last.pth"]


# ---------------------------------------------------------------- bad data in whole trainings
@pytest.mark.slow
def test_bad_labels_and_a_damaged_validation_shard_are_counted_and_never_best(demo_shards, tmp_path, capsys):
    root = copy_shards(demo_shards, tmp_path / "wds")
    info = load_info(str(root))
    train, val = info.split("train"), info.split("validation")
    set_labels(train.urls[0], [b"99999", b"6", b"-1", b"-100", b"99999999999999999999999", b"x"])
    set_labels(val.urls[0], [b"7"])
    with open(val.urls[-1], "r+b") as f:  # the last validation shard loses its second half
        f.truncate(os.path.getsize(val.urls[-1]) // 2)
    out = tmp_path / "out"
    code, stdout, err = run_main(["--data_path", str(root), *SMALL, "--epochs", "1", "--max-missing", "0.2",
                                  *run_folder(out)], capsys)
    assert code == 0, err
    problems = [line for line in stdout.splitlines() if line.startswith("data problems")]
    assert len(problems) == 1 and "7 samples skipped (1 in validation)" in problems[0], stdout
    assert "1 damaged/unreadable shard reads (1 in validation)" in problems[0]
    assert "INCOMPLETE" in stdout and not (out / "best.pth").exists() and (out / "last.pth").exists()
    val_row = next(r for r in read_metrics(out) if r["kind"] == "val")
    assert val_row["complete"] is False and val_row["n"] < val.num_samples
    # a finished run, resumed, says so in one line and exits 0
    code, stdout, err = run_main(["--data_path", str(root), *SMALL, "--epochs", "1", *run_folder(out),
                                  "--auto-resume"], capsys)
    assert code == 0 and "already finished all 1 epochs; nothing to do" in stdout, stdout + err
    # another data set is refused in one line, unless allowed
    other = copy_shards(root, tmp_path / "other")
    data = json.loads((other / "_info.json").read_text())
    data["name"], data["fingerprint"] = "other", "0" * 64
    (other / "_info.json").write_text(json.dumps(data))
    code, stdout, err = run_main(["--data_path", str(other), *SMALL, "--epochs", "1", "--resume",
                                  str(out / "last.pth")], capsys)
    assert code == 2 and one_error_line(err) and "trained on other data (name 'demo' -> 'other'" in err
    assert "--allow-other-data" in err
    code, stdout, err = run_main(["--data_path", str(other), *SMALL, "--epochs", "1", "--resume",
                                  str(out / "last.pth"), "--allow-other-data"], capsys)
    assert code == 0 and "nothing to do" in stdout, err


@pytest.mark.slow
def test_too_much_missing_data_stops_the_run_in_one_line(demo_shards, tmp_path, capsys):
    root = copy_shards(demo_shards, tmp_path / "wds")
    for url in load_info(str(root)).split("train").urls[:3]:  # lose about half of three shards
        with open(url, "r+b") as f:
            f.truncate(os.path.getsize(url) // 2)
    code, out, err = run_main(["--data_path", str(root), *SMALL, "--epochs", "1", "--no-val"], capsys)
    assert code == 1 and one_error_line(err), err
    assert "more than 2% of epoch 0 is missing" in err and "--max-missing" in err


# ---------------------------------------------------------------- bad data in the loader
def loader_stats(split, train=True, **kw):
    loader = create_loader(split, train=train, batch_size=B, img_size=SIZE, num_workers=0, num_classes=6, **kw)
    loader.set_epoch(0)
    n = sum(len(labels) for _, labels in loader)
    return n, loader.stats()


@pytest.mark.parametrize("split_name", ["train", "validation"])
def test_labels_outside_the_classes_are_skipped_and_counted(demo_shards, tmp_path, split_name):
    root = copy_shards(demo_shards, tmp_path / "wds")
    split = load_info(str(root)).split(split_name)
    bad = [b"99999", b"6", b"-1", b"-100", b"99999999999999999999999", b"\xff", b"1" * 5000]
    set_labels(split.urls[0], bad)
    n, stats = loader_stats(split, train=split_name == "train")
    assert stats["skipped"] == len(bad)
    if split_name == "validation":
        assert n == split.num_samples - len(bad)


def test_anything_a_decoder_throws_is_that_samples_problem(demo_shards, tmp_path, monkeypatch):
    root = copy_shards(demo_shards, tmp_path / "wds")
    split = load_info(str(root)).split("train")
    png16 = io.BytesIO()
    Image.fromarray(np.full((40, 50), 40000, dtype=np.uint16)).save(png16, "PNG")  # 16-bit, named .jpg
    replace_first_image(split.urls[0], png16.getvalue())
    assert loader_stats(split)[1]["skipped"] == 0  # decoded, as 8 bits

    calls = [0]
    original = TrainTransform.__call__

    def flaky(self, data, out, rng):
        calls[0] += 1
        if calls[0] in (3, 7):
            raise ZeroDivisionError("a decoder bug")
        return original(self, data, out, rng)
    monkeypatch.setattr(TrainTransform, "__call__", flaky)
    n, stats = loader_stats(split)
    assert stats["skipped"] == 2 and n == len(create_loader(split, train=True, batch_size=B, num_workers=0)) * B


def test_a_non_jpeg_over_the_pixel_limit_is_skipped_without_decoding(demo_shards, tmp_path, monkeypatch):
    root = copy_shards(demo_shards, tmp_path / "wds")
    split = load_info(str(root)).split("validation")
    side = int(MAX_PIXELS ** 0.5) + 10  # 1-bit PNG: small to store, ~270 MB to decode as RGB
    big = io.BytesIO()
    Image.new("1", (side, side)).save(big, "PNG")
    replace_first_image(split.urls[0], big.getvalue())
    n, stats = loader_stats(split, train=False)
    assert stats["skipped"] == 1 and n == split.num_samples - 1


@pytest.mark.parametrize("text,message", [
    ('{"splits": {"train": {"filenames": ["a.tar"], "shard_lengths": [Infinity]}}}', "Infinity"),
    ('{"splits": {"train": {"filenames": ["a.tar"], "shard_lengths": [NaN]}}}', "contains NaN"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"splits": {"train": {"filenames": ["a.tar"], "shard_lengths": [-5]}}}', "shard length -5"),
    ('{"splits": {"train": {"filenames": ["a.tar"], "shard_lengths": [2.5]}}}', "shard length 2.5"),
    ('{"splits": {"train": {"filenames": ["a.tar"], "shard_lengths": [true]}}}', "shard length True"),
    ('{"splits": {"train": {"filenames": ["a.tar", "a.tar"], "shard_lengths": [1, 1]}}}', "'a.tar' twice"),
    ('{"splits": {"train": {"filenames": ["a.tar"], "shard_lengths": [1, 2]}}}', "1 files but 2 shard lengths"),
    ('{"splits": {"train": {"filenames": "a.tar", "shard_lengths": [1]}}}', "needs the lists"),
    ('{"splits": {"train": {"filenames": ["a.tar"], "shard_lengths": [3], "num_samples": 4}}}', "add up to 3"),
    ('{"splits": {"train": ["x"]}}', "is not an object"),
    ('{"splits": []}', "no 'splits' object"),
    ('[1, 2]', "no 'splits' object"),
    ('{"splits": {}, "num_classes": "many"}', "num_classes='many'"),
    ('{"splits": {}, "classes": "abc"}', "'classes' must be a list"),
    ('{"splits": {}, "classes": ["a"], "num_classes": 2}', "lists 1 classes but says num_classes=2"),
    ('{"splits": {', "not valid JSON"),
])
def test_crafted_info_files_are_one_line(tmp_path, text, message):
    (tmp_path / "_info.json").write_text(text)
    with pytest.raises(DataError, match=message) as e:
        load_info(str(tmp_path))
    assert "\n" not in str(e.value)


def test_info_lengths_are_checked_against_local_shard_sizes(demo_shards, tmp_path):
    root = copy_shards(demo_shards, tmp_path / "wds")
    data = json.loads((root / "_info.json").read_text())
    split = data["splits"]["train"]
    split["shard_lengths"][0] = 10 ** 6  # under the bound on any shard (pipeline.info.MAX_SHARD_SAMPLES)
    split["num_samples"] = sum(split["shard_lengths"])
    (root / "_info.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"lists 1,000,000 samples for .*{split['filenames'][0]}"):
        check_local_shards(load_info(str(root)).split("train"))


# ---------------------------------------------------------------- remote sources
PATIENT_REMOTE = RemoteOptions(timeout=5.0, retries=2, backoff=0.1)  # for reads that should succeed


def remote_keys(url, train=True, remote=PATIENT_REMOTE):
    split = load_info(url, remote).split("train" if train else "validation")
    loader = create_loader(split, train=train, batch_size=B, img_size=SIZE, num_workers=0, remote=remote)
    loader.set_epoch(0)
    return [labels.tolist() for _, labels in loader]


def test_a_stalled_http_source_stops_with_one_line_naming_the_shard(demo_shards):
    with ShardServer(demo_shards) as server:
        split = load_info(server.url, FAST_REMOTE).split("validation")
        loader = create_loader(split, train=False, batch_size=B, img_size=SIZE, num_workers=0, remote=FAST_REMOTE)
        server.pause()  # connections are accepted, no data comes
        t0 = time.monotonic()
        with pytest.raises(DataLoadingError, match=r"shard http://127\.0\.0\.1:\d+/demo-validation-000000\.tar: "
                                                   r".*within 0\.5 s \(tried 2 times\)") as e:
            list(loader)
        assert time.monotonic() - t0 < 10 and "\n" not in str(e.value)
        server.resume()


def test_a_stall_is_retried_and_the_data_comes_through_whole(demo_shards):
    local = remote_keys(str(demo_shards), train=False)
    patient = RemoteOptions(timeout=1.0, retries=4, backoff=0.2)
    with ShardServer(demo_shards) as server:
        split = load_info(server.url, patient).split("validation")
        loader = create_loader(split, train=False, batch_size=B, img_size=SIZE, num_workers=0, remote=patient)
        it = iter(loader)
        first = next(it)[1].tolist()
        server.pause()  # the next read stalls; the server comes back before the retries run out
        threading.Timer(1.5, server.resume).start()
        rest = [labels.tolist() for _, labels in it]
        assert [first, *rest] == local and server.requests > len(split.urls)  # a shard was read twice
        assert loader.stats()["shard_errors"] == 0


def test_failing_and_missing_http_shards_are_one_line(demo_shards, tmp_path):
    with ShardServer(demo_shards) as server:
        server.fail_next(1)  # one 503, then fine: the retry succeeds
        assert remote_keys(server.url, train=False) == remote_keys(str(demo_shards), train=False)
        split = load_info(server.url, PATIENT_REMOTE).split("validation")
        server.fail_next(10)
        with pytest.raises(DataLoadingError, match=r"HTTP 503 .*\(tried 3 times\)"):
            list(create_loader(split, train=False, batch_size=B, img_size=SIZE, num_workers=0,
                               remote=PATIENT_REMOTE))
    root = copy_shards(demo_shards, tmp_path / "wds")
    os.remove(load_info(str(root)).split("validation").urls[1])
    with ShardServer(root) as server:
        with pytest.raises(DataLoadingError, match=r"validation-000001\.tar: HTTP 404"):
            remote_keys(server.url, train=False)
        url = server.url
    with pytest.raises(DataError, match="could not read _info.json .*cannot connect"):  # the server is gone
        load_info(url, PATIENT_REMOTE)


def test_a_stalled_pipe_command_is_one_line_and_leaves_no_process(demo_shards):
    local = load_info(str(demo_shards)).split("validation")
    split = Split("validation", tuple(f"pipe:sleep 30; cat {u}" for u in local.urls), local.lengths)
    loader = create_loader(split, train=False, batch_size=B, img_size=SIZE, num_workers=0, remote=FAST_REMOTE)
    t0 = time.monotonic()
    with pytest.raises(DataLoadingError, match="stalled: no data for 0.5 s from `sleep 30; cat"):
        list(loader)
    assert time.monotonic() - t0 < 10
    time.sleep(0.2)
    r = subprocess.run(["pgrep", "-f", f"sleep 30; cat {demo_shards}"], capture_output=True)
    assert r.stdout == b""


class Sleepy(TrainTransform):
    """Hangs for 3 s on its first image (in the worker), longer than the loader waits."""
    slept = False

    def __call__(self, data, out, rng):
        if not self.slept:
            self.slept = True
            time.sleep(3)
        super().__call__(data, out, rng)


def test_a_hung_worker_ends_in_one_line_after_the_loader_timeout(demo_shards):
    from pipeline.loader import StreamLoader
    from pipeline.stream import PixelBatches, ShardStream
    split = load_info(str(demo_shards)).split("train")
    ds = ShardStream(split, PixelBatches(Sleepy(SIZE), B), batch_size=B, train=True, num_workers=1)
    t0 = time.monotonic()
    with pytest.raises(DataLoadingError, match="DataLoader timed out after 1 seconds"):
        list(StreamLoader(ds, num_workers=1, pin_memory=False, timeout=1))
    assert time.monotonic() - t0 < 20


# ---------------------------------------------------------------- checkpoints and metrics
def tiny_state(tmp_path, model_name="resnet10t", num_classes=6):
    model = create_model(model_name, num_classes=num_classes)
    opt, _ = create_optimizer(model, lr=0.1, device=CPU)
    saver = CheckpointSaver(str(tmp_path))
    saver.save(0, model, opt, None, None, {"model": model_name})
    return model, opt


def test_checkpoint_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint(str(tmp_path / "a.pth"), {"epoch": 0})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.pth").st_mode) == 0o640  # not mkstemp's 0600


def test_wrong_model_checkpoint_names_the_model_and_the_keys(tmp_path):
    tiny_state(tmp_path, "resnet18")
    model = create_model("resnet10t", num_classes=6)
    opt, _ = create_optimizer(model, lr=0.1, device=CPU)
    with pytest.raises(CheckpointError) as e:
        resume(str(tmp_path / "last.pth"), model, opt, None, model_name="resnet10t")
    msg = str(e.value)
    assert "written for model 'resnet18', this run builds 'resnet10t'" in msg and "\n" not in msg
    assert "missing keys" in msg or "unexpected keys" in msg or "shapes differ" in msg
    tiny_state(tmp_path / "b", "resnet10t", num_classes=3)
    with pytest.raises(CheckpointError, match=r"shapes differ: fc.weight \(3, 512\) in the file, \(6, 512\) here"):
        resume(str(tmp_path / "b" / "last.pth"), model, opt, None, model_name="resnet10t")


@pytest.mark.parametrize("field,value,message", [
    ("epoch", "three", "'epoch' is 'three'"),
    ("epoch", 1e30, r"'epoch' is 1e\+30"),
    ("epoch", -7, "'epoch' is -7"),
    ("position", {"epoch": "x", "step": 0}, "'position' is not a training position"),
    ("position", {"epoch": 9, "step": 0}, "disagree"),
    ("rng", {"python": "garbage", "torch": torch.zeros(3)}, "unusable 'rng' entry"),
    ("optimizer", {"state": {}, "param_groups": [{"params": [0]}]}, "optimizer state does not fit"),
    ("best_metric", "best", "'best_metric' is 'best'"),
    ("model", [1, 2], "'model' is not a state dict"),
])
def test_crafted_checkpoint_fields_are_one_line(tmp_path, field, value, message):
    model, opt = tiny_state(tmp_path)
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    state[field] = value
    torch.save(state, tmp_path / "crafted.pth")
    with pytest.raises(CheckpointError, match=message) as e:
        resume(str(tmp_path / "crafted.pth"), model, opt, None, model_name="resnet10t")
    assert "\n" not in str(e.value)


def test_metrics_rows_past_the_resume_point_are_dropped(tmp_path):
    rows = [{"kind": "config"}, *({"kind": "train", "epoch": s // 5, "step": s} for s in range(1, 13)),
            {"kind": "val", "epoch": 0, "step": 5}, {"kind": "epoch", "epoch": 0},
            {"kind": "val", "epoch": 1, "step": 10}, {"kind": "epoch", "epoch": 1}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st'  # a line cut by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    Metrics(str(tmp_path), True, append=True, resume_at=(1, 7))  # epoch 1, global step 7
    kept = read_metrics(tmp_path)
    assert [r.get("step") for r in kept if r["kind"] == "train"] == list(range(1, 8))
    assert [(r["kind"], r["epoch"]) for r in kept if r["kind"] in ("val", "epoch")] == [("val", 0), ("epoch", 0)]


# ---------------------------------------------------------------- make_shards
@pytest.mark.timeout(120)
def test_make_shards_skips_link_loops_fifos_and_huge_headers(demo_folder, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(demo_folder, src)
    cls = src / "train" / sorted(os.listdir(src / "train"))[0]
    os.symlink(".", cls / "loop")  # a link back into the class: a loop
    os.makedirs(cls / "sub")
    os.symlink("..", cls / "sub" / "up")  # and a loop from below
    os.mkfifo(cls / "x.jpg")  # opening it would wait for a writer
    jpg = next(p for p in sorted(cls.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file()
               and p.read_bytes()[:2] == b"\xff\xd8")
    data = bytearray(jpg.read_bytes())
    sof = next(i for i in range(2, len(data) - 9) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5:sof + 9] = (60000).to_bytes(2, "big") * 2  # claims 60000x60000
    (cls / "huge.jpg").write_bytes(bytes(data))
    expected = make_shards(demo_folder, tmp_path / "plain", max_count=50, workers=2, progress=False)
    summary = make_shards(src, tmp_path / "out", max_count=50, workers=2, progress=False)
    assert summary["images"] == expected["images"]  # no image copied twice, the FIFO and huge.jpg skipped
    assert summary["skipped"] == expected["skipped"] + 2 and summary["ignored"] == expected["ignored"] + 2
    skipped = (tmp_path / "out" / "_skipped.tsv").read_text()
    assert "x.jpg\tnot a regular file" in skipped and "huge.jpg\ttoo large: 60000x60000" in skipped
    assert verify_shards(tmp_path / "out", progress=False)["ok"]


# ---------------------------------------------------------------- fuzzing
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def small_shard(demo_shards):
    """The first 12 KB of a shard: two or three samples."""
    path = load_info(str(demo_shards)).split("validation").urls[0]
    with open(path, "rb") as f:
        return f.read(12 << 10)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 3 * 512 - 1), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.integers(0, 12 * 512))
def test_fuzzed_tar_headers_are_read_or_reported(small_shard, edits, cut):
    """Damaged headers and sizes: the reader yields samples or raises ShardCorrupt, nothing else."""
    data = bytearray(small_shard)
    for pos, value in edits:
        data[pos] = value
    data = bytes(data[:len(data) - cut])
    try:
        for sample in iter_samples(io.BytesIO(data)):
            assert "__key__" in sample
    except ShardCorrupt:
        pass


@FUZZ
@given(payload=st.binary(max_size=40) | st.integers(-10 ** 30, 10 ** 30).map(lambda n: str(n).encode()))
def test_fuzzed_labels_are_in_range_or_skipped(payload):
    try:
        _, label = image_and_label({"__key__": "k", "jpg": b"x", "cls": payload}, 1000)
    except DecodeError:
        return
    assert 0 <= label < 1000


JSON = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
                    max_leaves=20)


@FUZZ
@given(splits=st.dictionaries(st.sampled_from(["train", "validation"]), JSON | st.fixed_dictionaries(
    {"filenames": st.lists(st.sampled_from(["a.tar", "b.tar", "../c.tar", 3]), max_size=3),
     "shard_lengths": st.lists(JSON, max_size=3)}), max_size=2), classes=JSON)
def test_fuzzed_info_files_load_or_fail_in_one_line(tmp_path_factory, splits, classes):
    root = tmp_path_factory.mktemp("info")
    (root / "_info.json").write_text(json.dumps({"splits": splits, "classes": classes, "num_classes": 3}))
    try:
        info = load_info(str(root))
    except DataError as e:
        assert "\n" not in str(e)
        return
    for split in info.splits.values():
        assert all(isinstance(n, int) and n >= 0 for n in split.lengths)
