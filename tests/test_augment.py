"""Device-side batch augmentation against timm and torchvision: colour jitter, mixup/cutmix,
random erasing; per-batch determinism; nothing read back from the device."""
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as TV

from pipeline.augment import BatchRandom, ColorJitter, DeviceAugment, Mixup, RandomErasing, WorkerColorJitter
from pipeline.prefetch import Normalize


def uint8_images(n, h=24, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def test_color_jitter_equals_torchvision_for_its_draws():
    """For torchvision's own per-image draws (op order from randperm(4), hue skipped, then the
    three factors), the batched jitter gives torchvision's uint8 ColorJitter output exactly."""
    imgs = uint8_images(24)
    cj = TV.ColorJitter(0.4, 0.4, 0.4)  # timm's --color-jitter 0.4
    orders, factors, refs = [], [], []
    for i, img in enumerate(imgs):
        torch.manual_seed(1000 + i)
        perm, b, c, s, hue = cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
        assert hue is None and all(0.6 <= f <= 1.4 for f in (b, c, s))
        orders.append([int(k) for k in perm if k != 3])
        factors.append([b, c, s])
        torch.manual_seed(1000 + i)
        refs.append(cj(img))
    x = imgs.float().contiguous(memory_format=torch.channels_last)
    out = ColorJitter.apply(x, torch.tensor(orders), torch.tensor(factors, dtype=torch.float64))
    assert torch.equal(out, torch.stack(refs).float())
    assert len({tuple(o) for o in orders}) > 3  # several op orders were exercised
    # the order matters: the same factors in one fixed order give other pixels
    fixed = ColorJitter.apply(imgs.float(), torch.tensor([[0, 1, 2]] * 24), torch.tensor(factors, dtype=torch.float64))
    assert not torch.equal(fixed, out)


def test_color_jitter_draws_torchvision_ranges_and_orders():
    cj = ColorJitter(0.4, 0.2, 0.0)
    g = torch.Generator().manual_seed(0)
    order, factors = cj.draw(3000, "cpu", g)
    assert sorted(order[0].tolist()) == [0, 1, 2] and (order.sort(1).values == torch.arange(3)).all()
    counts = torch.unique(order, dim=0, return_counts=True)[1]
    assert len(counts) == 6 and counts.min() > 400  # every order of the three ops, evenly
    lo, hi = factors.min(0).values, factors.max(0).values
    assert torch.allclose(lo, torch.tensor([0.6, 0.8, 1.0], dtype=torch.float64), atol=2e-3)
    assert torch.allclose(hi, torch.tensor([1.4, 1.2, 1.0], dtype=torch.float64), atol=2e-3)
    again = cj.draw(3000, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(again[0], order) and torch.equal(again[1], factors)


def test_worker_jitter_equals_the_batched_jitter_for_the_same_draws():
    """--jitter-in workers: the pixels of the batched jitter for the same order and factors, but
    for a few values torchvision's v2 ops round differently; drawn from the sample's generator only."""
    imgs = uint8_images(16, seed=3)
    wj = WorkerColorJitter(0.4, 0.4, 0.4)
    orders, factors, outs = [], [], []
    for i, img in enumerate(imgs):
        order, f = wj.draw(random.Random(i))
        assert sorted(order) == [0, 1, 2] and all(0.6 <= x <= 1.4 for x in f)
        orders.append(order)
        factors.append(f)
        out = img.permute(1, 2, 0).clone()  # a worker's HWC crop
        wj(out, random.Random(i))
        outs.append(out.permute(2, 0, 1))
    want = ColorJitter.apply(imgs.float(), torch.tensor(orders), torch.tensor(factors, dtype=torch.float64))
    diff = (torch.stack(outs).float() - want).abs()
    assert diff.max() <= 3 and (diff > 0).float().mean() < 1e-3
    assert len({tuple(o) for o in orders}) > 3 and not torch.equal(torch.stack(outs), imgs)
    again = imgs[0].permute(1, 2, 0).clone()
    wj(again, random.Random(0))
    assert torch.equal(again.permute(2, 0, 1), outs[0])


MIXUP_CASES = [  # (flags, the kinds of batches 40 trials must produce)
    (dict(mixup_alpha=0.8, cutmix_alpha=1.0), {"mixup", "cutmix"}),  # both: switch per batch
    (dict(mixup_alpha=0.2, cutmix_alpha=0.0), {"mixup"}),
    (dict(mixup_alpha=0.0, cutmix_alpha=1.0, prob=0.7), {"cutmix", "none"}),
    (dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.5, switch_prob=0.3), {"mixup", "cutmix", "none"}),
    (dict(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=(0.2, 0.8)), {"cutmix"}),
]


@pytest.mark.parametrize("case,kinds_expected", MIXUP_CASES)
def test_mixup_equals_timm_for_the_same_numpy_draws(case, kinds_expected):
    """timm's Mixup draws from numpy's global legacy generator; ours from a RandomState: seeded
    alike, the mixed images and the soft targets are identical."""
    from timm.data import Mixup as TimmMixup
    kinds = set()
    for trial in range(40):
        x = torch.randn(8, 3, 20, 28)
        y = torch.randint(0, 10, (8,))
        np.random.seed(trial)
        ref_x, ref_y = TimmMixup(**case, label_smoothing=0.1, num_classes=10)(x.clone(), y)
        ours = Mixup(**case, label_smoothing=0.1, num_classes=10)
        got_x, got_y = ours(x.clone(), y, np.random.RandomState(trial))
        assert torch.equal(got_x, ref_x) and torch.equal(got_y, ref_y), trial
        lam, box = ours.params(np.random.RandomState(trial), (20, 28))
        kinds.add("none" if lam == 1 else "cutmix" if box else "mixup")
    assert kinds_expected <= kinds


def test_mixup_off_gives_smoothed_one_hot_targets_and_untouched_images():
    from timm.data.mixup import mixup_target
    m = Mixup(0.8, 1.0, label_smoothing=0.1, num_classes=5)
    m.enabled = False
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 1, 4])
    rs = np.random.RandomState(0)
    state = rs.get_state()[1].copy()
    out, target = m(x.clone(), y, rs)
    assert torch.equal(out, x) and torch.equal(target, mixup_target(y, 5, 1.0, 0.1))
    assert target[1].tolist() == pytest.approx([0.02, 0.02, 0.02, 0.92, 0.02])
    assert np.array_equal(rs.get_state()[1], state)  # no draws while off, as timm


