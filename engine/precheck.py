"""Checks of the paths a command line names, made while parsing, before torch loads: a missing
data folder is refused in a second, not after the set-up. And the data path of a resumed run
when --data_path is left out: the one its checkpoint records (not the demo's)."""
from __future__ import annotations

import os

from common.errors import ConfigError


def check_paths(run) -> None:
    """The command line's local paths, before the set-up: --data_path, the run folder."""
    from .rundir import check_output_dir
    check_data_path(run.config.data.data_path)
    if run.run_dir:
        check_output_dir(run.run_dir)


def check_data_path(path: str | None) -> None:
    """A local --data_path must be a readable folder; remote roots and pipe: commands are
    checked when the data is opened."""
    from pipeline.info import is_remote
    if not path or is_remote(path) or path.startswith("file://"):
        return
    if not os.path.exists(path):
        raise ConfigError(f"--data_path {path} does not exist")
    if not os.path.isdir(path):
        raise ConfigError(f"--data_path {path} is not a folder (pass the folder that holds the shards and "
                          "_info.json)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"--data_path {path} is not readable by this user")


def recorded_data_path(checkpoint: str) -> tuple[str | None, str]:
    """(the data path the run of `checkpoint` trained on, the line that says so). None: it
    trained on the demo data or records nothing; refused when it cannot be used again."""
    config = _recorded_config(checkpoint)
    path = config.get("data_path") if isinstance(config, dict) else None
    if not isinstance(path, str) or not path:
        return None, ""
    if path.startswith("pipe:"):
        raise ConfigError(f"--resume {checkpoint}: its run read a 'pipe:' command, which is not rerun from a "
                          "checkpoint; pass --data_path")
    from pipeline.info import is_remote
    if not is_remote(path) and not os.path.isdir(path):
        raise ConfigError(f"--resume {checkpoint}: its run's data {path} is gone; pass --data_path")
    return path, f"data: {path} (recorded in {checkpoint}; --data_path overrides it)"


def _recorded_config(checkpoint: str) -> dict:
    """The `config` a checkpoint of ours records ({} for another file: the resume reports it).
    Memory-mapped: the tensors are not read."""
    if not os.path.isfile(checkpoint):  # refused by the configuration's checks, before torch loads
        return {}
    import argparse

    import torch
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: model.checkpoint.resume says why in one line
        return {}
    if not isinstance(ckpt, dict):
        return {}
    config = ckpt.get("config")
    return config if isinstance(config, dict) else {}
