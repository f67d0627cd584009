"""A small, learnable ImageFolder of real JPEG files (no download needed).

Layout: ROOT/train/<class>/<file>.JPEG and ROOT/val/<class>/<file>.JPEG, like ImageNet.
Each class has its own shape, colour and texture; every image adds a random position, scale,
rotation, background gradient and pixel noise, so a small CNN must actually learn the classes.
Sizes vary +-30% around image_size. With odd_images, each split also gets a tiny, a very
elongated, a large, a grayscale, a CMYK and a progressive JPEG (extra files, spread over classes).
The same seed gives byte-identical files.
"""
import colorsys
import io
import math
import os

import numpy as np
from PIL import Image, ImageChops, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon", "bar", "arrow")
TEXTURES = ("stripes", "checker", "dots", "solid")
ODD_KINDS = ("tiny", "elongated", "large", "gray", "cmyk", "progressive")
SPLITS = (("train", 1), ("val", 2))
QUALITY = 90


def class_names(num_classes):
    width = max(3, len(str(num_classes - 1)))
    return [f"c{i:0{width}d}-{SHAPES[i % len(SHAPES)]}-{TEXTURES[i % len(TEXTURES)]}"
            for i in range(num_classes)]


def _class_colour(index, num_classes):
    # Evenly spaced hues while they stay far apart; more classes also differ by shape/texture.
    hue = index / num_classes if num_classes <= 12 else (index * 0.618034) % 1.0
    return hue


