"""Stage 5: the loader contract, and the DataLoader around a ShardStream that fulfils it.

Workers are persistent by default (`--use-multi-epochs-loader`): they live across epochs and
read the epoch from shared memory, so the order still changes every epoch.

`reuse_buffers=True` is a promise of the consumer: it no longer reads a batch's images once it
has asked for the next batch (DevicePrefetcher keeps it: it copies a batch to the device, or
normalises it into a new tensor, before it asks for the next). The workers then write new
batches into the shared buffers of batches already consumed instead of fresh shared memory.

Faults: a worker that dies (killed, out of memory) or sends nothing for `timeout` seconds
(a hung read that no stall timeout caught) ends the epoch with a one-line DataLoadingError.
Shared memory: worker batches live in /dev/shm until the consumer is done with them. A container's
/dev/shm is often 64 MB (docker's default) or less, where torch fails mid-epoch with "unable to
allocate shared memory"; `check_shared_memory` refuses such a run before any worker starts.

Workers ignore SIGTERM and SIGUSR1 from anyone but the main process: preemption is its business
(engine/control.py), and it stops at a step boundary.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
from torch.utils.data import DataLoader

from common.errors import DataLoadingError, SharedMemoryError

from .elastic import pack, remainder_steps, union
from .geometry import DEFAULT_HFLIP, DEFAULT_RATIO, DEFAULT_SCALE, DEFAULT_VFLIP
from .info import is_remote
from .plan import round_robin
from .remote import RemoteOptions
from .stream import MAX_SAMPLE_BYTES, SHUFFLE_BYTES, Batch, PixelBatches, ShardStream, SharedState
from .transforms import EvalTransform, TrainTransform

DECODERS = ("cpu", "pil", "gpu")
LOADER_TIMEOUT = 600  # seconds without a batch before a local-data loader gives up (a hung read)
SHM_PATH = "/dev/shm"  # where torch puts the shared memory of worker batches (Linux)


@runtime_checkable
class BatchLoader(Protocol):
    """What the trainer needs from a source of batches (shard loader, synthetic data, DALI).

    `__len__` is the number of batches per epoch on this rank, the same on every rank for
    training; `set_epoch` is called before each epoch; `stats()` returns counters summed over
    the loader's workers since it was made, with at least the keys of `pipeline.stream.STATS`.
    A loader that can change its image size between epochs (progressive resizing) also has
    `set_img_size(size)`, called after `set_epoch`.
    """

    def __iter__(self) -> Iterator: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def stats(self) -> dict: ...


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1}


def _worker_init(worker_id: int) -> None:
    """A preemption signal sent to every process (Slurm signals the whole job) must not kill the
    workers before the main process reaches a step boundary, but the DataLoader's own shutdown
    still ends a stuck worker with SIGTERM. So a thread takes these signals and obeys only the
    ones the loader's process sent."""
    if not hasattr(signal, "sigwaitinfo"):  # macOS: workers keep the default (die on the signal)
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    threading.Thread(target=_obey_parent_only, args=(parent,), daemon=True, name="signals").start()


