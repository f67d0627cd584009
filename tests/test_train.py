"""train_stream.py end to end on the CPU: torchrun/DDP, resume, metrics, checkpoints, errors."""
import json

import pytest
import torch
from conftest import SMALL, read_metrics, run_folder, run_main, torchrun

import engine.data
import train_stream
from model.schedule import ScheduleConfig, lr_at
from pipeline.stream import STATS


@pytest.fixture(scope="module")
def ddp_runs(ddp_reference):
    """Two epochs straight, and one epoch + resume for the second, each on 2 gloo processes."""
    common, straight_dir, straight = ddp_reference
    base = straight_dir.parent
    first = torchrun([*common, *run_folder(base / "resumed"), "--stop-after", "1"])
    second = torchrun([*common, *run_folder(base / "resumed"), "--resume", str(base / "resumed" / "last.pth")])
    return base, straight, first, second


@pytest.mark.slow
def test_two_process_run_same_steps_metrics_and_checkpoint(ddp_runs, demo_shards):
    base, straight, _, _ = ddp_runs
    assert straight.returncode == 0, straight.stderr[-3000:]
    rows = read_metrics(base / "straight")
    epochs = [r for r in rows if r["kind"] == "epoch"]
    info = json.loads((demo_shards / "_info.json").read_text())
    steps = info["splits"]["train"]["num_samples"] // (2 * 8)
    assert [(e["steps_min"], e["steps_max"]) for e in epochs] == [(steps, steps)] * 2
    assert [r["kind"] for r in rows].count("val") == 2
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 2 * steps and all(r["img_per_s"] > 0 for r in train)
    cfg = ScheduleConfig(0.05, 2, steps, warmup_epochs=1)  # the LR logged is timm's, step by step
    assert [r["lr"] for r in train] == pytest.approx([lr_at(r["step"] - 1, cfg) for r in train], rel=1e-9)
    for name in ("last.pth", "best.pth", "config.json"):
        assert (base / "straight" / name).is_file()


@pytest.mark.slow
def test_checkpoint_loads_into_plain_timm_model(ddp_runs):
    import timm
    state = torch.load(ddp_runs[0] / "straight" / "last.pth", weights_only=True)
    model = timm.create_model("resnet10t", num_classes=6)
    model.load_state_dict(state["model"])  # strict: no module./_orig_mod. prefixes
    assert state["epoch"] == 1 and "optimizer" in state and "rng" in state


@pytest.mark.slow
def test_resume_continues_at_next_epoch_and_matches(ddp_runs):
    base, straight, first, second = ddp_runs
    assert first.returncode == 0 and second.returncode == 0, (first.stderr + second.stderr)[-3000:]
    a = [r for r in read_metrics(base / "straight") if r["kind"] == "train"]
    b = [r for r in read_metrics(base / "resumed") if r["kind"] == "train"]
    assert [r["step"] for r in b] == [r["step"] for r in a]  # no epoch repeated or skipped
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4, abs=1e-4)
    wa = torch.load(base / "straight" / "last.pth", weights_only=True)["model"]
    wb = torch.load(base / "resumed" / "last.pth", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)


def test_performance_json_is_the_last_line(demo_shards, capsys):
    for extra in (["--synthetic"], ["--data_path", str(demo_shards)]):
        code, out, err = run_main([*SMALL, "--performance", "--perf-steps", "3", "--perf-warmup", "1", *extra], capsys)
        assert code == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        for key in ("fps", "fps_per_device", "steps", "batch_size", "world_size", "device",
                    "amp_dtype", "data_wait_fraction"):
            assert key in result
        assert result["fps"] > 0 and result["fps"] == result["fps_per_device"]
        assert result["steps"] == 3 and result["batch_size"] == 8 and result["world_size"] == 1
        assert result["device"] == "cpu" and 0 <= result["data_wait_fraction"] <= 1
        assert result["synthetic"] == (extra == ["--synthetic"])


