"""The engine as a library: a run built and trained from Python, without argv, is the run the
command line makes, bit for bit."""
import pytest
import torch
from conftest import SMALL, read_metrics

from engine import Config, Trainer, build
from engine.cli import main


@pytest.mark.slow
def test_training_from_python_matches_the_command_line(demo_shards, tmp_path, capsys):
    config = Config.create(data_path=str(demo_shards), model="resnet10t", img_size=32, batch_size=8, workers=1,
                           log_interval=1, warmup_epochs=1, lr=0.05, shuffle_buffer=16, epochs=2,
                           output=str(tmp_path), experiment="python")
    summary = Trainer(build(config)).fit()
    assert summary["epochs_done"] == 2 and summary["run_dir"] == str(tmp_path / "python")
    assert summary["best_top1"] == max(r["top1"] for r in read_metrics(tmp_path / "python") if r["kind"] == "val")

    assert main(["--data_path", str(demo_shards), *SMALL, "--epochs", "2", "--output", str(tmp_path),
                 "--experiment", "cli"]) == 0
    capsys.readouterr()
    ours = torch.load(tmp_path / "python" / "last.pth", weights_only=True)["model"]
    theirs = torch.load(tmp_path / "cli" / "last.pth", weights_only=True)["model"]
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    losses = [[r["loss"] for r in read_metrics(tmp_path / run) if r["kind"] == "train"] for run in ("python", "cli")]
    assert losses[0] == losses[1] and len(losses[0]) > 0
