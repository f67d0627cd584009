"""engine/monitor.py: TensorBoard event files read back, timm's summary.csv, W&B calls."""
import csv
import sys
import types

import pytest

from common.errors import ConfigError
from engine import monitor as monitor_mod
from engine.monitor import SUMMARY_COLUMNS, Monitor


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_and_summary_csv(tmp_path):
    pytest.importorskip("tensorboard")
    m = Monitor(str(tmp_path), main=True, config={"lr": 0.1})  # on by default when installed
    for step in (10, 20):
        m.train(step, loss=2.0 / step, lr=0.1, img_per_s=100.0 + step, data_wait=0.01)
    m.val(20, top1=55.5, top5=90.0, loss=1.25)
    m.epoch(0, 0.15, {"loss": 1.25, "top1": 55.5, "top5": 90.0}, 0.1)
    m.epoch(1, 0.10, None, 0.05)  # an epoch without validation
    m.close()
    events = read_events(tmp_path / "tensorboard")
    assert events["train/loss"] == [(10, pytest.approx(0.2)), (20, pytest.approx(0.1))]
    assert events["val/top1"] == [(20, pytest.approx(55.5))] and "train/img_per_s" in events
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == SUMMARY_COLUMNS
    assert [(r["epoch"], r["eval_top1"]) for r in rows] == [("0", "55.5"), ("1", "")]


def test_resumed_run_replaces_later_summary_rows(tmp_path):
    m = Monitor(str(tmp_path), main=True, config={}, tensorboard=False)
    for epoch in range(3):
        m.epoch(epoch, 1.0, None, 0.1)
    m = Monitor(str(tmp_path), main=True, config={}, tensorboard=False, resume=True)
    m.epoch(1, 0.5, None, 0.1)  # the run resumed after epoch 0
    with open(tmp_path / "summary.csv", newline="") as f:
        assert [(r["epoch"], r["train_loss"]) for r in csv.DictReader(f)] == [("0", "1.0"), ("1", "0.5")]


def test_only_rank_0_and_only_with_an_output_folder(tmp_path):
    for m in (Monitor(str(tmp_path), main=False, config={}), Monitor(None, main=True, config={})):
        m.train(1, loss=1.0)
        m.epoch(0, 1.0, None, 0.1)
        m.close()
    assert list(tmp_path.iterdir()) == []


def test_wandb_gets_the_config_and_every_scalar(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda data, step: calls.append(("log", data, step)),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    m = Monitor(str(tmp_path / "run"), main=True, config={"lr": 0.3}, tensorboard=False, wandb=True)
    m.train(5, loss=1.5)
    m.close()
    assert calls[0][0] == "init" and calls[0][1]["config"] == {"lr": 0.3} and calls[0][1]["name"] == "run"
    assert calls[1:] == [("log", {"train/loss": 1.5}, 5), ("finish",)]


def test_missing_packages_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(ConfigError, match="--log-wandb needs the wandb package"):
        Monitor(str(tmp_path), main=True, config={}, tensorboard=False, wandb=True)
    monkeypatch.setattr(monitor_mod, "tensorboard_available", lambda: False)
    assert Monitor(str(tmp_path), main=True, config={}).tb is None  # default: off without the package
    with pytest.raises(ConfigError, match="--tensorboard needs the tensorboard package"):
        Monitor(str(tmp_path), main=True, config={}, tensorboard=True)