@pytest.mark.slow
def test_training_on_demo_data_lowers_the_loss(demo_shards, tmp_path, capsys):
    code, out, err = run_main(["--data_path", str(demo_shards), "--model", "resnet10t", "--img-size", "32",
                               "-b", "16", "-j", "1", "--epochs", "6", "--warmup-epochs", "1",
                               "--lr", "0.05", "--log-interval", "2", *run_folder(tmp_path)], capsys)
    assert code == 0, err
    rows = read_metrics(tmp_path)
    train = [r["loss"] for r in rows if r["kind"] == "train"]
    val = [r["top1"] for r in rows if r["kind"] == "val"]
    assert sum(train[-3:]) / 3 < 0.8 * sum(train[:3]) / 3
    assert val[-1] > 50  # well above chance (6 classes: 16.7%)


@pytest.mark.parametrize("args,message", [
    (["--apex-amp"], "Apex"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--device", "npu"], "torch_npu"),
    (["--data_path", "{missing}"], "does not exist"),
    (["--data_path", "{empty}"], "no _info.json"),
    (["-b", "0"], "--batch-size must be at least 1"),
    (["--model", "no_such_net", "--synthetic"], "unknown model"),
    (["--synthetic", "--decode", "gpu"], "--decode does not apply"),
    (["--data_path", "{shards}", "--decode", "gpu"], "--decode gpu needs a CUDA device"),
    (["--resume", "{missing}", "--synthetic"], "does not exist"),
    (["--apex-amp", "--amp-dtype", "bfloat16"], "cannot be combined"),
])
def test_clear_one_line_errors(args, message, tmp_path, capsys, demo_folder, demo_shards):
    args = [a.format(missing=tmp_path / "nope", folder=demo_folder, shards=demo_shards, empty=tmp_path) for a in args]
    code, out, err = run_main([*SMALL, "--device", "cpu", *args] if "--device" not in args else [*SMALL, *args], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_unknown_flag_and_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_stream.parse_args(["--no-such-flag"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unrecognized arguments: --no-such-flag" in err
    assert len(err.strip().splitlines()) == 1
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch-size: 12\nsched: step\n")
    args = train_stream.parse_args(["-c", str(cfg), "--epochs", "3"])
    assert (args.batch_size, args.sched, args.epochs) == (12, "step", 3)
    cfg.write_text("bogus_key: 1\n")
    with pytest.raises(SystemExit):
        train_stream.parse_args(["-c", str(cfg)])
    assert "unknown keys bogus_key" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["0", "2"])
def test_unreadable_data_is_a_clear_error_not_a_hang(workers, demo_shards, tmp_path, capsys):
    """Same one line and status whether the loader ran in this process or in workers."""
    import shutil
    root = tmp_path / "wds"
    shutil.copytree(demo_shards, root)
    for shard in root.glob("*-train-*.tar"):
        # present and of the right size, so the start-up checks pass, but garbage
        shard.write_bytes(b"\x01" * shard.stat().st_size)
    code, out, err = run_main(["--data_path", str(root), *SMALL, "-j", workers, "--epochs", "1"], capsys)
    assert code == 1 and "data loading failed" in err and "could not read a single sample" in err
    error = err.split("train_stream: error:")[-1]
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1


@pytest.mark.slow  # 100 training steps
def test_synthetic_training_runs_through_fit(tmp_path, capsys):
    """The loader contract through the training loop: synthetic batches report every counter."""
    code, out, err = run_main(["--synthetic", *SMALL, "--epochs", "1", "--warmup-epochs", "0",
                               "--log-interval", "50", *run_folder(tmp_path)], capsys)
    assert code == 0, err
    epoch = [r for r in read_metrics(tmp_path) if r["kind"] == "epoch"]
    assert len(epoch) == 1 and set(STATS) <= set(epoch[0])
    assert epoch[0]["samples"] == epoch[0]["steps_max"] * 8 == 100 * 8


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user errors become one line; anything else is a bug and must stay visible."""
    def broken(args, d):
        raise ValueError("a bug, not a user error")
    monkeypatch.setattr(engine.data, "make_data", broken)
    with pytest.raises(ValueError, match="a bug"):
        train_stream.main([*SMALL, "--synthetic", "--device", "cpu"])
