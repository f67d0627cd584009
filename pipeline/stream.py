"""Stages 3-4 inside a DataLoader worker: planned shard pieces -> samples -> shuffle buffer ->
decode + augment -> batches collated straight into one preallocated uint8 NHWC tensor.

Everything a worker shares with the main process is one `SharedState`, made before the workers
start and handed to `ShardStream`: the epoch and the epoch's training image size (set by the
main process before each epoch, so persistent workers, which keep their own copy of the stream,
still see them), per-worker counters
(`Stat`), and the buffer pool's free flags. Image batches are born in shared memory, so sending
one to the main process copies nothing; with a pool, a worker reuses the buffers that the main
process has handed back instead of paying a fresh buffer's page faults (BENCHMARKS.md).

Exact resume: each training sample draws its augmentation from its own generator, seeded from
(seed, epoch, shard, index in the shard), so its pixels do not depend on what a worker decoded
before it. Every batch tells which worker made it and how far that worker's shuffled stream had
got (`Batch.worker`, `taken`, `padded`); a checkpoint records that, and a resumed worker replays
its reads and its shuffle buffer without decoding up to that point, then continues with the
identical remaining samples.

Elastic resume: a training batch also carries its samples' ids (`Batch.ids`, id = the shard's
offset in `_info.json` + the index in the shard), so a checkpoint can record what was consumed;
a resume on another plan reads only the rest of the epoch (`ShardStream.remainder`,
pipeline/elastic.py).
"""
from __future__ import annotations

import enum
import hashlib
import logging
import math
import multiprocessing as mp
import os
import random
import re
import time
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from common.errors import DataLoadingError, SharedMemoryError

from .elastic import remainder_plan, sample_id, shard_offsets
from .info import is_remote
from .plan import eval_batches, eval_plan, train_plan, train_steps
from .remote import RemoteError, RemoteOptions
from .shards import MAX_SAMPLE_BYTES, SHUFFLE_BYTES, ShardCorrupt, byte_size, check_claim, iter_samples, open_shard  # noqa: F401
from .transforms import DecodeError

log = logging.getLogger("pipeline")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "img")


class Stat(enum.IntEnum):
    """Per-worker counters, summed by `StreamLoader.stats()`."""
    SAMPLES = 0  # samples put into batches
    SKIPPED = 1  # samples dropped: undecodable image, bad label, missing member
    SHARD_ERRORS = 2  # shard reads that failed or ended early
    PADDED = 3  # repeated samples that kept a training batch full after data was lost
    NEW_BUFFERS = 4  # batch buffers allocated (not taken from the pool)
    CACHE_HITS = 5  # remote shard reads served from the node-local cache (pipeline/cache.py)
    CACHE_MISSES = 6  # remote shard reads the cache had to fetch (or could not hold)
    FETCHED_BYTES = 7  # bytes read from remote sources (cache fills and uncached reads)


STATS = tuple(s.name.lower() for s in Stat)  # the names stats() reports


class Batch(NamedTuple):
    """What a worker sends: images, labels and the pool slot of the images (-1: not pooled),
    and where the worker's stream stood after this batch (for an exact mid-epoch resume)."""
    images: object  # uint8 (B, H, W, 3) tensor, or a builder's own batch (labels None)
    labels: torch.Tensor | None
    slot: int = -1
    worker: int = 0
    taken: int = 0  # samples taken from the worker's shuffled stream this epoch (skipped ones too)
    padded: int = 0  # pads drawn this epoch after the stream ran dry (undecodable ones too)
    ids: object = None  # training: the sample ids of the batch (numpy int64; pipeline.elastic.sample_id)


# Per worker, what a resumed epoch skips: [batches consumed, samples taken, pads drawn].
PROGRESS = 3
PAD_POOL = 16  # a worker whose stream ran dry repeats one of its last PAD_POOL samples
PAD_POOL_BYTES = 32 << 20  # ... that add up to at most this (one sample at least): 16 ImageNet samples are ~2 MB

def sample_bytes(sample) -> int:
    """Bytes of a sample's members (what holding it costs, less a small constant); read_pieces
    notes it in the sample once, as '__bytes__'."""
    n = sample.get("__bytes__")
    return n if n is not None else sum(len(v) for k, v in sample.items() if not k.startswith("__"))


