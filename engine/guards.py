"""Guards of a run against what it should never do: share its folder with another run, start on
a folder it cannot write or a disk too small for its checkpoints, or train on (and save) a
non-finite loss.

    with guard_run(resolved):   # rank 0: RUN/.lock held for the life of the run (the kernel
        ...                     # releases it on kill -9, so a stale lock never blocks), the
                                # folder probed for writing and its free space checked
    LossGuard(mode)             # --nonfinite-loss: stop (default) or skip such updates
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import shutil

from common.errors import ConfigError, UserError

LOCK = ".lock"
CHECKPOINTS_OF_SPACE = 3  # last.pth, best.pth and the temporary of an atomic write
MAX_SKIPPED_IN_A_ROW = 25  # --nonfinite-loss skip: more consecutive non-finite losses stop the run


class NonFiniteLoss(UserError):
    """The training loss became NaN or infinite; nothing after it is saved."""

    exit_code = 1


class RunBusy(ConfigError):
    """Another live run holds the run folder."""


# ------------------------------------------------------------------ run folder: writable, locked, space
def _probe(run_dir: str) -> tuple[int, bool]:
    """(an open fd of RUN/.lock, whether the folder was made here); refuses an unwritable folder."""
    made = not os.path.isdir(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        fd = os.open(os.path.join(run_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write the run folder {run_dir}: {e.strerror or e} (choose a writable --output)") \
            from None
    return fd, made


def lock_run(run_dir: str) -> tuple[int, bool]:
    """Take RUN/.lock (flock, exclusive, not waiting) and write this pid in it; a folder held by a
    live run is refused naming its pid. Returns (fd, whether the folder was made here)."""
    import fcntl
    fd, made = _probe(run_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise ConfigError(f"cannot lock the run folder {run_dir}: {e.strerror or e}") from None
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise RunBusy(f"{run_dir} is in use by another run (pid {holder}): wait for it to end, or choose "
                      "another --output/--experiment") from None
    try:  # the write probe: a folder that takes no bytes is refused now, not after set-up
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"cannot write the run folder {run_dir}: {e.strerror or e} (choose a writable --output)") \
            from None
    return fd, made


def checkpoint_bytes(config) -> int | None:
    """About how many bytes one checkpoint of this run takes: the weights (float32), the
    optimizer's momentum and the EMA copy, counted on a model built on the meta device (no
    memory, no weights read); None when it cannot be estimated."""
    try:
        import timm
        import torch

        from model.recipe import canonical_name
        with torch.device("meta"):
            model = timm.create_model(canonical_name(config.network.model), num_classes=config.data.num_classes
                                      or 1000)
        params = sum(p.numel() for p in model.parameters())
        buffers = sum(b.numel() for b in model.buffers())
    except Exception:  # an estimate only: the run itself reports a real problem with the model
        return None
    copies = 2 + bool(config.network.model_ema)  # weights, momentum (SGD), EMA weights
    return 4 * (params * copies + buffers * (1 + bool(config.network.model_ema)))


def check_space(run_dir: str, need: int | None, say=print) -> None:
    """Refuse a folder with less free space than one checkpoint; warn below CHECKPOINTS_OF_SPACE."""
    if not need:
        return
    free = shutil.disk_usage(run_dir).free
    gb = 2 ** 30
    if free < need:
        raise ConfigError(f"{run_dir}: {free / gb:.2f} GiB free, less than one checkpoint of this model "
                          f"(about {need / gb:.2f} GiB): free space or choose another --output")
    if free < CHECKPOINTS_OF_SPACE * need:
        say(f"warning: {run_dir}: {free / gb:.2f} GiB free; a run needs about {CHECKPOINTS_OF_SPACE * need / gb:.2f} "
            f"GiB ({CHECKPOINTS_OF_SPACE} checkpoints of {need / gb:.2f} GiB): a checkpoint may fail with a full disk")


@contextlib.contextmanager
def guard_run(resolved):
    """Around a whole run (rank 0 of a run that saves): the folder's lock, write probe and space
    check before set-up; the lock is released (and a folder made here and left empty removed)
    at the end."""
    run_dir = getattr(resolved, "run_dir", None)
    if not run_dir or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    fd, made = lock_run(run_dir)
    try:
        from .rundir import holds_run
        config = resolved.config
        if made is False and not resolved.resume and config.outputs.experiment and holds_run(run_dir):
            # another run filled the folder between our look at it and the lock
            raise ConfigError(f"{run_dir} already holds a run: pass --auto-resume to continue it, or choose "
                              "another --experiment")
        check_space(run_dir, checkpoint_bytes(config))
        yield
    finally:
        if made and os.listdir(run_dir) == [LOCK]:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(run_dir, LOCK))
                os.rmdir(run_dir)
        os.close(fd)


# ------------------------------------------------------------------ non-finite loss
class LossGuard:
    """--nonfinite-loss. stop: a non-finite loss found at a log sync point (or before a
    checkpoint) ends the run. skip: each update's loss is checked (one host sync per step, the
    price of skipping) and a non-finite one is dropped; MAX_SKIPPED_IN_A_ROW in a row stop it."""

    def __init__(self, mode: str = "stop"):
        self.skip = mode == "skip"
        self.skipped = 0  # over the run
        self.in_a_row = 0

    def keep(self, finite: bool, epoch: int, step: int) -> bool:
        """skip mode: whether this update is applied; counts the dropped ones."""
        if finite:
            self.in_a_row = 0
            return True
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row > MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteLoss(f"epoch {epoch} step {step}: {self.in_a_row} non-finite losses in a row "
                                f"({self.skipped} skipped in all); lower --lr or check the data. The last "
                                "checkpoint written is the last good one")
        return False

    @staticmethod
    def check(loss: float, epoch: int, step: int) -> None:
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"epoch {epoch} step {step}: the training loss is {loss} (diverged); stopped "
                                "without saving: lower --lr or check the data (--nonfinite-loss skip drops such "
                                "updates). The last checkpoint written is the last good one")


def weights_finite(*modules) -> bool:
    """Whether every parameter and float buffer is finite: one host sync (used before a save)."""
    import torch
    flags = [torch.isfinite(t).all() for m in modules if m is not None
             for t in [*m.parameters(), *m.buffers()] if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def sample_order(config) -> dict:
    """The settings besides the plan (world, workers, batch) that decide which sample comes when:
    recorded in a mid-epoch checkpoint's position, a change continues at the next epoch."""
    data = config.data
    return {"shuffle_buffer": data.shuffle_buffer, "shuffle_buffer_bytes": data.shuffle_buffer_bytes,
            "max_sample_bytes": data.max_sample_bytes}
