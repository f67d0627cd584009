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
                             bce_pos_weight=pos_weight, device=torch.device("cpu"))
    if pos_weight is not None:
        assert ours.pos_weight.device.type == "cpu" and float(ours.pos_weight) == pos_weight
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


# ---- the train crop: --scale/--ratio/--hflip/--vflip ----

def _jpeg(w=300, h=200, seed=0):
    import io

    from PIL import Image
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((w, h), Image.BICUBIC).save(buf, format="JPEG", quality=95)
    return bytearray(buf.getvalue())


def test_train_crop_defaults_keep_the_reference_draws():
    """At timm's defaults the transform draws box, (mode), hflip and nothing more, as before."""
    import random

    from pipeline import transforms as T
    data = _jpeg()
    tf = T.TrainTransform(64, interpolation="random")
    assert (tf.scale, tf.ratio, tf.hflip, tf.vflip) == ((0.08, 1.0), (3 / 4, 4 / 3), 0.5, 0.0)
    flips = set()
    for seed in range(12):
        rng, ref_rng = random.Random(seed), random.Random(seed)
        out, ref = (torch.empty((64, 64, 3), dtype=torch.uint8) for _ in range(2))
        tf(data, out, rng)
        box, mode = T.rrc_box(300, 200, ref_rng), T.pick_interpolation("random", ref_rng)
        flip = ref_rng.random() < 0.5  # the reference run's transform: exactly these draws
        T.resize_into(*T.decode(data, lambda *_, b=box: b, (64, 64)), ref, flip, mode)
        assert torch.equal(out, ref)
        assert rng.random() == ref_rng.random()  # no extra draw (vflip 0 draws nothing)
        flips.add(flip)
    assert flips == {False, True}


@pytest.mark.parametrize("scale,ratio", [((0.35, 0.9), (0.5, 2.0)), ((1.0, 1.0), (1.0, 1.0)),
                                         ((0.02, 0.3), (3 / 4, 4 / 3))])
def test_crop_scale_and_ratio_draw_timm_boxes(scale, ratio):
    """Our box for (scale, ratio) is timm's RandomResizedCropAndInterpolation.get_params from the
    same Python random stream."""
    import random

    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation

    from pipeline import transforms as T
    timm_rrc = RandomResizedCropAndInterpolation(64, scale=scale, ratio=ratio, interpolation="bilinear")
    tf = T.TrainTransform(64, scale=scale, ratio=ratio)
    areas = set()
    for seed in range(40):
        random.seed(seed)
        i, j, h, w = timm_rrc.get_params(Image.new("RGB", (300, 200)), timm_rrc.scale, timm_rrc.ratio)
        assert tf.box(300, 200, random.Random(seed)) == (j, i, w, h)
        areas.add(w * h)
        if scale[1] < 1.0:
            assert w * h <= scale[1] * 300 * 200 + 300 + 200  # within the scale range (rounding aside)
    if scale == (1.0, 1.0):  # a whole-image square does not fit 300x200: torchvision's centre fallback
        assert areas == {200 * 200}
    else:
        assert len(areas) > 20


def test_vertical_and_horizontal_flips():
    import random

    from pipeline import transforms as T
    data = _jpeg()
    seen = set()
    for hflip, vflip in ((0.0, 1.0), (1.0, 1.0), (0.0, 0.5), (0.5, 0.5)):
        tf = T.TrainTransform(64, hflip=hflip, vflip=vflip)
        for seed in range(8):
            rng, ref_rng = random.Random(seed), random.Random(seed)
            out, plain = (torch.empty((64, 64, 3), dtype=torch.uint8) for _ in range(2))
            tf(data, out, rng)
            box = T.rrc_box(300, 200, ref_rng)
            h, v = T.draw_flips(ref_rng, hflip, vflip)
            T.resize_into(*T.decode(data, lambda *_, b=box: b, (64, 64)), plain, False, "bilinear")
            dims = (0,) * v + (1,) * h
            assert torch.equal(out, plain.flip(dims) if dims else plain), (hflip, vflip, seed)
            assert not torch.equal(plain.flip(0), plain)  # a vertical flip is visible
            seen.add((hflip, vflip, h, v))
    assert {(0.0, 1.0, False, True), (1.0, 1.0, True, True)} <= seen
    assert {(s[2], s[3]) for s in seen if s[:2] == (0.5, 0.5)} == {(False, False), (True, False),
                                                                   (False, True), (True, True)}