def _obey_parent_only(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(_STOP_SIGNALS)
        if info.si_pid == parent:  # die of it, as the DataLoader expects (the default action)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {info.si_signo})
            signal.pthread_kill(threading.get_ident(), info.si_signo)


def worker_failure(error: BaseException) -> str | None:
    """The one-line reason when the DataLoader lost a worker or timed out; None for anything else
    (an exception raised inside a worker is re-raised as itself and stays a bug). torch raises
    the worker's death from its SIGCHLD handler, wherever the main process happens to be, so
    the command line checks for it too."""
    if not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if text.startswith("DataLoader worker (pid") or text.startswith("DataLoader timed out"):
        return text.strip().splitlines()[0].rstrip(".")
    return None


def shm_free(path: str = SHM_PATH) -> int | None:
    """Bytes free for shared memory, or None where there is no such file system (macOS)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _mb(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MB"


def check_shared_memory(loaders, processes: int = 1) -> None:
    """SharedMemoryError (one line) when /dev/shm has less free space than the batches in flight
    of `loaders` need, times `processes` (the training processes of this node share it)."""
    need = processes * sum(getattr(loader, "shared_memory_need", lambda: 0)() for loader in loaders if loader)
    free = shm_free()
    if not need or free is None or free >= need:
        return
    workers = sum(getattr(loader, "num_workers", 0) for loader in loaders if loader)
    per = f" x {processes} processes" if processes > 1 else ""
    raise SharedMemoryError(
        f"{SHM_PATH} has {_mb(free)} free but the batches in flight of {workers} loader workers{per} need "
        f"{_mb(need)}: give it more (docker's shm-size setting {-(-need // 2 ** 30) + 1}g, or mount a larger "
        f"tmpfs), or use fewer loader workers, smaller batches or fewer batches in flight")


class StreamLoader:
    """A BatchLoader of (images, labels) from a ShardStream, in DataLoader worker processes.

    Besides the contract: `set_epoch(epoch, start)` resumes an epoch mid-way from a `progress()`
    taken by an earlier run with the same plan (world size, workers, batch size);
    `set_epoch(epoch, remainder=ids)` reads only those sample ids in that epoch, in their order,
    cut into equal whole batches over the ranks and workers (an elastic resume with another plan,
    pipeline/elastic.py). `consumed_bitmap(n)`: the samples of the epoch consumed so far.

    STREAM_TRACE_IDS=path (tests): every training batch handed to the consumer appends a line
    "epoch world rank pid id id ..." to that file.
    """

    def __init__(self, dataset: ShardStream, *, num_workers: int, pin_memory: bool,
                 prefetch_factor: int = 4, persistent: bool = True, timeout: float = LOADER_TIMEOUT):
        self.dataset, self.shared = dataset, dataset.shared
        self.num_workers = num_workers
        self.loader = DataLoader(
            dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=persistent and num_workers > 0,
            timeout=timeout if num_workers > 0 else 0,
            worker_init_fn=_worker_init if num_workers > 0 else None)
        self.prefetch_factor = prefetch_factor
        self._start = self._zeros()
        self._trace = []
        self._batches = len(dataset)  # what the current epoch yields in all, on this rank
        self._carried = np.zeros(0, np.uint8)  # consumed before this run (a resume); None: unknown
        self._epoch = 0
        self._trace_path = os.environ.get("STREAM_TRACE_IDS") or None

    def shared_memory_need(self) -> int:
        """Bytes of shared memory the workers' batches may hold at once: per worker, the
        prefetched batches, one the consumer holds and one being pinned (the buffer pool's size),
        each at the largest image size of the run."""
        if self.num_workers == 0:
            return 0
        ds = self.dataset
        batch = ds.batch_size * (ds.largest ** 2 * 3 + 8)
        return self.num_workers * (self.prefetch_factor + 2) * batch

    def _zeros(self):
        return [[0, 0, 0] for _ in range(max(1, self.num_workers))]

    def set_epoch(self, epoch: int, start=None, remainder=None, consumed=None) -> None:
        """Next epoch to iterate; `start`: this rank's `progress()` to resume from, or None;
        `remainder`: the sample ids this epoch still has to read (an elastic resume), or None;
        `consumed`: the packed bitmap of the samples a resumed run had consumed in this epoch
        (carried into `consumed_bitmap`)."""
        ds = self.dataset
        started = self.num_workers > 0 and getattr(self.loader, "_iterator", None) is not None
        if remainder is not None or (ds.remainder is not None and ds.remainder[0] == epoch):
            if started:  # persistent workers hold their own copy of the dataset
                raise ValueError("an epoch's remainder must be set before the loader's workers start")
            ds.remainder = None if remainder is None else (epoch, np.asarray(remainder, dtype=np.int64))
        rotate = 0
        if start is not None and self.num_workers > 1:
            totals = [self.dataset.plan(epoch, w).num_batches for w in range(self.num_workers)]
            rotate, _ = round_robin(totals, sum(int(row[0]) for row in start))
        self.shared.epoch.value = epoch
        self.shared.set_start(start, rotate)
        self._start = [list(map(int, row)) for row in start] if start is not None else self._zeros()
        self._batches = len(self) if remainder is None else \
            remainder_steps(len(remainder), ds.world_size, ds.batch_size)
        self._epoch = epoch
        if consumed is not None:
            self._carried = np.asarray(consumed, dtype=np.uint8).reshape(-1)
        else:  # a resumed position with no record of what came before it: unknown
            self._carried = None if start is not None else np.zeros(0, np.uint8)

    def set_img_size(self, size: int) -> None:
        """The image size of the next epoch's batches (progressive resizing); the pooled buffers
        hold the `largest_img_size` given to create_loader."""
        if size > self.dataset.largest and self.dataset.shared.pool_size:
            raise ValueError(f"image size {size} is above the largest the loader was made for "
                             f"({self.dataset.largest})")
        self.shared.img_size.value = size

    def __len__(self) -> int:
        return len(self.dataset)

    def remaining(self) -> int:
        """Batches the next iteration yields: len() less what a resumed epoch already consumed."""
        return self._batches - sum(row[0] for row in self._start)

    def progress(self, consumed: int) -> list[list[int]]:
        """Per worker [batches, samples taken, samples padded] once the consumer has used the
        first `consumed` batches of the current iteration: the resume point of a checkpoint."""
        out = [list(row) for row in self._start]
        for worker, taken, padded, _ in self._trace[:consumed]:
            out[worker] = [out[worker][0] + 1, taken, padded]
        return out

    def consumed_ids(self, consumed: int) -> np.ndarray:
        """The sample ids of the first `consumed` batches of the current iteration (pads repeat ids)."""
        ids = [row[3] for row in self._trace[:consumed] if row[3] is not None]
        return np.concatenate(ids) if ids else np.zeros(0, np.int64)

    def consumed_bitmap(self, consumed: int) -> np.ndarray | None:
        """Packed bitmap (pipeline.elastic.pack) of the epoch's samples consumed once the consumer
        has used `consumed` batches, with those of the run this one resumed; None when a resumed
        position carried no bitmap (unknown)."""
        if self._carried is None:
            return None
        mine = pack(self.consumed_ids(consumed), int(self.dataset.offsets[-1]))
        return union([mine, self._carried]) if self._carried.size else mine

    def __iter__(self):
        """(images, labels) batches; a pooled buffer goes back to its worker when the consumer
        asks for the next batch."""
        slot, self._trace = -1, []
        if getattr(self.loader, "_iterator", None) is None:  # workers are about to start
            check_shared_memory([self])
        try:
            for batch in self.loader:
                self.shared.release(slot)
                slot = -1
                if isinstance(batch, Batch):
                    images, labels, slot, worker, taken, padded, ids = batch
                    self._trace.append((worker, taken, padded, ids))
                    if self._trace_path and ids is not None:
                        self._write_trace(ids)
                    batch = images if labels is None else (images, labels)
                yield batch
        except RuntimeError as e:
            reason = worker_failure(e)
            if reason is None:
                raise
            raise DataLoadingError(f"{reason}; resume from the last checkpoint to continue") from None
        finally:
            self.shared.release(slot)

    def _write_trace(self, ids) -> None:
        ds = self.dataset
        line = f"{self._epoch} {ds.world_size} {ds.rank} {os.getpid()} {' '.join(map(str, ids.tolist()))}\n"
        with open(self._trace_path, "a") as f:
            f.write(line)

    def stats(self) -> dict:
        return self.shared.totals()


def create_loader(split, *, train: bool, batch_size: int, img_size: int = 224,
                  num_workers: int = 8, seed: int = 0, world_size: int = 1, rank: int = 0,
                  decoder: str = "cpu", shuffle_buffer: int = 2048, crop_pct: float = 0.875,
                  train_interpolation: str = "bilinear", eval_interpolation: str = "bicubic",
                  augment=None, reduced_decode: bool | None = None,
                  pin_memory: bool = False, prefetch_factor: int = 4, persistent: bool = True,
                  reuse_buffers: bool = False, num_classes: int | None = None,
                  remote: RemoteOptions | None = None, timeout: float | None = None,
                  largest_img_size: int | None = None, max_sample_bytes: int | None = MAX_SAMPLE_BYTES,
                  shuffle_bytes: int | None = SHUFFLE_BYTES, scale=DEFAULT_SCALE, ratio=DEFAULT_RATIO,
                  hflip: float = DEFAULT_HFLIP, vflip: float = DEFAULT_VFLIP) -> StreamLoader:
    """A loader of uint8 NHWC batches (or, with decoder='gpu', of JPEG bytes + crop boxes).

    `augment(out, rng)` (train only) changes each HWC uint8 crop in the worker, e.g. a
    pipeline.randaugment.RandAugment; with decoder='gpu' the workers decode nothing, so there is
    no crop to change (engine.config refuses the combination). Reduced-size decoding is on for training and off for
    evaluation by default: on a large image it moves the eval tensor away from timm's
    (tests/test_transforms.py). `num_classes`: labels outside [0, num_classes) are skipped and
    counted. `remote`: timeouts and retries for http/pipe shards. `timeout`: seconds without a
    batch before the loader gives up (default: LOADER_TIMEOUT, plus what the remote retries may
    take). `largest_img_size`: the largest size `set_img_size` will ask for (progressive
    resizing; default img_size): the reused batch buffers are made that large.
    `max_sample_bytes`: a larger sample is skipped unread and counted; `shuffle_bytes`: the most
    bytes of samples a worker's shuffle buffer holds (None: no limit, for either).
    `scale`, `ratio`, `hflip`, `vflip` (train only): timm's random resized crop and flips.
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}: choose one of {', '.join(DECODERS)}")
    cpu_decoder = "pil" if decoder == "pil" else "tv"
    reduce = train if reduced_decode is None else reduced_decode
    if train:
        transform = TrainTransform(img_size, scale=scale, ratio=ratio, hflip=hflip, vflip=vflip,
                                   interpolation=train_interpolation, decoder=cpu_decoder, reduce=reduce,
                                   augment=augment)
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
                          shuffle_buffer=shuffle_buffer, shared=shared, num_classes=num_classes,
                          remote=remote, largest=max(img_size, largest_img_size or 0),
                          max_sample_bytes=max_sample_bytes, shuffle_bytes=shuffle_bytes)
    if timeout is None:
        remote_reads = any(is_remote(u) for u in split.urls)
        timeout = LOADER_TIMEOUT + (dataset.remote.worst_case() if remote_reads else 0)
    return StreamLoader(dataset, num_workers=num_workers, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor, persistent=persistent, timeout=timeout)
