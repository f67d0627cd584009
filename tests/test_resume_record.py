"""The record of a resumed run equals the uninterrupted run's: the best epoch over all starts,
summary.csv (the interrupted epoch's train loss over all of its steps), the metrics the plot
reads; the first start's args.yaml and config.json are kept, each resume is recorded beside
them, and `-c args.yaml` reruns the run instead of resuming it."""
import csv
import json
import os
import signal

import pytest
import yaml
from conftest import SMALL, make_trainer, read_metrics, run_folder

from common.errors import Preempted
from engine.config import parse_args
from engine.metrics import read_history
from engine.rundir import keep_config
from engine.trainer import Trainer

STOP_AT = 20  # global step of the SIGTERM: epoch 1, inside a log window of 4 steps


def train(demo_shards, folder, extra=()):
    return make_trainer(["--data_path", str(demo_shards), *SMALL, "--epochs", "3", "--log-interval", "4",
                         *run_folder(folder), *extra])


def summary_rows(folder):
    with open(folder / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(demo_shards, tmp_path_factory):
    """(uninterrupted folder, its summary; resumed folder, its summary, the trainer that resumed,
    args.yaml and config.json as the first start wrote them)."""
    base = tmp_path_factory.mktemp("record")
    straight = base / "straight"
    want = train(demo_shards, straight).fit()
    run = base / "run"
    trainer = train(demo_shards, run)
    first = (run / "args.yaml").read_text(), (run / "config.json").read_text()
    step = Trainer.step

    def stop_at(self, images, labels, global_step, **kw):
        if global_step + 1 == STOP_AT:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, images, labels, global_step, **kw)
    try:
        Trainer.step = stop_at
        with pytest.raises(Preempted):
            trainer.fit()
    finally:
        Trainer.step = step
    resumed = train(demo_shards, run, ["--auto-resume"])
    got = resumed.fit()
    return straight, want, run, got, resumed, first


@pytest.mark.slow
def test_resumed_run_has_the_uninterrupted_record(runs):
    straight, want, run, got, resumed, _ = runs
    assert resumed.start.epoch == 1 and resumed.start.step > 0  # a mid-epoch resume
    assert [(e, k) for e, k, _ in resumed.history] == [(0, "val"), (1, "val"), (2, "val")]
    for key in ("best_epoch", "best_top1", "best_top5", "best_is_ema", "epochs"):
        assert got[key] == want[key], key
    assert summary_rows(run) == summary_rows(straight)  # every column exact, the resumed epoch's train_loss too
    keys = {"train": ("epoch", "step", "loss", "lr"), "val": ("epoch", "step", "top1", "top5", "loss", "n")}
    for kind, cols in keys.items():  # what tools/plot_metrics.py draws
        a = [tuple(r[c] for c in cols) for r in read_metrics(straight) if r["kind"] == kind]
        b = [tuple(r[c] for c in cols) for r in read_metrics(run) if r["kind"] == kind]
        assert a == b, kind
    summary = [r for r in read_metrics(run) if r["kind"] == "summary"]
    assert len(summary) == 1 and summary[0]["best_epoch"] == want["best_epoch"]


@pytest.mark.slow
def test_a_resume_keeps_the_settings_and_is_recorded(runs):
    _, _, run, _, _, (args_text, config_text) = runs
    assert (run / "args.yaml").read_text() == args_text and (run / "config.json").read_text() == config_text
    rows = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["resume"] == str(run / "last.pth") and rows[0]["changed"] == {}
    assert isinstance(rows[0]["time"], float) and isinstance(rows[0]["argv"], list)


@pytest.mark.slow
def test_args_yaml_of_a_run_reruns_it_in_a_new_folder(runs, tmp_path):
    _, _, run, _, _, _ = runs
    saved = yaml.safe_load((run / "args.yaml").read_text())
    assert not {"resume", "auto_resume", "experiment", "run_dir", "notes"} & set(saved)
    again = parse_args(["-c", str(run / "args.yaml"), "--output", str(tmp_path)])
    assert again.resume is None and again.run_dir != str(run) and os.path.dirname(again.run_dir) == str(tmp_path)
    for key in ("epochs", "batch_size", "lr", "model", "log_interval", "data_path"):
        assert getattr(again, key) == saved[key], key


def test_keep_config_writes_once_and_records_changes(tmp_path):
    config = {"epochs": 4, "batch_size": 32, "resume": None, "auto_resume": False, "experiment": "x"}
    keep_config(str(tmp_path), config, resumed=False)
    assert yaml.safe_load((tmp_path / "args.yaml").read_text()) == {"epochs": 4, "batch_size": 32}
    assert json.loads((tmp_path / "config.json").read_text()) == config
    keep_config(str(tmp_path), {**config, "batch_size": 16, "resume": "x/last.pth"}, resumed=True, argv=["t", "-b16"])
    keep_config(str(tmp_path), {**config, "resume": "x/last.pth"}, resumed=True, argv=["t"])
    assert yaml.safe_load((tmp_path / "args.yaml").read_text()) == {"epochs": 4, "batch_size": 32}
    assert json.loads((tmp_path / "config.json").read_text()) == config
    rows = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert [r["changed"] for r in rows] == [{"batch_size": [32, 16]}, {}]
    assert [r["argv"] for r in rows] == [["t", "-b16"], ["t"]]


def test_history_is_read_from_metrics_and_skips_incomplete_and_broken_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "val", "epoch": 0, "top1": 24.0, "top5": 80.0, "loss": 1.5, "n": 50, "complete": True},
            {"kind": "val", "epoch": 1, "top1": 99.0, "top5": 99.0, "loss": 1.0, "n": 3, "complete": False},
            {"kind": "train", "epoch": 1, "step": 3, "loss": 2.0},
            {"kind": "val_ema", "epoch": 1, "top1": 20.0, "top5": 70.0, "loss": 1.7, "n": 50}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"kind\": \"val\", \"epo")
    got = read_history(str(path))
    assert [(e, k, r["top1"]) for e, k, r in got] == [(0, "val", 24.0), (1, "val_ema", 20.0)]
    assert read_history(None) == [] and read_history(str(tmp_path / "none.jsonl")) == []