def test_train_crop_errors():
    from pipeline import transforms as T
    for kwargs, match in (({"scale": (0.5, 0.1)}, "scale range"), ({"scale": (0.0, 1.0)}, "scale range"),
                          ({"ratio": (2.0,)}, "aspect-ratio range"), ({"hflip": 1.5}, "horizontal flip"),
                          ({"vflip": -0.1}, "vertical flip")):
        with pytest.raises(ValueError, match=match):
            T.TrainTransform(64, **kwargs)


# ---- --mean/--std ----

def test_mean_std_resolve_and_normalise_like_timm():
    from PIL import Image
    from timm.data import create_transform

    from pipeline.autoaugment import IMAGENET_DEFAULT_MEAN, fill_color, resolve_mean_std
    from pipeline.prefetch import IMAGENET_MEAN, IMAGENET_STD, Normalize
    assert resolve_mean_std() == (IMAGENET_MEAN, IMAGENET_STD) and IMAGENET_DEFAULT_MEAN == IMAGENET_MEAN
    assert resolve_mean_std([0.5], [0.25]) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # as timm: one value for all
    assert fill_color() == (124, 116, 104) and fill_color((0.5, 0.5, 0.5)) == (128, 128, 128)
    with pytest.raises(ValueError, match="1 or 3 values"):
        resolve_mean_std([0.1, 0.2])
    with pytest.raises(ValueError, match="std must be > 0"):
        resolve_mean_std(None, [0.2, 0.0, 0.2])
    mean, std = resolve_mean_std([0.5, 0.4, 0.3], [0.2, 0.3, 0.4])
    img = torch.randint(0, 256, (1, 16, 16, 3), dtype=torch.uint8)
    ours = Normalize("cpu", mean, std, channels_last=False)(img)
    ref = create_transform(16, is_training=False, crop_pct=1.0, mean=mean, std=std)(Image.fromarray(img[0].numpy()))
    torch.testing.assert_close(ours[0], ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, Normalize("cpu", channels_last=False)(img))


# ---- --aa beyond RandAugment ----

def _timm_secondary(config, size, mean, interpolation):
    """timm's own --aa transform, as transforms_imagenet_train builds it."""
    from timm.data.transforms_factory import transforms_imagenet_train
    _, secondary, _ = transforms_imagenet_train(size, auto_augment=config, mean=mean, interpolation=interpolation,
                                                separate=True)
    return secondary


@pytest.mark.parametrize("config,interpolation,mean", [
    ("original", "random", (0.485, 0.456, 0.406)),
    ("originalr", "bicubic", (0.485, 0.456, 0.406)),
    ("v0", "bilinear", (0.5, 0.5, 0.5)),
    ("v0r-mstd0.5", "random", (0.485, 0.456, 0.406)),
    ("3a", "random", (0.485, 0.456, 0.406)),
    ("augmix-m5-w4-d2", "random", (0.485, 0.456, 0.406)),
    ("augmix-m3-mstd0.5", "bicubic", (0.4, 0.4, 0.4)),
])
def test_policy_equals_timm_transform_on_the_same_image_and_seed(config, interpolation, mean):
    import random

    from PIL import Image

    from pipeline.autoaugment import PolicyAugment, create_augment
    size = 48
    aug = create_augment(config, size, mean=mean, interpolation=interpolation)
    assert isinstance(aug, PolicyAugment)
    ref = _timm_secondary(config, size, mean, interpolation)
    if config == "3a":  # timm keeps colour jitter with 3a: compare the policy alone
        ref = ref.transforms[0]
    g = torch.Generator().manual_seed(0)
    changed = 0
    for k in range(10):
        img = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g)
        rng = random.Random(k)
        seed = random.Random(k).getrandbits(32)  # what the worker draws from the sample's generator
        before = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state())
        out = img.clone()
        aug(out, rng)
        after = (random.getstate(), np.random.get_state()[1], torch.random.get_rng_state())
        assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])
        random.seed(seed), np.random.seed(seed)
        expected = np.asarray(ref(Image.fromarray(img.numpy())))
        assert np.array_equal(out.numpy(), expected), (config, k)
        again = img.clone()
        aug(again, random.Random(k))
        assert torch.equal(again, out)  # a function of the sample's generator only
        changed += not torch.equal(out, img)
    assert changed >= 5


