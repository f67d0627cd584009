"""Stage 5: the loader contract, and the DataLoader around a ShardStream that fulfils it.

Workers are persistent by default (`--use-multi-epochs-loader`): they live across epochs and
read the epoch from shared memory, so the order still changes every epoch.

`reuse_buffers=True` is a promise of the consumer: it no longer reads a batch's images once it
has asked for the next batch (DevicePrefetcher keeps it: it copies a batch to the device, or
normalises it into a new tensor, before it asks for the next). The workers then write new
batches into the shared buffers of batches already consumed instead of fresh shared memory.
"""
from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

from torch.utils.data import DataLoader

from .stream import Batch, PixelBatches, ShardStream, SharedState
from .transforms import EvalTransform, TrainTransform

DECODERS = ("cpu", "pil", "gpu")


@runtime_checkable
class BatchLoader(Protocol):
    """What the trainer needs from a source of batches (shard loader, synthetic data, DALI).

    `__len__` is the number of batches per epoch on this rank, the same on every rank for
    training; `set_epoch` is called before each epoch; `stats()` returns counters summed over
    the loader's workers since it was made, with at least the keys of `pipeline.stream.STATS`.
    """

    def __iter__(self) -> Iterator: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def stats(self) -> dict: ...


class StreamLoader:
    """A BatchLoader of (images, labels) from a ShardStream, in DataLoader worker processes."""

    def __init__(self, dataset: ShardStream, *, num_workers: int, pin_memory: bool,
                 prefetch_factor: int = 4, persistent: bool = True):
        self.dataset, self.shared = dataset, dataset.shared
        self.loader = DataLoader(
            dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=persistent and num_workers > 0)

    def set_epoch(self, epoch: int) -> None:
        self.shared.epoch.value = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        """(images, labels) batches; a pooled buffer goes back to its worker when the consumer
        asks for the next batch."""
        slot = -1
        try:
            for batch in self.loader:
                self.shared.release(slot)
                slot = -1
                if isinstance(batch, Batch):
                    images, labels, slot = batch
                    batch = images, labels
                yield batch
        finally:
            self.shared.release(slot)

    def stats(self) -> dict:
        return self.shared.totals()


def create_loader(split, *, train: bool, batch_size: int, img_size: int = 224,
                  num_workers: int = 8, seed: int = 0, world_size: int = 1, rank: int = 0,
                  decoder: str = "cpu", shuffle_buffer: int = 2048, crop_pct: float = 0.875,
                  train_interpolation: str = "bilinear", eval_interpolation: str = "bicubic",
                  augment=None, reduced_decode: bool | None = None,
                  pin_memory: bool = False, prefetch_factor: int = 4, persistent: bool = True,
                  reuse_buffers: bool = False) -> StreamLoader:
    """A loader of uint8 NHWC batches (or, with decoder='gpu', of JPEG bytes + crop boxes).

    `augment(out, rng)` (train only) changes each HWC uint8 crop in the worker, e.g. a
    pipeline.randaugment.RandAugment. Reduced-size decoding is on for training and off for
    evaluation by default: on a large image it moves the eval tensor away from timm's
    (tests/test_transforms.py).
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}: choose one of {', '.join(DECODERS)}")
    if decoder == "gpu" and augment is not None:
        raise ValueError("worker augmentation runs on decoded pixels: it does not combine with decoder='gpu'")
    cpu_decoder = "pil" if decoder == "pil" else "tv"
    reduce = train if reduced_decode is None else reduced_decode
    if train:
        transform = TrainTransform(img_size, interpolation=train_interpolation,
                                   decoder=cpu_decoder, reduce=reduce, augment=augment)
    else:
        transform = EvalTransform(img_size, crop_pct, eval_interpolation, decoder=cpu_decoder, reduce=reduce)
    if decoder == "gpu":
        from .gpu_decode import JpegBatches
        builder = JpegBatches(transform, batch_size)
    else:
        builder = PixelBatches(transform, batch_size)
    # in flight per worker: prefetch_factor queued, one held by the consumer, one pinning
    pooled = reuse_buffers and persistent and num_workers > 0
    shared = SharedState(num_workers, pool_size=prefetch_factor + 2 if pooled else 0)
    dataset = ShardStream(split, builder, batch_size=batch_size, train=train, seed=seed,
                          world_size=world_size, rank=rank, num_workers=num_workers,
                          shuffle_buffer=shuffle_buffer, shared=shared)
    return StreamLoader(dataset, num_workers=num_workers, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor, persistent=persistent)