class SharedState:
    """Memory shared by the main process and the workers of one loader."""

    def __init__(self, num_workers: int = 0, pool_size: int = 0, ctx=None):
        ctx = ctx or mp.get_context()
        self.num_workers, self.pool_size = max(1, num_workers), pool_size
        self.epoch = ctx.Value("q", 0, lock=False)
        self.img_size = ctx.Value("q", 0, lock=False)  # training image size of the epoch; 0: the transform's own
        self.start = ctx.Array("q", self.num_workers * PROGRESS, lock=False)  # resume point, per worker
        # DataLoader worker i plays planned worker (i + rotate) % workers: a resumed epoch must take
        # its first batch from the worker whose turn it was, but the DataLoader starts at worker 0
        self.rotate = ctx.Value("q", 0, lock=False)
        self.stats = ctx.Array("q", self.num_workers * len(Stat), lock=False)
        # free[worker * pool_size + k]: the consumer handed buffer k of that worker back
        self.free = ctx.Array("b", max(1, self.num_workers * pool_size), lock=False)

    def counters(self, worker: int) -> "Counters":
        return Counters(self.stats, worker * len(Stat))

    def totals(self) -> dict:
        values = list(self.stats)
        return {s.name.lower(): sum(values[s::len(Stat)]) for s in Stat}

    def release(self, slot: int) -> None:
        if slot >= 0:
            self.free[slot] = 1

    def set_start(self, progress, rotate: int = 0) -> None:
        """Where each worker's next epoch starts: None, or [batches, taken, padded] per worker."""
        values = [0] * len(self.start) if progress is None else [int(v) for row in progress for v in row]
        if len(values) != len(self.start):
            raise ValueError(f"resume point for {len(values) // PROGRESS} workers, loader has {self.num_workers}")
        self.start[:] = values
        self.rotate.value = rotate

    def start_of(self, worker: int) -> tuple[int, int, int]:
        return tuple(self.start[worker * PROGRESS:(worker + 1) * PROGRESS])


class Counters:
    """One worker's slice of the shared counters."""

    def __init__(self, array, base: int):
        self.array, self.base = array, base

    def add(self, stat: Stat, n: int = 1) -> None:
        self.array[self.base + stat] += n

    def __getitem__(self, stat: Stat) -> int:
        return self.array[self.base + stat]


_SHM_NAME = re.compile(r"<(/torch_\d+_\d+_\d+)>")


def empty(shape, dtype, shared: bool) -> torch.Tensor:
    """A new tensor; inside a worker it is born in shared memory, so sending it costs no copy.

    When /dev/shm is full, torch raises "unable to allocate shared memory" and leaves behind the
    file it had created, at the full size asked for (sparse); it is removed here, and the error
    becomes one line."""
    if not shared:
        return torch.empty(shape, dtype=dtype)
    base = torch.empty(0, dtype=dtype)
    try:
        storage = base._typed_storage()._new_shared(math.prod(shape))
    except RuntimeError as e:
        found = _SHM_NAME.search(str(e))
        if found is None:
            raise
        try:
            os.unlink("/dev/shm" + found.group(1))
        except OSError:
            pass
        need = math.prod(shape) * base.element_size()
        raise SharedMemoryError(f"/dev/shm is full: no room for a {need:,}-byte batch: give it more room (docker's "
                                "shm-size setting), or use fewer loader workers, smaller batches or fewer batches "
                                "in flight") from None
    return base.new(storage).view(shape)


class Memory:
    """Where a worker's batches are allocated: private memory in the main process, shared memory
    in a worker, from its pool of reusable image buffers when it has one.

    Pooled buffers are flat and hold `capacity` bytes (a batch at the largest image size of the
    run), so a batch of any smaller size is a view of one: progressive resizing changes the size
    between epochs without new buffers."""

    def __init__(self, shared: bool, free=None, base: int = 0, size: int = 0, counters=None,
                 capacity: int = 0):
        self.shared, self.free, self.base, self.size = shared, free, base, size
        self.counters, self.capacity = counters, capacity
        self.buffers = []

    def empty(self, shape, dtype) -> torch.Tensor:
        return empty(shape, dtype, self.shared)

    def _new(self, n: int) -> torch.Tensor:
        if self.counters is not None:
            self.counters.add(Stat.NEW_BUFFERS)
        return self.empty((n,), torch.uint8)

    def images(self, shape) -> tuple[torch.Tensor, int]:
        """(uint8 tensor, slot): the slot is -1 for a buffer that is not to be handed back."""
        n = math.prod(shape)
        for k, buf in enumerate(self.buffers):
            if self.free[self.base + k]:
                self.free[self.base + k] = 0
                if buf.numel() < n:  # larger than the pool was made for
                    buf = self.buffers[k] = self._new(max(n, self.capacity))
                return buf[:n].view(shape), self.base + k
        if len(self.buffers) < self.size:
            self.buffers.append(self._new(max(n, self.capacity)))
            return self.buffers[-1][:n].view(shape), self.base + len(self.buffers) - 1
        return self._new(n).view(shape), -1


