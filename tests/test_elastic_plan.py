"""The elastic remainder plan: after an interruption, the samples an epoch planned and did not
consume are read exactly once by any new (world size, workers, batch size)."""
import numpy as np
import pytest

from pipeline.elastic import (
    pack,
    pieces_of,
    planned_ids,
    remainder_plan,
    remainder_steps,
    remaining_ids,
    shard_offsets,
    union,
    unpack,
)
from pipeline.plan import train_plan

LENGTHS = [13, 13, 13, 13, 13, 5]  # the shape of the demo shards: the last one shorter


def ids_of_plan(plan, offsets):
    return [int(offsets[p.shard]) + p.skip + k for p in plan.pieces for k in range(p.take)]


@pytest.mark.parametrize("world,workers,batch", [(1, 1, 8), (2, 2, 4), (3, 1, 5)])
def test_planned_ids_are_what_train_plan_reads(world, workers, batch):
    offsets = shard_offsets(LENGTHS)
    read = []
    for rank in range(world):
        for w in range(workers):
            plan = train_plan(LENGTHS, seed=3, epoch=1, world_size=world, rank=rank, num_workers=workers,
                              worker=w, batch_size=batch)
            read += ids_of_plan(plan, offsets)
    assert read == planned_ids(LENGTHS, seed=3, epoch=1, world_size=world, batch_size=batch).tolist()


def test_bitmap_round_trip_and_union():
    total = sum(LENGTHS)
    a, b = pack([0, 5, 69], total), pack([5, 6], total)
    mask = unpack(union([a, b]), total)
    assert np.flatnonzero(mask).tolist() == [0, 5, 6, 69]
    with pytest.raises(ValueError):
        unpack(a[:-1], total)
    with pytest.raises(ValueError):
        pack([total], total)


def test_pieces_of_groups_runs_within_a_shard():
    offsets = shard_offsets(LENGTHS)
    ids = np.array([12, 13, 14, 3, 4, 66])  # end of shard 0 then shard 1; a gap; shard 5
    pieces = pieces_of(offsets, ids)
    assert [(p.shard, p.skip, p.take) for p in pieces] == [(0, 12, 1), (1, 0, 2), (0, 3, 2), (5, 1, 1)]


@pytest.mark.parametrize("new_world,new_workers,new_batch", [(1, 1, 8), (1, 2, 8), (3, 2, 2), (2, 1, 4)])
def test_interrupted_epoch_is_finished_exactly_once(new_world, new_workers, new_batch):
    """2 ranks x 2 workers consumed part of the epoch; any new plan reads every other planned
    sample once, and drops fewer than one global batch."""
    total, offsets = sum(LENGTHS), shard_offsets(LENGTHS)
    planned = planned_ids(LENGTHS, seed=0, epoch=2, world_size=2, batch_size=4)
    rng = np.random.default_rng(0)
    consumed_ids = rng.choice(planned, size=27, replace=False)  # a shuffle buffer consumes out of order
    consumed = unpack(pack(consumed_ids, total), total)
    remaining = remaining_ids(planned, consumed)
    read = []
    for rank in range(new_world):
        for w in range(new_workers):
            plan = remainder_plan(LENGTHS, remaining, world_size=new_world, rank=rank, num_workers=new_workers,
                                  worker=w, batch_size=new_batch)
            got = ids_of_plan(plan, offsets)
            assert len(got) == plan.num_samples == plan.num_batches * new_batch
            read += got
    assert len(read) == len(set(read))
    assert not set(read) & set(consumed_ids.tolist())
    dropped = set(planned.tolist()) - set(read) - set(consumed_ids.tolist())
    assert len(dropped) < new_world * new_batch
    assert len(read) == remainder_steps(remaining.size, new_world, new_batch) * new_world * new_batch
    assert read == remaining[:len(read)].tolist()  # the epoch's order is kept
