"""Live views of a run beside metrics.jsonl: TensorBoard, Weights & Biases, timm's summary.csv.

Rank 0 only. TensorBoard is on by default when the `tensorboard` package is installed
(`--no-tensorboard` turns it off); W&B only with `--log-wandb` (and the `wandb` package).
summary.csv has timm's columns (epoch, train_loss, eval_loss, eval_top1, eval_top5, lr), one row
per epoch, so timm users' scripts read it unchanged.
"""
from __future__ import annotations

import csv
import importlib.util
import logging
import os

from common.errors import ConfigError

log = logging.getLogger("engine")
SUMMARY_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class Monitor:
    def __init__(self, output: str | None, main: bool, config: dict, *, tensorboard: bool | None = None,
                 wandb: bool = False, project: str | None = None, resume: bool = False):
        self.output = output if main else None
        self.tb = self.wandb = None
        if not self.output:
            return
        if tensorboard is None:
            tensorboard = tensorboard_available()
        if tensorboard:
            if not tensorboard_available():
                raise ConfigError("--tensorboard needs the tensorboard package (pip install tensorboard)")
            from torch.utils.tensorboard import SummaryWriter
            # absolute: the writer's thread opens its file later, wherever the process's cwd is then
            self.tb = SummaryWriter(log_dir=os.path.abspath(os.path.join(self.output, "tensorboard")))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise ConfigError("--log-wandb needs the wandb package (pip install wandb)") from None
            self.wandb = wandb_module
            self.wandb.init(project=project or "stream-imagenet", name=os.path.basename(self.output),
                            dir=self.output, config=config, resume="allow" if resume else None)

    @property
    def summary_path(self) -> str | None:
        return os.path.join(self.output, "summary.csv") if self.output else None

    def train(self, step: int, **scalars) -> None:
        self._scalars("train", step, scalars)

    def val(self, step: int, prefix: str = "val", **scalars) -> None:
        self._scalars(prefix, step, scalars)

    def _scalars(self, prefix: str, step: int, scalars: dict) -> None:
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)

    def epoch(self, epoch: int, train_loss: float | None, val: dict | None, lr: float) -> None:
        """One summary.csv row (timm's update_summary columns); rows of epochs >= this one that a
        resumed run wrote before are replaced."""
        if not self.output:
            return
        row = {"epoch": epoch, "train_loss": train_loss, "eval_loss": val and val["loss"],
               "eval_top1": val and val["top1"], "eval_top5": val and val["top5"], "lr": lr}
        rows = []
        if os.path.isfile(self.summary_path):
            with open(self.summary_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit() and int(r["epoch"]) < epoch]
        rows.append(row)
        with open(self.summary_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
