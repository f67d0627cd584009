"""Exact-epoch properties of the per-rank, per-worker plan, with simulated ranks and workers."""
import pytest

from pipeline.plan import eval_plan, shard_order, train_plan, train_steps


def samples_of(plan):
    """(shard, index within shard) of every sample a worker plan reads."""
    return [(p.shard, p.skip + k) for p in plan.pieces for k in range(p.take)]


def train_epoch(lengths, world, workers, batch, epoch=0, seed=0):
    """{rank: [worker plans]} for one epoch."""
    return {r: [train_plan(lengths, seed=seed, epoch=epoch, world_size=world, rank=r,
                           num_workers=workers, worker=w, batch_size=batch)
                for w in range(workers)] for r in range(world)}


GEOMETRIES = [
    # (shard lengths, world size, workers, batch)
    ([10] * 12, 1, 1, 4),
    ([10] * 12, 3, 2, 4),
    ([7, 13, 1, 29, 5, 11, 3], 3, 4, 3),   # uneven shard sizes
    ([50, 47], 3, 4, 2),                   # fewer shards than ranks x workers
    ([100], 2, 8, 5),                      # a single shard
    ([9, 9, 9, 5], 1, 3, 8),
]


@pytest.mark.parametrize("lengths,world,workers,batch", GEOMETRIES)
def test_every_rank_runs_the_same_steps_and_no_sample_twice(lengths, world, workers, batch):
    steps = train_steps(sum(lengths), world, batch)
    assert steps == sum(lengths) // (world * batch) and steps > 0
    seen = []
    for plans in train_epoch(lengths, world, workers, batch, epoch=3).values():
        assert sum(p.num_batches for p in plans) == steps
        for p in plans:
            assert p.num_samples == p.num_batches * batch
            assert sum(piece.take for piece in p.pieces) == p.num_samples
            for piece in p.pieces:
                assert 0 <= piece.skip and piece.skip + piece.take <= lengths[piece.shard]
            seen += samples_of(p)
    assert len(seen) == len(set(seen)) == steps * world * batch


def read_intervals(plans):
    """{shard: sorted [(start, stop)]} read by all the given worker plans; asserts no overlap."""
    by_shard = {}
    for p in plans:
        for piece in p.pieces:
            by_shard.setdefault(piece.shard, []).append((piece.skip, piece.skip + piece.take))
    for spans in by_shard.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "a sample is read twice"
    return by_shard


def left_out(lengths, spans):
    """The (shard, start, stop) ranges nobody read."""
    gaps = set()
    for shard, n in enumerate(lengths):
        pos = 0
        for a, b in spans.get(shard, []) + [(n, n)]:
            if a > pos:
                gaps.add((shard, pos, a))
            pos = max(pos, b)
    return gaps


def test_imagenet_geometry_covers_99_percent_and_leftovers_change():
    lengths = [1250] * 1024 + [1167]
    total = sum(lengths)
    assert total == 1281167
    for world in range(8, 65, 8):
        read = []
        for epoch in (0, 1):
            plans = [p for ps in train_epoch(lengths, world, 8, 256, epoch=epoch).values() for p in ps]
            spans = read_intervals(plans)
            seen = sum(b - a for ss in spans.values() for a, b in ss)
            assert seen == train_steps(total, world, 256) * world * 256
            assert seen >= 0.99 * total, (world, seen / total)
            read.append(left_out(lengths, spans))
        assert read[0] and read[1] and read[0] != read[1], world  # leftovers change per epoch


def test_epochs_differ_and_plans_are_deterministic():
    lengths = [20] * 10
    a0 = train_epoch(lengths, 2, 2, 4, epoch=0)
    a1 = train_epoch(lengths, 2, 2, 4, epoch=1)
    assert a0 == train_epoch(lengths, 2, 2, 4, epoch=0)
    assert samples_of(a0[0][0]) != samples_of(a1[0][0])
    assert shard_order(10, seed=0, epoch=0) != shard_order(10, seed=1, epoch=0)
    assert shard_order(10, seed=0, epoch=0, shuffle=False) == list(range(10))


@pytest.mark.parametrize("lengths,world,workers,batch", GEOMETRIES + [([3], 4, 2, 8)])
def test_validation_sees_every_sample_exactly_once(lengths, world, workers, batch):
    seen = []
    for rank in range(world):
        for w in range(workers):
            p = eval_plan(lengths, world_size=world, rank=rank, num_workers=workers, worker=w,
                          batch_size=batch)
            assert p.num_batches == -(-p.num_samples // batch)
            seen += samples_of(p)
    assert sorted(seen) == [(i, k) for i, n in enumerate(lengths) for k in range(n)]