def test_trivial_augment_equals_torchvision_on_the_same_seed():
    import random

    from torchvision.transforms import InterpolationMode, v2

    from pipeline.autoaugment import create_augment
    aug = create_augment("trivial", 48)
    ref = v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR)
    g = torch.Generator().manual_seed(1)
    changed = 0
    for k in range(16):
        img = torch.randint(0, 256, (48, 48, 3), dtype=torch.uint8, generator=g)
        out = img.clone()
        aug(out, random.Random(k))
        torch.manual_seed(random.Random(k).getrandbits(32))
        assert torch.equal(out, ref(img.permute(2, 0, 1)).permute(1, 2, 0)), k
        changed += not torch.equal(out, img)
    assert changed >= 8


def test_policy_names_and_errors():
    from pipeline.autoaugment import create_augment
    from pipeline.randaugment import RandAugment
    assert create_augment(None, 64) is None
    assert isinstance(create_augment("rand-m9-mstd0.5", 64), RandAugment)  # our uint8 RandAugment, unchanged
    for bad, match in (("autoaug", "unknown augmentation policy"), ("original-x3", "not one timm can parse"),
                       ("augmix-q2", "not one timm can parse"), ("trivial-m3", "not one timm can parse")):
        with pytest.raises(ValueError, match=match) as e:
            create_augment(bad, 64)
        assert "\n" not in str(e.value)


def test_policy_runs_in_the_train_transform():
    import random

    from pipeline import transforms as T
    from pipeline.autoaugment import create_augment
    data = _jpeg()
    plain = T.TrainTransform(48)
    tf = T.TrainTransform(48, augment=create_augment("original", 48))
    a, b = (torch.empty((48, 48, 3), dtype=torch.uint8) for _ in range(2))
    plain(data, a, random.Random(3))
    tf(data, b, random.Random(3))
    ref = a.clone()
    tf.augment(ref, _after_crop(random.Random(3)))
    assert torch.equal(b, ref) and not torch.equal(a, b)


def _after_crop(rng):
    """The generator as the transform leaves it after box and flip (default settings)."""
    from pipeline.geometry import rrc_box
    rrc_box(300, 200, rng)
    rng.random()
    return rng


def test_randaugment_fills_with_the_normalisation_mean():
    """timm fills uncovered pixels with the --mean in levels; our uint8 RandAugment follows it."""
    from PIL import Image
    from timm.data.auto_augment import NAME_TO_OP

    from pipeline.autoaugment import create_augment, fill_color
    from pipeline.randaugment import FILL
    mean = (0.2, 0.6, 0.9)
    img = np.full((32, 32, 3), 200, dtype=np.uint8)
    for name, arg in (("Rotate", 27.0), ("ShearX", 0.27), ("TranslateYRel", -0.405)):
        ours = create_augment("rand-m9-mstd0.5", 32, mean=mean).apply(
            torch.from_numpy(img.copy()).permute(2, 0, 1), [(name, arg)]).permute(1, 2, 0).numpy()
        ref = np.asarray(NAME_TO_OP[name](Image.fromarray(img), arg, fillcolor=fill_color(mean),
                                          resample=Image.BILINEAR))
        filled, ref_filled = (np.all(x == (51, 153, 230), axis=-1) for x in (ours, ref))
        assert filled.sum() > 20 and (filled == ref_filled).mean() >= 0.95, name  # the same region filled
        default = create_augment("rand-m9-mstd0.5", 32).apply(
            torch.from_numpy(img.copy()).permute(2, 0, 1), [(name, arg)]).permute(1, 2, 0).numpy()
        assert np.array_equal(np.all(default == FILL, axis=-1), filled)  # the reference fill at the default mean
