"""Draw the training curves of a run to a PNG: loss, validation accuracy, LR and throughput.

    python tools/plot_metrics.py output/demo                  # reads output/demo/metrics.jsonl
    python tools/plot_metrics.py output/demo/metrics.jsonl -o curves.png

Input: the JSON-lines file train_stream.py writes, one object per line. Used kinds:
  {"kind": "train", "epoch", "step" (global), "loss", "lr", "img_per_s", "data_wait", "time"}
  {"kind": "val",   "epoch", "step", "top1", "top5", "loss", "time"}
Other kinds (config, perf, ...) are ignored; malformed lines are skipped and counted. When a
resumed run rewrites steps or epochs, the later line wins. Output (default: metrics.png beside
the input): 4 panels (train + validation loss, top-1/top-5, LR, img/s), 1200x800 pixels.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

METRICS_FILENAME = "metrics.jsonl"
FIGSIZE, DPI = (12, 8), 100  # 1200 x 800 pixels


class MetricsError(RuntimeError):
    """The metrics file cannot be plotted; the message is one line for the user."""


def _number(row: dict, key: str) -> bool:
    v = row.get(key)
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def resolve_path(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILENAME)
    if not os.path.isfile(path):
        raise MetricsError(f"no metrics file at {path}")
    return path


def read_metrics(path: str) -> tuple[list[dict], list[dict], int]:
    """(train rows sorted by step, val rows sorted by epoch, number of skipped lines)."""
    train, val, skipped, lines = {}, {}, 0, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            lines += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(row, dict):
                skipped += 1
            elif row.get("kind") == "train":
                if _number(row, "step") and _number(row, "loss"):
                    train[row["step"]] = row
                else:
                    skipped += 1
            elif row.get("kind") == "val":
                if _number(row, "epoch") and _number(row, "top1"):
                    val[row["epoch"]] = row
                else:
                    skipped += 1
    if lines == 0:
        raise MetricsError(f"metrics file {path} is empty")
    if not train and not val:
        raise MetricsError(f"metrics file {path} has no usable train or val lines "
                           f"({skipped} of {lines} lines malformed)")
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)], skipped


def _series(rows: list[dict], x: str, y: str):
    pts = [(r[x], r[y]) for r in rows if _number(r, x) and _number(r, y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(train: list[dict], val: list[dict], out: str, title: str = "") -> str:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=FIGSIZE, dpi=DPI)
    (ax_loss, ax_acc), (ax_lr, ax_fps) = axes
    ax_loss.plot(*_series(train, "step", "loss"), lw=1, label="train")
    xs, ys = _series(val, "step", "loss")
    if xs:
        ax_loss.plot(xs, ys, marker="o", label="validation")
    ax_loss.set(title="loss", xlabel="global step", ylabel="loss")
    for key in ("top1", "top5"):
        xs, ys = _series(val, "epoch", key)
        ax_acc.plot(xs, ys, marker="o", label=key)
    ax_acc.set(title="validation accuracy", xlabel="epoch", ylabel="%")
    ax_acc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.plot(*_series(train, "step", "lr"), lw=1)
    ax_lr.set(title="learning rate", xlabel="global step", ylabel="LR")
    ax_fps.plot(*_series(train, "step", "img_per_s"), lw=1)
    ax_fps.set(title="throughput", xlabel="global step", ylabel="images / s (global)")
    for ax in (ax_loss, ax_acc):
        if ax.lines:
            ax.legend()
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help=f"run output folder (holding {METRICS_FILENAME}) or a .jsonl file")
    ap.add_argument("-o", "--output", help="PNG to write (default: metrics.png beside the input)")
    args = ap.parse_args(argv)
    try:
        path = resolve_path(args.path)
        train, val, skipped = read_metrics(path)
    except (MetricsError, OSError) as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 1
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.png")
    plot(train, val, out, title=os.path.basename(os.path.dirname(os.path.abspath(path))))
    note = f", skipped {skipped} malformed lines" if skipped else ""
    print(f"wrote {out} ({len(train)} train points, {len(val)} validation epochs{note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
