"""tools/plot_metrics.py: a valid PNG from a metrics file, and one-line errors."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tools.plot_metrics import main, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def _png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _write_run(folder: Path, extra_lines=()):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"kind": "config", "model": "resnet10t", "lr": 0.1})]
    step = 0
    for epoch in range(3):
        for _ in range(5):
            lines.append(json.dumps({"kind": "train", "epoch": epoch, "step": step, "loss": 2.0 / (1 + step),
                                     "lr": 0.1 * (step + 1) / 15, "img_per_s": 900.0 + step,
                                     "data_wait": 0.05, "time": 1.0 * step}))
            step += 1
        lines.append(json.dumps({"kind": "val", "epoch": epoch, "step": step, "top1": 30.0 + 10 * epoch,
                                 "top5": 70.0 + 5 * epoch, "loss": 1.5 - 0.2 * epoch, "time": 1.0 * step}))
    lines.append(json.dumps({"kind": "perf", "fps": 1234.5}))
    lines.extend(extra_lines)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "metrics.jsonl"


def test_png_from_output_dir(tmp_path, capsys):
    _write_run(tmp_path / "run", extra_lines=["{not json", '{"kind": "train", "step": 3}', "[1, 2]"])
    assert main([str(tmp_path / "run")]) == 0
    png = tmp_path / "run" / "metrics.png"
    assert png.stat().st_size > 10_000  # four drawn panels, not an empty canvas
    assert _png_size(png) == (1200, 800)
    out = capsys.readouterr().out
    assert "15 train points, 3 validation epochs, skipped 3 malformed lines" in out


def test_read_metrics_ignores_other_kinds_and_later_lines_win(tmp_path):
    path = _write_run(tmp_path, extra_lines=[json.dumps({"kind": "train", "epoch": 2, "step": 4, "loss": 9.0,
                                                         "lr": 0.1, "img_per_s": 1.0})])
    train, val, skipped = read_metrics(str(path))
    assert [r["step"] for r in train] == list(range(15)) and [r["epoch"] for r in val] == [0, 1, 2]
    assert train[4]["loss"] == 9.0 and skipped == 0


def test_cli_with_output_path(tmp_path):
    path = _write_run(tmp_path / "run")
    out = tmp_path / "curves.png"
    script = ROOT / "tools" / "plot_metrics.py"
    proc = subprocess.run([sys.executable, str(script), str(path), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _png_size(out) == (1200, 800)


@pytest.mark.parametrize("content,message", [
    (None, "no metrics file at"),
    ("", "is empty"),
    ("\n\n", "is empty"),
    ("garbage\n{\"kind\": \"val\"}\n", "no usable train or val lines (2 of 2 lines malformed)"),
    (json.dumps({"kind": "config"}) + "\n", "no usable train or val lines"),
])
def test_errors_are_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "metrics.jsonl"
    if content is not None:
        path.write_text(content)
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("plot_metrics: error:")
    assert not (tmp_path / "metrics.png").exists()


def _figure(tmp_path, *folders, x="step"):
    from tools.plot_metrics import Run, make_figure
    runs = []
    for folder in folders:
        train, val, _ = read_metrics(str(folder / "metrics.jsonl"))
        runs.append(Run(folder.name, train, val, x))
    return make_figure(runs, x)


def _panel(fig, title):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def test_panels_share_one_x_axis_log_loss_best_mark_and_data_wait(tmp_path):
    _write_run(tmp_path / "run")
    fig = _figure(tmp_path, tmp_path / "run")
    loss, acc, wait = _panel(fig, "loss"), _panel(fig, "validation accuracy"), _panel(fig, "data wait")
    assert loss.get_yscale() == "log"
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [
        "train (mean per log interval)", "validation (whole set)"]
    assert {ax.get_xlabel() for ax in (loss, acc, wait)} == {"global step"}
    assert acc.get_xlim() == loss.get_xlim() == wait.get_xlim()
    assert list(acc.lines[0].get_xdata()) == [5, 10, 15]  # accuracy at its steps, not its epoch numbers
    assert any("best 50.0% (epoch 2)" in t.get_text() for t in acc.texts)
    assert list(wait.lines[0].get_ydata()) == [5.0] * 15  # percent of step time


def test_one_epoch_run_gets_a_sane_axis(tmp_path):
    folder = tmp_path / "short"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(json.dumps(
        {"kind": "val", "epoch": 0, "step": 31, "top1": 40.0, "top5": 80.0, "loss": 1.2, "time": 5.0}) + "\n")
    fig = _figure(tmp_path, folder)
    low, high = _panel(fig, "validation accuracy").get_xlim()
    assert low == 0 and high >= 31


def test_two_runs_overlay_against_time(tmp_path, capsys):
    _write_run(tmp_path / "ref")
    _write_run(tmp_path / "fast")
    fig = _figure(tmp_path, tmp_path / "ref", tmp_path / "fast", x="time")
    acc = _panel(fig, "validation accuracy")
    assert [line.get_label() for line in acc.lines if "top-1" in line.get_label()] == ["ref: top-1", "fast: top-1"]
    assert acc.get_xlabel() == "minutes since start" and acc.lines[0].get_xdata()[-1] == pytest.approx(15 / 60)
    out = tmp_path / "both.png"
    assert main([str(tmp_path / "ref"), str(tmp_path / "fast"), "--x", "epoch", "-o", str(out)]) == 0
    assert _png_size(out) == (1200, 800)
    assert "15 train points, 3 validation epochs; 15 train points" in capsys.readouterr().out
