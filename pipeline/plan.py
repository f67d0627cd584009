"""Stage 2: which samples each rank and DataLoader worker reads in an epoch.

Pure functions of `_info.json`'s shard lengths and (seed, epoch, world size, rank, workers,
batch size), so every rank computes the same plan with no communication.

Train: the shards are permuted with (seed, epoch) and read as one global sequence of samples.
Rank r takes the contiguous range [r*S*B, (r+1)*S*B) with S = N // (world*B) steps, so every
rank runs exactly S full batches, no sample is read twice in an epoch, and the few samples left
over (fewer than world*B) fall at the end of a permutation that changes every epoch. The rank's
range is cut into whole batches for its workers; a range may start or end inside a shard, so
any number of shards works, fewer shards than ranks x workers included.

Validation: no permutation; ranks split the samples as evenly as possible and each worker yields
ceil(n/B) batches, the last one partial, so every sample is evaluated exactly once.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import accumulate


@dataclass(frozen=True)
class Piece:
    """Read `take` samples of shard `shard` after skipping its first `skip`."""
    shard: int
    skip: int
    take: int


@dataclass(frozen=True)
class WorkerPlan:
    pieces: tuple[Piece, ...]
    num_samples: int
    num_batches: int


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def train_steps(num_samples: int, world_size: int, batch_size: int) -> int:
    """Steps per epoch, identical on every rank: full batches only."""
    return num_samples // (world_size * batch_size)


def _split(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` items are cut into `parts` near-equal parts."""
    return total * index // parts, total * (index + 1) // parts


def pieces_for_range(lengths, order, start: int, stop: int) -> tuple[Piece, ...]:
    """Map [start, stop) of the sample sequence (shards concatenated in `order`) to pieces."""
    pieces = []
    ends = list(accumulate(lengths[s] for s in order))
    begin = 0
    for shard, end in zip(order, ends):
        lo, hi = max(start, begin), min(stop, end)
        if lo < hi:
            pieces.append(Piece(shard, lo - begin, hi - lo))
        if end >= stop:
            break
        begin = end
    return tuple(pieces)


def train_plan(lengths, *, seed: int, epoch: int, world_size: int, rank: int,
               num_workers: int, worker: int, batch_size: int, shuffle: bool = True) -> WorkerPlan:
    steps = train_steps(sum(lengths), world_size, batch_size)
    b0, b1 = _split(steps, num_workers, worker)  # this worker's batches within the rank
    start = (rank * steps + b0) * batch_size
    stop = (rank * steps + b1) * batch_size
    order = shard_order(len(lengths), seed, epoch, shuffle)
    return WorkerPlan(pieces_for_range(lengths, order, start, stop), stop - start, b1 - b0)


def eval_plan(lengths, *, world_size: int, rank: int, num_workers: int, worker: int,
              batch_size: int) -> WorkerPlan:
    r0, r1 = _split(sum(lengths), world_size, rank)
    w0, w1 = _split(r1 - r0, num_workers, worker)
    n = w1 - w0
    order = list(range(len(lengths)))
    return WorkerPlan(pieces_for_range(lengths, order, r0 + w0, r0 + w1), n, -(-n // batch_size))


def eval_batches(lengths, *, world_size: int, rank: int, num_workers: int, batch_size: int) -> int:
    return sum(eval_plan(lengths, world_size=world_size, rank=rank, num_workers=num_workers,
                         worker=w, batch_size=batch_size).num_batches for w in range(num_workers))


def round_robin(totals, steps: int) -> tuple[int, list[int]]:
    """How a DataLoader takes batches from workers holding `totals` batches: in turn, skipping
    the workers that have run out. Returns (the worker whose batch comes next, batches taken
    from each worker) after `steps` batches; a resumed epoch starts its turns at that worker."""
    n = len(totals)
    done, w = [0] * n, 0
    for _ in range(min(steps, sum(totals))):
        while done[w] >= totals[w]:
            w = (w + 1) % n
        done[w] += 1
        w = (w + 1) % n
    for _ in range(n):
        if done[w] < totals[w]:
            break
        w = (w + 1) % n
    return w, done