@pytest.mark.parametrize("mode,count", [("pixel", 1), ("rand", 1), ("const", 1), ("pixel", 3)])
def test_random_erasing_equals_timm(mode, count):
    """timm's RandomErasing draws boxes from Python's global random and fills from torch's global
    generator; ours from explicit generators seeded alike: identical batches."""
    from timm.data.random_erasing import RandomErasing as TimmErasing
    x = torch.randn(16, 3, 32, 40)
    random.seed(7)
    torch.manual_seed(11)
    ref = TimmErasing(0.5, mode=mode, max_count=count, device="cpu")(x.clone())
    got = RandomErasing(0.5, mode=mode, max_count=count)(x.clone(), random.Random(7), torch.Generator().manual_seed(11))
    assert torch.equal(got, ref)
    erased = (got != x).flatten(1).any(1)
    if mode != "const":
        assert 3 <= int(erased.sum()) <= 13  # about half the images


def _augment(**kw):
    cfg = dict(jitter=ColorJitter(), mixup=Mixup(0.8, 1.0, num_classes=10), erasing=RandomErasing(0.5))
    cfg.update(kw)
    return DeviceAugment("cpu", seed=3, rank=0, **cfg)


def test_device_augment_is_a_pure_function_of_the_batch_position():
    """Same (seed, rank, epoch, index) -> same batch, whatever ran before (a resume, another
    process); another index, epoch or rank -> other draws."""
    images = uint8_images(8, seed=1).permute(0, 2, 3, 1).contiguous()
    labels = torch.arange(8) % 10
    norm = Normalize("cpu")

    def run(aug, epoch, start, n):
        aug.set_epoch(epoch, start)
        return [aug(images, labels, norm) for _ in range(n)]

    a = run(_augment(), 2, 0, 3)
    b = run(_augment(), 2, 2, 1)  # resumed at the third batch of epoch 2
    assert torch.equal(a[2][0], b[0][0]) and torch.equal(a[2][1], b[0][1])
    assert not torch.equal(a[0][0], a[1][0])
    c = run(_augment(), 3, 0, 1)
    assert not torch.equal(a[0][0], c[0][0])
    other_rank = DeviceAugment("cpu", seed=3, rank=1, jitter=ColorJitter())
    other_rank.set_epoch(2)
    assert not torch.equal(run(_augment(mixup=None, erasing=None), 2, 0, 1)[0][0], other_rank(images, labels, norm)[0])
    # the jitter happens before normalisation: undo it and the values are integer levels
    plain = run(_augment(mixup=None, erasing=None), 0, 0, 1)[0][0]
    levels = (plain * norm.scale.reciprocal() - norm.bias * norm.scale.reciprocal())
    assert torch.allclose(levels, levels.round(), atol=2e-3) and not torch.equal(plain, norm(images))


