#!/usr/bin/env python3
"""Draw the training curves of one or more runs to a PNG: loss, accuracy, LR, speed, data wait.

    python tools/plot_metrics.py output/demo                  # reads output/demo/metrics.jsonl
    python tools/plot_metrics.py output/demo/metrics.jsonl -o curves.png
    python tools/plot_metrics.py runs/ref runs/fast --x time -o compare.png   # overlay two runs

Input: the JSON-lines file train_stream.py writes, one object per line. Used kinds:
  {"kind": "train", "epoch", "step" (global), "loss", "lr", "img_per_s", "data_wait", "time"}
  {"kind": "val",   "epoch", "step", "top1", "top5", "loss", "time"}
Other kinds are ignored; malformed lines are skipped and counted. When a resumed run rewrites
steps or epochs, the later line wins. Every panel shares one x-axis: the global step (default),
the epoch, or the minutes since the run's first line (`--x time`, for time-to-accuracy
comparisons). A resume with another batch size renumbers the global steps: such a run is drawn
against epochs (step / that process's steps per epoch), and a curve breaks where a resume
skipped the rest of an epoch. Train loss is the mean over each log interval; validation loss is over the whole
validation set. Output (default: metrics.png beside the first input): 6 panels, 1200x800 pixels.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

METRICS_FILENAME = "metrics.jsonl"
FIGSIZE, DPI = (12, 8), 100  # 1200 x 800 pixels
X_LABELS = {"step": "global step", "epoch": "epoch", "time": "minutes since start"}


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
    """(train rows sorted by epoch and step, val rows sorted by epoch, number of skipped lines).

    Each row gets `_segment`: which process wrote it (a `config` line starts a process; a resume
    appends a new one), and `_batch`: that process's batch size, when its config line says.
    """
    train, val, skipped, lines = {}, {}, 0, 0
    segment, batch, used = 0, None, False
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
                continue
            kind = row.get("kind")
            if kind == "config":
                segment, used = segment + used, False
                batch = row.get("batch_size") if _number(row, "batch_size") else None
            elif kind == "train":
                if _number(row, "step") and _number(row, "loss"):
                    # a resume with another batch size numbers its steps anew: (epoch, step) is unique
                    epoch = row["epoch"] if _number(row, "epoch") else -1
                    train[(epoch, row["step"])] = dict(row, _segment=segment, _batch=batch)
                    used = True
                else:
                    skipped += 1
            elif kind == "val":
                if _number(row, "epoch") and _number(row, "top1"):
                    val[row["epoch"]] = dict(row, _segment=segment, _batch=batch)
                    used = True
                else:
                    skipped += 1
    if lines == 0:
        raise MetricsError(f"metrics file {path} is empty")
    if not train and not val:
        raise MetricsError(f"metrics file {path} has no usable train or val lines "
                           f"({skipped} of {lines} lines malformed)")
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)], skipped


def steps_per_epoch(train: list[dict], val: list[dict]) -> dict:
    """{segment: steps per epoch}. A row's global step is epoch * steps_per_epoch + steps done in
    the epoch, with the steps per epoch of the process that wrote it: exact from a validation row
    (written at the epoch's end) or from an epoch's last training row (always logged) when a later
    epoch follows; else scaled from another segment by the batch sizes; else the smallest value
    the rows allow."""
    exact = {}
    for r in val:
        if _number(r, "step") and r["step"] > 0:
            exact.setdefault(r["_segment"], r["step"] / (r["epoch"] + 1))
    last = {}
    for r in train:
        if _number(r, "epoch"):
            key = (r["_segment"], r["epoch"])
            last[key] = max(last.get(key, 0), r["step"])
    for (seg, epoch), step in last.items():
        if any(s == seg and e > epoch for s, e in last):
            exact.setdefault(seg, step / (epoch + 1))
    out = dict(exact)
    for seg in {r["_segment"] for r in train} - set(exact):
        batch = next((r["_batch"] for r in train if r["_segment"] == seg), None)
        known = [(s, next((r["_batch"] for r in train + val if r["_segment"] == s), None)) for s in exact]
        known = [(s, b) for s, b in known if b and batch]
        if known:
            s, b = min(known, key=lambda k: abs(k[0] - seg))  # the nearest process with a known size
            out[seg] = exact[s] * b / batch
        else:
            out[seg] = max((step / (epoch + 1) for (s, epoch), step in last.items() if s == seg), default=None)
    return out


class Run:
    """One run's rows with its x positions in the chosen unit.

    x='step' plots the global step, unless a resume changed the steps per epoch (another batch
    size or number of processes renumbers the steps): then the run is plotted against epochs,
    which stay monotone. The training curves break where steps were skipped (a resume that
    started at the next epoch), instead of a line drawn across the gap.
    """

    def __init__(self, label: str, train: list[dict], val: list[dict], x: str):
        self.label, self.train, self.val = label, train, val
        times = [r["time"] for r in train + val if _number(r, "time")]
        self.t0 = min(times) if times else 0.0
        for r in train + val:
            r.setdefault("_segment", 0)
            r.setdefault("_batch", None)
        self.spe = steps_per_epoch(train, val)
        sizes = sorted({round(v, 6) for v in self.spe.values() if v})
        self.note = ""
        if x == "step" and len(sizes) > 1:
            order = [round(self.spe[s]) for s in sorted(self.spe) if self.spe[s]]
            self.note = f"resumed with {' -> '.join(map(str, order))} steps per epoch"
            x = "epoch"
        self.set_x(x)
        self.breaks = self._breaks()

    def set_x(self, x: str) -> None:
        self.x = x
        self.train_x = [self._pos(r, False) for r in self.train]
        self.val_x = [self._pos(r, True) for r in self.val]

    def _epochs(self, row: dict):
        spe = self.spe.get(row["_segment"])
        return row["step"] / spe if spe and _number(row, "step") else None

    def _pos(self, row: dict, is_val: bool):
        if self.x == "time":
            return (row["time"] - self.t0) / 60 if _number(row, "time") else None
        if self.x == "epoch":
            if is_val:
                return row["epoch"] + 1  # validation happens at the end of its epoch
            return self._epochs(row)
        return row.get("step") if _number(row, "step") else None

    def _breaks(self) -> set:
        """Indices of training rows that follow a gap: a new process that did not continue where
        the previous one stopped (it started at a later epoch than the last row's, which was
        not at its epoch's end)."""
        out = set()
        for i in range(1, len(self.train)):
            a, b = self.train[i - 1], self.train[i]
            if a["_segment"] == b["_segment"] or not (_number(a, "epoch") and _number(b, "epoch")):
                continue
            spe = self.spe.get(a["_segment"])
            at_end = bool(spe) and abs(a["step"] - (a["epoch"] + 1) * spe) < 1e-6
            if b["epoch"] > a["epoch"] + (1 if at_end else 0):
                out.add(i)
        return out

    def series(self, key: str, val: bool = False):
        """(xs, ys); for training rows a NaN point at each gap, where matplotlib breaks the line."""
        rows, xs = (self.val, self.val_x) if val else (self.train, self.train_x)
        out_x, out_y = [], []
        for i, (x, r) in enumerate(zip(xs, rows)):
            if x is None or not _number(r, key):
                continue
            if not val and i in self.breaks and out_x:
                out_x.append(math.nan)
                out_y.append(math.nan)
            out_x.append(x)
            out_y.append(r[key])
        return out_x, out_y

    def best(self):
        """(x, top1, epoch) of the best validation epoch, or None."""
        pts = [(x, r["top1"], r["epoch"]) for x, r in zip(self.val_x, self.val) if x is not None]
        return max(pts, key=lambda p: p[1]) if pts else None

    def summary(self) -> str:
        lines = [self.label] + ([f"  {self.note}:", "  x axis in epochs"] if self.note else [])
        best = self.best()
        if best:
            lines.append(f"  best top-1 {best[1]:.2f}% (epoch {best[2]})")
            lines.append(f"  last top-1 {self.val[-1]['top1']:.2f}% (epoch {self.val[-1]['epoch']})")
        times = [r["time"] for r in self.train + self.val if _number(r, "time")]
        if len(times) > 1:
            lines.append(f"  {(max(times) - min(times)) / 60:.1f} min from first to last line")
        for key, name, fmt in (("img_per_s", "images/s", "{:,.0f}"), ("data_wait", "data wait", "{:.1%}")):
            values = [r[key] for r in self.train if _number(r, key)]
            if values:
                lines.append(f"  mean {name} {fmt.format(sum(values) / len(values))}")
        return "\n".join(lines)


def make_figure(runs: list[Run], x: str = "step"):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        """matplotlib's choice of which log ticks to label, written as plain decimals (2, 0.5)
        instead of 2x10^0 or 1e-01."""

        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    units = {run.x for run in runs}
    if len(units) > 1:  # one x-axis for every run: epochs when any run cannot use steps
        for run in runs:
            run.set_x("epoch")
    x = runs[0].x if runs else x
    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI)
    (ax_loss, ax_acc, ax_lr), (ax_fps, ax_wait, ax_text) = axes
    several = len(runs) > 1
    for k, run in enumerate(runs):
        colour = f"C{k}"
        name = f"{run.label}: " if several else ""
        ax_loss.plot(*run.series("loss"), lw=1, color=colour, label=f"{name}train (mean per log interval)")
        xs, ys = run.series("loss", val=True)
        if xs:
            ax_loss.plot(xs, ys, "o--", color=colour, ms=4, label=f"{name}validation (whole set)")
        xs, ys = run.series("top1", val=True)
        if xs:
            ax_acc.plot(xs, ys, "o-", color=colour, ms=4, label=f"{name}top-1")
        if not several:
            xs, ys = run.series("top5", val=True)
            if xs:
                ax_acc.plot(xs, ys, "s:", color="C1", ms=3, label="top-5")
        best = run.best()
        if best:
            ax_acc.plot([best[0]], [best[1]], "*", color=colour, ms=14, zorder=5, clip_on=False)
            # inside the axes, bottom right (below a rising curve), one line higher per run
            ax_acc.text(0.98, 0.03 + 0.08 * k, f"{name}best {best[1]:.1f}% (epoch {best[2]})", ha="right",
                        va="bottom", fontsize=8, color=colour, transform=ax_acc.transAxes, zorder=6,
                        bbox=dict(boxstyle="round,pad=0.2", fc="white", ec=colour, alpha=0.85))
        ax_lr.plot(*run.series("lr"), lw=1, color=colour, label=run.label)
        ax_fps.plot(*run.series("img_per_s"), lw=1, color=colour, label=run.label)
        xs, ys = run.series("data_wait")
        ax_wait.plot(xs, [100 * y for y in ys], lw=1, color=colour, label=run.label)
    ax_loss.set(title="loss", ylabel="loss (log scale)")
    if any(line.get_ydata().size and (line.get_ydata() > 0).all() for line in ax_loss.lines):
        ax_loss.set_yscale("log")  # an early spike would flatten a linear axis
        ax_loss.yaxis.set_major_formatter(PlainLogFormatter(labelOnlyBase=False))
        ax_loss.yaxis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))
    ax_acc.set(title="validation accuracy", ylabel="%")
    ax_lr.set(title="learning rate", ylabel="LR")
    ax_fps.set(title="throughput", ylabel="images / s (global)")
    ax_wait.set(title="data wait", ylabel="% of step time waiting for data")
    ax_text.axis("off")
    ax_text.text(0.0, 1.0, "\n\n".join(r.summary() for r in runs), va="top", ha="left", fontsize=9,
                 family="monospace", transform=ax_text.transAxes)
    xmax = max([v for r in runs for v in r.train_x + r.val_x if v is not None], default=1.0)
    for ax in (ax_loss, ax_acc, ax_lr, ax_fps, ax_wait):
        ax.set_xlabel(X_LABELS[x])  # a run's reason for epochs is in its notes
        ax.set_xlim(0, xmax * 1.02 if xmax > 0 else 1.0)  # one x-axis for every panel, from 0
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in (ax_loss, ax_acc) + ((ax_lr, ax_fps, ax_wait) if several else ()):
        if ax.lines:
            ax.legend(fontsize=8, loc="upper left" if ax is ax_acc else "best")
    fig.tight_layout()
    return fig


def plot(runs: list[Run], out: str, x: str = "step") -> str:
    import matplotlib.pyplot as plt
    fig = make_figure(runs, x)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", metavar="PATH",
                    help=f"run output folder (holding {METRICS_FILENAME}) or a .jsonl file; several overlay")
    ap.add_argument("-o", "--output", help="PNG to write (default: metrics.png beside the first input)")
    ap.add_argument("--x", choices=tuple(X_LABELS), default="step", help="x-axis of every panel (default: step)")
    args = ap.parse_args(argv)
    runs, notes = [], []
    try:
        for path in args.paths:
            path = resolve_path(path)
            train, val, skipped = read_metrics(path)
            label = os.path.basename(os.path.dirname(os.path.abspath(path)))
            runs.append(Run(label, train, val, args.x))
            if skipped:
                notes.append(f"skipped {skipped} malformed lines")
    except (MetricsError, OSError) as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 1
    first = resolve_path(args.paths[0])
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(first)), "metrics.png")
    plot(runs, out, args.x)
    counts = "; ".join(f"{len(r.train)} train points, {len(r.val)} validation epochs" for r in runs)
    note = f", {', '.join(notes)}" if notes else ""
    print(f"wrote {out} ({counts}{note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
