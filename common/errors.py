"""One family of errors for everything a user can cause: a wrong flag, bad data, a missing device.

`train_stream.py` (and every tool) catches `UserError` once and prints its message as one line;
any other exception is a bug and keeps its traceback. Each layer raises its own subclass, so a
caller can still tell a data problem from a checkpoint problem.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message is one line. `exit_code` is the process status."""

    exit_code = 2


class ConfigError(UserError):
    """A wrong flag, a contradiction between flags, or a bad config file."""


class DataError(UserError):
    """Missing or malformed data: no _info.json, a missing shard, an unusable split."""


class DataLoadingError(DataError):
    """Data became unreadable while training ran (raised by the loader, often in a worker)."""

    exit_code = 1


class ShardError(UserError):
    """make_shards: bad input folder or output environment."""

    exit_code = 1


class SharedMemoryError(UserError):
    """The shared memory (/dev/shm) is too small for the loader workers' batches."""


class DeviceError(UserError):
    """A device that was asked for is not usable."""


class PrecisionError(UserError):
    """The requested precision cannot be used on this device."""


class OptimizerError(UserError):
    """The requested optimizer cannot be built here."""


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit this run."""


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped at a step boundary after writing a checkpoint; rerun to resume


class Preempted(Exception):
    """Not an error: every rank agreed to stop at a signal and the checkpoint is written;
    the command exits with PREEMPTED_EXIT."""


_WORKER_MARK = "in DataLoader worker process"


def user_message(error: BaseException) -> str:
    """The error's one-line message; a DataLoader worker's re-raised error is unwrapped once.

    torch re-raises a worker's exception in the main process as the same class, with the text
    "Caught X in DataLoader worker process N.\\nOriginal Traceback ...\\nmodule.X: message";
    the user needs only the last part.
    """
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and _WORKER_MARK in lines[0]:
        last = lines[-1].strip()
        name = type(error).__name__
        for prefix in (f"{type(error).__module__}.{name}: ", f"{name}: "):
            if last.startswith(prefix):
                return last[len(prefix):]
        return last
    return " ".join(line.strip() for line in lines) or type(error).__name__