class RateLimited:
    """Warn about the 1st..5th, 10th, 100th, 1000th... event, never sleeping."""

    def __init__(self):
        self.count = 0

    def __call__(self, msg: str) -> None:
        self.count += 1
        n = self.count
        if n <= 5 or (n >= 10 and 10 ** int(math.log10(n)) == n):
            log.warning("%s%s", msg, f" ({n} so far in this worker)" if n > 5 else "")


def read_pieces(urls, pieces, warn, counters: Counters, remote: RemoteOptions | None = None,
                max_sample_bytes: int | None = MAX_SAMPLE_BYTES):
    """Samples of the planned pieces, each tagged `__index__` = (shard, index in the shard).

    A damaged or missing shard loses only what it lacks. A remote read that fails (no
    connection, a stall, a dropped connection) is retried with backoff where it stopped; when
    the retries are spent the run stops with one line naming the shard: the data is not bad,
    the way to it is, and a rerun with --auto-resume continues once it is back.
    """
    remote = remote or RemoteOptions()
    for p in pieces:
        got, url = 0, urls[p.shard]
        delays = remote.delays() if is_remote(url) else []
        while True:
            try:
                with open_shard(url, remote, counters) as f:
                    check_claim(f, url, p.skip + p.take)
                    for sample in iter_samples(f, p.skip + got, p.take - got, max_sample_bytes):
                        sample["__index__"] = (p.shard, p.skip + got)
                        sample["__bytes__"] = sample_bytes(sample)
                        got += 1
                        yield sample
                if got < p.take:
                    raise ShardCorrupt(f"holds fewer samples than _info.json lists (read {got} of "
                                       f"{p.take} planned from sample {p.skip} on)")
                break
            except RemoteError as e:
                if not delays:
                    raise DataLoadingError(
                        f"shard {url}: {e} (tried {remote.retries + 1} times); the data source is "
                        "unreachable: fix it, then resume from the last checkpoint") from None
                wait = delays.pop(0)
                warn(f"shard {url}: {e}; retrying in {wait:g} s")
                time.sleep(wait)
            except (ShardCorrupt, OSError, ValueError) as e:
                counters.add(Stat.SHARD_ERRORS)
                warn(f"shard {url}: {e}; lost {p.take - got} of its planned samples")
                break


def shuffled(samples, size: int, rng, max_bytes: int | None = None):
    """webdataset-style shuffle buffer: fill `size` samples, then emit one at random per input.

    `max_bytes`: the buffer also holds at most this many bytes of samples (one sample at least).
    An input that does not fit takes the place of one emitted at random, and more are emitted
    at random until the buffer is back under the budget; it then fills again. Under the budget
    the order is the count-only order. Either way the order is a function of the input (its
    samples and their sizes) and `rng` alone, so a resumed worker that replays the same reads
    rebuilds the same buffer (exact resume).
    """
    buf, held = [], 0
    for s in samples:
        n = sample_bytes(s) if max_bytes is not None else 0
        if len(buf) < size and (not buf or max_bytes is None or held + n <= max_bytes):
            buf.append(s)
            held += n
            continue
        j = rng.randrange(len(buf))
        out, buf[j] = buf[j], s
        held += n - (sample_bytes(out) if max_bytes is not None else 0)
        yield out
        while max_bytes is not None and held > max_bytes and len(buf) > 1:
            j = rng.randrange(len(buf))
            out, last = buf[j], buf.pop()
            if j < len(buf):
                buf[j] = last
            held -= sample_bytes(out)
            yield out
    rng.shuffle(buf)
    yield from buf


