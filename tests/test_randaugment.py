"""RandAugment on uint8 tensors against timm's PIL RandAugment: the op table, each op's pixels,
the draws (ops per image, probability, magnitude noise, signs)."""
import io
import random
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.randaugment import FILL, OPS, RandAugment
from pipeline.transforms import TrainTransform


def photo(size=96, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))
    return (img * 0.7 + 20).astype(np.uint8)  # levels 20-198: AutoContrast has work to do


# (op, argument, largest mean |difference| to timm's PIL op, in levels)
CASES = [
    ("AutoContrast", None, 0.0), ("Equalize", None, 0.0), ("Invert", None, 0.0),
    ("Posterize", 3, 0.0), ("Solarize", 150, 0.0), ("SolarizeAdd", 99, 0.0),
    ("Brightness", 1.72, 0.0), ("Sharpness", 1.72, 0.0),
    ("Color", 1.72, 0.5), ("Contrast", 1.72, 0.5),  # torchvision's grayscale truncates, PIL's rounds
    ("Rotate", 27.0, 1.0), ("Rotate", -27.0, 1.0), ("ShearX", 0.27, 1.0), ("ShearY", -0.27, 1.0),
    ("TranslateXRel", 0.405, 1.0), ("TranslateYRel", -0.405, 1.0),
]


@pytest.mark.parametrize("name,arg,tolerance", CASES)
def test_each_op_matches_timms_pil_op(name, arg, tolerance):
    from timm.data.auto_augment import NAME_TO_OP
    a = photo()
    pil_args = () if arg is None else (arg,)
    ref = np.asarray(NAME_TO_OP[name](Image.fromarray(a), *pil_args, fillcolor=tuple(FILL), resample=Image.BILINEAR))
    ours = RandAugment("rand-m9-mstd0.5").apply(torch.from_numpy(a.copy()).permute(2, 0, 1), [(name, arg)])
    diff = np.abs(ours.permute(1, 2, 0).numpy().astype(int) - ref.astype(int))
    assert diff.mean() <= tolerance, diff.mean()
    if tolerance < 1:
        assert diff.max() <= 1
    assert not np.array_equal(ours.permute(1, 2, 0).numpy(), a)  # the op did something


def test_policy_is_timms_rand_m9_mstd05():
    from timm.data.auto_augment import _RAND_TRANSFORMS
    ra = RandAugment("rand-m9-mstd0.5")
    assert ra.num_layers == 2 and ra.weights is None
    assert [op[0] for op in ra.ops] == list(_RAND_TRANSFORMS)
    assert {op[1:] for op in ra.ops} == {(0.5, 9, 0.5, 10.0)}  # p, m, mstd, upper bound


def test_draws_follow_timms_augment_op():
    """Per image: 2 ops with replacement, each applied with p 0.5, magnitude N(9, 0.5) clipped
    to [0, 10], signed ops negated half the time; arguments from timm's level functions."""
    ra = RandAugment("rand-m9-mstd0.5")
    rng = random.Random(0)
    draws = [ra.draw(rng) for _ in range(3000)]
    assert statistics.mean(len(d) for d in draws) == pytest.approx(1.0, abs=0.05)
    args = {}
    for d in draws:
        for name, arg in d:
            args.setdefault(name, []).append(arg)
    assert set(args) == set(op[0] for op in ra.ops)
    rot = args["Rotate"]
    assert statistics.mean(abs(r) for r in rot) == pytest.approx(27.0, abs=0.5)  # 9/10 * 30 degrees
    assert 0.35 < sum(r > 0 for r in rot) / len(rot) < 0.65 and max(abs(r) for r in rot) <= 30
    assert set(args["Posterize"]) <= {3, 4}  # int(m / 10 * 4)
    assert statistics.mean(args["Color"]) == pytest.approx(1.72, abs=0.02) and min(args["Color"]) > 1
    assert statistics.mean(args["Solarize"]) == pytest.approx(230, abs=2)
    assert statistics.mean(args["SolarizeAdd"]) == pytest.approx(99, abs=2) and max(args["SolarizeAdd"]) <= 110
    assert args["AutoContrast"][0] is None


def test_policy_variants_and_errors():
    inc = RandAugment("rand-m7-n3-mstd1-inc1")
    assert inc.num_layers == 3 and "ColorIncreasing" in [op[0] for op in inc.ops]
    rng = random.Random(1)
    factors = [arg for _ in range(2000) for name, arg in inc.draw(rng) if name == "ColorIncreasing"]
    assert min(factors) >= 0.1 and min(factors) < 1 < max(factors)  # increasing ops go both ways
    for bad in ("augmix-m5", "rand-x9", "original"):
        with pytest.raises(ValueError):
            RandAugment(bad)
    assert set(OPS) >= {op[0] for op in RandAugment("rand-m9-mstd0.5-inc1").ops}


def test_train_transform_applies_it_after_the_crop_with_the_same_stream():
    b = io.BytesIO()
    Image.fromarray(photo(160, seed=3)).save(b, format="JPEG", quality=95)
    data = bytearray(b.getvalue())
    ra = RandAugment("rand-m9-mstd0.5")
    plain, with_ra = TrainTransform(64), TrainTransform(64, augment=ra)
    outs = []
    for seed in range(6):
        a, c = (torch.empty((64, 64, 3), dtype=torch.uint8) for _ in range(2))
        plain(data, a, random.Random(seed))
        with_ra(data, c, random.Random(seed))
        rng = random.Random(seed)  # replay: crop, interpolation (fixed), flip, then RandAugment
        plain.box(160, 160, rng), plain.flip(rng)
        expected = ra.apply(a.permute(2, 0, 1), ra.draw(rng)).permute(1, 2, 0)
        assert torch.equal(c, expected)
        outs.append(not torch.equal(a, c))
    assert any(outs)
