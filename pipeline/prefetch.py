"""Stage 6: batches to the device, one step ahead of the model.

Copies run on one side stream made when the prefetcher is made (never one per epoch: timm,
NVIDIA's examples and ffcv leaked memory that way). The copy stream waits for the compute
stream before reusing memory, the compute stream waits for the copy before using a batch, and
the tensors handed across are `record_stream`ed. On the device the uint8 NHWC batch becomes
float, normalised with the model's mean/std, in channels-last layout: an NHWC batch permuted to
NCHW already has channels-last strides, so no copy is needed for the layout. On the CPU the same
code runs without streams.
"""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize:
    """uint8 NHWC -> float NCHW (channels-last strides), (x/255 - mean) / std."""

    def __init__(self, device, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last: bool = True,
                 dtype: torch.dtype = torch.float32):
        std_t = torch.tensor(std, dtype=torch.float64)
        self.scale = (1.0 / (255.0 * std_t)).to(dtype).view(1, 3, 1, 1).to(device)
        self.bias = (-torch.tensor(mean, dtype=torch.float64) / std_t).to(dtype).view(1, 3, 1, 1).to(device)
        self.channels_last, self.dtype = channels_last, dtype

    def __call__(self, images: torch.Tensor, adjust=None) -> torch.Tensor:
        """`adjust(x)`, if given, changes the float batch in [0, 255] before the normalisation."""
        x = images.permute(0, 3, 1, 2)
        x = x.to(self.dtype) if self.channels_last else x.to(self.dtype, memory_format=torch.contiguous_format)
        if adjust is not None:
            x = adjust(x)
        return x.mul_(self.scale).add_(self.bias)


class DevicePrefetcher:
    """Iterate (images, labels) on the device, normalised, one batch ahead of the consumer.

    `to_device(batch, device)` turns a loader batch into device (uint8 NHWC images, labels); the
    default copies a (images, labels) pair, GPU decoding passes its own. `augment(images, labels,
    normalize)` (pipeline.augment.DeviceAugment), if given, normalises with its augmentations.
    """

    def __init__(self, device, normalize: Normalize, to_device=None, augment=None):
        self.device, self.normalize, self.augment = device, normalize, augment
        self.to_device = to_device or _copy_pair
        self.stream = device.new_stream()  # once, reused by every epoch

    def _prepare(self, batch):
        images, labels = self.to_device(batch, self.device.torch)
        if self.augment is not None:
            return self.augment(images, labels, self.normalize)
        return self.normalize(images), labels

    def __call__(self, batches):
        dev = self.device
        if self.stream is None:
            for batch in batches:
                yield self._prepare(batch)
            return
        compute = dev.current_stream()
        ready = None
        for batch in batches:
            self.stream.wait_stream(compute)
            with dev.stream(self.stream):
                nxt = self._prepare(batch)
            if ready is not None:
                yield ready
            compute.wait_stream(self.stream)
            for t in nxt:
                dev.record_stream(t, compute)
            ready = nxt
        if ready is not None:
            yield ready


def _copy_pair(batch, device):
    images, labels = batch
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
