"""Sample geometry without torch: crop boxes, eval windows and interpolation choice.

Shared by the uint8 transforms (pipeline/transforms.py) and the DALI source (pipeline/dali.py),
whose Python workers must not import torch, so that both draw the same crops from the same seeds.
"""
from __future__ import annotations

import math
from typing import NamedTuple

INTERPOLATIONS = ("bilinear", "bicubic")  # timm's 'random' picks one of these per image
# timm's train crop defaults (train.py --scale, --ratio, --hflip, --vflip; transforms_imagenet_train)
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)
DEFAULT_HFLIP = 0.5
DEFAULT_VFLIP = 0.0


def check_train_crop(scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO, hflip=DEFAULT_HFLIP, vflip=DEFAULT_VFLIP):
    """(scale, ratio, hflip, vflip) as floats, or a ValueError that says which is wrong."""
    scale, ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise ValueError(f"the crop scale range needs two values 0 < min <= max (got {scale})")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"the crop aspect-ratio range needs two values 0 < min <= max (got {ratio})")
    for name, p in (("horizontal", hflip), ("vertical", vflip)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"the {name} flip probability must be in [0, 1] (got {p})")
    return scale, ratio, float(hflip), float(vflip)


def draw_flips(rng, hflip: float, vflip: float) -> tuple[bool, bool]:
    """timm's RandomHorizontalFlip(hflip) then RandomVerticalFlip(vflip), each present (and drawing)
    only when its probability is > 0, as transforms_imagenet_train adds them."""
    h = hflip > 0 and rng.random() < hflip
    v = vflip > 0 and rng.random() < vflip
    return h, v


def pick_interpolation(name: str, rng) -> str:
    """timm's RandomResizedCropAndInterpolation: 'random' draws bilinear or bicubic per image."""
    return rng.choice(INTERPOLATIONS) if name == "random" else name


def rrc_box(width: int, height: int, rng, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO):
    """torchvision's RandomResizedCrop.get_params as timm's RandomResizedCropAndInterpolation
    draws it from Python's `random`, on a `random.Random`: (x, y, w, h), the same draws."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = rng.randint(0, height - h)  # top first, as torchvision and timm draw them
            return rng.randint(0, width - w), y, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class Geometry(NamedTuple):
    """Crop box (x, y, w, h) in source pixels, resized to (rh, rw), output cut at (top, left)."""
    x: int
    y: int
    w: int
    h: int
    rh: int
    rw: int
    top: int = 0
    left: int = 0


def crop_geometry(box, size: int) -> Geometry:
    """A box resized straight to the output (the train crop)."""
    return Geometry(*box, size, size, 0, 0)


def eval_geometry(width: int, height: int, size: int, crop_pct: float) -> Geometry:
    """timm's eval transform: Resize(floor(size / crop_pct)) of the shorter side, CenterCrop(size),
    with torchvision's rounding (timm/data/transforms_factory.py transforms_imagenet_eval;
    torchvision _compute_resized_output_size and center_crop)."""
    short = math.floor(size / crop_pct)
    if width <= height:
        rw, rh = short, int(short * height / width)
    else:
        rw, rh = int(short * width / height), short
    return Geometry(0, 0, width, height, rh, rw, int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0)))
