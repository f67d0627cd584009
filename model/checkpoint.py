"""Checkpoints: atomic, `torch.load(weights_only=True)`-safe, loadable straight into timm.

A checkpoint is a dict of tensors and plain Python values only:
  model        state_dict of the unwrapped module (no `module.` / `_orig_mod.` prefixes)
  optimizer    optimizer.state_dict() (momentum buffers)
  scaler       precision.state_dict() (GradScaler / Apex loss scale; {} for bf16/fp32)
  schedule     LRSchedule.state_dict(), for the record (the LR is a pure function of the step)
  epoch        the epoch just finished; resume continues at epoch + 1
  config       the run's resolved config (values that are not plain types become strings)
  rng          python `random`, numpy (as lists), torch CPU and accelerator generator states
  metric       this epoch's metric; best_metric  the best so far
  state_dict_ema  with --model-ema: the EMA weights (timm's key; timm's loaders prefer it)
  ranks        per-rank state beside rank 0's `model` (engine.rankstate: each rank's BN buffers,
               RNG, loss scaler, log window); optional
  position     where training resumes: {"epoch", "step" (optimizer updates done in that epoch),
               "global_step", "steps_per_epoch", "world", "workers", "batch_size", "progress"
               (each rank's loader workers' [batches, taken, padded]), "data" (the data set's
               name, fingerprint and train sample count)}; absent in files of older versions
Files are written to a temporary file in the same folder, flushed, fsynced, then renamed over
the target, so a crash mid-write never leaves a truncated last.pth or best.pth; the temporary
files of a killed write are removed when the next saver starts. Files get the mode a normal
file would (0666 less the umask), not mkstemp's 0600.
"""
from __future__ import annotations

import glob
import math
import os
import random
import tempfile

import torch
from torch import nn

from common.errors import CheckpointError
from model.device import Device


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers, any nesting."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save `state` to `path` atomically: temp file in the same dir, fsync, os.replace."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, (OSError, RuntimeError)):
            raise CheckpointWriteError(_write_failure(e, folder, path)) from None
        raise
    _fsync_dir(folder)  # make the rename itself durable


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (full disk, lost mount): a fault during the run."""

    exit_code = 1


def _write_failure(e: BaseException, folder: str, path: str) -> str:
    """One line for a failed checkpoint write; torch.save reports a full disk as a RuntimeError."""
    import errno
    import shutil
    try:
        full = shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        full = False
    if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or full:
        why = f"no space left on the device of {folder}"
    else:
        text = str(e).strip()
        why = getattr(e, "strerror", None) or (text.splitlines()[0] if text else type(e).__name__)
    kept = "is kept" if os.path.exists(path) else "was never written"
    return f"cannot write {path}: {why}; the previous {os.path.basename(path)} {kept}, no temporary file is left"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str, names=("last.pth", "best.pth")) -> int:
    """Delete the temporary files that killed writes of `names` left in `folder`; returns how many."""
    count = 0
    for name in names:
        for tmp in glob.glob(os.path.join(glob.escape(folder), f".{name}.*.tmp")):
            try:
                os.unlink(tmp)
                count += 1
            except OSError:
                pass
    return count


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    import argparse
    import pickle
    import re
    try:
        # weights_only: tensors and plain containers, plus an allow-list of harmless types, never a
        # full unpickle; timm's train.py stores its flags as an argparse.Namespace under `args`
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if found:
            raise CheckpointError(f"cannot read checkpoint {path}: it holds {found.group(1)}, which is not an "
                                  "allowed type (read with torch.load(weights_only=True), never unpickled in full)"
                                  ) from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot read checkpoint {path}: not a dict but {type(state).__name__}")
    return state


def rng_state(device: Device | None = None) -> dict:
    """Generator states as tensors and plain Python values (weights_only-safe)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    if device is not None and device.is_accelerator:
        state[device.type] = device.module.get_rng_state(device.index)
    return state


