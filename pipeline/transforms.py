"""Stage 3b: decode + augment one sample into a uint8 HWC slot of the batch.

Both decoders (torchvision `decode_jpeg`, PIL) share one resize: torch's uint8 antialiased
kernel, run on a crop first made channels-last-contiguous so that its output is already HWC
(PIL's own resize and the strided-view variant cost more: BENCHMARKS.md, "Streaming loader").

The geometry of a sample is a `Geometry`: a box of the source image, the size the box is
resized to, and the offset of the output window in that resized image.
- train: timm's RandomResizedCropAndInterpolation (crop box drawn as torchvision's
  RandomResizedCrop.get_params, resized to the output; `interpolation="random"` picks bilinear
  or bicubic per image after the box, as timm does), then a horizontal flip;
- eval: timm's `transforms_imagenet_eval`: the whole image resized so that its shorter side is
  floor(size / crop_pct) (torchvision's Resize rounding: the longer side truncated), then a
  centre crop of `size` at round((H - size) / 2), round((W - size) / 2).

Reduced-size decoding: when the box is at least twice the size it is resized to in both
directions, the JPEG is decoded by PIL at 1/2, 1/4 or 1/8 scale (libjpeg-turbo DCT scaling,
`Image.draft`).

Before anything is decoded, the size in the image's header (a JPEG's frame header, a PNG's IHDR,
PIL's header read for other formats) is held against MAX_PIXELS, and the bytes its pixels take
(channels, alpha included, times bytes a channel) against MAX_DECODED_BYTES. 16-bit images
become 8-bit by keeping each value's high byte, a view that copies nothing.
"""
from __future__ import annotations

import io
import math
import struct
import sys
import warnings

import torch
import torch.nn.functional as F
from PIL import Image

from .geometry import (
    DEFAULT_HFLIP,
    DEFAULT_RATIO,
    DEFAULT_SCALE,
    DEFAULT_VFLIP,
    INTERPOLATIONS,
    Geometry,
    check_train_crop,
    crop_geometry,
    draw_flips,
    eval_geometry,
    pick_interpolation,
    rrc_box,
)
from .jpeg import MAX_DECODED_BYTES, MAX_PIXELS, jpeg_header

# PIL hands over read-only buffers; we only ever read them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

__all__ = ["DecodeError", "EvalTransform", "Geometry", "INTERPOLATIONS", "TrainTransform", "check_pixels",
           "crop_geometry", "decode", "eval_geometry", "jpeg_header", "resize_into", "rrc_box"]

class DecodeError(Exception):
    """The bytes are not a decodable image."""


def check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise DecodeError(f"{width}x{height} pixels is over the limit of {MAX_PIXELS:,} (a decompression bomb?)")


def check_decoded_bytes(width: int, height: int, channels: int, depth: int) -> None:
    """DecodeError when the decoded pixels (at least RGB, `depth` bytes a channel) would take
    more than MAX_DECODED_BYTES."""
    need = width * height * max(3, channels) * depth
    if need > MAX_DECODED_BYTES:
        raise DecodeError(f"{width}x{height} pixels of {channels} x {8 * depth} bits take {need:,} bytes to decode, "
                          f"over the limit of {MAX_DECODED_BYTES:,}")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # by colour type: gray, RGB, palette (to RGB), gray+alpha, RGBA
_PIL_DEPTH = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}


