"""Where a resumed run starts: the position a checkpoint recorded, checked against this run's
data and plan. Exact when the plan is the same; otherwise the interrupted epoch is finished with
the samples it had not consumed (pipeline/elastic.py), or, where the checkpoint records no
consumed samples or the loader cannot read a chosen subset (DALI), at the next epoch boundary."""
from __future__ import annotations

import base64

import numpy as np

from common.errors import CheckpointError
from pipeline.elastic import planned_ids, remainder_steps, remaining_ids, unpack


def encode_consumed(bits) -> str:
    """A packed bitmap as checkpoint text (weights_only-safe; ~1/6 of the split's size in bytes)."""
    return base64.b64encode(np.asarray(bits, dtype=np.uint8).tobytes()).decode("ascii")


def elastic_record(bitmaps, *, total: int, planned: int, seed: int, remainder: bool) -> dict | None:
    """The position's "elastic" entry: every rank's consumed samples OR-ed, the epoch's planned
    count and seed (its order), and whether the epoch was itself a remainder; None when a rank
    does not know what it consumed."""
    if not bitmaps or any(b is None for b in bitmaps):
        return None
    out = np.zeros((total + 7) // 8, np.uint8)
    for b in bitmaps:
        out |= np.asarray(b, dtype=np.uint8).reshape(-1)
    return {"consumed": encode_consumed(out), "samples": int(total), "planned": int(planned), "seed": int(seed),
            "remainder": bool(remainder)}


def _consumed(el, total: int, path: str):
    """The boolean mask of a position's "elastic" entry; None when it has none (older files)."""
    if not isinstance(el, dict) or not isinstance(el.get("consumed"), str):
        return None
    if el.get("samples") != total or not isinstance(el.get("planned"), int) or not isinstance(el.get("seed"), int) \
            or not 0 <= el["planned"] <= total:
        raise CheckpointError(f"checkpoint {path}: its record of consumed samples is for {el.get('samples')} "
                              f"samples, this split has {total}")
    try:
        return unpack(np.frombuffer(base64.b64decode(el["consumed"], validate=True), np.uint8), total)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: unusable record of consumed samples: {e}") from None


def _progress_rows(rows, workers: int) -> bool:
    """A loader progress as StreamLoader.progress() makes it: [batches, taken, padded] per worker."""
    return (isinstance(rows, list) and len(rows) == workers
            and all(isinstance(r, list) and len(r) == 3
                    and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 62 for v in r)
                    for r in rows))


def start_position(pos: dict, path: str, data, d, batch_size: int, allow_other_data: bool, order=None):
    """(epoch, step, this rank's loader progress, elastic) to start at; a checkpoint from another
    data set is refused (unless --allow-other-data); a mid-epoch one whose plan this run cannot
    reproduce (world size, workers, batch size, and the `order` settings that change which sample
    comes when: shuffle buffer, its byte budget, the per-sample byte limit) finishes the epoch with
    the samples it had not consumed. `elastic`: None, or {"remainder": ids or None, "consumed":
    packed bitmap, "planned", "seed"} for the loader's set_epoch and the next checkpoint."""
    epoch, step, steps_per_epoch = pos["epoch"], pos["step"], len(data.train)
    workers = getattr(data.train, "num_workers", 0)
    theirs, ours = pos.get("data"), data.identity
    if isinstance(theirs, dict) and ours:
        differ = [k for k in ("name", "fingerprint", "train_samples")
                  if theirs.get(k) is not None and ours.get(k) is not None and theirs[k] != ours[k]]
        if differ:
            what = ", ".join(f"{k} {theirs[k]!r} -> {ours[k]!r}" for k in differ)
            if not allow_other_data:
                raise CheckpointError(f"checkpoint {path} was trained on other data ({what}); "
                                      "pass --allow-other-data to continue on this data set")
            if step:
                d.say(f"resume: other data ({what}): continuing at the start of epoch {epoch + 1}")
                return epoch + 1, 0, None, None
    if step == 0:
        return epoch, 0, None, None
    plan = {"world": d.world, "workers": workers, "batch_size": batch_size, "steps_per_epoch": steps_per_epoch}
    changed = {k: (pos.get(k), v) for k, v in plan.items() if pos.get(k) != v}
    changed.update({k: (pos[k], v) for k, v in (order or {}).items() if k in pos and pos[k] != v})  # if recorded
    if step > steps_per_epoch and not changed:
        raise CheckpointError(f"checkpoint {path}: step {step} is past the {steps_per_epoch} steps of an epoch")
    progress = pos.get("progress")
    el = pos.get("elastic")
    ds = getattr(data.train, "dataset", None)
    can = hasattr(data.train, "consumed_bitmap") and ds is not None
    mask = _consumed(el, int(sum(ds.lengths)), path) if can else None
    if mask is not None and el.get("remainder"):  # its progress is in a remainder's plan: replay by ids
        changed = changed or {"epoch": ("a remainder", "a whole one")}
    if not changed and step < steps_per_epoch:
        if not (isinstance(progress, list) and len(progress) == d.world and progress[d.rank] is not None
                and hasattr(data.train, "progress")):
            changed = {"loader progress": ("none recorded", "needed")}
        elif not _progress_rows(progress[d.rank], max(1, workers)):
            raise CheckpointError(f"checkpoint {path}: 'position' holds no usable loader progress "
                                  f"for rank {d.rank}")
    if changed and mask is not None:
        planned = planned_ids(ds.lengths, seed=el["seed"], epoch=epoch, world_size=1, batch_size=1)[:el["planned"]]
        remaining = remaining_ids(planned, mask)
        start = steps_per_epoch - remainder_steps(remaining.size, d.world, batch_size)
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        d.say(f"resume: elastic: {what}, {remaining.size:,} of {planned.size:,} samples of epoch {epoch} remain, "
              f"continuing at step {start}")
        return epoch, start, None, {"remainder": remaining, "consumed": np.packbits(mask),
                                    "planned": int(planned.size), "seed": el["seed"]}
    if changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        why = ("this loader cannot read a chosen subset of an epoch" if not can else
               "the checkpoint records no consumed samples (an older version wrote it)")
        d.say(f"resume: {path} was written at step {step} of epoch {epoch} with another plan ({what}); "
              f"continuing at the start of epoch {epoch + 1} ({why})")
        return epoch + 1, 0, None, None
    carry = None if mask is None else {"remainder": None, "consumed": np.packbits(mask),
                                       "planned": el["planned"], "seed": el["seed"]}
    return epoch, step, progress[d.rank] if step < steps_per_epoch else None, carry
