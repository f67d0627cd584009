"""Stages 3-4 inside a DataLoader worker: planned shard pieces -> samples -> shuffle buffer ->
decode + augment -> batches collated straight into one preallocated uint8 NHWC tensor.

The epoch comes from a shared `multiprocessing.Value` that the main process sets before each
epoch, so persistent workers (which keep their own copy of this object) still see it.
Per-worker counters (samples, skipped, shard errors, padded, new buffers) live in a shared array.

Image batches are born in shared memory, so sending one to the main process copies nothing. A
fresh shared batch still costs its page faults: 6.5 ms for 64 x 224 x 224 x 3 bytes, 100 us per
image, ~8% of a core's decode budget. With a buffer pool, a worker reuses the buffers that the
main process has handed back (`StreamLoader(reuse_buffers=True)`), and allocates anew only when
none is free.
"""
from __future__ import annotations

import logging
import math
import random

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .plan import eval_plan, train_plan, train_steps, eval_batches
from .shards import ShardCorrupt, iter_samples, open_shard
from .transforms import DecodeError

log = logging.getLogger("pipeline")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "img")
STATS = ("samples", "skipped", "shard_errors", "padded", "new_buffers")


def empty(shape, dtype, shared: bool) -> torch.Tensor:
    """A new tensor; inside a worker it is born in shared memory, so sending it costs no copy."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    base = torch.empty(0, dtype=dtype)
    return base.new(base._typed_storage()._new_shared(math.prod(shape))).view(shape)


class Memory:
    """Where a worker's batches are allocated: private memory in the main process, shared memory
    in a worker, from its pool of reusable image buffers when it has one."""

    def __init__(self, shared: bool, free=None, base: int = 0, size: int = 0, stats=None):
        self.shared, self.free, self.base, self.size, self.stats = shared, free, base, size, stats
        self.buffers = []

    def empty(self, shape, dtype) -> torch.Tensor:
        return empty(shape, dtype, self.shared)

    def images(self, shape) -> tuple[torch.Tensor, int]:
        """(uint8 tensor, slot): the slot is -1 for a buffer that is not to be handed back."""
        for k, buf in enumerate(self.buffers):
            if self.free[self.base + k]:
                self.free[self.base + k] = 0
                return buf, self.base + k
        if self.stats is not None:
            self.stats[STATS.index("new_buffers")] += 1
        buf = self.empty(shape, torch.uint8)
        if len(self.buffers) < self.size:
            self.buffers.append(buf)
            return buf, self.base + len(self.buffers) - 1
        return buf, -1


class RateLimited:
    """Warn about the 1st..5th, 10th, 100th, 1000th... event, never sleeping."""

    def __init__(self):
        self.count = 0

    def __call__(self, msg: str) -> None:
        self.count += 1
        n = self.count
        if n <= 5 or (n >= 10 and 10 ** int(math.log10(n)) == n):
            log.warning("%s%s", msg, f" ({n} so far in this worker)" if n > 5 else "")


def read_pieces(urls, pieces, warn, stats):
    """Samples of the planned pieces; a damaged or missing shard loses only what it lacks."""
    for p in pieces:
        got, url = 0, urls[p.shard]
        try:
            with open_shard(url) as f:
                for sample in iter_samples(f, p.skip, p.take):
                    got += 1
                    yield sample
            if got < p.take:
                raise ShardCorrupt(f"holds fewer samples than _info.json lists (read {got} of "
                                   f"{p.take} planned from sample {p.skip} on)")
        except (ShardCorrupt, OSError, ValueError) as e:  # pipes and curl raise several types
            stats[STATS.index("shard_errors")] += 1
            warn(f"shard {url}: {e}; lost {p.take - got} of its planned samples")


def shuffled(samples, size: int, rng):
    """webdataset-style shuffle buffer: fill `size` samples, then emit one at random per input."""
    buf = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = s
    rng.shuffle(buf)
    yield from buf


def image_and_label(sample):
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None or "cls" not in sample:
        raise DecodeError(f"sample {sample['__key__']!r} lacks an image or a .cls member")
    try:
        return data, int(sample["cls"])
    except ValueError:
        raise DecodeError(f"sample {sample['__key__']!r} has a bad .cls") from None


class PixelBatches:
    """Collate decoded uint8 HWC images into one (B, H, W, 3) tensor plus int64 labels; the
    batch travels as (images, labels, buffer slot), and StreamLoader drops the slot."""

    def __init__(self, transform, batch_size: int):
        self.transform, self.batch_size = transform, batch_size

    def new(self, memory: Memory):
        s = self.transform.size
        self.images, self.slot = memory.images((self.batch_size, s, s, 3))
        self.labels = memory.empty((self.batch_size,), torch.int64)

    def add(self, i: int, data, label: int, rng) -> None:
        self.transform(data, self.images[i], rng)
        self.labels[i] = label

    def finish(self, n: int):
        return self.images[:n], self.labels[:n], self.slot


class ShardStream(IterableDataset):
    """Yields this rank's batches for one epoch; `len()` is the number of batches per rank."""

    def __init__(self, split, builder, *, batch_size: int, train: bool, seed: int = 0,
                 world_size: int = 1, rank: int = 0, num_workers: int = 0,
                 shuffle_buffer: int = 2048, epoch=None, stats=None, free=None, pool_size: int = 0):
        self.urls, self.lengths = split.urls, split.lengths
        self.builder, self.batch_size, self.train = builder, batch_size, train
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.num_workers, self.shuffle_buffer = max(1, num_workers), shuffle_buffer
        self.epoch = epoch  # multiprocessing.Value('q') shared with the workers
        self.stats = stats  # multiprocessing.Array('q', num_workers * len(STATS))
        self.free, self.pool_size = free, pool_size  # Array('b', workers * pool_size): handed back
        self.memory = None  # made in the worker, kept across epochs with persistent workers

    def __len__(self) -> int:
        if self.train:
            return train_steps(sum(self.lengths), self.world_size, self.batch_size)
        return eval_batches(self.lengths, world_size=self.world_size, rank=self.rank,
                            num_workers=self.num_workers, batch_size=self.batch_size)

    def plan(self, epoch: int, worker: int):
        common = dict(world_size=self.world_size, rank=self.rank, num_workers=self.num_workers,
                      worker=worker, batch_size=self.batch_size)
        if self.train:
            return train_plan(self.lengths, seed=self.seed, epoch=epoch, **common)
        return eval_plan(self.lengths, **common)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch = self.epoch.value if self.epoch is not None else 0
        if self.memory is None:  # once per worker: counters and buffers outlive the epoch
            pooled = info is not None and self.free is not None
            self.memory = Memory(info is not None, self.free, worker * self.pool_size,
                                 self.pool_size if pooled else 0, _StatsView(self.stats, worker))
        stats = self.memory.stats
        plan = self.plan(epoch, worker)
        rng = random.Random(f"augment:{self.seed}:{epoch}:{self.rank}:{worker}")
        warn = RateLimited()
        samples = read_pieces(self.urls, plan.pieces, warn, stats)
        if self.train and self.shuffle_buffer > 1:
            samples = shuffled(samples, self.shuffle_buffer, rng)
        yield from self._batches(samples, plan.num_samples, rng, warn, stats)

    def _batches(self, samples, quota: int, rng, warn, stats):
        """Exactly `quota` samples in full batches (the last one partial in eval); training pads
        with recently seen samples when damaged data left the stream short."""
        b, i, done, recent = self.builder, 0, 0, []
        b.new(self.memory)
        while done < quota:
            sample = next(samples, None)
            if sample is None:
                if not self.train or not recent:
                    break
                sample = rng.choice(recent)
                stats[STATS.index("padded")] += 1
            try:
                data, label = image_and_label(sample)
                b.add(i, data, label, rng)
            except DecodeError as e:
                stats[STATS.index("skipped")] += 1
                warn(f"skipped sample {sample.get('__key__')!r}: {e}")
                continue
            if self.train:
                recent = (recent + [sample])[-16:]
            i, done = i + 1, done + 1
            stats[0] += 1
            if i == self.batch_size or done == quota:
                yield b.finish(i)
                i = 0
                if done < quota:
                    b.new(self.memory)
        if i:
            yield b.finish(i)
        if self.train and done < quota:
            raise RuntimeError(f"rank {self.rank} worker could not read a single sample of its "
                               f"{len(self.urls)}-shard split: see the warnings above")


class _StatsView:
    """This worker's slice of the shared counters (a plain list when running without them)."""

    def __init__(self, array, worker: int):
        self.array, self.base = array, worker * len(STATS)
        self.local = [0] * len(STATS)

    def __getitem__(self, i):
        return self.array[self.base + i] if self.array is not None else self.local[i]

    def __setitem__(self, i, value):
        if self.array is not None:
            self.array[self.base + i] = value
        else:
            self.local[i] = value
