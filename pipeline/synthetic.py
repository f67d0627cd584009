"""Device-resident random batches: a BatchLoader for compute-only measurements.

Same shapes and the same normalisation path as real data; nothing crosses the host-device
link, so the gap between a run on these and one on shards is the data stall.
"""
from __future__ import annotations

import torch

from .stream import STATS


class SyntheticBatches:
    def __init__(self, device, *, batch_size: int, img_size: int, num_classes: int,
                 steps: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (batch_size, img_size, img_size, 3),
                                    dtype=torch.uint8, generator=g).to(device)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
        self.device, self.seed = device, seed
        self.steps = steps
        self.served = 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        pass

    def set_img_size(self, size: int) -> None:
        if size != self.images.shape[1]:
            g = torch.Generator().manual_seed(self.seed + size)
            self.images = torch.randint(0, 256, (len(self.labels), size, size, 3), dtype=torch.uint8,
                                        generator=g).to(self.device)

    def stats(self) -> dict:
        counts = dict.fromkeys(STATS, 0)
        counts["samples"] = self.served
        return counts

    def __iter__(self):
        for _ in range(self.steps):
            self.served += len(self.labels)
            yield self.images, self.labels
