"""Guards: a bad number, a `pipe:` command from a file, a busy, unwritable or full run folder
are refused before set-up with one line; a non-finite loss stops the run without saving over
the last good checkpoint; a validation of 0 images is no result; a mid-epoch resume notices a
change of the settings that decide the sample order."""
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SMALL, child_env, copy_shards, make_trainer, run_folder, run_main

from common.errors import ConfigError
from engine import guards
from engine.guards import LossGuard, NonFiniteLoss, check_space, lock_run
from engine.resume import start_position
from model.checkpoint import CheckpointSaver, CheckpointWriteError, save_checkpoint


def refused(args, capsys):
    """train_stream's main on `args`: (exit status, stderr, stdout); argparse's refusals exit."""
    import train_stream
    try:
        code = train_stream.main(args)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, err, out


def one_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in err and lines[0].startswith("train_stream: error:")


# ---------------------------------------------------------------- numbers: range-checked, finite
BAD_NUMBERS = [
    ("--momentum", "-5"), ("--smoothing", "2"), ("--smoothing", "1"), ("--prefetch-factor", "0"),
    ("--drop-path", "5"), ("--img-size", "100000"), ("--val-res", "5000"), ("--min-res", "16", "--max-res", "8192"),
    ("--weight-decay", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-0.1"), ("--lr-base", "-1"),
    ("--warmup-lr", "-1"), ("--min-lr", "-1"), ("--decay-rate", "0"), ("--decay-epochs", "0"),
    ("--model-ema-decay", "1"), ("--perf-steps", "0"), ("--shuffle-buffer", "0"), ("--seed", "-1"),
    ("--checkpoint-hist", "-1"), ("--clip-grad", "-1"), ("--clip-grad", "nan"), ("--io-retries", "11"),
    ("--io-timeout", "nan"), ("--io-timeout", "inf"), ("--color-jitter", "nan"), ("--color-jitter", "3"),
    ("--reprob", "2"), ("--crop-pct", "nan"), ("--num-classes", "2000000000"), ("-j", "100000"),
    ("--max-missing", "nan"), ("-b", "10000000"), ("--device_id", "-1"), ("--mixup", "nan"),
    ("--cutmix-minmax", "0.1", "nan"),
]


@pytest.mark.parametrize("flags", BAD_NUMBERS, ids=[" ".join(f) for f in BAD_NUMBERS])
def test_out_of_range_numbers_are_refused_before_set_up(flags, capsys, tmp_path):
    code, err, out = refused([*flags, "--epochs", "1", "--output", str(tmp_path / "runs")], capsys)
    assert code == 2, (flags, err)
    assert one_line(err), err
    named = {{"-j": "--workers"}.get(f, f).replace("_", "-") for f in flags if f.startswith("-")}
    assert any(name in err.replace("_", "-") for name in named), err  # the line names the flag
    assert not (tmp_path / "runs").exists() and "model " not in out  # nothing set up, nothing written


def test_a_nan_from_a_config_file_is_refused(capsys, tmp_path):
    cfg = tmp_path / "args.yaml"
    cfg.write_text("lr: .nan\nepochs: 1\n")
    code, err, _ = refused(["-c", str(cfg), "--output", str(tmp_path / "runs")], capsys)
    assert code == 2 and one_line(err) and "--lr must be a finite number" in err


# ---------------------------------------------------------------- pipe: only from this command line
@pytest.mark.parametrize("key", ["data_path", "data_dir", "cache_dir"])
def test_a_pipe_command_in_a_config_file_never_runs(key, capsys, tmp_path, demo_shards):
    marker = tmp_path / "X"
    cfg = tmp_path / "args.yaml"
    cfg.write_text(json.dumps({key: f"pipe:touch {marker}; cat {demo_shards}/{{}}", "epochs": 1}))
    code, err, _ = refused(["-c", str(cfg), *SMALL, "--output", str(tmp_path / "runs")], capsys)
    assert code == 2 and one_line(err), err
    assert "shell command" in err and "typed on the command line" in err
    assert not marker.exists()


# ---------------------------------------------------------------- run folder lock
def test_a_run_folder_held_by_a_live_run_is_refused_naming_its_pid(capsys, tmp_path):
    run = tmp_path / "runs" / "exp"
    fd, _ = lock_run(str(run))  # this process is "the first run"
    try:
        code, err, out = refused(["--epochs", "1", *run_folder(run)], capsys)
        assert code == 2 and one_line(err), err
        assert f"pid {os.getpid()}" in err and "in use by another run" in err
        assert os.listdir(run) == [".lock"] and "model " not in out  # refused before set-up
    finally:
        os.close(fd)


@pytest.mark.slow
def test_two_runs_started_together_one_is_refused(tmp_path, demo_shards):
    run = tmp_path / "runs" / "same"
    cmd = [sys.executable, os.path.join(ROOT, "train_stream.py"), "--data_path", str(demo_shards), *SMALL,
           "--epochs", "1", "--log-interval", "5", *run_folder(run)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                             cwd=tmp_path)
    try:
        deadline = time.time() + 60
        while not (run / ".lock").exists() or not (run / ".lock").read_text().strip():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.1)
        second = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=tmp_path, timeout=120)
    finally:
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2 and one_line(second.stderr), second.stderr
    assert f"pid {first.pid}" in second.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "config" for r in rows) == 1  # one run's records only


