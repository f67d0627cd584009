"""Stage 7 (`--decode gpu`): workers ship JPEG bytes + crop boxes; the device decodes with nvJPEG.

A worker parses each JPEG's header, draws the geometry (crop box, or eval resize + centre
crop), the interpolation and the flip (the same random draws as CPU decoding), and packs a
batch's bytes into one tensor. Anything nvJPEG should not see (PNG,
CMYK, unusual component counts) is decoded and cropped on the CPU in the worker and travels as
pixels. On the device, `torchvision.io.decode_jpeg(list, device="cuda")` decodes the batch;
each image is cropped, resized (float, antialiased), flipped and written into one uint8 NHWC
batch. Everything but the nvJPEG call runs on the CPU too, which is how it is tested here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .jpeg import jpeg_header
from .transforms import INTERPOLATIONS, Geometry, check_pixels

_GPU_OK_COMPONENTS = (1, 3)


class JpegBatch:
    """Packed JPEG bytes + per-image geometry (8 ints, a transforms.Geometry), flip,
    interpolation (index into INTERPOLATIONS) and label; pixels for CPU-decoded leftovers."""

    def __init__(self, data, sizes, boxes, flips, labels, pixel_index, pixels, modes=None):
        self.data, self.sizes, self.boxes, self.flips = data, sizes, boxes, flips
        self.labels, self.pixel_index, self.pixels = labels, pixel_index, pixels
        self.modes = modes if modes is not None else torch.zeros(len(flips), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def pin_memory(self):
        # Only what is copied to the device needs pinning; nvJPEG reads the bytes itself.
        self.labels, self.pixels = self.labels.pin_memory(), self.pixels.pin_memory()
        return self


class JpegBatches:
    """Batch builder for ShardStream: collects bytes and boxes instead of pixels."""

    def __init__(self, transform, batch_size: int):
        self.transform, self.batch_size = transform, batch_size

    def new(self, memory):
        self.memory = memory
        self.items, self.pixels = [], []

    def add(self, i: int, data, label: int, rng) -> None:
        header = jpeg_header(data)
        if header is not None and header[2] in _GPU_OK_COMPONENTS:
            check_pixels(header[0], header[1])
            geom = self.transform.geometry(header[0], header[1], rng)
            mode = INTERPOLATIONS.index(self.transform.mode(rng))
            self.items.append((i, data, geom, self.transform.flip(rng), label, mode))
        else:
            s = self.transform.size
            out = torch.empty((s, s, 3), dtype=torch.uint8)
            self.transform(data, out, rng)  # raises DecodeError for bad bytes, like CPU decoding
            self.pixels.append((i, out, label))

    def finish(self, n: int) -> JpegBatch:
        s, empty = self.transform.size, self.memory.empty
        sizes = [len(item[1]) for item in self.items]
        data = empty((sum(sizes),), torch.uint8)
        offset = 0
        for item, size in zip(self.items, sizes):
            data[offset:offset + size] = torch.frombuffer(item[1], dtype=torch.uint8)
            offset += size
        labels = empty((n,), torch.int64)
        for item in self.items:
            labels[item[0]] = item[4]
        pixels = empty((len(self.pixels), s, s, 3), torch.uint8)
        for k, (i, img, label) in enumerate(self.pixels):
            pixels[k] = img
            labels[i] = label
        return JpegBatch(
            data, torch.tensor(sizes, dtype=torch.int64),
            torch.tensor([item[2] for item in self.items], dtype=torch.int64).view(-1, 8),
            torch.tensor([item[3] for item in self.items], dtype=torch.bool),
            labels, torch.tensor([i for i, _, _ in self.pixels], dtype=torch.int64), pixels,
            torch.tensor([item[5] for item in self.items], dtype=torch.int64))


def crop_resize_flip(img: torch.Tensor, box, out: torch.Tensor, flip: bool, mode: str) -> None:
    """Like transforms.resize_into (a box, or a Geometry), in float: CUDA has no uint8
    antialiased resize."""
    if not isinstance(box, Geometry):
        box = Geometry(*box) if len(box) == 8 else Geometry(*box, *out.shape[:2])
    crop = img[:, box.y:box.y + box.h, box.x:box.x + box.w].unsqueeze(0).float()
    res = F.interpolate(crop, size=(box.rh, box.rw), mode=mode, antialias=True)
    res = res[0, :, box.top:box.top + out.shape[0], box.left:box.left + out.shape[1]]
    res = res.permute(1, 2, 0).round_().clamp_(0, 255)
    out.copy_(res.flip(1) if flip else res)


def decode_batch(batch: JpegBatch, device):
    """(uint8 NHWC images, labels) on `device` from a JpegBatch."""
    from torchvision.io import ImageReadMode, decode_jpeg
    n, size = len(batch), batch.pixels.shape[1]  # pixels is (k, size, size, 3), k may be 0
    labels = batch.labels.to(device, non_blocking=True)
    jpeg_index = sorted(set(range(n)) - set(batch.pixel_index.tolist()))
    out = torch.empty((n, size, size, 3), dtype=torch.uint8, device=device)
    if len(batch.pixels):
        out[batch.pixel_index.to(device)] = batch.pixels.to(device, non_blocking=True)
    if jpeg_index:
        datas = list(torch.split(batch.data, batch.sizes.tolist()))
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        for i, img, box, flip, mode in zip(jpeg_index, images, batch.boxes.tolist(), batch.flips.tolist(),
                                           batch.modes.tolist()):
            crop_resize_flip(img, Geometry(*box), out[i], flip, INTERPOLATIONS[mode])
    return out, labels


def make_to_device():
    """The DevicePrefetcher hook for GPU decoding."""
    return decode_batch
