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
