"""Where a run's files go: one folder per run, never another run's (timm's convention).

    --output DIR (default: output)  ->  DIR/<YYYYmmdd-HHMMSS>-<model>-<img_size>/
    --output DIR --experiment NAME  ->  DIR/NAME/            (refused if it holds a run, unless resumed)
    --resume DIR/RUN/last.pth       ->  DIR/RUN/             (the resumed run's own folder)
    --auto-resume                   ->  continue DIR/NAME with --experiment, else the newest run
                                        under DIR that has a last.pth; a new folder when there is none
    --no-output                     ->  nothing is saved (said at the start)
A --performance run saves nothing unless --output is given. Pure path logic, no torch: it runs
with the other checks, before anything slow.
"""
from __future__ import annotations

import os
import re
import time

from common.errors import ConfigError

DEFAULT_ROOT = "output"
RUN_FILES = ("last.pth", "best.pth", "metrics.jsonl", "config.json", "args.yaml", "summary.csv")


def run_name(model: str, img_size: int, now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}-{img_size}"


def holds_run(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in RUN_FILES)


def newest_run(root: str) -> str | None:
    """The most recently written run folder under root that has a last.pth."""
    try:
        runs = [e.path for e in os.scandir(root) if e.is_dir() and os.path.isfile(os.path.join(e.path, "last.pth"))]
    except OSError:
        return None
    return max(runs, key=lambda p: os.path.getmtime(os.path.join(p, "last.pth")), default=None)


def _unique(path: str) -> str:
    """path, or path-1, path-2, ... when a run of the same second exists (timm's get_outdir)."""
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def resolve(args) -> list[str]:
    """Set args.run_dir (None: save nothing) and, for --auto-resume, args.resume. Returns the
    lines to tell the user (rank 0 prints them)."""
    notes = []
    if args.no_output:
        if args.output or args.experiment or args.auto_resume:
            raise ConfigError("--no-output saves nothing: it cannot be combined with --output, --experiment "
                              "or --auto-resume")
        args.run_dir = None
        return ["output: none (--no-output): no metrics, checkpoints or logs are saved"]
    root = args.output or (None if args.performance else DEFAULT_ROOT)
    if root is None:
        args.run_dir = None
        return notes
    name = args.experiment
    if name is not None and (not name or os.sep in name or name in (".", "..")):
        raise ConfigError(f"--experiment {args.experiment!r} must be a plain folder name")
    if args.resume:
        args.run_dir = (os.path.join(root, args.experiment) if args.experiment
                        else os.path.dirname(os.path.abspath(args.resume)))
    elif args.experiment:
        args.run_dir = os.path.join(root, args.experiment)
        last = os.path.join(args.run_dir, "last.pth")
        if args.auto_resume and os.path.isfile(last):
            args.resume = last
            notes.append(f"auto-resume: continuing {last}")
        elif holds_run(args.run_dir):
            raise ConfigError(f"{args.run_dir} already holds a run: pass --auto-resume (or --resume "
                              f"{last}) to continue it, or choose another --experiment")
    else:
        found = newest_run(root) if args.auto_resume else None
        if found:
            args.run_dir, args.resume = found, os.path.join(found, "last.pth")
            notes.append(f"auto-resume: continuing {args.resume}")
        else:
            args.run_dir = _unique(os.path.join(root, run_name(args.model, args.img_size)))
    notes.insert(0, f"output: {args.run_dir}")
    return notes
