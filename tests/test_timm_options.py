"""timm's training options at the library level: each against timm's own implementation
(the loss here; optimizers in test_optim.py, schedules in test_schedule.py)."""
import numpy as np
import pytest
import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from common.errors import ConfigError
from model.loss import create_loss, validation_loss
from pipeline.augment import Mixup


def _batch(n=8, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, classes, generator=g) * 3, torch.randint(0, classes, (n,), generator=g)


def _timm_train_loss(mixup, smoothing, bce, thresh=None, bce_sum=False, pos_weight=None):
    """timm 1.0 train.py's "setup loss function" (without the JSD branch)."""
    if mixup:
        if bce:
            return BinaryCrossEntropy(target_threshold=thresh, sum_classes=bce_sum, pos_weight=pos_weight)
        return SoftTargetCrossEntropy()
    if smoothing:
        if bce:
            return BinaryCrossEntropy(smoothing=smoothing, target_threshold=thresh, sum_classes=bce_sum,
                                      pos_weight=pos_weight)
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


def test_default_loss_is_the_reference_cross_entropy_and_equals_timm():
    x, y = _batch()
    loss, desc = create_loss(mixup=False, smoothing=0.1)
    assert type(loss) is nn.CrossEntropyLoss and loss.label_smoothing == 0.1  # unchanged reference path
    assert torch.equal(loss(x, y), nn.CrossEntropyLoss(label_smoothing=0.1)(x, y))
    torch.testing.assert_close(loss(x, y), _timm_train_loss(False, 0.1, False)(x, y), rtol=1e-6, atol=1e-6)
    assert loss(x, y) != nn.CrossEntropyLoss()(x, y)  # smoothing really applied
    plain, _ = create_loss(mixup=False, smoothing=0.0)
    assert torch.equal(plain(x, y), nn.CrossEntropyLoss()(x, y))
    assert "label smoothing 0.1" in desc
    assert type(validation_loss()) is nn.CrossEntropyLoss and validation_loss().label_smoothing == 0.0


@pytest.mark.parametrize("thresh,bce_sum,pos_weight", [(None, False, None), (0.2, False, None),
                                                       (None, True, 2.5), (0.05, True, 0.5)])
def test_bce_equals_timm_train_py_without_mixup(thresh, bce_sum, pos_weight):
    x, y = _batch()
    ours, desc = create_loss(mixup=False, smoothing=0.1, bce=True, bce_target_thresh=thresh, bce_sum=bce_sum,
                             bce_pos_weight=pos_weight)
    ref = _timm_train_loss(False, 0.1, True, thresh, bce_sum, pos_weight)
    assert torch.equal(ours(x, y), ref(x, y))
    # and what it means: BCE with logits on one-hot targets, off 0.1/10, on 0.9 + 0.01 (or binarised)
    target = torch.full((8, 10), 0.01).scatter_(1, y[:, None], 0.91)
    if thresh is not None:
        target = (target > thresh).float()
    pw = torch.tensor(pos_weight) if pos_weight is not None else None
    expected = nn.functional.binary_cross_entropy_with_logits(x, target, pos_weight=pw,
                                                              reduction="none" if bce_sum else "mean")
    expected = expected.sum(-1).mean() if bce_sum else expected
    torch.testing.assert_close(ours(x, y), expected)
    assert desc.startswith("timm BinaryCrossEntropy") and ("summed" in desc) is bce_sum


@pytest.mark.parametrize("bce,thresh", [(False, None), (True, None), (True, 0.2)])
def test_mixup_losses_equal_timm_on_our_mixed_targets(bce, thresh):
    """Our Mixup (smoothing inside the targets) feeds the loss timm's train.py would pick."""
    x = torch.rand(8, 3, 8, 8)
    _, y = _batch()
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    images, soft = mix(x.clone(), y, np.random.RandomState(3))
    assert soft.shape == (8, 10) and not torch.equal(soft.max(1).values, torch.full((8,), 0.91))  # mixed
    logits = nn.Conv2d(3, 10, 8)(images).flatten(1)
    ours, desc = create_loss(mixup=True, smoothing=0.1, bce=bce, bce_target_thresh=thresh)
    ref = _timm_train_loss(True, 0.1, bce, thresh)
    assert type(ours) is type(ref)
    assert torch.equal(ours(logits, soft), ref(logits, soft))
    ours(logits, soft).backward()  # a real training loss
    if bce and thresh is None:  # BCE on the soft targets as they are (smoothing already inside)
        torch.testing.assert_close(ours(logits, soft), nn.functional.binary_cross_entropy_with_logits(logits, soft))
    assert "in the mixed targets" in desc


def test_loss_option_errors():
    with pytest.raises(ConfigError, match="only to the BCE loss"):
        create_loss(mixup=False, smoothing=0.1, bce_target_thresh=0.2)
    with pytest.raises(ConfigError, match="positive weight must be > 0"):
        create_loss(mixup=False, smoothing=0.1, bce=True, bce_pos_weight=0.0)
    with pytest.raises(ConfigError, match=r"smoothing must be in \[0, 1\)"):
        create_loss(mixup=False, smoothing=1.0)
    # timm falls back to plain cross-entropy for BCE without smoothing; ours stays BCE
    x, y = _batch()
    bce0, _ = create_loss(mixup=False, smoothing=0.0, bce=True)
    assert isinstance(bce0, BinaryCrossEntropy)
    torch.testing.assert_close(bce0(x, y), nn.functional.binary_cross_entropy_with_logits(
        x, nn.functional.one_hot(y, 10).float()))