def image_and_label(sample, num_classes: int | None = None):
    """(image bytes, label); DecodeError for a missing member, a label outside [0, num_classes)
    or a sample that was too large to read."""
    if "__oversize__" in sample:
        raise DecodeError(f"sample {sample['__key__']!r} not read: its {sample['__oversize__']} "
                          "(over the per-sample byte limit)")
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None or "cls" not in sample:
        raise DecodeError(f"sample {sample['__key__']!r} lacks an image or a .cls member")
    try:
        label = int(sample["cls"])
    except (ValueError, TypeError):  # not a number, or more digits than int() takes
        raise DecodeError(f"sample {sample['__key__']!r} has a bad .cls {bytes(sample['cls'][:20])!r}") from None
    limit = num_classes if num_classes else 2 ** 63
    if not 0 <= label < limit:
        shown = str(label) if abs(label) < 10 ** 20 else f"{str(label)[:20]}..."
        raise DecodeError(f"sample {sample['__key__']!r} has the label {shown}, outside [0, {num_classes or limit})")
    return data, label


def sample_rng(seed: int, epoch: int, index) -> random.Random:
    """The augmentation generator of one sample: a function of (seed, epoch, shard, index in the
    shard) only, so a sample's pixels do not depend on the worker, the rank or what came before."""
    key = hashlib.blake2b(f"{seed}:{epoch}:{index[0]}:{index[1]}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(key, "little"))


class PixelBatches:
    """Collate decoded uint8 HWC images into one (B, H, W, 3) tensor plus int64 labels."""

    def __init__(self, transform, batch_size: int):
        self.transform, self.batch_size = transform, batch_size

    def new(self, memory: Memory):
        s = self.transform.size
        self.images, self.slot = memory.images((self.batch_size, s, s, 3))
        self.labels = memory.empty((self.batch_size,), torch.int64)

    def add(self, i: int, data, label: int, rng) -> None:
        self.transform(data, self.images[i], rng)
        self.labels[i] = label

    def finish(self, n: int) -> Batch:
        return Batch(self.images[:n], self.labels[:n], self.slot)


def _keep_last(pool: list, sample) -> list:
    """The pad pool after `sample` was read: the last PAD_POOL samples, at most PAD_POOL_BYTES."""
    pool = (pool + [sample])[-PAD_POOL:]
    while len(pool) > 1 and sum(map(sample_bytes, pool)) > PAD_POOL_BYTES:
        pool = pool[1:]
    return pool


class ShardStream(IterableDataset):
    """Yields this rank's batches for one epoch; `len()` is the number of batches per rank."""

    def __init__(self, split, builder, *, batch_size: int, train: bool, seed: int = 0,
                 world_size: int = 1, rank: int = 0, num_workers: int = 0,
                 shuffle_buffer: int = 2048, shared: SharedState | None = None,
                 num_classes: int | None = None, remote: RemoteOptions | None = None,
                 largest: int | None = None, max_sample_bytes: int | None = MAX_SAMPLE_BYTES,
                 shuffle_bytes: int | None = SHUFFLE_BYTES):
        self.urls, self.lengths = split.urls, split.lengths
        self.builder, self.batch_size, self.train = builder, batch_size, train
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.num_workers, self.shuffle_buffer = max(1, num_workers), shuffle_buffer
        self.shared = shared if shared is not None else SharedState(num_workers)
        self.num_classes, self.remote = num_classes, remote or RemoteOptions()
        self.max_sample_bytes, self.shuffle_bytes = max_sample_bytes, shuffle_bytes
        self.named = set()  # (shard, index) of the oversize samples this worker has warned about
        self.memory = None  # made in the worker, kept across epochs with persistent workers
        self.offsets = shard_offsets(self.lengths)
        # (epoch, remaining ids): that epoch reads only these (an elastic resume); set before the
        # workers start, so persistent workers keep it in their copy, and key it by the epoch
        self.remainder = None
        # the largest image size of the run (progressive resizing), for the buffer pool
        self.largest = largest or getattr(getattr(builder, "transform", None), "size", 0)

    def __len__(self) -> int:
        if self.train:
            return train_steps(sum(self.lengths), self.world_size, self.batch_size)
        return eval_batches(self.lengths, world_size=self.world_size, rank=self.rank,
                            num_workers=self.num_workers, batch_size=self.batch_size)

    def plan(self, epoch: int, worker: int):
        common = dict(world_size=self.world_size, rank=self.rank, num_workers=self.num_workers,
                      worker=worker, batch_size=self.batch_size)
        if self.train and self.remainder is not None and self.remainder[0] == epoch:
            return remainder_plan(self.lengths, self.remainder[1], **common)
        if self.train:
            return train_plan(self.lengths, seed=self.seed, epoch=epoch, **common)
        return eval_plan(self.lengths, **common)

    def __iter__(self):
        info = get_worker_info()
        physical = info.id if info is not None else 0
        shared = self.shared
        epoch = shared.epoch.value
        if self.memory is None:  # once per worker: counters and buffers outlive the epoch
            pooled = info is not None and shared.pool_size > 0
            self.memory = Memory(info is not None, shared.free, physical * shared.pool_size,
                                 shared.pool_size if pooled else 0, shared.counters(physical),
                                 capacity=self.batch_size * self.largest ** 2 * 3)
        if shared.img_size.value:  # progressive resizing: this epoch's size, set by the main process
            self.builder.transform.size = shared.img_size.value
        worker = (physical + shared.rotate.value) % self.num_workers  # whose share of the plan
        counters = self.memory.counters
        plan = self.plan(epoch, worker)
        tag = f"{self.seed}:{epoch}:{self.rank}:{worker}"
        warn = RateLimited()
        samples = read_pieces(self.urls, plan.pieces, warn, counters, self.remote, self.max_sample_bytes)
        if self.train and self.shuffle_buffer > 1:
            samples = shuffled(samples, self.shuffle_buffer, random.Random(f"shuffle:{tag}"), self.shuffle_bytes)
        start = shared.start_of(worker) if self.train else (0, 0, 0)
        yield from self._batches(samples, plan.num_samples, epoch, worker, start, tag, warn, counters)

    def _batches(self, samples, quota: int, epoch: int, worker: int, start, tag: str, warn,
                 counters: Counters):
        """Exactly `quota` samples in full batches (the last one partial in eval).

        Training pads when damaged data left the stream short: pad k repeats a sample of the
        last PAD_POOL read (PAD_POOL_BYTES at most), picked by a generator seeded with k, so a
        resumed run pads the same way. `start` = (batches, taken, padded) already consumed by the run this one
        resumes: those samples are read again (the shuffle buffer needs them) but not decoded.
        """
        b, i, pool, failed, ids = self.builder, 0, [], set(), []
        done, taken, padded = min(start[0] * self.batch_size, quota), start[1], start[2]
        for _ in range(taken):
            sample = next(samples, None)
            if sample is None:
                break
            pool = _keep_last(pool, sample)
        if done < quota:
            b.new(self.memory)
        while done < quota:
            sample, pad = next(samples, None), None
            if sample is not None:
                taken += 1
                pool = _keep_last(pool, sample)
            elif not self.train or len(failed) == len(pool):
                break
            else:
                pad = random.Random(f"pad:{tag}:{padded}").randrange(len(pool))
                sample, padded = pool[pad], padded + 1
                if pad in failed:
                    continue
            try:
                data, label = image_and_label(sample, self.num_classes)
                rng = sample_rng(self.seed, epoch, sample["__index__"]) if self.train else None
                b.add(i, data, label, rng)
            except Exception as e:  # anything a decoder throws is this sample's problem, not the run's
                counters.add(Stat.SKIPPED)
                if pad is not None:
                    failed.add(pad)
                if "__oversize__" in sample:  # named once per worker, not every epoch
                    if sample["__index__"] in self.named:
                        continue
                    self.named.add(sample["__index__"])
                reason = str(e) if isinstance(e, DecodeError) else f"{type(e).__name__}: {e}"
                warn(f"skipped sample {sample.get('__key__')!r}: {reason}")
                continue
            if pad is not None:
                counters.add(Stat.PADDED)
            if self.train:
                ids.append(sample_id(self.offsets, sample["__index__"]))
            i, done = i + 1, done + 1
            counters.add(Stat.SAMPLES)
            if i == self.batch_size or done == quota:
                yield self._tag(b.finish(i), worker, taken, padded, ids)
                i, ids = 0, []
                if done < quota:
                    b.new(self.memory)
        if i:
            yield self._tag(b.finish(i), worker, taken, padded, ids)
        if self.train and done < quota:
            raise DataLoadingError(f"rank {self.rank}: a loader worker could not read a single sample "
                                   f"of its {len(self.urls)}-shard split: see the warnings above")

    @staticmethod
    def _tag(batch, worker: int, taken: int, padded: int, ids) -> Batch:
        ids = np.asarray(ids, dtype=np.int64) if ids else None  # pickled with the batch: no shared memory
        if isinstance(batch, Batch):
            return batch._replace(worker=worker, taken=taken, padded=padded, ids=ids)
        return Batch(batch, None, -1, worker, taken, padded, ids)
