"""Every rank's own state in the checkpoints: an interrupted and resumed 2-process run with
per-rank BatchNorm statistics (--dist-bn '') ends bit-identical to the uninterrupted one on every
rank -- weights, buffers, validation and the logged training losses -- after a checkpointed
SIGTERM and after a second SIGTERM that exits without a checkpoint."""
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import ROOT, child_env, read_metrics, run_folder, torchrun_cmd
from test_faults import interrupt

from engine.rankstate import epoch_losses, window


def rows_of(folder, kind, keys):
    return [tuple(r[k] for k in keys) for r in read_metrics(folder) if r["kind"] == kind]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def finish(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_run(ref_dir, out, train_rows=True):
    want = torch.load(ref_dir / "last.pth", weights_only=True)
    got = torch.load(out / "last.pth", weights_only=True)
    for key in want["model"]:  # rank 0: weights and buffers
        assert torch.equal(want["model"][key], got["model"][key]), key
    assert len(want["ranks"]) == len(got["ranks"]) == 2
    a, b = want["ranks"][1]["buffers"], got["ranks"][1]["buffers"]  # rank 1's own BN statistics
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], want["model"][k]) for k in a)  # they are rank 1's, not a copy
    assert torch.equal(want["ranks"][1]["rng"]["torch"], got["ranks"][1]["rng"]["torch"])
    kinds = (("val", ("epoch", "top1", "top5", "loss", "n")), ("train", ("step", "loss", "lr")))
    for kind, keys in kinds if train_rows else kinds[:1]:
        assert rows_of(out, kind, keys) == rows_of(ref_dir, kind, keys), kind  # exact, step by step


@pytest.mark.slow
def test_sigterm_at_a_checkpoint_then_auto_resume_is_identical_on_every_rank(ddp_reference, tmp_path):
    args, ref_dir, ref = ddp_reference
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    cmd = torchrun_cmd([*args, *run_folder(out), "--auto-resume", "--checkpoint-interval", "3", "--dist-bn", ""])
    rc, err, _ = interrupt(cmd, out, 1, lambda p, ranks: os.kill(p.pid, signal.SIGTERM), after=4)
    assert rc != 0 and "stopped (got SIGTERM)" in err, err[-3000:]
    mid = torch.load(out / "last.pth", weights_only=True)
    assert 0 < mid["position"]["step"] < mid["position"]["steps_per_epoch"]
    assert len(mid["ranks"]) == 2 and mid["ranks"][0]["buffers"] is None and mid["ranks"][1]["buffers"]
    finish(cmd)
    assert_same_run(ref_dir, out)


@pytest.mark.slow
def test_a_second_sigterm_then_auto_resume_is_identical_on_every_rank(ddp_reference, tmp_path):
    """Both ranks get SIGTERM twice: they exit at once, without a checkpoint; the rerun resumes
    at the last step-interval checkpoint (step 3), inside a log window of 2 steps (steps 3-4)."""
    args, ref_dir, ref = ddp_reference
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    cmd = torchrun_cmd([*args, *run_folder(out), "--auto-resume", "--checkpoint-interval", "3", "--log-interval", "2"])

    def twice(proc, ranks):
        # SIGTERM every few ms until the ranks are gone: two signals at once are one for Python's
        # handler, and the stop's checkpoint comes a step after the first that is handled
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive(pid) for pid in ranks):
            for pid in ranks:
                if alive(pid):
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            time.sleep(0.005)

    rc, err, _ = interrupt(cmd, out, 1, twice, after=4)
    assert rc != 0 and "second SIGTERM: exiting now" in err, err[-3000:]
    assert torch.load(out / "last.pth", weights_only=True)["position"]["global_step"] == 3
    finish(cmd)
    assert_same_run(ref_dir, out, train_rows=False)
    # each logged loss is the mean over its window of 2 steps (the epoch's last alone), the window
    # the checkpoint cut included: the reference logged every step
    ref = dict(rows_of(ref_dir, "train", ("step", "loss")))
    got, last = rows_of(out, "train", ("step", "loss")), 0
    assert [s for s, _ in got] == [2, 4, 6, 7, 9, 11, 13, 14]
    for step, loss in got:
        window = range(last + 1, step + 1)
        assert loss == pytest.approx(sum(ref[t] for t in window) / len(window), rel=1e-5), step
        last = step


def test_window_and_epoch_losses_are_read_defensively():
    assert window({"window": [torch.tensor(2.5), 3]}, "cpu")[1] == 3
    assert window({"window": ["x", 3]}, "cpu") is None and window(None, "cpu") is None
    assert epoch_losses({"epoch_losses": [1.0, 2.0]}) == [1.0, 2.0]
    assert epoch_losses({"epoch_losses": "1.0"}) == [] and epoch_losses(None) == []


def _bn_model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def test_restore_gives_each_rank_its_own_buffers_and_refuses_damaged_ones(capsys):
    from common.errors import CheckpointError
    from engine.dist import Dist
    from engine.rankstate import restore
    from model.checkpoint import rng_state
    from model.device import Device
    theirs = _bn_model()
    theirs[1].running_mean.fill_(3.0)
    entry = {"buffers": {k: v.clone() for k, v in theirs.named_buffers()}, "ema_buffers": None,
             "rng": rng_state(), "scaler": {}, "window": [torch.tensor(1.5), 2]}
    mine, d1 = _bn_model(), Dist(1, 2, 1, 2, Device("cpu"))
    assert restore([{"buffers": None}, entry], mine, None, None, d1, "x.pth") is entry
    assert torch.equal(mine[1].running_mean, torch.full((4,), 3.0))
    other = _bn_model()
    assert restore([{"buffers": None}, entry], other, None, None, Dist(0, 1, 0, 1, Device("cpu")), "x.pth") is None
    assert "written by 2 processes, this run has 1" in capsys.readouterr().out
    assert torch.equal(other[1].running_mean, torch.zeros(4))  # rank 0's, as loaded from `model`
    bad = {**entry, "buffers": {"1.running_mean": torch.zeros(7)}}
    with pytest.raises(CheckpointError, match="rank 1's saved buffers do not fit"):
        restore([{}, bad], _bn_model(), None, None, d1, "x.pth")
    with pytest.raises(CheckpointError, match="not a list of per-rank states"):
        restore("junk", _bn_model(), None, None, d1, "x.pth")
