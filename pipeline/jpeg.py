"""The one JPEG marker walker: the frame size for the loader, the full structure check for make_shards.

`jpeg_header` stops at the frame header (SOF), as the loader needs only the size and the
component count before it picks a crop. `jpeg_frame` walks every segment to EOI and searches
each scan's entropy-coded data for the marker that ends it, so a file cut anywhere or garbage
fails; it does not check the Huffman-coded bits themselves.
"""
from __future__ import annotations

import re

# The most pixels an image may have before it is decoded: PIL's default Image.MAX_IMAGE_PIXELS
# (~89.5 MP, 1024 MiB of 32-bit pixels / 3). ImageNet's largest image is far below it; a file
# whose header claims more is skipped as a decompression bomb (loader and make_shards alike).
MAX_PIXELS = 89_478_485
# ... and the most bytes its decoded pixels may take: PIL's budget behind MAX_PIXELS, 4 bytes a
# pixel (~341 MiB), so 8-bit RGB and RGBA keep the pixel limit while 16 bits a channel count twice
# (a 9000x9000 16-bit PNG is under MAX_PIXELS but takes 486 MB as pixels).
MAX_DECODED_BYTES = MAX_PIXELS * 4

# All start-of-frame markers; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
PLAIN_SOF = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman)
# After an SOS segment the entropy-coded data runs to the next marker: 0xFF followed by a byte
# other than 0x00 (byte stuffing) or 0xD0-0xD7 (restart markers).
_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def _walk(data, complete: bool):
    """(width, height, components) of the frame, or None. complete=True: also require a
    plainly built 8-bit baseline/progressive JPEG with 1 or 3 components that ends in EOI."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, frame = 2, None
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            return frame if complete else None
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            if complete:
                return None
            pos += 2
            continue
        if pos + 4 > n or (complete and marker < 0xC0):
            return None
        end = pos + 2 + ((data[pos + 2] << 8) | data[pos + 3])
        if end < pos + 4 or (complete and end > n):
            return None
        if marker in SOF_MARKERS:
            if pos + 10 > n:
                return None
            precision, components = data[pos + 4], data[pos + 9]
            height, width = (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8]
            if not (width and height):
                return None
            if not complete:
                return width, height, components
            if (marker not in PLAIN_SOF or frame or end - pos < 12 or precision != 8
                    or components not in (1, 3)):
                return None
            frame = (width, height, components)
        elif marker == 0xDA:  # SOS
            if not (complete and frame):
                return None
            found = _ENTROPY_END.search(data, end)
            if not found:
                return None
            end = found.start()
        pos = end
    return None


def jpeg_header(data) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header; None if it is not a JPEG."""
    return _walk(data, complete=False)


def jpeg_frame(data) -> tuple[int, int] | None:
    """(width, height) if `data` is a complete, plainly built 8-bit baseline or progressive JPEG
    with 1 (gray) or 3 (colour) components, else None."""
    frame = _walk(data, complete=True)
    return frame[:2] if frame else None