def _header_size(data) -> tuple[int, int]:
    """(width, height) of a non-JPEG image from its header, without decoding the pixels; an
    image whose size cannot be read this way is not decoded at all. Also checks what its pixels
    take (check_decoded_bytes), from a PNG's IHDR (PIL does not tell 16-bit RGB apart)."""
    head = bytes(data[:29])
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
        width, height, bits, colour = struct.unpack(">IIBB", head[16:26])
        check_pixels(width, height)
        check_decoded_bytes(width, height, _PNG_CHANNELS.get(colour, 4), 2 if bits == 16 else 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                check_pixels(*im.size)
                check_decoded_bytes(*im.size, len(im.getbands()), _PIL_DEPTH.get(im.mode, 1))
                return im.size
    except DecodeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DecodeError(f"over the pixel limit: {e}") from None
    except Exception as e:  # PIL raises several types for what it cannot identify
        raise DecodeError(f"unreadable image header ({type(e).__name__}: {e})") from None


def _decode_tv(data) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image
    buf = data if isinstance(data, torch.Tensor) else torch.frombuffer(data, dtype=torch.uint8)
    img = decode_image(buf, mode=ImageReadMode.RGB)
    if img.dtype != torch.uint8:  # 16-bit PNG: keep the high byte, a strided view (no copy)
        high = 1 if sys.byteorder == "little" else 0
        c, h, w = img.shape
        img = img.contiguous().view(torch.uint8).view(c, h, w, 2)[..., high]
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
    """Map a box (or the box of a Geometry) from header pixels to decoded pixels, kept inside
    the image; the rest of a Geometry is unchanged."""
    if sx == 1.0 and sy == 1.0:
        return box
    x, y = min(int(box[0] * sx), img.shape[2] - 1), min(int(box[1] * sy), img.shape[1] - 1)
    w = max(1, min(int(round(box[2] * sx)), img.shape[2] - x))
    h = max(1, min(int(round(box[3] * sy)), img.shape[1] - y))
    return (x, y, w, h) + tuple(box[4:]) if not isinstance(box, Geometry) else box._replace(x=x, y=y, w=w, h=h)


def decode(data, box_fn, out_hw, decoder: str = "tv", reduce: bool = True):
    """Decode `data` and pick its geometry: (CHW uint8 view with HWC memory, box or Geometry).

    `box_fn(width, height)` returns a box (x, y, w, h), resized to `out_hw`, or a Geometry, in
    original pixels; the returned box is in the pixels of the returned image, which is smaller
    when reduced-size decoding applied.
    """
    try:
        header = jpeg_header(data)
        if header is None:  # PNG, WebP, a damaged JPEG...: decode first, then crop
            _header_size(data)  # checks the pixel and decoded-byte limits
            img = _decode_tv(data) if decoder == "tv" else _decode_pil(data)
            return img, box_fn(img.shape[2], img.shape[1])
        width, height, components = header
        check_pixels(width, height)
        check_decoded_bytes(width, height, components, 1)
        box = box_fn(width, height)
        if isinstance(box, Geometry):
            out_hw = (box.rh, box.rw)
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


def resize_into(img: torch.Tensor, box, out: torch.Tensor, flip: bool, mode: str, vflip: bool = False) -> None:
    """Crop `box` (x, y, w, h) of a CHW image and resize it into the HWC uint8 `out`; or, for a
    Geometry, resize the box to (rh, rw) and copy the window at (top, left). Flips horizontally
    (`flip`) and vertically (`vflip`)."""
    x, y, w, h = box[:4]
    size = tuple(out.shape[:2]) if not isinstance(box, Geometry) else (box.rh, box.rw)
    crop = img[:, y:y + h, x:x + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
    res = F.interpolate(crop, size=size, mode=mode, antialias=True)
    hwc = res[0].permute(1, 2, 0)  # channels-last output: a contiguous HWC view
    if isinstance(box, Geometry):
        hwc = hwc[box.top:box.top + out.shape[0], box.left:box.left + out.shape[1]]
    dims = (0,) * vflip + (1,) * flip
    out.copy_(hwc.flip(dims) if dims else hwc)


def _check_interpolation(name: str, allowed) -> str:
    if name not in allowed:
        raise ValueError(f"unknown interpolation {name!r}: choose one of {', '.join(allowed)}")
    return name


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio) with bilinear, bicubic or random interpolation,
    horizontal and vertical flips, then an optional uint8 augmentation of the output (RandAugment,
    pipeline/autoaugment.py's timm policies), in uint8.

    Draws from `rng` per image, in timm's order: the crop box, the interpolation (only when
    'random'), the horizontal flip (only when hflip > 0), the vertical flip (only when vflip > 0),
    then whatever `augment(out, rng)` draws. At timm's defaults (scale 0.08-1, ratio 3/4-4/3,
    hflip 0.5, vflip 0) the draws are those of the reference run's transform.
    """

    def __init__(self, size: int, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO, hflip: float = DEFAULT_HFLIP,
                 interpolation: str = "bilinear", decoder: str = "tv", reduce: bool = True, augment=None,
                 vflip: float = DEFAULT_VFLIP):
        self.scale, self.ratio, self.hflip, self.vflip = check_train_crop(scale, ratio, hflip, vflip)
        self.size = size
        self.interpolation = _check_interpolation(interpolation, INTERPOLATIONS + ("random",))
        self.decoder, self.reduce, self.augment = decoder, reduce, augment

    def box(self, width, height, rng):
        return rrc_box(width, height, rng, self.scale, self.ratio)

    def geometry(self, width, height, rng) -> Geometry:
        return crop_geometry(self.box(width, height, rng), self.size)

    def mode(self, rng) -> str:
        return pick_interpolation(self.interpolation, rng)

    def flip(self, rng) -> bool:
        """The horizontal flip alone (GPU decoding's path, which has no vertical flip)."""
        return self.hflip > 0 and rng.random() < self.hflip

    def flips(self, rng) -> tuple[bool, bool]:
        return draw_flips(rng, self.hflip, self.vflip)

    def __call__(self, data, out: torch.Tensor, rng) -> None:
        img, box = decode(data, lambda w, h: self.box(w, h, rng), (self.size, self.size),
                          self.decoder, self.reduce)
        mode = self.mode(rng)
        hflip, vflip = self.flips(rng)
        resize_into(img, box, out, hflip, mode, vflip)
        if self.augment is not None:
            self.augment(out, rng)


class EvalTransform:
    """Resize the shorter side to floor(size / crop_pct) and centre-crop `size`, in uint8.

    No reduced-size decoding by default: on large images it moves the tensor about 0.8 levels
    away from timm's (tests/test_transforms.py), and evaluation is not the loader's bottleneck.
    """

    def __init__(self, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic",
                 decoder: str = "tv", reduce: bool = False):
        self.size, self.crop_pct = size, crop_pct
        self.interpolation = _check_interpolation(interpolation, INTERPOLATIONS)
        self.decoder, self.reduce = decoder, reduce

    def geometry(self, width, height, rng=None) -> Geometry:
        return eval_geometry(width, height, self.size, self.crop_pct)

    def mode(self, rng=None) -> str:
        return self.interpolation

    def flip(self, rng) -> bool:
        return False

    def __call__(self, data, out: torch.Tensor, rng=None) -> None:
        img, geom = decode(data, self.geometry, (self.size, self.size), self.decoder, self.reduce)
        resize_into(img, geom, out, False, self.interpolation)

