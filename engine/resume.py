"""Where a resumed run starts: the position a checkpoint recorded, checked against this run's
data and plan. Exact when the plan is the same; otherwise at the next epoch boundary."""
from __future__ import annotations

from common.errors import CheckpointError


def _progress_rows(rows, workers: int) -> bool:
    """A loader progress as StreamLoader.progress() makes it: [batches, taken, padded] per worker."""
    return (isinstance(rows, list) and len(rows) == workers
            and all(isinstance(r, list) and len(r) == 3
                    and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 62 for v in r)
                    for r in rows))


def start_position(pos: dict, path: str, data, d, batch_size: int, allow_other_data: bool, order=None):
    """(epoch, step, this rank's loader progress) to start at; a checkpoint from another data
    set is refused (unless --allow-other-data), and a mid-epoch one whose plan this run cannot
    reproduce (world size, workers, batch size, and the `order` settings that change which sample
    comes when: shuffle buffer, its byte budget, the per-sample byte limit) continues at the next
    epoch boundary."""
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
                return epoch + 1, 0, None
    if step == 0:
        return epoch, 0, None
    plan = {"world": d.world, "workers": workers, "batch_size": batch_size, "steps_per_epoch": steps_per_epoch}
    changed = {k: (pos.get(k), v) for k, v in plan.items() if pos.get(k) != v}
    changed.update({k: (pos[k], v) for k, v in (order or {}).items() if k in pos and pos[k] != v})  # if recorded
    if step > steps_per_epoch and not changed:
        raise CheckpointError(f"checkpoint {path}: step {step} is past the {steps_per_epoch} steps of an epoch")
    progress = pos.get("progress")
    if not changed and step < steps_per_epoch:
        if not (isinstance(progress, list) and len(progress) == d.world and progress[d.rank] is not None
                and hasattr(data.train, "progress")):
            changed = {"loader progress": ("none recorded", "needed")}
        elif not _progress_rows(progress[d.rank], max(1, workers)):
            raise CheckpointError(f"checkpoint {path}: 'position' holds no usable loader progress "
                                  f"for rank {d.rank}")
    if changed:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        d.say(f"resume: {path} was written at step {step} of epoch {epoch} with another plan ({what}); "
              f"continuing at the start of epoch {epoch + 1}")
        return epoch + 1, 0, None
    return epoch, step, progress[d.rank] if step < steps_per_epoch else None
