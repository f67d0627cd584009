"""tools/plot_metrics.py: a valid PNG from a metrics file, and one-line errors."""
import json
import math
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
    path = _write_run(tmp_path, extra_lines=[json.dumps({"kind": "train", "epoch": 0, "step": 4, "loss": 9.0,
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


def _write_resumed(folder: Path, steps=(10, 5), stop=25, log=1):
    """-b 32 for two epochs and half of the third (10 steps per epoch), stopped at step `stop`;
    resumed with -b 64 (5 steps per epoch) at the start of the next epoch, as the trainer does
    when the plan changed. The global steps jump back from 25 to 16."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for seg, (spe, batch) in enumerate(zip(steps, (32, 64))):
        lines.append(json.dumps({"kind": "config", "batch_size": batch, "time": 100.0 * seg}))
        epochs = range(0, 3) if seg == 0 else range(3, 5)
        for epoch in epochs:
            for i in range(spe):
                step = epoch * spe + i + 1
                if seg == 0 and step > stop:
                    break
                if (i + 1) % log == 0 or i + 1 == spe:
                    e = epoch + (i + 1) / spe
                    lines.append(json.dumps({"kind": "train", "epoch": epoch, "step": step, "loss": 3.0 / (1 + e),
                                             "lr": 0.1, "img_per_s": 100.0, "data_wait": 0.1, "time": 10.0 * e}))
            else:
                lines.append(json.dumps({"kind": "val", "epoch": epoch, "step": (epoch + 1) * spe,
                                         "top1": 10.0 * (epoch + 1), "top5": 50.0, "loss": 2.0, "time": 10.0 * epoch}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _train_line(ax):
    return next(line for line in ax.lines if line.get_label().endswith("train (mean per log interval)"))


def test_a_resume_with_another_batch_size_is_drawn_against_epochs_with_a_break(tmp_path):
    _write_resumed(tmp_path / "resumed")
    fig = _figure(tmp_path, tmp_path / "resumed")
    loss, acc = _panel(fig, "loss"), _panel(fig, "validation accuracy")
    xs = list(_train_line(loss).get_xdata())
    gap = [i for i, v in enumerate(xs) if math.isnan(v)]
    assert len(gap) == 1  # one break, where the rest of epoch 2 was skipped
    before, after = xs[gap[0] - 1], xs[gap[0] + 1]
    assert before == pytest.approx(2.5) and after == pytest.approx(3.2)
    points = [v for v in xs if not math.isnan(v)]
    assert points == sorted(points) and len(set(points)) == len(points)  # monotone: no jump back
    assert points[-1] == pytest.approx(5.0)
    assert list(acc.lines[0].get_xdata()) == [1, 2, 4, 5]  # each validation at its epoch's end
    assert loss.get_xlabel() == "epoch"
    notes = _panel(fig, "").texts[0].get_text()
    assert "resumed with 10 -> 5 steps per epoch:\n  x axis in epochs" in notes
    # resumed at the end of an epoch: nothing skipped, one unbroken curve
    _write_resumed(tmp_path / "at_end", stop=30)
    xs = list(_train_line(_panel(_figure(tmp_path, tmp_path / "at_end"), "loss")).get_xdata())
    assert not any(math.isnan(v) for v in xs) and xs == sorted(xs)


def test_same_batch_size_keeps_the_global_step_axis(tmp_path):
    _write_resumed(tmp_path / "same", steps=(10, 10), stop=30)
    loss = _panel(_figure(tmp_path, tmp_path / "same"), "loss")
    assert loss.get_xlabel() == "global step"
    xs = list(_train_line(loss).get_xdata())
    assert xs == list(range(1, 51))
    # stopped mid-epoch and resumed at the next epoch (another -j): the skipped steps are a gap
    _write_resumed(tmp_path / "skipped", steps=(10, 10), stop=25)
    xs = list(_train_line(_panel(_figure(tmp_path, tmp_path / "skipped"), "loss")).get_xdata())
    assert xs[:25] == list(range(1, 26)) and math.isnan(xs[25]) and xs[26:] == list(range(31, 51))


def test_best_labels_inside_the_axes_apart_and_plain_loss_ticks(tmp_path):
    _write_run(tmp_path / "ref")
    _write_resumed(tmp_path / "resumed")
    fig = _figure(tmp_path, tmp_path / "ref", tmp_path / "resumed")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    acc, loss = _panel(fig, "validation accuracy"), _panel(fig, "loss")
    box = acc.get_window_extent(renderer)
    labels = [t for t in acc.texts if "best" in t.get_text()]
    assert [t.get_text() for t in labels] == ["ref: best 50.0% (epoch 2)", "resumed: best 50.0% (epoch 4)"]
    extents = [t.get_window_extent(renderer) for t in labels]
    for e in extents:
        assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1
    assert not extents[0].overlaps(extents[1])
    assert acc.get_xlabel() == "epoch"  # one run needs epochs: both are drawn against them
    ticks = [t.get_text() for t in loss.get_yticklabels(minor=False) + loss.get_yticklabels(minor=True)
             if t.get_text()]
    assert ticks and loss.get_yscale() == "log"
    for text in ticks:
        float(text)  # plain decimals: no "2.4x10^0" mathtext
