"""timm's RandAugment (`--aa rand-m9-mstd0.5`) on uint8 tensors, in the loader workers.

The policy string is parsed by timm's own `rand_augment_transform` (op names, magnitude, layers,
probability, magnitude noise, weights), and each op runs on the HWC uint8 output of the crop
with torchvision's tensor functions (timm/data/auto_augment.py runs PIL ops). Per image, as
timm's `RandAugment` + `AugmentOp`: choose `num_layers` ops (with replacement unless weighted);
for each, skip it with probability 1 - p, draw the magnitude from N(m, mstd) clipped to
[0, mmax or 10], turn it into the op's argument with timm's level functions (signed ops get a
random sign), and apply it. Fill colour: the ImageNet mean in uint8, (124, 116, 104).

Where this differs from timm (tests/test_randaugment.py measures each op against timm's):
- draws come from the worker's `random.Random`, not numpy's and Python's global generators;
- Rotate, ShearX/Y, TranslateX/YRel resample bilinearly: torchvision's tensor affine has no
  bicubic (timm's 'random' train interpolation picks bilinear or bicubic per op);
- Color and Contrast blend towards torchvision's grayscale (0.2989 R + 0.587 G + 0.114 B,
  truncated; contrast uses its unrounded mean) where PIL rounds: at most 1 level apart.
"""
from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM
FILL = [124, 116, 104]  # timm: round(255 * IMAGENET_DEFAULT_MEAN)


def _affine(img, *, translate=(0.0, 0.0), shear=(0.0, 0.0), center=None, fill=FILL):
    return F.affine(img, angle=0.0, translate=list(translate), scale=1.0, shear=list(shear),
                    interpolation=InterpolationMode.BILINEAR, fill=list(fill), center=center)


def _solarize(img, thresh):
    return img if thresh > 255 else F.solarize(img, thresh)


def _solarize_add(img, add, thresh=128):
    return torch.where(img < thresh, (img.to(torch.int16) + add).clamp_(max=255).to(torch.uint8), img)


def _posterize(img, bits):
    return img if bits >= 8 else F.posterize(img, bits)


# op name -> (function(img CHW uint8, arg), level -> unsigned argument, signed). The level
# functions are timm's (auto_augment.py LEVEL_TO_ARG) without the random sign, drawn here.
def _enhance(level):
    return level / LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing(level):
    return level / LEVEL_DENOM * 0.9  # 1 +- this, at least 0.1


OPS = {
    "AutoContrast": (lambda img, _: F.autocontrast(img), None, False),
    "Equalize": (lambda img, _: F.equalize(img), None, False),
    "Invert": (lambda img, _: F.invert(img), None, False),
    "Rotate": (lambda img, deg, fill=FILL: F.rotate(img, deg, interpolation=InterpolationMode.BILINEAR,
                                                    fill=list(fill)),
               lambda level: level / LEVEL_DENOM * 30.0, True),
    "Posterize": (_posterize, lambda level: int(level / LEVEL_DENOM * 4), False),
    "PosterizeIncreasing": (_posterize, lambda level: 4 - int(level / LEVEL_DENOM * 4), False),
    "PosterizeOriginal": (_posterize, lambda level: int(level / LEVEL_DENOM * 4) + 4, False),
    "Solarize": (_solarize, lambda level: min(256, int(level / LEVEL_DENOM * 256)), False),
    "SolarizeIncreasing": (_solarize, lambda level: 256 - min(256, int(level / LEVEL_DENOM * 256)), False),
    "SolarizeAdd": (_solarize_add, lambda level: min(128, int(level / LEVEL_DENOM * 110)), False),
    "Color": (F.adjust_saturation, _enhance, False),
    "Contrast": (F.adjust_contrast, _enhance, False),
    "Brightness": (F.adjust_brightness, _enhance, False),
    "Sharpness": (F.adjust_sharpness, _enhance, False),
    "ColorIncreasing": (F.adjust_saturation, _enhance_increasing, True),
    "ContrastIncreasing": (F.adjust_contrast, _enhance_increasing, True),
    "BrightnessIncreasing": (F.adjust_brightness, _enhance_increasing, True),
    "SharpnessIncreasing": (F.adjust_sharpness, _enhance_increasing, True),
    # PIL's affine data (1, f, 0, 0, 1, 0) shears about the top-left corner, as torchvision's
    # own RandAugment reproduces with center=[0, 0]; a PIL translation by +p px moves content by -p.
    "ShearX": (lambda img, f, fill=FILL: _affine(img, shear=(math.degrees(math.atan(f)), 0.0), center=[0, 0],
                                                 fill=fill),
               lambda level: level / LEVEL_DENOM * 0.3, True),
    "ShearY": (lambda img, f, fill=FILL: _affine(img, shear=(0.0, math.degrees(math.atan(f))), center=[0, 0],
                                                 fill=fill),
               lambda level: level / LEVEL_DENOM * 0.3, True),
    "TranslateXRel": (lambda img, pct, fill=FILL: _affine(img, translate=(-pct * img.shape[-1], 0.0), fill=fill),
                      lambda level: level / LEVEL_DENOM * 0.45, True),
    "TranslateYRel": (lambda img, pct, fill=FILL: _affine(img, translate=(0.0, -pct * img.shape[-2]), fill=fill),
                      lambda level: level / LEVEL_DENOM * 0.45, True),
}
INCREASING = {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
FILLED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}  # ops that take the fill colour


