"""Elastic resume: finish an interrupted epoch on another plan (world size, workers, batch size).

A mid-epoch checkpoint records which training samples the run has consumed, as a bitmap over
sample ids (id = the shard's offset in `_info.json`'s list + the sample's index in the shard).
A run that can replay the checkpoint's plan exactly does so (pipeline/plan.py, bit-identical).
One that cannot continues the epoch with the samples that the epoch planned and nobody
consumed, in the epoch's permuted order, cut into equal whole batches over its ranks and
workers; the few that do not fill a last global batch (fewer than world x batch) are dropped,
as every epoch drops the tail of its permutation. Pure functions: every rank computes the same
plan from the same bitmap with no communication.
"""
from __future__ import annotations

import numpy as np

from .plan import Piece, WorkerPlan, _split, shard_order, train_steps


def shard_offsets(lengths) -> np.ndarray:
    """Sample id of the first sample of each shard, plus the total at the end."""
    return np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])


def sample_id(offsets: np.ndarray, index) -> int:
    """The id of `__index__` = (shard, index in the shard)."""
    return int(offsets[index[0]]) + int(index[1])


def planned_ids(lengths, *, seed: int, epoch: int, world_size: int, batch_size: int,
                shuffle: bool = True) -> np.ndarray:
    """The ids an epoch of `train_plan` reads, in the order of its global sample sequence."""
    offsets = shard_offsets(lengths)
    order = shard_order(len(lengths), seed, epoch, shuffle)
    seq = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in order]) if order else \
        np.zeros(0, np.int64)
    return seq[:train_steps(int(offsets[-1]), world_size, batch_size) * world_size * batch_size]


def pack(ids, total: int) -> np.ndarray:
    """A bitmap (uint8, np.packbits) of `total` sample ids with `ids` set."""
    mask = np.zeros(total, dtype=bool)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= total):
        raise ValueError(f"sample ids outside [0, {total})")
    mask[ids] = True
    return np.packbits(mask)


def unpack(bits, total: int) -> np.ndarray:
    """The boolean mask of a `pack` bitmap; ValueError when it is not one of `total` ids."""
    bits = np.asarray(bits, dtype=np.uint8).reshape(-1)
    if bits.size != (total + 7) // 8:
        raise ValueError(f"a bitmap of {bits.size * 8} samples, the split has {total}")
    return np.unpackbits(bits, count=total).astype(bool)


def union(bitmaps) -> np.ndarray:
    """Bitwise OR of packed bitmaps of the same size (every rank's consumed samples)."""
    out = None
    for b in bitmaps:
        b = np.asarray(b, dtype=np.uint8).reshape(-1)
        out = b.copy() if out is None else out | b
    return out


def remaining_ids(planned: np.ndarray, consumed: np.ndarray) -> np.ndarray:
    """The planned ids that `consumed` (a boolean mask over all ids) lacks, in planned order."""
    return planned[~consumed[planned]]


def remainder_steps(num_remaining: int, world_size: int, batch_size: int) -> int:
    return num_remaining // (world_size * batch_size)


def pieces_of(offsets: np.ndarray, ids: np.ndarray) -> tuple[Piece, ...]:
    """Runs of consecutive samples of one shard, in the order of `ids`."""
    if ids.size == 0:
        return ()
    shards = np.searchsorted(offsets, ids, side="right") - 1
    index = ids - offsets[shards]
    breaks = np.flatnonzero((np.diff(shards) != 0) | (np.diff(index) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [ids.size]])
    return tuple(Piece(int(shards[a]), int(index[a]), int(b - a)) for a, b in zip(starts, stops))


def remainder_plan(lengths, remaining: np.ndarray, *, world_size: int, rank: int, num_workers: int,
                   worker: int, batch_size: int) -> WorkerPlan:
    """This worker's share of `remaining`: as train_plan cuts a whole epoch, over fewer samples."""
    steps = remainder_steps(remaining.size, world_size, batch_size)
    b0, b1 = _split(steps, num_workers, worker)
    start, stop = (rank * steps + b0) * batch_size, (rank * steps + b1) * batch_size
    return WorkerPlan(pieces_of(shard_offsets(lengths), remaining[start:stop]), stop - start, b1 - b0)
