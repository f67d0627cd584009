"""timm's other `--aa` policies, per image in the loader workers, plus the normalisation values
they fill with.

- AutoAugment (`original`, `originalr`, `v0`, `v0r`, `3a`, each with an optional `-mstd<x>`):
  timm's `auto_augment_transform`;
- AugMix (`augmix-m<m>-w<w>-d<d>-...`): timm's `augment_and_mix_transform`, applied to the image
  (without timm's split batches and JSD loss);
- TrivialAugment (`trivial`): timm 1.0 has none, so torchvision's TrivialAugmentWide, with the
  bilinear interpolation of torchvision's classification reference;
- RandAugment (`rand-...`) stays our uint8 implementation (pipeline/randaugment.py).
The timm policies run on a PIL image of the uint8 crop with the hparams timm's
transforms_imagenet_train gives them (translate_const = 45% of the size, the mean as fill colour,
the train interpolation unless 'random'). timm's ops draw from Python's global `random` (AugMix also
from numpy's), torchvision's from torch's: for each image those generators are seeded from the
sample's own generator (pipeline/stream.py sample_rng) and restored afterwards, so an image's pixels
depend on (seed, epoch, sample) only and resume stays exact.
"""
from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch

# timm.data.constants IMAGENET_DEFAULT_MEAN / _STD (timm train.py --mean/--std default: the model's)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
AUTO_AUGMENT_POLICIES = ("original", "originalr", "v0", "v0r", "3a")
POLICY_FAMILIES = ("rand", "augmix", "trivial") + AUTO_AUGMENT_POLICIES


def resolve_mean_std(mean=None, std=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of 3 floats each, as timm's resolve_data_config: None is ImageNet's, one value is
    repeated for the 3 channels; a ValueError for anything else or a std <= 0."""
    out = []
    for name, values, default in (("mean", mean, IMAGENET_DEFAULT_MEAN), ("std", std, IMAGENET_DEFAULT_STD)):
        values = default if values is None else tuple(float(v) for v in values)
        if len(values) == 1:
            values = values * 3
        if len(values) != 3:
            raise ValueError(f"the normalisation {name} needs 1 or 3 values (got {len(values)})")
        out.append(values)
    if min(out[1]) <= 0:
        raise ValueError(f"the normalisation std must be > 0 (got {', '.join(map(str, out[1]))})")
    return out[0], out[1]


def fill_color(mean=IMAGENET_DEFAULT_MEAN) -> tuple[int, ...]:
    """timm's img_mean hparam: the mean in uint8 levels, the fill of geometric ops."""
    return tuple(min(255, round(255 * x)) for x in mean)


def timm_aa_hparams(size: int, mean=IMAGENET_DEFAULT_MEAN, interpolation: str = "random") -> dict:
    """The hparams timm's transforms_imagenet_train gives an --aa policy (timm 1.0 l.192-197)."""
    from timm.data.transforms import str_to_pil_interp
    params = dict(translate_const=int(size * 0.45), img_mean=fill_color(mean))
    if interpolation and interpolation != "random":
        params["interpolation"] = str_to_pil_interp(interpolation)
    return params


def policy_family(config: str) -> str:
    family = config.split("-")[0]
    if family not in POLICY_FAMILIES:
        raise ValueError(f"unknown augmentation policy {config!r}: choose rand-..., augmix-..., trivial or an "
                         f"AutoAugment policy ({', '.join(AUTO_AUGMENT_POLICIES)}, optionally -mstd<x>)")
    return family


@contextmanager
def seeded_globals(seed: int):
    """Python's, numpy's and torch's global generators seeded with `seed`, then restored."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class PolicyAugment:
    """`augment(out, rng)`: timm's AutoAugment / AugMix or torchvision's TrivialAugmentWide on the
    HWC uint8 tensor `out`, in place; one 32-bit seed drawn from `rng` per image."""

    def __init__(self, config: str, size: int, mean=IMAGENET_DEFAULT_MEAN, interpolation: str = "random"):
        family = policy_family(config)
        if family == "rand":
            raise ValueError("RandAugment runs as pipeline.randaugment.RandAugment (uint8, no PIL)")
        self.config, self.family = config, family
        try:
            if family == "trivial":
                if config != "trivial":
                    raise ValueError("trivial takes no options")
                from torchvision.transforms import InterpolationMode, v2
                self.tf = v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR)
            elif family == "augmix":
                from timm.data.auto_augment import augment_and_mix_transform
                self.tf = augment_and_mix_transform(config, {**timm_aa_hparams(size, mean, interpolation),
                                                             "translate_pct": 0.3})
            else:
                from timm.data.auto_augment import auto_augment_transform
                self.tf = auto_augment_transform(config, timm_aa_hparams(size, mean, interpolation))
        except (AssertionError, KeyError, ValueError) as e:
            raise ValueError(f"augmentation policy {config!r} is not one timm can parse ({e or 'bad option'})") \
                from None

    def apply(self, hwc: torch.Tensor, seed: int) -> torch.Tensor:
        """The policy on one HWC uint8 image with its generators seeded by `seed` (a new tensor)."""
        with seeded_globals(seed):
            if self.family == "trivial":
                return self.tf(hwc.permute(2, 0, 1)).permute(1, 2, 0)
            from PIL import Image
            res = self.tf(Image.fromarray(hwc.numpy()))
        return torch.from_numpy(np.asarray(res, dtype=np.uint8).copy())

    def __call__(self, out: torch.Tensor, rng) -> None:
        out.copy_(self.apply(out, rng.getrandbits(32)))

    def __repr__(self) -> str:
        return f"PolicyAugment({self.config!r})"


def create_augment(config: str | None, size: int, mean=IMAGENET_DEFAULT_MEAN, interpolation: str = "random"):
    """The worker augmentation for an --aa policy string (None: none)."""
    if not config:
        return None
    if policy_family(config) == "rand":
        from .randaugment import RandAugment
        return RandAugment(config, fill=fill_color(mean))
    return PolicyAugment(config, size, mean, interpolation)