class RandAugment:
    """`augment(out, rng)`: RandAugment of the HWC uint8 tensor `out`, in place."""

    def __init__(self, config: str, fill=FILL):
        """`fill`: the uint8 colour uncovered pixels get, timm's img_mean hparam (the normalisation
        mean in levels, pipeline.autoaugment.fill_color)."""
        from timm.data.auto_augment import rand_augment_transform
        if not config.startswith("rand"):
            raise ValueError(f"augmentation policy {config!r}: only RandAugment ('rand-m9-mstd0.5' and its variants) "
                             f"runs on uint8 tensors here")
        try:
            ra = rand_augment_transform(config, {"translate_pct": 0.45})
        except (AssertionError, ValueError) as e:
            raise ValueError(f"{config!r} is not a RandAugment policy timm can parse ({e})") from None
        unknown = sorted({op.name for op in ra.ops} - set(OPS))
        if unknown:
            raise ValueError(f"augmentation policy {config!r}: ops {', '.join(unknown)} have no uint8 version here")
        self.config, self.num_layers, self.fill = config, ra.num_layers, tuple(int(v) for v in fill)
        self.weights = None if ra.choice_weights is None else list(ra.choice_weights)
        self.ops = [(op.name, op.prob, op.magnitude, op.magnitude_std, op.magnitude_max or LEVEL_DENOM)
                    for op in ra.ops]

    def choose(self, rng) -> list:
        if self.weights is None:
            return [self.ops[rng.randrange(len(self.ops))] for _ in range(self.num_layers)]
        picked, left = [], list(range(len(self.ops)))  # weighted: without replacement, as timm
        for _ in range(min(self.num_layers, len(left))):
            k = rng.choices(left, weights=[self.weights[i] for i in left])[0]
            left.remove(k)
            picked.append(self.ops[k])
        return picked

    def draw(self, rng) -> list[tuple[str, object]]:
        """The ops applied to one image with their arguments, drawn as timm's AugmentOp does."""
        applied = []
        for name, prob, magnitude, std, upper in self.choose(rng):
            if prob < 1.0 and rng.random() > prob:
                continue
            if std == float("inf"):
                magnitude = rng.uniform(0, magnitude)
            elif std > 0:
                magnitude = rng.gauss(magnitude, std)
            magnitude = max(0.0, min(magnitude, upper))
            _, level_fn, signed = OPS[name]
            arg = level_fn(magnitude) if level_fn is not None else None
            if signed and rng.random() > 0.5:
                arg = -arg
            if name in INCREASING:
                arg = max(0.1, 1.0 + arg)
            applied.append((name, arg))
        return applied

    def apply(self, img: torch.Tensor, ops) -> torch.Tensor:
        """Apply drawn ops to a CHW uint8 tensor."""
        for name, arg in ops:
            img = OPS[name][0](img, arg, fill=self.fill) if name in FILLED else OPS[name][0](img, arg)
        return img

    def __call__(self, out: torch.Tensor, rng) -> None:
        ops = self.draw(rng)
        if ops:
            out.copy_(self.apply(out.permute(2, 0, 1), ops).permute(1, 2, 0))

    def __repr__(self) -> str:
        return f"RandAugment({self.config!r}, n={self.num_layers}, {len(self.ops)} ops)"