def set_rng_state(state: dict, device: Device | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if device is not None and device.is_accelerator and device.type in state:
        device.module.set_rng_state(state[device.type].cpu(), device.index)


def _plain(value):
    """Config values as weights_only-safe types (paths, enums, namespaces become strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _load_optimizer(optimizer, state: dict) -> None:
    # Optimizer.load_state_dict replaces every param group with the saved one. Keep what belongs
    # to this process: the kernel choice (a CUDA run's fused=True may not exist on the resuming
    # device) and the LR's type -- a device-resident tensor LR stays the same object, its value
    # copied in, so the schedule and any compiled step keep pointing at it.
    before = [dict(g) for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, old in zip(optimizer.param_groups, before):
        for key in _IMPLEMENTATION_KEYS:
            if key in old:
                group[key] = old[key]
        value = float(group["lr"])
        if torch.is_tensor(old["lr"]):
            old["lr"].fill_(value)
            group["lr"] = old["lr"]
        else:
            group["lr"] = value


HISTORY_INDEX = "checkpoints.json"  # the kept history: [[file, metric, epoch], ...], best first
TIMM_NAMES = {"last.pth.tar": "last.pth", "model_best.pth.tar": "best.pth"}  # links for timm's tools


def _link_or_copy(src: str, dst: str) -> None:
    """dst holds src's bytes: a hard link (the next atomic save of src replaces src, not dst)."""
    folder = os.path.dirname(dst)
    tmp = os.path.join(folder, f".{os.path.basename(dst)}.{os.getpid()}.tmp")  # remove_stale_temporaries' name
    try:
        os.link(src, tmp)
    except FileExistsError:  # a killed write's, of a process with this id
        os.unlink(tmp)
        os.link(src, tmp)
    except OSError:  # a file system without hard links
        import shutil
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(folder)


class CheckpointSaver:
    """Writes `last.pth` every epoch and `best.pth` when the metric improves (rank 0 only).

    With `hist` N, the N best epochs (by metric; epochs without one rank last, newest first) are
    kept as timm's `checkpoint-EPOCH.pth.tar`, listed best first in checkpoints.json. timm's names
    `last.pth.tar` and `model_best.pth.tar` are symbolic links to last.pth and best.pth. `extra`
    goes into every file (the class count and names, for tools that load a checkpoint).
    """

    def __init__(self, output_dir: str, device: Device | None = None, best_metric: float | None = None,
                 hist: int = 0, extra: dict | None = None):
        self.output_dir = output_dir
        self.device = device  # whose accelerator RNG goes into the checkpoint
        self.best_metric = best_metric  # pass resume()'s best_metric when resuming
        self.hist, self.extra = hist, _plain(extra or {})
        self.higher_is_better = True  # set by save(): the metric's direction ranks the history
        self.last_path = os.path.join(output_dir, "last.pth")
        self.best_path = os.path.join(output_dir, "best.pth")
        self.removed = remove_stale_temporaries(output_dir) if os.path.isdir(output_dir) else 0
        self.history = self._read_history()

    def _read_history(self) -> list:
        import json
        try:
            with open(os.path.join(self.output_dir, HISTORY_INDEX)) as f:
                rows = json.load(f)
            return [r for r in rows if os.path.isfile(os.path.join(self.output_dir, r[0]))]
        except (OSError, ValueError, TypeError, IndexError):
            return []

    def _add_history(self, epoch: int, metric: float | None) -> None:
        import json
        name = f"checkpoint-{epoch}.pth.tar"
        _link_or_copy(self.last_path, os.path.join(self.output_dir, name))
        rows = [r for r in self.history if r[0] != name] + [[name, metric, epoch]]
        sign = 1.0 if self.higher_is_better else -1.0  # a loss ranks lowest first
        rows.sort(key=lambda r: (r[1] is not None, sign * r[1] if r[1] is not None else 0.0, r[2]), reverse=True)
        for old in rows[self.hist:]:
            try:
                os.remove(os.path.join(self.output_dir, old[0]))
            except FileNotFoundError:
                pass
        self.history = rows[:self.hist]
        tmp = os.path.join(self.output_dir, f".{HISTORY_INDEX}.tmp")
        with open(tmp, "w") as f:
            json.dump(self.history, f)
        os.replace(tmp, os.path.join(self.output_dir, HISTORY_INDEX))

    def _timm_links(self) -> None:
        for link, target in TIMM_NAMES.items():
            path = os.path.join(self.output_dir, link)
            if os.path.exists(os.path.join(self.output_dir, target)) and not os.path.lexists(path):
                try:
                    os.symlink(target, path)
                except OSError:  # no symbolic links here: the .pth names are the files
                    pass

    def _improves(self, metric: float | None, higher_is_better: bool) -> bool:
        if metric is None or math.isnan(metric):
            return False
        if self.best_metric is None:
            return True
        return metric > self.best_metric if higher_is_better else metric < self.best_metric

    def save(self, epoch: int, model, optimizer, precision, schedule, config: dict,
             metric: float | None = None, higher_is_better: bool = True, position: dict | None = None,
             ema=None, ranks: list | None = None) -> bool:
        """Returns True when this epoch became best.pth. A mid-epoch save passes `position`
        (and epoch = the last finished epoch) and no metric; `ema` is the EMA module, if any;
        `ranks` the per-rank states (saved as they are: tensors and plain values)."""
        self.higher_is_better = higher_is_better
        is_best = self._improves(metric, higher_is_better)
        if is_best:
            self.best_metric = float(metric)
        weights = unwrap_model(model).state_dict()
        state = {
            # `state_dict`, `arch` and `version` 2 (epoch = the epoch finished) are what timm's
            # CheckpointSaver writes and its resume_checkpoint/load_checkpoint read; `model` is
            # the same object (stored once: pickle keeps one copy of an object named twice)
            "state_dict": weights,
            "model": weights,
            "arch": str((config or {}).get("model") or type(unwrap_model(model)).__name__.lower()),
            "version": 2,
            "optimizer": optimizer.state_dict(),
            "scaler": precision.state_dict() if precision is not None else {},
            "schedule": schedule.state_dict() if schedule is not None else {},
            "epoch": int(epoch),
            "config": _plain(config or {}),
            "rng": rng_state(self.device),
            "metric": None if metric is None else float(metric),
            "best_metric": self.best_metric,
        }
        if ema is not None:
            state["state_dict_ema"] = unwrap_model(ema).state_dict()
        if position is not None:
            state["position"] = _plain(position)
        if ranks is not None:
            state["ranks"] = ranks
        state.update(self.extra)
        save_checkpoint(self.last_path, state)
        if is_best:  # the same bytes: a hard link (no second copy), replaced atomically
            _link_or_copy(self.last_path, self.best_path)
        mid_epoch = position is not None and position.get("step", 0) > 0
        if self.hist and not mid_epoch:
            self._add_history(epoch, None if metric is None else float(metric))
        self._timm_links()
        return is_best


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def _misfit(model: nn.Module, state, path: str, ckpt: dict, model_name: str | None) -> str:
    """Why a state_dict does not load: the recorded model name and the first differing keys."""
    parts = []
    written_for = ckpt.get("config", {}).get("model") if isinstance(ckpt.get("config"), dict) else None
    if written_for and model_name and written_for != model_name:
        parts.append(f"it was written for model {written_for!r}, this run builds {model_name!r}")
    if not isinstance(state, dict):
        return f"checkpoint {path}: 'model' is not a state dict"
    own = model.state_dict()

    def first(keys):
        keys = list(keys)
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here" for k in own
              if k in state and torch.is_tensor(state[k]) and state[k].shape != own[k].shape]
    if missing:
        parts.append(f"missing keys {first(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {first(unexpected)}")
    if shapes:
        parts.append(f"shapes differ: {first(shapes)}")
    if any(k.endswith("blur_filter") for k in missing + unexpected):
        parts.append("the checkpoint and the model differ in BlurPool layers")
    return f"checkpoint {path} does not fit this model: " + ("; ".join(parts) or "its tensors do not load")


