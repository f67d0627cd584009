"""Per image: keep its JPEG bytes, transcode it to JPEG, or skip it with a reason."""
from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from pipeline.jpeg import jpeg_frame

TRANSCODE, RESIZE = 1, 2  # per-sample flags decided by the scan
JPEG_QUALITY = 95  # the default of make_shards --jpeg-quality


def classify(path, resize_max=None):
    """(flags, None) for a usable image, (None, reason) for one to skip.

    A plain JPEG keeps its bytes (flags 0); anything else that decodes is TRANSCODEd to RGB JPEG;
    RESIZE is added when the longer side exceeds resize_max. The marker walk (`jpeg_frame`)
    is far cheaper than a decode (BENCHMARKS.md); any JPEG it rejects goes to Pillow, which
    makes the final call.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"unreadable: {e.strerror}"
    if not data:
        return None, "empty file"
    frame = jpeg_frame(data)
    flags = 0
    if frame is None:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                frame = im.size
        except UnidentifiedImageError:
            return None, "not an image (unknown format)"
        except Exception as e:  # PIL raises many types for broken files; any of them means skip
            return None, f"cannot decode: {e}"
        flags = TRANSCODE
    if resize_max and max(frame) > resize_max:
        flags |= RESIZE
    return flags, None


def reencode(data, resize_max=None, quality=JPEG_QUALITY):
    """RGB JPEG (at `quality`) of an image, its longer side shrunk to resize_max if larger."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "JPEG":  # palette and 16-bit images resample badly in their own mode
            im = im.convert("RGB")
        if resize_max and max(im.size) > resize_max:
            im.thumbnail((resize_max, resize_max))  # keeps the aspect ratio; JPEGs decode at reduced scale
        out = io.BytesIO()
        im.convert("RGB").save(out, "JPEG", quality=quality)
        return out.getvalue()
