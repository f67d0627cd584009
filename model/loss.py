"""The training loss, chosen as timm's train.py chooses it (timm 1.0, "setup loss function").

- mixup/cutmix on: the targets are already soft (label smoothing is inside them, see
  pipeline/augment.py Mixup), so timm's `SoftTargetCrossEntropy`, or with `bce=True` its
  `BinaryCrossEntropy(target_threshold, sum_classes, pos_weight)` on those soft targets;
- otherwise with `bce=True`: `BinaryCrossEntropy(smoothing, target_threshold, sum_classes,
  pos_weight)`, which one-hot encodes the class indices with `smoothing / num_classes` off-values.
  timm falls back to plain cross-entropy when smoothing is 0; here BCE is BCE at any smoothing;
- otherwise torch's `CrossEntropyLoss(label_smoothing=smoothing)`: the reference run's loss,
  equal to timm's `LabelSmoothingCrossEntropy` up to float rounding (tests/test_timm_options.py)
  and to `nn.CrossEntropyLoss()` at smoothing 0.
Validation always uses plain cross-entropy (as timm's validate_loss_fn).
"""
from __future__ import annotations

from torch import nn

from common.errors import ConfigError


def create_loss(*, mixup: bool, smoothing: float, bce: bool = False, bce_target_thresh: float | None = None,
                bce_sum: bool = False, bce_pos_weight: float | None = None,
                device=None) -> tuple[nn.Module, str]:
    """The training criterion (on `device`: BCE's positive weight is a buffer) and a one-line
    description for the log."""
    if not 0.0 <= smoothing < 1.0:
        raise ConfigError(f"label smoothing must be in [0, 1) (got {smoothing})")
    if not bce and (bce_target_thresh is not None or bce_sum or bce_pos_weight is not None):
        raise ConfigError("the BCE target threshold, class sum and positive weight apply only to the BCE loss")
    if bce_pos_weight is not None and bce_pos_weight <= 0:
        raise ConfigError(f"the BCE positive weight must be > 0 (got {bce_pos_weight})")
    if bce:
        from timm.loss import BinaryCrossEntropy
        loss = BinaryCrossEntropy(smoothing=0.0 if mixup else smoothing, target_threshold=bce_target_thresh,
                                  sum_classes=bce_sum, pos_weight=bce_pos_weight)
        parts = [f"smoothing {smoothing:g} in the mixed targets" if mixup else f"smoothing {smoothing:g}"]
        parts += [f"targets > {bce_target_thresh:g} -> 1" if bce_target_thresh is not None else "",
                  "summed over classes" if bce_sum else "",
                  f"positive weight {bce_pos_weight:g}" if bce_pos_weight is not None else ""]
        return loss.to(device), f"timm BinaryCrossEntropy ({', '.join(p for p in parts if p)})"
    if mixup:
        from timm.loss import SoftTargetCrossEntropy
        return SoftTargetCrossEntropy(), f"timm SoftTargetCrossEntropy (smoothing {smoothing:g} in the mixed targets)"
    return nn.CrossEntropyLoss(label_smoothing=smoothing), f"cross-entropy, label smoothing {smoothing:g}"


def validation_loss() -> nn.Module:
    return nn.CrossEntropyLoss()
