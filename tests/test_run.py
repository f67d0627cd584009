"""A user's run: run folders that never overwrite another run, what is saved and said, live
monitoring files, the summary, and flags refused before anything slow loads."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, SMALL, read_metrics, run_folder, run_main

import train_stream
from engine.config import build_parser, parse_args
from model import registry

TRAIN = [*SMALL, "--epochs", "2", "--warmup-epochs", "0"]


def runs_in(root):
    return sorted(p for p in root.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def first_run(demo_shards, tmp_path_factory):
    """Two epochs into a fresh --output root: (root, the run's folder, its stdout)."""
    import contextlib
    import io
    root = tmp_path_factory.mktemp("runs")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train_stream.main(["--data_path", str(demo_shards), *TRAIN, "--output", str(root)])
    assert code == 0
    (run,) = runs_in(root)
    return root, run, out.getvalue()


@pytest.mark.slow
def test_a_second_run_gets_its_own_folder_and_the_first_is_untouched(demo_shards, first_run, capsys):
    root, first, out = first_run
    assert first.name.endswith("-resnet10t-32") and f"output: {first}" in out
    before = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    code, out, _ = run_main(["--data_path", str(demo_shards), *SMALL, "--performance", "--perf-steps", "2",
                             "--perf-warmup", "0", "--output", str(root)], capsys)
    assert code == 0
    assert len(runs_in(root)) == 2  # the performance run made its own folder
    assert runs_in(root)[1] != first
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == before
    # files a timm user expects, and what the summary says
    names = {p.name for p in first.iterdir()}
    assert {"last.pth", "best.pth", "metrics.jsonl", "config.json", "args.yaml", "summary.csv",
            "model_best.pth.tar", "last.pth.tar", "checkpoint-0.pth.tar", "checkpoint-1.pth.tar"} <= names
    assert os.readlink(first / "model_best.pth.tar") == "best.pth"
    with open(first / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"] and all(float(r["eval_top1"]) >= 0 for r in rows)
    summary = [r for r in read_metrics(first) if r["kind"] == "summary"][-1]
    assert summary["epochs_done"] == 2 and summary["best_epoch"] in (0, 1) and summary["img_per_s"] > 0


@pytest.mark.slow
def test_without_output_the_run_goes_to_output_and_says_so(demo_shards, tmp_path, capsys):
    # the autouse fixture runs each test in tmp_path: ./output is tmp_path/output
    code, out, _ = run_main(["--data_path", str(demo_shards), *SMALL, "--epochs", "1", "--warmup-epochs", "0"],
                            capsys)
    assert code == 0
    (run,) = runs_in(tmp_path / "output")
    assert f"output: {os.path.join('output', run.name)}" in out and (run / "last.pth").is_file()
    assert f"plot: python tools/plot_metrics.py {os.path.join('output', run.name)}" in out
    assert "best: top-1" in out and "done: 1 epochs" in out


@pytest.mark.slow
def test_the_demo_run_folder_is_named_with_the_demos_size(tmp_path):
    args = parse_args(["--output", str(tmp_path)])  # no --data_path: the demo, at 64 px
    assert args.img_size == 64 and args.run_dir.endswith("-resnet50.gluon_in1k-64")
    args = parse_args(["--output", str(tmp_path), "--img-size", "96", "--epochs", "3"])
    assert (args.img_size, args.epochs, args.batch_size) == (96, 3, 32) and args.run_dir.endswith("-96")
    args = parse_args(["--output", str(tmp_path), "--data_path", str(tmp_path)])
    assert args.img_size == 224 and args.run_dir.endswith("-224")  # real data: the recipe's size


def test_no_output_saves_nothing_and_says_so(demo_shards, tmp_path, capsys):
    code, out, _ = run_main(["--data_path", str(demo_shards), *SMALL, "--epochs", "1", "--warmup-epochs", "0",
                             "--no-output"], capsys)
    assert code == 0 and "output: none (--no-output)" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_experiment_folder_holding_a_run_is_refused_unless_resumed(demo_shards, tmp_path, capsys):
    args = ["--data_path", str(demo_shards), *SMALL, "--epochs", "1", "--warmup-epochs", "0",
            *run_folder(tmp_path / "exp")]
    assert run_main(args, capsys)[0] == 0
    metrics = (tmp_path / "exp" / "metrics.jsonl").read_bytes()
    code, _, err = run_main(args, capsys)
    assert code == 2 and "already holds a run: pass --auto-resume" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "exp" / "metrics.jsonl").read_bytes() == metrics
    code, out, _ = run_main([*args, "--auto-resume"], capsys)
    assert code == 0 and "has already finished all 1 epochs" in out


@pytest.mark.slow
def test_tensorboard_events_of_a_real_run(first_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, run, _ = first_run
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    train_rows = [r for r in read_metrics(run) if r["kind"] == "train"]
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in loss] == [r["step"] for r in train_rows]
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in train_rows], rel=1e-5)
    val = [r["top1"] for r in read_metrics(run) if r["kind"] == "val"]
    assert [e.value for e in acc.Scalars("val/top1")] == pytest.approx(val) and len(val) == 2


