"""The state each rank holds on its own, saved beside the model so that a resumed multi-process
run is bit-identical on every rank, not only on rank 0.

With `--dist-bn ''` (and no DDP buffer broadcast) each rank's BatchNorm running statistics
differ, and each rank validates its share of the data with its own; each rank also has its own
random generators (seeded with seed + rank), its loss scaler and the loss of the current log
window. The checkpoint's `model` keeps rank 0's buffers (timm loads it as is); `ranks` holds,
per rank: `buffers` (None for rank 0: they are in `model`), `ema_buffers`, `rng`, `scaler` and
`window` ([loss sum, steps] of the log window not yet written). The position's `epoch_losses`
are the train losses logged so far in the interrupted epoch (the same on every rank), so the
epoch's train_loss in summary.csv covers the whole epoch after a resume.

A resume on the same world size restores each rank's entry; on another one every rank starts
from rank 0's buffers (the ones in `model`) and its own fresh generators, which is said once.
"""
from __future__ import annotations

import torch

from common.errors import CheckpointError
from model.checkpoint import rng_state, set_rng_state, unwrap_model


def _buffers(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in unwrap_model(module).named_buffers()}


def mine(trainer, window=None) -> dict:
    """This rank's entry (plain tensors and numbers, small: the buffers, not the weights)."""
    entry = {"buffers": None if trainer.d.main else _buffers(trainer.plain),
             "ema_buffers": None if trainer.ema is None or trainer.d.main else _buffers(trainer.ema.module),
             "rng": rng_state(trainer.dev),
             "scaler": trainer.precision.state_dict() if trainer.precision is not None else {}}
    if window is not None:
        loss_sum, n = window
        entry["window"] = [loss_sum.detach().cpu().clone(), int(n)]
    return entry


def gather(trainer, window=None) -> list | None:
    """Every rank's entry, in rank order, on every rank (call on all ranks at the same point)."""
    return trainer.control.gather(mine(trainer, window))


def _load_buffers(module, buffers: dict, path: str, rank: int) -> None:
    own = dict(unwrap_model(module).named_buffers())
    if not isinstance(buffers, dict) or set(buffers) != set(own):
        raise CheckpointError(f"checkpoint {path}: rank {rank}'s saved buffers do not fit this model")
    with torch.no_grad():
        for k, v in own.items():
            if not torch.is_tensor(buffers[k]) or buffers[k].shape != v.shape:
                raise CheckpointError(f"checkpoint {path}: rank {rank}'s buffer {k} does not fit this model")
            v.copy_(buffers[k])


def restore(ranks, model, ema, precision, d, path: str) -> dict | None:
    """Give this rank its own saved state; returns its entry (None when there is none to use:
    an older file, or another world size, which is said on rank 0)."""
    if ranks is None:
        return None
    if not isinstance(ranks, list) or not all(isinstance(e, dict) for e in ranks):
        raise CheckpointError(f"checkpoint {path}: 'ranks' is not a list of per-rank states")
    if len(ranks) != d.world:
        d.say(f"per-rank state: {path} was written by {len(ranks)} processes, this run has {d.world}: "
              "every rank starts from rank 0's BatchNorm statistics and its own fresh random generators")
        return None
    entry = ranks[d.rank]
    try:
        if entry.get("buffers") is not None:
            _load_buffers(model, entry["buffers"], path, d.rank)
        if ema is not None and entry.get("ema_buffers") is not None:
            _load_buffers(ema, entry["ema_buffers"], path, d.rank)
        if entry.get("rng"):
            set_rng_state(entry["rng"], d.device)
        if precision is not None and entry.get("scaler"):
            precision.load_state_dict(entry["scaler"])
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {path}: unusable state of rank {d.rank} "
                              f"({type(e).__name__}: {str(e).strip()[:80]})") from None
    return entry


def window(entry: dict | None, device) -> tuple | None:
    """The saved log window of a rank ([loss sum, steps]) as (device tensor, steps), or None."""
    w = entry.get("window") if isinstance(entry, dict) else None
    if not (isinstance(w, list) and len(w) == 2 and torch.is_tensor(w[0]) and isinstance(w[1], int)):
        return None
    return w[0].to(device), w[1]


def epoch_losses(position: dict | None) -> list:
    """The train losses logged before the checkpoint in the interrupted epoch (position key)."""
    losses = position.get("epoch_losses") if isinstance(position, dict) else None
    if isinstance(losses, list) and all(isinstance(x, float) for x in losses):
        return list(losses)
    return []
