#!/usr/bin/env python3
"""Time to a validation top-1 target, from the metrics.jsonl of one or more runs.

    python tools/time_to_accuracy.py RUN_DIR [RUN_DIR ...] --target 90 [--ema]

For each run: the wall-clock seconds from its start (the `config` row, written when training is
set up) to the end of the first validation that reached `--target` % top-1 (validation time
included, as in FFCV's published times), that epoch, the best top-1 and the run's total seconds.
A resumed run's pause would count as training time: compare runs that were not resumed. Last
stdout line: JSON, one entry per run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def read_rows(run: str) -> list[dict]:
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        raise SystemExit(f"time_to_accuracy: error: cannot read {path}: {e.strerror}") from None


def summarise(run: str, target: float, kind: str = "val") -> dict:
    rows = read_rows(run)
    start = next((r["time"] for r in rows if r.get("kind") == "config" and "time" in r), None)
    vals = [r for r in rows if r.get("kind") == kind]
    if start is None or not vals:
        raise SystemExit(f"time_to_accuracy: error: {run} has no start time or no {kind} rows "
                         "(a metrics.jsonl of train_stream.py with validation)")
    hit = next((r for r in vals if r["top1"] >= target), None)
    return {"run": run, "target": target, "seconds_to_target": round(hit["time"] - start, 1) if hit else None,
            "epoch_reached": hit["epoch"] if hit else None, "best_top1": round(max(r["top1"] for r in vals), 2),
            "total_seconds": round(max(r.get("time", start) for r in rows) - start, 1), "validations": len(vals)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output folder (or metrics.jsonl) of a run")
    p.add_argument("--target", type=float, required=True, help="validation top-1 in percent")
    p.add_argument("--ema", action="store_true", help="use the EMA's validation (kind val_ema)")
    args = p.parse_args(argv)
    results = [summarise(run, args.target, "val_ema" if args.ema else "val") for run in args.runs]
    for r in results:
        reached = (f"{r['seconds_to_target']:.1f} s (epoch {r['epoch_reached']})" if r["seconds_to_target"] is not None
                   else "not reached")
        print(f"{r['run']}: top-1 {args.target:g}% after {reached}; best {r['best_top1']:.2f}% "
              f"in {r['total_seconds']:.1f} s")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