def test_a_lock_of_a_killed_run_never_blocks(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from engine.guards import lock_run; "
                               f"lock_run({str(run)!r}); print('locked', flush=True); time.sleep(300)"],
                              stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(guards.RunBusy, match=f"pid {holder.pid}"):
            lock_run(str(run))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    fd, made = lock_run(str(run))  # the kernel released the dead run's lock
    assert not made and (run / ".lock").read_text().strip() == str(os.getpid())
    os.close(fd)


# ---------------------------------------------------------------- writable, free space
def test_an_output_under_a_file_is_refused_at_the_start(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    code, err, out = refused(["--epochs", "1", "--output", str(tmp_path / "file" / "runs")], capsys)
    assert code == 2 and one_line(err) and "is a file, not a folder" in err and "model " not in out


def test_a_read_only_output_is_refused_at_the_start(capsys, tmp_path, monkeypatch):
    # as root, chmod does not stop writes: the read-only file system is simulated where the run
    # folder is first written (its lock file), as a read-only mount answers
    real_open = os.open

    def read_only(path, *a, **kw):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, *a, **kw)
    monkeypatch.setattr(guards.os, "open", read_only)
    code, err, out = refused(["--epochs", "1", "--output", str(tmp_path / "ro")], capsys)
    assert code == 2 and one_line(err), err
    assert "Read-only file system" in err and "model " not in out