def test_mixup_off_epoch_turns_mixup_off():
    aug = DeviceAugment("cpu", mixup=Mixup(1.0, 0.0, num_classes=10), mixup_off_epoch=2)
    images, labels = uint8_images(4).permute(0, 2, 3, 1).contiguous(), torch.arange(4)
    for epoch, enabled in ((0, True), (1, True), (2, False), (5, False)):
        aug.set_epoch(epoch)
        x, target = aug(images, labels, Normalize("cpu"))
        assert aug.mixup.enabled is enabled
        assert torch.equal(x, Normalize("cpu")(images)) is (not enabled)
        assert target.shape == (4, 10) and target.dtype == torch.float32


def test_batch_random_generators_differ_per_batch():
    a, b = BatchRandom(0, 0, 0, 0, torch.Generator()), BatchRandom(0, 0, 0, 1, None)
    assert a.py.random() != b.py.random() and a.np.rand() != b.np.rand()


def test_no_value_is_read_back_from_the_device():
    """On the 'meta' device a tensor has no values: any .item(), .tolist(), bool() or copy to
    the host raises. The whole augmentation of a batch runs there, so on a GPU it queues work
    without waiting for it."""
    images = torch.empty((8, 16, 16, 3), dtype=torch.uint8, device="meta")
    labels = torch.empty((8,), dtype=torch.int64, device="meta")
    aug = DeviceAugment("meta", jitter=ColorJitter(), mixup=Mixup(0.8, 1.0, num_classes=10),
                        erasing=RandomErasing(1.0, max_count=2))
    for epoch in range(2):
        aug.set_epoch(epoch)
        for _ in range(3):
            x, target = aug(images, labels, Normalize("meta"))
            assert x.device.type == "meta" and target.shape == (8, 10)
    with pytest.raises(RuntimeError, match="meta"):
        x.sum().item()  # the probe works: reading a value does fail


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_augment_has_no_host_sync():
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 10, (16,), device="cuda")
    aug = DeviceAugment("cuda", jitter=ColorJitter(), mixup=Mixup(0.8, 1.0, num_classes=10),
                        erasing=RandomErasing(0.5))
    aug.set_epoch(0)
    norm = Normalize("cuda")
    aug(images, labels, norm)  # warm-up: first-call allocations and lazy initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            aug(images, labels, norm)
    finally:
        torch.cuda.set_sync_debug_mode("default")
