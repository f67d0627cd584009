"""What a run decides from its configuration when it starts, kept beside the frozen Config:
the run folder, the checkpoint --auto-resume found, the notes to print; and the rules that
derive a setting from several flags (mixup on, where colour jitter runs)."""
from __future__ import annotations

import os
from dataclasses import dataclass

from .config import Config


@dataclass(frozen=True)
class Resolved:
    """What a run decides from its Config before it starts: the run folder (None: save nothing),
    the checkpoint to resume (--resume, or the one --auto-resume found) and the lines to tell the
    user. Reads through to the config for everything else (`resolved.batch_size`)."""
    config: Config
    run_dir: str | None = None
    resume: str | None = None
    notes: tuple = ()

    def __getattr__(self, name):
        if name == "config":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.config, name)

    @property
    def demo(self) -> bool:
        return self.config.data.data_path is None and not self.config.data.synthetic

    @property
    def data_root(self) -> str | None:
        """--data_path, or the demo's shards without it (None: synthetic data); for an ImageFolder
        --data_path, the shards the run makes of it (engine/folder.py)."""
        if self.demo:
            return demo_path(self.config)
        from .folder import is_image_folder, shard_root
        path = self.config.data.data_path
        return shard_root(path, self.config.data.demo_dir) if is_image_folder(path) else path

    @property
    def image_folder(self) -> bool:
        return self.data_root != self.config.data.data_path and not self.demo


def demo_path(config: Config) -> str:
    return os.path.join(config.data.demo_dir, "demo-wds")


def resolve(config: Config, notes=()) -> Resolved:
    """The run folder, the resume path, the data path and the notes of `config`; nothing is written."""
    from .rundir import resolve_run_dir
    run_dir, resume, run_notes = resolve_run_dir(config)
    return Resolved(config, run_dir, resume, tuple(notes) + tuple(run_notes) + tuple(advice(config)))


def advice(config: Config) -> list[str]:
    """Warnings about flags that are allowed but probably not meant."""
    s = config.schedule
    if s.warmup_epochs >= s.epochs and not config.run.performance:
        return [f"warning: --warmup-epochs {s.warmup_epochs} >= --epochs {s.epochs}: the LR never leaves its warmup "
                "ramp and the peak LR is never reached; lower --warmup-epochs"]
    return []


def mixup_active(config) -> bool:
    """timm's train.py: mixup_active = mixup > 0 or cutmix > 0 or cutmix_minmax is not None."""
    return config.augment.mixup_active


def jitter_place(config, device_type: str) -> str | None:
    """Where colour jitter runs: 'device', 'workers', or None when it is off (0, or --aa as in timm).
    auto: the workers on a CPU-only run, where the batched version costs the training process
    more per image (BENCHMARKS.md, section "The reference recipe's augmentation in the loader"),
    else the device."""
    aug, data = config.augment, config.data
    if aug.color_jitter <= 0 or (aug.aa and "3a" not in aug.aa):  # timm keeps colour jitter with 3a
        return None
    if aug.jitter_in != "auto":
        return aug.jitter_in
    ours = data.loader == "ours" and data.decode != "gpu" and not data.synthetic
    return "workers" if ours and device_type == "cpu" else "device"


def plain_config(resolved) -> dict:
    """The run's settings as plain values (YAML/JSON-safe): every field, with the resolved resume
    checkpoint, and the run folder and notes (NOT_FLAGS)."""
    config = resolved.config if isinstance(resolved, Resolved) else resolved
    out = config.flat()
    if isinstance(resolved, Resolved):
        out.update(resume=resolved.resume, run_dir=resolved.run_dir,
                   notes=list(resolved.notes))
    for k, v in out.items():
        if isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (int, float, str, bool, type(None))) else str(x) for x in v]
        elif not isinstance(v, (int, float, str, bool, type(None))):
            out[k] = str(v)
    return out


NOT_FLAGS = ("notes", "run_dir")  # resolved, not set by the user
