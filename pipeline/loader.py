"""Stage 5: the DataLoader around a ShardStream, as one object with `set_epoch` and counters.

Workers are persistent by default (`--use-multi-epochs-loader`): they live across epochs and
read the epoch from a shared value, so the order still changes every epoch.

`reuse_buffers=True` is a promise of the consumer: it no longer reads a batch's images once it
has asked for the next batch (DevicePrefetcher keeps it: it copies a batch to the device, or
normalises it into a new tensor, before it asks for the next). The workers then write new
batches into the shared buffers of batches already consumed instead of fresh shared memory.
"""
from __future__ import annotations

import multiprocessing as mp

from torch.utils.data import DataLoader

from .stream import STATS, PixelBatches, ShardStream
from .transforms import EvalTransform, TrainTransform

DECODERS = ("cpu", "pil", "gpu")


class StreamLoader:
    def __init__(self, dataset: ShardStream, *, num_workers: int, pin_memory: bool,
                 prefetch_factor: int = 4, persistent: bool = True, reuse_buffers: bool = False):
        ctx = mp.get_context()
        dataset.epoch = ctx.Value("q", 0, lock=False)
        dataset.stats = ctx.Array("q", max(1, num_workers) * len(STATS), lock=False)
        if reuse_buffers and persistent and num_workers > 0:
            # in flight per worker: prefetch_factor queued, one held by the consumer, one pinning
            dataset.pool_size = prefetch_factor + 2
            dataset.free = ctx.Array("b", num_workers * dataset.pool_size, lock=False)
        self.dataset = dataset
        self.loader = DataLoader(
            dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=persistent and num_workers > 0)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch.value = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        """(images, labels) batches; the buffer slot a batch came in is handed back to its worker
        when the consumer asks for the next batch (only with reuse_buffers)."""
        slot = -1
        try:
            for batch in self.loader:
                if slot >= 0:
                    self.dataset.free[slot] = 1
                    slot = -1
                if isinstance(batch, (tuple, list)) and len(batch) == 3:
                    images, labels, slot = batch  # slot >= 0 only for pooled buffers
                    batch = images, labels
                yield batch
        finally:
            if slot >= 0:
                self.dataset.free[slot] = 1

    def stats(self) -> dict:
        """Counters summed over this rank's workers since the loader was made."""
        values = list(self.dataset.stats)
        return {k: sum(values[i::len(STATS)]) for i, k in enumerate(STATS)}


def create_loader(split, *, train: bool, batch_size: int, img_size: int = 224,
                  num_workers: int = 8, seed: int = 0, world_size: int = 1, rank: int = 0,
                  decoder: str = "cpu", shuffle_buffer: int = 2048, crop_pct: float = 0.875,
                  train_interpolation: str = "bilinear", eval_interpolation: str = "bicubic",
                  reduced_decode: bool = True, pin_memory: bool = False, prefetch_factor: int = 4,
                  persistent: bool = True, reuse_buffers: bool = False) -> StreamLoader:
    """A loader of uint8 NHWC batches (or, with decoder='gpu', of JPEG bytes + crop boxes)."""
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}: choose one of {', '.join(DECODERS)}")
    cpu_decoder = "pil" if decoder == "pil" else "tv"
    if train:
        transform = TrainTransform(img_size, interpolation=train_interpolation,
                                   decoder=cpu_decoder, reduce=reduced_decode)
    else:
        transform = EvalTransform(img_size, crop_pct, eval_interpolation,
                                  decoder=cpu_decoder, reduce=reduced_decode)
    if decoder == "gpu":
        from .gpu_decode import JpegBatches
        builder = JpegBatches(transform, batch_size)
    else:
        builder = PixelBatches(transform, batch_size)
    dataset = ShardStream(split, builder, batch_size=batch_size, train=train, seed=seed,
                          world_size=world_size, rank=rank, num_workers=num_workers,
                          shuffle_buffer=shuffle_buffer)
    return StreamLoader(dataset, num_workers=num_workers, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor, persistent=persistent,
                        reuse_buffers=reuse_buffers)
