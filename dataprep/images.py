"""Per image: keep its JPEG bytes, transcode it to JPEG, or skip it with a reason."""
from __future__ import annotations

import io
import os
import stat
import warnings

from PIL import Image, UnidentifiedImageError

from pipeline.jpeg import MAX_PIXELS, jpeg_frame

TRANSCODE, RESIZE = 1, 2  # per-sample flags decided by the scan
JPEG_QUALITY = 95  # the default of make_shards --jpeg-quality


MAX_IMAGE_BYTES = 64 << 20  # the default of make_shards --max-image-bytes: far above any ImageNet photo


def read_image(loc, max_bytes=MAX_IMAGE_BYTES):
    """(bytes, None) of one image, or (None, reason) to skip it unread.

    loc is a path, or (archive path, offset, size) for a member of an uncompressed tar. A file
    over max_bytes is skipped without reading it, so memory stays bounded by the limit.
    """
    path, offset, size = loc if isinstance(loc, tuple) else (loc, None, None)
    try:
        # O_NONBLOCK: opening a FIFO named x.jpg must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return None, f"unreadable: {e.strerror}"
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file (a FIFO, device or socket)"
        if size is None:
            size = st.st_size
        if max_bytes and size > max_bytes:
            return None, f"too large: {size:,} bytes, over --max-image-bytes {max_bytes:,}"
        try:
            if offset is not None:
                data = os.pread(fd, size, offset)
            else:  # read at most one byte past the limit: a file may grow after the fstat
                data = f.read(max_bytes + 1 if max_bytes else -1)
        except OSError as e:
            return None, f"unreadable: {e.strerror}"
    if max_bytes and len(data) > max_bytes:
        return None, f"too large: over --max-image-bytes {max_bytes:,} bytes (it grew while read)"
    if offset is not None and len(data) != size:
        return None, "unreadable: the archive ends early"
    return data, None


def classify(loc, resize_max=None, max_bytes=MAX_IMAGE_BYTES):
    """(flags, None) for a usable image, (None, reason) for one to skip.

    A plain JPEG keeps its bytes (flags 0); anything else that decodes is TRANSCODEd to RGB JPEG;
    RESIZE is added when the longer side exceeds resize_max. The marker walk (`jpeg_frame`)
    is far cheaper than a decode (BENCHMARKS.md); any JPEG it rejects goes to Pillow, which
    makes the final call. Files that are not regular (FIFOs, devices) or larger than max_bytes are
    skipped unread, and images whose header claims more than MAX_PIXELS undecoded.
    """
    data, reason = read_image(loc, max_bytes)
    if reason:
        return None, reason
    if not data:
        return None, "empty file"
    frame = jpeg_frame(data)
    flags = 0
    if frame is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit follows
                with Image.open(io.BytesIO(data)) as im:
                    if im.size[0] * im.size[1] > MAX_PIXELS:
                        return None, _too_large(*im.size)
                    im.load()
                    frame = im.size
        except UnidentifiedImageError:
            return None, "not an image (unknown format)"
        except Exception as e:  # PIL raises many types for broken files; any of them means skip
            return None, f"cannot decode: {e}"
        flags = TRANSCODE
    elif frame[0] * frame[1] > MAX_PIXELS:
        return None, _too_large(*frame)
    if resize_max and max(frame) > resize_max:
        flags |= RESIZE
    return flags, None


def _too_large(width, height):
    return f"too large: {width}x{height} pixels, over the limit of {MAX_PIXELS:,} (a decompression bomb?)"


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