def test_too_little_free_space_is_refused_and_little_is_warned(tmp_path, monkeypatch):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ConfigError, match="less than one checkpoint"):
        check_space(str(tmp_path), free * 2)
    said = []
    check_space(str(tmp_path), free // 2, say=said.append)
    assert len(said) == 1 and said[0].startswith("warning:") and "3 checkpoints" in said[0]
    said.clear()
    check_space(str(tmp_path), 1, say=said.append)
    assert not said


def test_checkpoint_size_estimate_counts_the_model_without_building_it():
    from engine.config import Config
    need = guards.checkpoint_bytes(Config.create(model="resnet50"))
    assert 2 * 4 * 25_500_000 < need < 2 * 4 * 26_000_000 + 4 * 100_000  # weights + momentum, float32


# ---------------------------------------------------------------- disk full during a checkpoint
@pytest.mark.parametrize("failure", ["torch_save_enospc", "torch_save_runtime", "replace_enospc"])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(failure, tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = CheckpointSaver(str(tmp_path))
    saver.save(0, model, opt, None, None, {}, metric=1.0)
    before = (tmp_path / "last.pth").read_bytes()
    import model.checkpoint as ckpt
    if failure == "replace_enospc":
        monkeypatch.setattr(ckpt.os, "replace", lambda *a: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    else:
        def save(obj, f):
            f.write(b"partial")
            if failure == "torch_save_enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        monkeypatch.setattr(ckpt.torch, "save", save)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(CheckpointWriteError) as e:
        saver.save(1, model, opt, None, None, {}, metric=2.0)
    message = str(e.value)
    assert "\n" not in message and "last.pth" in message and "is kept" in message
    if failure != "torch_save_runtime":
        assert "no space left" in message
    assert e.value.exit_code == 1
    assert (tmp_path / "last.pth").read_bytes() == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_save_checkpoint_error_of_a_first_write_says_none_was_written(tmp_path, monkeypatch):
    import model.checkpoint as ckpt
    monkeypatch.setattr(ckpt.torch, "save", lambda obj, f: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(CheckpointWriteError, match="was never written"):
        save_checkpoint(str(tmp_path / "last.pth"), {"a": 1})
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_full_disk_in_a_run_is_one_line(tmp_path, monkeypatch, capsys, demo_shards):
    import model.checkpoint as ckpt
    monkeypatch.setattr(ckpt.torch, "save", lambda obj, f: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    run = tmp_path / "runs" / "full"
    code, out, err = run_main(["--data_path", str(demo_shards), *SMALL, "--epochs", "1", *run_folder(run)], capsys)
    assert code == 1 and one_line(err), err
    assert "no space left" in err
    assert not [n for n in os.listdir(run) if n.endswith(".tmp") or n.endswith(".pth")]


# ---------------------------------------------------------------- non-finite loss
@pytest.mark.slow
def test_a_diverging_run_stops_with_one_line_and_saves_nothing(tmp_path, capsys, demo_shards):
    run = tmp_path / "runs" / "nan"
    code, out, err = run_main(["--data_path", str(demo_shards), *SMALL, "--lr", "1e30", "--warmup-epochs", "0",
                               "--epochs", "1", *run_folder(run)], capsys)
    assert code == 1 and one_line(err), err
    assert "not finite" in err or "loss is nan" in err or "loss is inf" in err
    assert "lower --lr" in err and "epoch 0 step" in err
    assert not (run / "last.pth").exists() and not (run / "best.pth").exists()


@pytest.mark.slow
def test_divergence_after_a_resume_keeps_the_last_good_checkpoint(tmp_path, capsys, demo_shards):
    run = tmp_path / "runs" / "good"
    args = ["--data_path", str(demo_shards), *SMALL, "--epochs", "2"]
    code, _, err = run_main([*args, "--stop-after", "1", *run_folder(run)], capsys)
    assert code == 0, err
    last, best = (run / "last.pth").read_bytes(), (run / "best.pth").read_bytes()
    code, _, err = run_main([*args, "--lr", "1e30", "--warmup-epochs", "0", "--checkpoint-interval", "3",
                             "--log-interval", "100", "--resume", str(run / "last.pth")], capsys)
    assert code == 1 and one_line(err), err
    assert (run / "last.pth").read_bytes() == last and (run / "best.pth").read_bytes() == best
    state = torch.load(run / "last.pth", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_skip_mode_drops_updates_and_stops_after_too_many_in_a_row():
    g = LossGuard("skip")
    assert g.skip and g.keep(True, 0, 1)
    assert not g.keep(False, 0, 2) and g.skipped == 1
    assert g.keep(True, 0, 3) and g.in_a_row == 0
    for step in range(guards.MAX_SKIPPED_IN_A_ROW):
        assert not g.keep(False, 0, 4 + step)
    with pytest.raises(NonFiniteLoss, match="non-finite losses in a row"):
        g.keep(False, 0, 99)
    with pytest.raises(NonFiniteLoss, match="the training loss is nan"):
        LossGuard.check(float("nan"), 1, 7)
    LossGuard.check(2.5, 1, 7)
    assert not LossGuard("stop").skip


@pytest.mark.slow
def test_skip_mode_trains_through_a_bad_batch(tmp_path, capsys, demo_shards, monkeypatch):
    """One batch gives a NaN loss: --nonfinite-loss skip drops that update and finishes with finite
    weights; the default stops the run."""
    from engine import trainer as trainer_module
    real = trainer_module.Trainer.step
    calls = {"n": 0}

    def poisoned(self, images, labels, global_step, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            images = images * float("nan")
        return real(self, images, labels, global_step, **kw)
    monkeypatch.setattr(trainer_module.Trainer, "step", poisoned)
    run = tmp_path / "runs" / "skip"
    code, out, err = run_main(["--data_path", str(demo_shards), *SMALL, "--epochs", "1", "--nonfinite-loss", "skip",
                               *run_folder(run)], capsys)
    assert code == 0, err
    state = torch.load(run / "last.pth", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    calls["n"] = 0
    code, out, err = run_main(["--data_path", str(demo_shards), *SMALL, "--epochs", "1",
                               *run_folder(tmp_path / "runs" / "stop")], capsys)
    assert code == 1 and one_line(err) and "epoch 0 step 3" in err, err


# ---------------------------------------------------------------- 0-image validation
@pytest.mark.slow
@pytest.mark.parametrize("how", ["empty lists", "zero lengths"])
def test_a_validation_split_of_no_samples_is_no_validation(how, tmp_path, capsys, demo_shards):
    data = copy_shards(demo_shards, tmp_path / "wds")
    info = json.loads((data / "_info.json").read_text())
    val = info["splits"]["validation"]
    if how == "empty lists":
        val.update(filenames=[], shard_lengths=[], num_samples=0)
    else:
        val.update(shard_lengths=[0] * len(val["filenames"]), num_samples=0)
    (data / "_info.json").write_text(json.dumps(info))
    run = tmp_path / "runs" / "noval"
    code, out, err = run_main(["--data_path", str(data), *SMALL, "--epochs", "1", *run_folder(run)], capsys)
    assert code == 0, err
    assert out.count("validation split lists 0 samples") == 1
    assert "new best" not in out and not (run / "best.pth").exists() and (run / "last.pth").exists()


@pytest.mark.slow
def test_a_validation_of_zero_images_is_never_complete(tmp_path, demo_shards, monkeypatch, capsys):
    from engine import trainer as trainer_module
    trainer = make_trainer(["--data_path", str(demo_shards), *SMALL, "--epochs", "1",
                            *run_folder(tmp_path / "runs" / "zero")])
    monkeypatch.setattr(trainer_module, "evaluate", lambda *a, **k: {"n": 0, "loss": 0.0, "top1": 0, "top5": 0})
    result = trainer.validate(0)
    assert result["complete"] is False
    assert "no image was validated" in capsys.readouterr().out
    trainer.save(0, result)
    assert not (tmp_path / "runs" / "zero" / "best.pth").exists()
    assert trainer.saver.best_metric is None and not trainer.history


# ---------------------------------------------------------------- resume: the sample order settings
class _Say:
    world, rank = 1, 0

    def __init__(self):
        self.lines = []

    def say(self, text):
        self.lines.append(text)


class _Train:
    num_workers = 1

    def __len__(self):
        return 10

    def progress(self, consumed):
        return None


class _Data:
    identity = None
    train = _Train()


@pytest.mark.parametrize("key, value", [("shuffle_buffer", 16), ("shuffle_buffer_bytes", 1 << 20),
                                        ("max_sample_bytes", 1 << 20)])
def test_a_changed_sample_order_setting_resumes_at_the_next_epoch(key, value):
    order = {"shuffle_buffer": 2048, "shuffle_buffer_bytes": 256 << 20, "max_sample_bytes": 64 << 20}
    pos = {"epoch": 3, "step": 4, "world": 1, "workers": 1, "batch_size": 8, "steps_per_epoch": 10,
           "progress": [[[1, 8, 0]]], **order}
    d = _Say()
    same = start_position(pos, "last.pth", _Data(), d, 8, False, order=order)
    assert same == (3, 4, [[1, 8, 0]], None) and not d.lines
    # without a record of consumed samples (tests/test_elastic.py: with one, the epoch is finished)
    changed = start_position(pos, "last.pth", _Data(), d, 8, False, order={**order, key: value})
    assert changed == (4, 0, None, None)
    assert len(d.lines) == 1 and key in d.lines[0]


# ---------------------------------------------------------------- the hostile probe runner
@pytest.mark.slow
def test_hostile_probes_fast_subset_holds(tmp_path):
    from tools.hostile_probes import main, run_probes
    out = io.StringIO()
    rows = run_probes(only=("pipe: data path", "--lr nan", "--img-size", "crafted"), fast=True, tmp=str(tmp_path),
                      out=out)
    assert len(rows) == 4 and all(held for *_, held in rows), out.getvalue()
    assert main(["--only", "no such probe"]) == 0  # nothing run: "0 probes, 0 held, 0 failed"
