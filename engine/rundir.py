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


def check_output_dir(run_dir: str) -> None:
    """Refuse a run folder that cannot be made: a file on its path, or a folder not writable."""
    path = os.path.abspath(run_dir)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        raise ConfigError(f"--output: {path} is a file, not a folder (runs go into a folder; pass another "
                          "--output)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--output: cannot write in {path} (pass another --output)")


def resolve_run_dir(config) -> tuple[str | None, str | None, list[str]]:
    """(the run folder, None: save nothing; the checkpoint to resume; the lines to tell the user,
    rank 0 prints them) of a Config. Reads the file system, writes nothing."""
    out, run = config.outputs, config.run
    if out.no_output:  # with --output, --experiment or --auto-resume: refused by the Config
        return None, run.resume, ["output: none (--no-output): no metrics, checkpoints or logs are saved"]
    root = out.output or (None if run.performance else DEFAULT_ROOT)
    if root is None:
        return None, run.resume, []
    notes, resume = [], run.resume
    if resume:
        run_dir = os.path.join(root, out.experiment) if out.experiment else os.path.dirname(os.path.abspath(resume))
    elif out.experiment:
        run_dir = os.path.join(root, out.experiment)
        last = os.path.join(run_dir, "last.pth")
        if run.auto_resume and os.path.isfile(last):
            resume = last
            notes.append(f"auto-resume: continuing {last}")
        elif holds_run(run_dir):
            raise ConfigError(f"{run_dir} already holds a run: pass --auto-resume (or --resume "
                              f"{last}) to continue it, or choose another --experiment")
    else:
        found = newest_run(root) if run.auto_resume else None
        if found:
            run_dir, resume = found, os.path.join(found, "last.pth")
            notes.append(f"auto-resume: continuing {resume}")
        else:
            run_dir = _unique(os.path.join(root, run_name(config.network.model, config.data.img_size)))
    return run_dir, resume, [f"output: {run_dir}", *notes]


# ---------------------------------------------------------------- the run's settings, kept
RESUMES = "resumes.jsonl"
NOT_IN_ARGS = ("notes", "run_dir", "resume", "auto_resume", "experiment")  # would resume, or refuse, a rerun


def args_yaml(config: dict) -> dict:
    """The settings of args.yaml: `-c args.yaml` reruns the run in a new folder (no resume flags,
    no --experiment, which would name this run's folder)."""
    return {k: v for k, v in config.items() if k not in NOT_IN_ARGS}


def keep_config(run_dir: str, config: dict, resumed: bool, argv=None) -> None:
    """config.json and args.yaml of the run's first start; a resume leaves them as they are and
    appends a line to resumes.jsonl: time, command line, checkpoint and the settings it changed."""
    import json
    import sys

    import yaml
    os.makedirs(run_dir, exist_ok=True)
    config_path, args_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "args.yaml")
    original = None
    if resumed and os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                original = json.load(f)
        except (OSError, ValueError):
            original = None
    if original is None or not isinstance(original, dict):
        _write(config_path, json.dumps(config, indent=2))
    if not (resumed and os.path.isfile(args_path)):
        _write(args_path, yaml.safe_dump(args_yaml(config), sort_keys=False))
    if resumed:
        changed = {k: [original.get(k), v] for k, v in args_yaml(config).items()
                   if isinstance(original, dict) and original.get(k) != v}
        row = {"time": time.time(), "argv": list(sys.argv if argv is None else argv),
               "resume": config.get("resume"), "changed": changed}
        with open(os.path.join(run_dir, RESUMES), "a") as f:
            f.write(json.dumps(row) + "\n")


def _write(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
