"""Stopping a run cleanly, agreed by every rank without a per-step device sync.

A preemption signal (SIGTERM or SIGUSR1) may reach any one rank, or torchrun, which passes
SIGTERM on to every rank; a rank launched by torchrun also stops when torchrun itself is gone
(killed, or ended by a signal it does not handle, such as SIGUSR1). Each rank keeps its wishes
in a few CPU integers; once per step it starts an asynchronous MAX all-reduce of them on a
gloo group and reads the result of the previous step's one, so every rank sees the same
decision at the same step, one step after the signal, and the device is never waited for.
A second signal exits at once. Ctrl-C (SIGINT) stops like SIGTERM; under torchrun, which passes
the terminal's SIGINT on to ranks that already had it, a repeat within DUPLICATE_S is the same one.
Time-based checkpoints (`--checkpoint-interval 10m`) ride on
the same all-reduce: rank 0's clock decides, every rank saves at the same step.
"""
from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from common.errors import PREEMPTED_EXIT, Preempted  # noqa: F401  (re-exported)

from .config import parse_interval  # noqa: F401  (re-exported)
from .dist import Dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
DUPLICATE_S = 2.0  # seconds: a SIGINT repeated by torchrun within them is not a second Ctrl-C
LAUNCHER_GONE = 255  # the stop "signal" of a rank whose torchrun died
STOP, SAVE = 0, 1  # slots of the flags tensor


def reason(code: int) -> str:
    if code == LAUNCHER_GONE:
        return "the launcher (torchrun) is gone"
    try:
        return f"got {signal.Signals(code).name}"
    except ValueError:
        return f"got signal {code}"


class Control:
    """The stop and checkpoint decisions of one training run (call `install()` to arm it)."""

    def __init__(self, d: Dist, interval=None):
        self.d, self.interval = d, interval
        self.signal, self.signal_at = 0, 0.0
        self.group = dist.new_group(backend="gloo") if d.world > 1 else None
        self.pending = None  # (work, tensor) of the all-reduce started at the previous step
        # torchrun's workers learn of its death only by being orphaned
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self.last_save = time.monotonic()
        self.previous = {}

    # ------------------------------------------------------------------ signals
    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if (signum == self.signal == signal.SIGINT and self.parent is not None
                and time.monotonic() - self.signal_at < DUPLICATE_S):
            return  # torchrun passing on the Ctrl-C that the terminal gave every process already
        if self.signal:
            os.write(2, f"train_stream: second {name}: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.signal, self.signal_at = signum, time.monotonic()  # the one line comes at the stop (engine.cli)

    # ------------------------------------------------------------------ decisions
    def _local(self) -> list[int]:
        stop = self.signal
        if not stop and self.parent is not None and os.getppid() != self.parent:
            stop = LAUNCHER_GONE
        save = 0
        if self.interval and self.interval[0] == "seconds" and self.d.main:
            save = int(time.monotonic() - self.last_save >= self.interval[1])
        return [stop, save]

    def poll(self) -> tuple[int, bool]:
        """Once per step, at the same point on every rank: (stop code or 0, save now?) as all
        ranks agreed on one step ago. With one process, the current wishes."""
        if self.group is None:
            stop, save = self._local()
            return stop, bool(save)
        agreed = self._wait()
        t = torch.tensor(self._local(), dtype=torch.int64)
        self.pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True), t)
        return agreed

    def _wait(self) -> tuple[int, bool]:
        if self.pending is None:
            return 0, False
        work, t = self.pending
        self.pending = None
        work.wait()
        return int(t[STOP]), bool(t[SAVE])

    def sync(self) -> int:
        """A blocking agreement (epoch ends): the stop code any rank has now, or 0."""
        if self.group is None:
            return self._local()[STOP]
        pending_stop, _ = self._wait()
        t = torch.tensor(self._local(), dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return max(pending_stop, int(t[STOP]))

    def steps_due(self, global_step: int) -> bool:
        """A step-interval checkpoint after `global_step` optimizer updates."""
        return bool(self.interval and self.interval[0] == "steps" and global_step % self.interval[1] == 0)

    def saved(self) -> None:
        self.last_save = time.monotonic()

    # ------------------------------------------------------------------ collectives for a checkpoint
    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order (small Python objects, on the gloo group)."""
        if self.group is None:
            return [obj]
        self._wait_quiet()
        out = [None] * self.d.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.group is not None:
            self._wait_quiet()
            dist.barrier(group=self.group)

    def _wait_quiet(self) -> None:
        """Let the in-flight all-reduce finish first; its result stays for the next poll."""
        if self.pending is not None:
            self.pending[0].wait()
