"""Decode + augment: formats, crop geometry, agreement with timm/PIL, reduced-size decoding."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import transforms as T


def smooth_image(w, h, seed=0):
    """A smooth RGB picture (resizes of it are comparable across implementations)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8))
    return small.resize((w, h), Image.BICUBIC)


def encode(im, fmt="JPEG", **kw):
    b = io.BytesIO()
    im.save(b, format=fmt, quality=95, **kw) if fmt == "JPEG" else im.save(b, format=fmt, **kw)
    return bytearray(b.getvalue())


def hwc(t):
    return t.numpy().astype(np.int32)


@pytest.mark.parametrize("mode,progressive", [("RGB", False), ("RGB", True), ("L", False), ("CMYK", False)])
def test_jpeg_header(mode, progressive):
    data = encode(smooth_image(123, 77).convert(mode), progressive=progressive)
    w, h, comps = T.jpeg_header(data)
    assert (w, h) == (123, 77) and comps == {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    assert T.jpeg_header(encode(smooth_image(10, 10), "PNG")) is None
    assert T.jpeg_header(bytearray(b"\xff\xd8garbage")) is None


def test_rrc_box_inside_image_with_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(1, 900), rng.randint(1, 900)
        x, y, cw, ch = T.rrc_box(w, h, rng)
        assert 0 <= x and 0 <= y and x + cw <= w and y + ch <= h and cw > 0 and ch > 0
    areas = [T.rrc_box(500, 375, rng) for _ in range(2000)]
    frac = np.array([cw * ch / (500 * 375) for _, _, cw, ch in areas])
    assert frac.min() >= 0.07 and frac.max() <= 1.0 and 0.4 < frac.mean() < 0.65


@pytest.mark.parametrize("decoder", ["tv", "pil"])
@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"),
                                      ("PNG", "RGBA"), ("WEBP", "RGB"), ("BMP", "RGB")])
def test_formats_decode_to_rgb_like_pil(decoder, fmt, mode):
    im = smooth_image(160, 120).convert(mode)
    data = encode(im, fmt)
    ref = np.asarray(Image.open(io.BytesIO(bytes(data))).convert("RGB").resize((64, 64), Image.BILINEAR))
    out = torch.empty((64, 64, 3), dtype=torch.uint8)
    tf = T.EvalTransform(64, crop_pct=1.0, interpolation="bilinear", decoder=decoder)
    T.resize_into(*T.decode(data, lambda w, h: (0, 0, w, h), (64, 64), decoder), out, False, "bilinear")
    assert np.abs(hwc(out) - ref).mean() < 3
    tf(data, out)  # the full eval path accepts every format too
    assert out.shape == (64, 64, 3)


@pytest.mark.parametrize("data", [bytearray(), bytearray(b"not an image at all"),
                                  bytearray(b"\xff\xd8\xff\xe0" + bytes(300))])
def test_undecodable_bytes_raise_decode_error(data):
    with pytest.raises(T.DecodeError):
        T.TrainTransform(32)(data, torch.empty((32, 32, 3), dtype=torch.uint8), random.Random(0))