def _position(ckpt: dict, path: str) -> dict:
    """The resume position, checked; older files (no 'position') resume at the next epoch."""
    epoch = ckpt["epoch"]
    if not _is_int(epoch, -1, 10 ** 6):
        raise CheckpointError(f"checkpoint {path}: 'epoch' is {epoch!r}, not an epoch number")
    pos = ckpt.get("position")
    if pos is None:
        return {"epoch": epoch + 1, "step": 0}
    if not isinstance(pos, dict) or not all(_is_int(pos.get(k), 0, 10 ** 12) for k in ("epoch", "step")):
        raise CheckpointError(f"checkpoint {path}: 'position' is not a training position: {str(pos)[:80]}")
    if pos["epoch"] > epoch + 1:
        raise CheckpointError(f"checkpoint {path}: 'position' (epoch {pos['epoch']}) and 'epoch' ({epoch}) disagree")
    return pos


def resume(path: str, model, optimizer, precision, device: Device | None = None,
           restore_rng: bool = True, model_name: str | None = None, ema=None) -> dict:
    """Restore everything `CheckpointSaver.save` wrote; returns {'epoch': next epoch to run,
    'step': optimizer updates already done in it, 'position': the whole saved position (or
    {'epoch', 'step'} for files without one), 'best_metric', 'config', 'metric', 'schedule' (the
    LRSchedule state, for its load_state_dict), and 'ranks' (the per-rank states) when the file has
    them}; `optimizer` None restores no optimizer state. Call on every
    rank, after precision.prepare() and before wrapping the model in DDP/compile (wrappers are
    stripped either way). `ema` (the EMA module) gets `state_dict_ema`; from a checkpoint without
    one it starts from the resumed weights. Anything in the file that does not fit is one
    CheckpointError line."""
    ckpt = load_checkpoint(path)
    if "model" not in ckpt and "optimizer" in ckpt and isinstance(ckpt.get("state_dict"), dict):  # timm's key
        ckpt["model"] = ckpt["state_dict"]
    missing = [k for k in ("model", "optimizer", "epoch") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not written by this trainer")
    position = _position(ckpt, path)
    target = unwrap_model(model)
    try:
        target.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError, ValueError):
        raise CheckpointError(_misfit(target, ckpt["model"], path, ckpt, model_name)) from None
    if ema is not None:
        try:
            unwrap_model(ema).load_state_dict(ckpt.get("state_dict_ema") or target.state_dict())
        except (RuntimeError, TypeError, AttributeError, ValueError):
            why = _misfit(unwrap_model(ema), ckpt.get("state_dict_ema"), path, ckpt, model_name)
            raise CheckpointError(why.replace("does not fit", "has EMA weights that do not fit", 1)) from None
    try:
        if optimizer is not None:  # None: weights only (the optimizer keeps its fresh state)
            _load_optimizer(optimizer, ckpt["optimizer"])
    except Exception as e:  # torch raises ValueError/KeyError/TypeError for a foreign state
        detail = (str(e).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(f"checkpoint {path}: its optimizer state does not fit this run "
                              f"({type(e).__name__}: {detail})") from None
    if precision is not None:
        try:
            precision.load_state_dict(ckpt.get("scaler") or {})
        except Exception as e:
            raise CheckpointError(f"checkpoint {path}: unusable 'scaler' entry ({type(e).__name__})") from None
    if restore_rng and ckpt.get("rng"):
        try:
            set_rng_state(ckpt["rng"], device)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path}: unusable 'rng' entry ({type(e).__name__}: "
                                  f"{str(e).strip()[:80]})") from None
    best = ckpt.get("best_metric")
    if best is not None and not isinstance(best, (int, float)):
        raise CheckpointError(f"checkpoint {path}: 'best_metric' is {str(best)[:40]!r}, not a number")
    config = ckpt.get("config", {})
    schedule = ckpt.get("schedule")
    return {"epoch": position["epoch"], "step": position["step"], "position": position,
            "best_metric": best, "config": config if isinstance(config, dict) else {},
            "metric": ckpt.get("metric"), "schedule": schedule if isinstance(schedule, dict) else {},
            **({"ranks": ckpt["ranks"]} if "ranks" in ckpt else {})}


def timm_model_name(source: str) -> str | None:
    """For a checkpoint of timm's train.py, the model its flags name (`args.model`):
    timm's files record no `config`. Read with timm's metadata loader (weights_only with the
    argparse.Namespace allowed, memory-mapped tensors); None when there is nothing to read, and
    load_model reports an unreadable file itself."""
    if not os.path.isfile(source):
        return None
    import argparse

    from timm.utils.checkpoint_saver import load_checkpoint_metadata
    try:
        ckpt = load_checkpoint_metadata(source)
    except Exception:  # damaged or hostile: load_model reads it again and says why in one line
        return None
    if not isinstance(ckpt, dict) or isinstance(ckpt.get("config"), dict):
        return None
    name = getattr(ckpt.get("args"), "model", None) if isinstance(ckpt.get("args"), argparse.Namespace) else None
    return name if isinstance(name, str) and name else None
