"""Stage 3b: decode + augment one sample into a uint8 HWC slot of the batch.

Both decoders (torchvision `decode_jpeg`, PIL) share one resize: torch's uint8 antialiased
kernel, run on a crop first made channels-last-contiguous so that its output is already HWC
(PIL's own resize and the strided-view variant cost more: BENCHMARKS.md, "Streaming loader").

Reduced-size decoding: when the crop is at least twice the output size in both directions, the
JPEG is decoded by PIL at 1/2, 1/4 or 1/8 scale (libjpeg-turbo DCT scaling, `Image.draft`).

Before anything is decoded, the size in the image's header (a JPEG's frame header, PIL's header
read for other formats) is held against MAX_PIXELS. 16-bit images become 8-bit.
"""
from __future__ import annotations

import io
import math
import warnings

import torch
import torch.nn.functional as F
from PIL import Image

from .jpeg import MAX_PIXELS, jpeg_header

# PIL hands over read-only buffers; we only ever read them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

__all__ = ["DecodeError", "EvalTransform", "TrainTransform", "check_pixels", "decode", "jpeg_header",
           "resize_into", "rrc_box"]


class DecodeError(Exception):
    """The bytes are not a decodable image."""


def rrc_box(width: int, height: int, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, on a `random.Random`: (x, y, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_box(width: int, height: int, size: int, crop_pct: float):
    """timm's eval transform (resize shorter side to size/crop_pct, centre crop) as one box."""
    scale = math.floor(size / crop_pct) / min(width, height)
    w = min(width, max(1, int(round(size / scale))))
    h = min(height, max(1, int(round(size / scale))))
    return (width - w) // 2, (height - h) // 2, w, h


def check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise DecodeError(f"{width}x{height} pixels is over the limit of {MAX_PIXELS:,} (a decompression bomb?)")


def _header_size(data) -> tuple[int, int]:
    """(width, height) of a non-JPEG image from its header, without decoding the pixels; an
    image whose size cannot be read this way is not decoded at all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DecodeError(f"over the pixel limit: {e}") from None
    except Exception as e:  # PIL raises several types for what it cannot identify
        raise DecodeError(f"unreadable image header ({type(e).__name__}: {e})") from None


def _decode_tv(data) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image
    buf = data if isinstance(data, torch.Tensor) else torch.frombuffer(data, dtype=torch.uint8)
    img = decode_image(buf, mode=ImageReadMode.RGB)
    if img.dtype != torch.uint8:  # 16-bit PNG: keep the high byte
        img = (img.to(torch.int32) >> 8).to(torch.uint8)
    return img


def _decode_pil(data, width=None, height=None, factor: float = 1.0) -> torch.Tensor:
    """PIL decode, at reduced DCT scale when `factor` >= 2; returns a CHW view."""
    im = Image.open(io.BytesIO(data))
    if factor >= 2 and im.format == "JPEG":
        im.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    im = im.convert("RGB")
    hwc = torch.frombuffer(im.tobytes(), dtype=torch.uint8).view(im.size[1], im.size[0], 3)
    return hwc.permute(2, 0, 1)


def _rescale_box(box, sx: float, sy: float, img: torch.Tensor):
    """Map a box from header pixels to decoded pixels, kept inside the image."""
    if sx == 1.0 and sy == 1.0:
        return box
    x, y = min(int(box[0] * sx), img.shape[2] - 1), min(int(box[1] * sy), img.shape[1] - 1)
    w = max(1, min(int(round(box[2] * sx)), img.shape[2] - x))
    h = max(1, min(int(round(box[3] * sy)), img.shape[1] - y))
    return x, y, w, h


def decode(data, box_fn, out_hw, decoder: str = "tv", reduce: bool = True):
    """Decode `data` and pick its crop box: (CHW uint8 view with HWC memory, (x, y, w, h)).

    `box_fn(width, height)` returns the box in original pixels; the returned box is in the
    pixels of the returned image, which is smaller when reduced-size decoding applied.
    """
    try:
        header = jpeg_header(data)
        if header is None:  # PNG, WebP, a damaged JPEG...: decode first, then crop
            check_pixels(*_header_size(data))
            img = _decode_tv(data) if decoder == "tv" else _decode_pil(data)
            return img, box_fn(img.shape[2], img.shape[1])
        width, height, _ = header
        check_pixels(width, height)
        box = box_fn(width, height)
        factor = min(box[2] / out_hw[1], box[3] / out_hw[0])
        if decoder == "tv" and not (reduce and factor >= 2):
            img = _decode_tv(data)
        else:
            img = _decode_pil(data, width, height, factor if reduce else 1.0)
        return img, _rescale_box(box, img.shape[2] / width, img.shape[1] / height, img)
    except DecodeError:
        raise
    except Exception as e:  # torchvision raises RuntimeError, PIL OSError/ValueError/SyntaxError
        if decoder == "tv":
            return decode(data, box_fn, out_hw, "pil", reduce)  # e.g. BMP, which torchvision lacks
        raise DecodeError(f"{type(e).__name__}: {e}") from None


def resize_into(img: torch.Tensor, box, out: torch.Tensor, flip: bool, mode: str) -> None:
    """Crop `box` of a CHW image, resize it into the HWC uint8 `out`, flipping horizontally."""
    x, y, w, h = box
    crop = img[:, y:y + h, x:x + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
    res = F.interpolate(crop, size=tuple(out.shape[:2]), mode=mode, antialias=True)
    hwc = res[0].permute(1, 2, 0)  # channels-last output: a contiguous HWC view
    out.copy_(hwc.flip(1) if flip else hwc)


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio) + horizontal flip, in uint8."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 interpolation: str = "bilinear", decoder: str = "tv", reduce: bool = True):
        self.size, self.scale, self.ratio, self.hflip = size, scale, ratio, hflip
        self.interpolation, self.decoder, self.reduce = interpolation, decoder, reduce

    def box(self, width, height, rng):
        return rrc_box(width, height, rng, self.scale, self.ratio)

    def flip(self, rng) -> bool:
        return self.hflip > 0 and rng.random() < self.hflip

    def __call__(self, data, out: torch.Tensor, rng) -> None:
        img, box = decode(data, lambda w, h: self.box(w, h, rng), (self.size, self.size),
                          self.decoder, self.reduce)
        resize_into(img, box, out, self.flip(rng), self.interpolation)


class EvalTransform:
    """Resize the shorter side to size/crop_pct and centre-crop `size`, in uint8."""

    def __init__(self, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic",
                 decoder: str = "tv", reduce: bool = True):
        self.size, self.crop_pct, self.interpolation = size, crop_pct, interpolation
        self.decoder, self.reduce = decoder, reduce

    def box(self, width, height, rng=None):
        return center_box(width, height, self.size, self.crop_pct)

    def flip(self, rng) -> bool:
        return False

    def __call__(self, data, out: torch.Tensor, rng=None) -> None:
        img, box = decode(data, self.box, (self.size, self.size), self.decoder, self.reduce)
        resize_into(img, box, out, False, self.interpolation)