def test_truncated_jpeg_raises_decode_error():
    data = encode(smooth_image(300, 200))
    with pytest.raises(T.DecodeError):
        T.EvalTransform(32)(data[: len(data) // 2], torch.empty((32, 32, 3), dtype=torch.uint8))


def test_eval_transform_matches_timm():
    from timm.data import create_transform
    im = smooth_image(500, 375)
    data = encode(im)
    ref_tf = create_transform(224, is_training=False, crop_pct=0.875, interpolation="bicubic")
    ref = (ref_tf(Image.open(io.BytesIO(bytes(data))).convert("RGB")))  # normalised float CHW
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    ref = (ref * std[:, None, None] + mean[:, None, None]).mul(255).permute(1, 2, 0).numpy()
    out = torch.empty((224, 224, 3), dtype=torch.uint8)
    T.EvalTransform(224, 0.875, "bicubic")(data, out)
    assert np.abs(hwc(out) - ref).mean() < 3.0  # PIL's and torch's bicubic differ slightly
    T.EvalTransform(224, 1.0, "bicubic")(data, out)
    assert np.abs(hwc(out) - ref).mean() > 6.0  # ...much less than a wrong crop does


def test_flip_mirrors_the_same_crop():
    data = encode(smooth_image(400, 300))
    img, box = T.decode(data, lambda w, h: (50, 40, 200, 150), (96, 96))
    a, b = (torch.empty((96, 96, 3), dtype=torch.uint8) for _ in range(2))
    T.resize_into(img, box, a, False, "bilinear")
    T.resize_into(img, box, b, True, "bilinear")
    assert torch.equal(a.flip(1), b) and not torch.equal(a, b)


def test_train_transform_is_deterministic_per_rng_and_random_across_draws():
    data = encode(smooth_image(300, 200))
    tf = T.TrainTransform(64)
    outs = []
    for seed in (1, 1, 2):
        out = torch.empty((64, 64, 3), dtype=torch.uint8)
        tf(data, out, random.Random(seed))
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_reduced_size_decoding_for_large_crops(monkeypatch):
    big = smooth_image(1600, 1200)
    data = encode(big)
    box = (100, 80, 1200, 900)
    full = torch.empty((224, 224, 3), dtype=torch.uint8)
    T.resize_into(*T.decode(data, lambda w, h: box, (224, 224), reduce=False), full, False, "bilinear")

    def no_full_decode(_data):
        raise AssertionError("a crop 4x the output should not be decoded at full size")
    monkeypatch.setattr(T, "_decode_tv", no_full_decode)
    img, scaled = T.decode(data, lambda w, h: box, (224, 224), reduce=True)
    assert img.shape[1:] == (300, 400)  # 1/4 scale: 1200/224 >= 4
    reduced = torch.empty((224, 224, 3), dtype=torch.uint8)
    T.resize_into(img, scaled, reduced, False, "bilinear")
    assert np.abs(hwc(reduced) - hwc(full)).mean() < 2.0


def photo_like(seed, size=(500, 375)):
    """A JPEG with a photo's statistics: a demo-data scene (shape, texture, gradient, sensor
    noise) under 1/f-like structure at several scales, so resampling differences show."""
    from dataprep.demo import render
    rng = np.random.default_rng(seed)
    w, h = size
    img = np.asarray(render(seed % 10, 10, size, rng), dtype=np.float32) * 0.7 + 40
    for octave in (4, 16, 64):
        small = rng.normal(0, 1, (max(2, h // octave), max(2, w // octave), 3))
        small = ((small - small.min()) / np.ptp(small) * 255).astype(np.uint8)
        up = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img += (up - 128) * (octave / 64) * 0.6
    return encode(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))


def timm_eval_uint8(data, size=224, crop_pct=0.875, interpolation="bicubic"):
    """timm's eval transform on a PIL image, de-normalised back to HWC levels."""
    from timm.data import create_transform
    tf = create_transform(size, is_training=False, crop_pct=crop_pct, interpolation=interpolation)
    x = tf(Image.open(io.BytesIO(bytes(data))).convert("RGB"))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x * std[:, None, None] + mean[:, None, None]).mul(255).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 500), (1200, 900)])
def test_eval_tensor_equals_timm_on_photo_like_images(size):
    """Resize the shorter side to floor(224 / 0.875) = 256 (bicubic), then centre-crop 224, with
    torchvision's rounding: within half a level of timm's transform (a crop box resized straight
    to 224 was 3-6 levels off: a crop shifted by up to a source pixel)."""
    diffs = []
    for seed in range(3):
        data = photo_like(seed, size)
        out = torch.empty((224, 224, 3), dtype=torch.uint8)
        T.EvalTransform(224, 0.875, "bicubic")(data, out)
        diffs.append(np.abs(hwc(out) - timm_eval_uint8(data)))
    diff = np.stack(diffs)
    assert diff.mean() < 0.5 and (diff > 2).mean() < 0.01, (diff.mean(), (diff > 2).mean())


def test_eval_geometry_rounds_like_torchvision():
    g = T.eval_geometry(500, 375, 224, 0.875)  # shorter side 375 -> 256, longer int(256 * 500 / 375)
    assert (g.rh, g.rw, g.top, g.left) == (256, 341, 16, 58) and g[:4] == (0, 0, 500, 375)
    g = T.eval_geometry(333, 500, 224, 0.875)
    assert (g.rh, g.rw, g.top, g.left) == (384, 256, 80, 16)
    g = T.eval_geometry(300, 300, 224, 1.0)
    assert (g.rh, g.rw, g.top, g.left) == (224, 224, 0, 0)


def test_random_interpolation_draws_box_then_mode_then_flip_like_timm():
    """'random' picks bilinear or bicubic per image after the crop box, from the same Python
    random stream timm's RandomResizedCropAndInterpolation uses (then the flip)."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    timm_rrc = RandomResizedCropAndInterpolation(64, interpolation="random")
    data = encode(smooth_image(300, 200))
    tf = T.TrainTransform(64, interpolation="random")
    modes = []
    for seed in range(24):
        random.seed(seed)
        i, j, h, w = timm_rrc.get_params(Image.new("RGB", (300, 200)), timm_rrc.scale, timm_rrc.ratio)
        timm_mode = random.choice(timm_rrc.interpolation).value  # torchvision InterpolationMode
        rng = random.Random(seed)
        box, mode, flip = tf.box(300, 200, rng), tf.mode(rng), tf.flip(rng)
        assert box == (j, i, w, h) and mode == timm_mode
        modes.append(mode)
        out, ref = (torch.empty((64, 64, 3), dtype=torch.uint8) for _ in range(2))
        tf(data, out, random.Random(seed))
        T.resize_into(*T.decode(data, lambda *_, b=box: b, (64, 64)), ref, flip, mode)
        assert torch.equal(out, ref)
    assert set(modes) == {"bilinear", "bicubic"}
    with pytest.raises(ValueError, match="unknown interpolation"):
        T.TrainTransform(64, interpolation="nearest")