def test_args_yaml_round_trips_and_a_timm_config_loads(tmp_path, capsys):
    args = parse_args(["--epochs", "7", "--mixup", "0.2", "-b", "64", *run_folder(tmp_path / "a"), "--no-val"])
    from engine.resolved import NOT_FLAGS, plain_config
    (tmp_path / "args.yaml").write_text(yaml.safe_dump({k: v for k, v in plain_config(args).items()
                                                        if k not in NOT_FLAGS}))
    again = parse_args(["-c", str(tmp_path / "args.yaml"), "--experiment", "b"])
    for key in ("epochs", "mixup", "batch_size", "no_val", "seed", "lr_base"):
        assert getattr(again, key) == getattr(args, key), key
    # timm's train.py writes data_dir, '' for unset values, and settings we do not have
    (tmp_path / "timm.yaml").write_text("data_dir: /data/wds\nmodel: resnet10t\nopt: momentum\ninterpolation: ''\n"
                                        "lr: null\nlayer_decay: 0.7\nhflip: 0.3\nepochs: 3\n")
    timm_args = parse_args(["-c", str(tmp_path / "timm.yaml"), "--output", str(tmp_path)])
    assert (timm_args.data_path, timm_args.model, timm_args.opt, timm_args.epochs) == ("/data/wds", "resnet10t",
                                                                                        "momentum", 3)
    assert timm_args.interpolation is None and timm_args.lr is None  # unset in timm's file: ours (the model's)
    assert timm_args.hflip == 0.3  # a timm option this trainer has: applied
    assert "ignoring timm settings this trainer does not have: layer_decay" in " ".join(timm_args.notes)


@pytest.mark.slow
def test_warnings_for_a_warmup_that_never_ends_and_shards_without_validation(demo_shards, tmp_path, capsys):
    args = parse_args(["--epochs", "2", "--warmup-epochs", "3", "--no-output"])
    assert any("never leaves its warmup" in n for n in args.notes)
    import shutil
    root = tmp_path / "wds"
    shutil.copytree(demo_shards, root)
    info = json.loads((root / "_info.json").read_text())
    del info["splits"]["validation"]
    (root / "_info.json").write_text(json.dumps(info))
    code, out, _ = run_main(["--data_path", str(root), *SMALL, "--epochs", "1", "--performance", "--perf-steps", "1",
                             "--perf-warmup", "0"], capsys)
    assert code == 0 and "no validation split" not in out  # a performance run does not validate anyway
    code, out, _ = run_main(["--data_path", str(root), *SMALL, "--epochs", "1", "--no-output"], capsys)
    assert code == 0 and "has no validation split: no validation and no best.pth" in out


@pytest.mark.slow
def test_a_checkpoint_loads_into_timm_for_any_class_count(demo_shards, first_run):
    """The README's snippet: the class count is in the checkpoint."""
    import timm
    ckpt = torch.load(first_run[1] / "last.pth", weights_only=True)
    info = json.loads((demo_shards / "_info.json").read_text())
    assert ckpt["num_classes"] == 6 and ckpt["classes"] == info["classes"]
    model = timm.create_model(ckpt["config"]["model"], num_classes=ckpt["num_classes"])
    model.load_state_dict(ckpt["model"])


# ---------------------------------------------------------------- refused at once
FAST = """
import sys
sys.path.insert(0, {root!r})
from engine.cli import main
code = main({argv!r})
print("torch loaded:", "torch" in sys.modules, "timm loaded:", "timm" in sys.modules)
sys.exit(code)
"""


@pytest.mark.parametrize("argv,message", [
    (["-b", "0"], "--batch-size must be at least 1"),
    (["--stop-after", "0"], "--stop-after must be at least 1"),
    (["--resume", "/no/such/last.pth"], "--resume /no/such/last.pth does not exist"),
    (["--model", "resnet5O"], "unknown model 'resnet5O'"),
    (["--experiment", "a/b"], "must be a plain folder name"),
])
def test_bad_flags_are_refused_before_torch_or_timm_load(argv, message, tmp_path):
    """The checks run before the heavy imports (seconds), not after the workers start."""
    registry_cache = tmp_path / "cache"
    env = dict(os.environ, XDG_CACHE_HOME=str(registry_cache))
    if "--model" in argv:  # a previous run left timm's model list in the cache
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); "
                        "from model.registry import write_cache; write_cache()"], env=env, check=True)
    r = subprocess.run([sys.executable, "-c", FAST.format(root=ROOT, argv=argv)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "torch loaded: False timm loaded: False" in r.stdout


def test_model_names_checked_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert registry.unknown_model_message("no_such_net") is None  # no cache yet: left to timm
    registry.write_cache()
    assert registry.unknown_model_message("resnet10t") is None
    assert registry.unknown_model_message("gluon_resnet50_v1b") is None  # the port's name
    assert registry.unknown_model_message("resnet50.gluon_in1k") is None
    assert "did you mean resnet50" in registry.unknown_model_message("resnet5O")


def test_every_flag_has_a_description_and_one_default():
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
    assert "(default: None)" not in text and "/" + "work" not in text  # no clone path in --help
    blocks = text.split("\n  -")
    assert all(b.count("(default") <= 1 for b in blocks), [b for b in blocks if b.count("(default") > 1]


def test_an_unreachable_http_data_path_is_one_short_line(capsys):
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = run_main(["--data_path", f"http://127.0.0.1:{port}/", "--io-retries", "0", "--io-timeout", "2",
                             "--no-output"], capsys)
    line = err.strip()
    assert code == 2 and "\n" not in line and len(line) < 250 and f"http://127.0.0.1:{port}/" in line, line
