"""Batch augmentations on the device, after the copy: colour jitter (before normalisation),
then mixup/cutmix and random erasing (after it), as timm's prefetcher path orders them.

- `ColorJitter`: torchvision's ColorJitter(brightness, contrast, saturation) on uint8 images
  (timm's `--color-jitter 0.4` = each factor uniform in [0.6, 1.4], the three ops in a random
  order per image, hue untouched), for a whole batch with per-image parameters. Every op is a
  blend `f * img + (1 - f) * degenerate` (black; the mean of the image's grayscale; the
  per-pixel grayscale), clamped and truncated to integers after each op, as torchvision's
  uint8 tensor path does (grayscale = trunc(0.2989 R + 0.587 G + 0.114 B)). Done here when
  training on an accelerator, because one image costs a worker about as much as decoding it
  while the batch costs the device a few memory-bound passes; `WorkerColorJitter` is the same
  jitter in the workers, the cheaper place when the "device" is the CPU itself (BENCHMARKS.md).
- `Mixup`: timm's `Mixup` in its default 'batch' mode: one lambda per batch, the partner of
  image i is image B-1-i, soft targets with label smoothing inside (`timm.data.mixup.mixup_target`).
- `RandomErasing`: timm's `RandomErasing` (boxes of 2-33% of the image, aspect 0.3-3.3, filled
  with per-pixel normal noise ('pixel'), a per-box colour ('rand') or zeros ('const')).

Random draws: `BatchRandom` gives each batch its own generators, seeded from (seed, rank,
epoch, batch index): Python's `random.Random` for the erasing boxes (timm uses Python's global
`random`), a numpy `RandomState` for mixup (timm uses numpy's global legacy generator, so the
same seed gives timm's draws) and a torch generator on the device for jitter and erasing noise.
So a batch's augmentation is a pure function of where it is in the run, whichever rank or
resume produced it, and nothing is read back from the device: no host synchronisation.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (not 0.299)


class BatchRandom:
    """The generators for one batch, derived from (seed, rank, epoch, index)."""

    def __init__(self, seed: int, rank: int, epoch: int, index: int, generator: torch.Generator | None):
        self.py = random.Random(f"batch-augment:{seed}:{rank}:{epoch}:{index}")
        self.base = self.py.getrandbits(64)
        self._np = None
        self.torch = generator
        if generator is not None:
            generator.manual_seed(self.base >> 1)  # a host-side setting: no device work, no sync

    @property
    def np(self) -> np.random.RandomState:
        if self._np is None:  # made on first use: only mixup draws from it
            self._np = np.random.RandomState([self.base & 0xFFFFFFFF, self.base >> 32])
        return self._np


def device_generator(device: torch.device) -> torch.Generator | None:
    try:
        return torch.Generator(device=device)
    except (RuntimeError, TypeError):  # a backend without device generators: the global one
        return None


class ColorJitter:
    """Per-image brightness, contrast and saturation jitter of a float NCHW batch in [0, 255]."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4):
        self.ranges = [(max(0.0, 1.0 - s), 1.0 + s) for s in (brightness, contrast, saturation)]

    def draw(self, n: int, device, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, factors): order[i] is a permutation of (0 brightness, 1 contrast, 2 saturation),
        factors[i] the three factors, float64, each uniform in its range (torchvision's ranges)."""
        order = torch.rand((n, 3), device=device, generator=generator).argsort(dim=1)
        u = torch.rand((n, 3), device=device, generator=generator, dtype=torch.float64)
        lo = torch.tensor([r[0] for r in self.ranges], dtype=torch.float64, device=device)
        hi = torch.tensor([r[1] for r in self.ranges], dtype=torch.float64, device=device)
        return order, lo + u * (hi - lo)

    @staticmethod
    def apply(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """Jitter float `x` (N, 3, H, W), integer values in [0, 255], with drawn parameters."""
        n = x.shape[0]
        shape = (n, 1, 1, 1)
        for k in range(3):
            op = order[:, k]
            f = factors.gather(1, op[:, None])
            keep, blend = f.to(x.dtype).view(shape), (1.0 - f).to(x.dtype).view(shape)
            gray = (GRAY[0] * x[:, 0:1] + GRAY[1] * x[:, 1:2] + GRAY[2] * x[:, 2:3]).floor_()
            mean = gray.mean(dim=(1, 2, 3), keepdim=True)
            is_contrast, is_saturation = (op == 1).view(shape), (op == 2).view(shape)
            degenerate = torch.where(is_saturation, gray, torch.where(is_contrast, mean, 0.0))
            x.mul_(keep).add_(blend * degenerate).clamp_(0, 255).floor_()
        return x

    def __call__(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        return self.apply(x, *self.draw(x.shape[0], x.device, generator))


class WorkerColorJitter:
    """`augment(out, rng)` for the loader workers: ColorJitter on one HWC uint8 crop, in place,
    drawn from the sample's own generator, so resume stays exact. torchvision's v2 uint8 ops:
    for the same draws, the batched `ColorJitter` (which matches v1 bit for bit) gives the same
    pixels but for ~0.01% of values, by a few levels (v2 does not truncate the grayscale behind
    the contrast mean and the saturation blend); v1's ops would match exactly but cost more."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4):
        self.ranges = ColorJitter(brightness, contrast, saturation).ranges

    def draw(self, rng) -> tuple[list[int], list[float]]:
        """(order, factors) as `ColorJitter.draw` gives them for one image."""
        order = rng.sample(range(3), 3)
        return order, [rng.uniform(lo, hi) for lo, hi in self.ranges]

    @staticmethod
    def apply(out: torch.Tensor, order, factors) -> None:
        from torchvision.transforms.v2 import functional as F  # cheaper than v1's (see the class docstring)
        ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
        img = out.permute(2, 0, 1)
        for k in order:
            img = ops[k](img, factors[k])
        out.copy_(img.permute(1, 2, 0))

    def __call__(self, out: torch.Tensor, rng) -> None:
        self.apply(out, *self.draw(rng))

    def __repr__(self) -> str:
        return f"WorkerColorJitter({', '.join(f'{hi - 1:g}' for _, hi in self.ranges)})"


class Mixup:
    """timm's Mixup/CutMix, mode 'batch', drawing from a given numpy RandomState."""

    def __init__(self, mixup_alpha: float = 1.0, cutmix_alpha: float = 0.0, cutmix_minmax=None,
                 prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1,
                 num_classes: int = 1000, correct_lam: bool = True):
        self.mixup_alpha, self.cutmix_alpha, self.cutmix_minmax = mixup_alpha, cutmix_alpha, cutmix_minmax
        if cutmix_minmax is not None:
            if len(cutmix_minmax) != 2:
                raise ValueError("cutmix_minmax needs two values (min, max)")
            self.cutmix_alpha = 1.0  # as timm: minmax forces cutmix on
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing
        self.num_classes, self.correct_lam = num_classes, correct_lam
        self.enabled = True  # --mixup-off-epoch turns it off; targets stay soft (lam = 1)

    def params(self, rs: np.random.RandomState, hw) -> tuple[float, tuple | None]:
        """(lam, cutmix box (yl, yh, xl, xh) or None), with timm's draws in timm's order
        (Mixup._params_per_batch, then cutmix_bbox_and_lam / rand_bbox / rand_bbox_minmax)."""
        lam, use_cutmix = 1.0, False
        if self.enabled and rs.rand() < self.prob:
            if self.mixup_alpha > 0.0 and self.cutmix_alpha > 0.0:
                use_cutmix = rs.rand() < self.switch_prob
                alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
                lam = float(rs.beta(alpha, alpha))
            elif self.mixup_alpha > 0.0:
                lam = float(rs.beta(self.mixup_alpha, self.mixup_alpha))
            else:
                use_cutmix, lam = True, float(rs.beta(self.cutmix_alpha, self.cutmix_alpha))
        if lam == 1.0 or not use_cutmix:
            return lam, None
        h, w = hw
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            cut_h, cut_w = rs.randint(int(h * lo), int(h * hi)), rs.randint(int(w * lo), int(w * hi))
            yl, xl = rs.randint(0, h - cut_h + 1), rs.randint(0, w - cut_w + 1)
            yh, xh = yl + cut_h, xl + cut_w
        else:
            ratio = np.sqrt(1 - lam)
            cut_h, cut_w = int(h * ratio), int(w * ratio)
            cy, cx = rs.randint(0, h), rs.randint(0, w)
            yl, yh = np.clip(cy - cut_h // 2, 0, h), np.clip(cy + (cut_h + 1) // 2, 0, h)
            xl, xh = np.clip(cx - cut_w // 2, 0, w), np.clip(cx + (cut_w + 1) // 2, 0, w)
        if self.correct_lam or self.cutmix_minmax is not None:
            lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)
        return lam, (int(yl), int(yh), int(xl), int(xh))

    def __call__(self, x: torch.Tensor, target: torch.Tensor, rs: np.random.RandomState):
        """Mix `x` (N, C, H, W) in place; returns (x, soft targets (N, num_classes))."""
        from timm.data.mixup import mixup_target
        lam, box = self.params(rs, x.shape[-2:])
        if box is not None:
            yl, yh, xl, xh = box
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
        elif lam != 1.0:
            flipped = x.flip(0).mul_(1.0 - lam)  # before x changes, as timm's _mix_batch
            x.mul_(lam).add_(flipped)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing)


class RandomErasing:
    """timm's RandomErasing of a normalised batch, with explicit generators."""

    MODES = ("pixel", "rand", "const")

    def __init__(self, probability: float = 0.25, mode: str = "pixel", min_area: float = 0.02,
                 max_area: float = 1 / 3, min_aspect: float = 0.3, max_aspect=None, min_count: int = 1,
                 max_count=None):
        if mode not in self.MODES:
            raise ValueError(f"unknown random erasing mode {mode!r}: choose {', '.join(self.MODES)}")
        self.probability, self.mode = probability, mode
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
        self.min_count, self.max_count = min_count, max_count or min_count

    def boxes(self, rng: random.Random, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """One image's boxes (top, left, bh, bw), drawn as timm's RandomErasing._erase does."""
        if rng.random() > self.probability:
            return []
        count = self.min_count if self.min_count == self.max_count else rng.randint(self.min_count, self.max_count)
        out = []
        for _ in range(count):
            for _attempt in range(10):
                target_area = rng.uniform(self.min_area, self.max_area) * h * w / count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                bh, bw = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
                if bw < w and bh < h:
                    out.append((rng.randint(0, h - bh), rng.randint(0, w - bw), bh, bw))
                    break
        return out

    def __call__(self, x: torch.Tensor, rng: random.Random, generator=None) -> torch.Tensor:
        n, c, h, w = x.shape
        for i in range(n):
            for top, left, bh, bw in self.boxes(rng, h, w):
                if self.mode == "pixel":
                    fill = torch.empty((c, bh, bw), dtype=x.dtype, device=x.device).normal_(generator=generator)
                elif self.mode == "rand":
                    fill = torch.empty((c, 1, 1), dtype=x.dtype, device=x.device).normal_(generator=generator)
                else:
                    fill = 0.0
                x[i, :, top:top + bh, left:left + bw] = fill
        return x


class DeviceOp:
    """One device augmentation in `DeviceAugment`'s list. `stage` says where it runs: "uint8"
    (on the copied uint8 NHWC batch, before normalisation: `images -> images`) or "float" (after
    it: `(images, labels) -> (images, labels)`). Each call draws only from the batch's
    `BatchRandom`, so a batch's augmentation stays a pure function of its place in the run. A new
    op: subclass, set `stage`, write `__call__` (and `describe`), append an instance to the list."""
    stage = "float"
    inner = None  # the augmentation object it runs (ColorJitter, Mixup, RandomErasing...)

    def set_epoch(self, epoch: int) -> None:
        pass

    def describe(self) -> str:
        return type(self).__name__


class JitterOp(DeviceOp):
    stage = "uint8"

    def __init__(self, jitter: ColorJitter):
        self.inner = jitter

    def __call__(self, images, r: BatchRandom):
        return self.inner(images, r.torch)

    def describe(self) -> str:
        return "colour jitter " + "/".join(f"{lo:g}-{hi:g}" for lo, hi in self.inner.ranges)


class MixupOp(DeviceOp):
    """Mixup/cutmix, off from epoch `off_epoch` (0: never), as timm's --mixup-off-epoch."""

    def __init__(self, mixup: Mixup, off_epoch: int = 0):
        self.inner, self.off_epoch = mixup, off_epoch

    def set_epoch(self, epoch: int) -> None:
        self.inner.enabled = not (self.off_epoch and epoch >= self.off_epoch)

    def __call__(self, images, labels, r: BatchRandom):
        return self.inner(images, labels, r.np)

    def describe(self) -> str:
        m = self.inner
        off = f", off from epoch {self.off_epoch}" if self.off_epoch else ""
        return f"mixup {m.mixup_alpha:g} / cutmix {m.cutmix_alpha:g} (p {m.prob:g}, switch {m.switch_prob:g}{off})"


class ErasingOp(DeviceOp):
    def __init__(self, erasing: RandomErasing):
        self.inner = erasing

    def __call__(self, images, labels, r: BatchRandom):
        return self.inner(images, r.py, r.torch), labels

    def describe(self) -> str:
        return f"random erasing p {self.inner.probability:g} {self.inner.mode}"


class DeviceAugment:
    """The train feed's device-side augmentation: an ordered list of `DeviceOp`s around the
    normalisation (the uint8 ops, normalise, then the float ops, each in list order).

    `DeviceAugment(device, ops=[JitterOp(ColorJitter()), MixupOp(Mixup(...)), ErasingOp(...)])`;
    the keywords jitter/mixup/erasing/mixup_off_epoch build that list in timm's order.
    `set_epoch(epoch)` before each epoch (it also reaches every op: --mixup-off-epoch); then each
    call handles the next batch of that epoch, numbered from `start` (0 unless resuming mid-epoch).
    """

    def __init__(self, device, seed: int = 0, rank: int = 0, jitter: ColorJitter | None = None,
                 mixup: Mixup | None = None, erasing: RandomErasing | None = None, mixup_off_epoch: int = 0,
                 ops: list[DeviceOp] | None = None):
        self.ops = list(ops or [])
        self.ops += [op for op in (JitterOp(jitter) if jitter is not None else None,
                                   MixupOp(mixup, mixup_off_epoch) if mixup is not None else None,
                                   ErasingOp(erasing) if erasing is not None else None) if op is not None]
        self.seed, self.rank = seed, rank
        self.generator = device_generator(torch.device(device))
        self.epoch, self.index = 0, 0

    def _inner(self, kind: type):
        return next((op.inner for op in self.ops if isinstance(op, kind)), None)

    @property
    def jitter(self) -> ColorJitter | None:
        return self._inner(JitterOp)

    @property
    def mixup(self) -> Mixup | None:
        return self._inner(MixupOp)

    @property
    def erasing(self) -> RandomErasing | None:
        return self._inner(ErasingOp)

    def describe(self) -> str:
        return ", ".join(op.describe() for op in self.ops)

    @property
    def active(self) -> bool:
        return bool(self.ops)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.index = epoch, start
        for op in self.ops:
            op.set_epoch(epoch)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, normalize):
        """uint8 NHWC images + int labels -> normalised float images + labels (soft with mixup)."""
        r = BatchRandom(self.seed, self.rank, self.epoch, self.index, self.generator)
        self.index += 1
        before = [op for op in self.ops if op.stage == "uint8"]
        adjust = None
        if before:
            def adjust(x):
                for op in before:
                    x = op(x, r)
                return x
        x = normalize(images, adjust=adjust)
        for op in self.ops:
            if op.stage == "float":
                x, labels = op(x, labels, r)
        return x, labels