def _outline(shape):
    """Unit-size polygon (about [-1, 1]^2) of a shape, before rotation."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    if shape in ("circle", "ring"):
        return circle
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.85
    if shape == "triangle":
        return np.array([[0, -1], [0.95, 0.75], [-0.95, 0.75]])
    if shape == "diamond":
        return np.array([[0, -1], [0.65, 0], [0, 1], [-0.65, 0]])
    if shape == "cross":
        a, b = 0.3, 1.0
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b],
                         [-a, a], [-b, a], [-b, -a], [-a, -a]])
    if shape == "star":
        k = np.arange(10)
        r = np.where(k % 2 == 0, 1.0, 0.45)
        return np.stack([r * np.sin(k * np.pi / 5), -r * np.cos(k * np.pi / 5)], 1)
    if shape == "hexagon":
        return circle[::8]
    if shape == "bar":
        return np.array([[-1, -0.3], [1, -0.3], [1, 0.3], [-1, 0.3]])
    if shape == "arrow":
        return np.array([[-1, -0.25], [0.2, -0.25], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.25], [-1, 0.25]])
    raise ValueError(shape)


def _mask(shape, size, centre, radius, angle):
    w, h = size
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    points = _outline(shape) @ rot.T * radius + centre
    draw.polygon([tuple(p) for p in points.tolist()], fill=255)
    if shape == "ring":
        inner = _outline("circle") * radius * 0.55 + centre
        draw.polygon([tuple(p) for p in inner.tolist()], fill=0)
    return np.asarray(mask) > 127


def _texture(kind, size, radius, angle):
    """Pattern of 0/1 whose period scales with the object, so it survives downscaling."""
    w, h = size
    y, x = np.ogrid[0:h, 0:w]
    step = 1.0 / max(radius / 2.5, 2.0)
    # Offset keeps coordinates positive, so int truncation acts as floor.
    u = x * np.float32(math.cos(angle) * step) + (y * np.float32(math.sin(angle) * step) + np.float32(1e4))
    v = y * np.float32(math.cos(angle) * step) - (x * np.float32(math.sin(angle) * step) - np.float32(1e4))
    if kind == "stripes":
        return u.astype(np.int32) & 1
    if kind == "checker":
        return (u.astype(np.int32) + v.astype(np.int32)) & 1
    if kind == "dots":
        return ((u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2 < 0.09).astype(np.int32)
    return np.ones((h, w), np.int32)


def _noise(rng, shape):
    # rng.bytes is the cheapest source of many random numbers; 0..31 per value.
    return np.frombuffer(rng.bytes(math.prod(shape)), np.uint8).reshape(shape) >> 3


def render(class_index, num_classes, size, rng, gray=False):
    """One RGB (or L) PIL image of a class, drawn with the given numpy Generator.

    Built as a palette image (128 background gradient levels, 2 object tones) so that the
    per-pixel work stays in 8-bit arrays and PIL's C code.
    """
    w, h = size
    shape = SHAPES[class_index % len(SHAPES)]
    texture = TEXTURES[class_index % len(TEXTURES)]
    # Background: a low-saturation gradient in a random direction.
    c0, c1 = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
    c0 = c0.mean() + 0.25 * (c0 - c0.mean())
    c1 = c1.mean() + 0.25 * (c1 - c1.mean())
    direction = rng.uniform(0, 2 * np.pi)
    y, x = np.ogrid[0:h, 0:w]
    # Levels 0..127 across the image: centred coordinates, scaled by the half diagonal.
    scale = 63.0 / math.hypot(w / 2, h / 2)
    level = ((x - w / 2) * np.float32(math.cos(direction) * scale)
             + ((y - h / 2) * np.float32(math.sin(direction) * scale) + np.float32(63.5)))
    # Object: class shape, colour and texture at a random place, scale and angle.
    radius = min(w, h) * rng.uniform(0.2, 0.4)
    centre = np.array([rng.uniform(radius * 0.8, w - radius * 0.8), rng.uniform(radius * 0.8, h - radius * 0.8)])
    angle = rng.uniform(0, 2 * np.pi)
    hue = (_class_colour(class_index, num_classes) + rng.uniform(-0.015, 0.015)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0))) * 255
    pattern = _texture(texture, (w, h), radius, rng.uniform(0, np.pi))
    mask = _mask(shape, (w, h), centre, radius, angle)
    index = np.where(mask, pattern + 128, level.astype(np.int32)).astype(np.uint8)
    palette = np.zeros((256, 3))
    palette[:128] = c0 + np.linspace(0, 1, 128)[:, None] * (c1 - c0)
    palette[128:130] = colour * 0.55, colour
    pil = Image.fromarray(index, "P")
    pil.putpalette(np.round(palette).astype(np.uint8).tobytes())
    # Pixel noise: shared (luminance) plus per channel, -31..+31 in all.
    noise = _noise(rng, (h, w, 3)) + _noise(rng, (h, w, 1))
    pil = ImageChops.add(pil.convert("RGB"), Image.fromarray(noise, "RGB"), 1.0, -31)
    return pil.convert("L") if gray else pil


def _jitter(image_size, rng):
    w, h = image_size
    return max(8, round(w * rng.uniform(0.7, 1.3))), max(8, round(h * rng.uniform(0.7, 1.3)))


def _encode(img, **save_args):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=QUALITY, **save_args)
    return buf.getvalue()


def _odd_image(kind, class_index, num_classes, image_size, rng):
    w, h = image_size
    sizes = {"tiny": (40, 30), "elongated": (max(2 * w, 64), max(h // 3, 16)), "large": (1200, 900)}
    size = sizes.get(kind) or _jitter(image_size, rng)
    img = render(class_index, num_classes, size, rng, gray=(kind == "gray"))
    if kind == "cmyk":
        return _encode(img.convert("CMYK"))
    return _encode(img, progressive=(kind == "progressive"))


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)  # no empty class folders when a count is 0
    with open(path, "wb") as f:
        f.write(data)


def make_demo_data(root, num_classes=10, train_per_class=100, val_per_class=20, seed=0,
                   image_size=(500, 375), odd_images=True):
    """Write the demo ImageFolder under root; return {"classes", "train", "val", "odd"} counts."""
    if num_classes < 1:
        raise ValueError("num_classes must be at least 1")
    names = class_names(num_classes)
    counts = {"classes": names, "train": 0, "val": 0, "odd": len(ODD_KINDS) if odd_images else 0}
    for split, split_id in SPLITS:
        per_class = train_per_class if split == "train" else val_per_class
        for c, name in enumerate(names):
            folder = os.path.join(root, split, name)
            for j in range(per_class):
                # One generator per image: files depend only on (seed, split, class, index).
                rng = np.random.default_rng([seed, split_id, c, j])
                img = render(c, num_classes, _jitter(image_size, rng), rng)
                _write(os.path.join(folder, f"{name}_{j:05d}.JPEG"), _encode(img))
                counts[split] += 1
        if odd_images:
            for k, kind in enumerate(ODD_KINDS):
                c = k % num_classes
                rng = np.random.default_rng([seed, split_id, 1_000_000 + k])
                data = _odd_image(kind, c, num_classes, image_size, rng)
                _write(os.path.join(root, split, names[c], f"{names[c]}_odd_{kind}.JPEG"), data)
                counts[split] += 1
    return counts

