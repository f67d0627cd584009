#!/usr/bin/env python3
"""Per-step cost of the preemption check (engine/control.py), measured in one run.

    python tools/bench_control.py [--procs 2] [--steps 300] [--work-ms 20] [--rounds 3] [--idle]

Starts `--procs` gloo processes on this machine. Each "step" is `--work-ms` of matrix work
(with `--idle`: of sleep, a CPU left idle as while an accelerator computes) followed by a
blocking all-reduce of a 1 MB tensor (standing in for DDP's gradient sync, which
keeps the ranks in step as in training). Rounds alternate a loop of plain steps with a loop
whose steps also call `Control.poll()` (one asynchronous 2-integer MAX all-reduce per step,
read one step later), so drift hits both; medians are compared. Also times poll() alone,
back to back. Last stdout line: JSON with `check_us_per_step` and `overhead` (fraction of a step).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

if __package__ in (None, ""):  # run as a script: the repository's packages are importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from engine.control import Control  # noqa: E402
from engine.dist import Dist  # noqa: E402
from model.device import Device  # noqa: E402
from tools import benchlib  # noqa: E402

benchlib.register(benchlib.Spec("control", __file__, "per-step cost of the preemption check (gloo, 2 processes)"))


def _work(a: torch.Tensor, n: int) -> None:
    for _ in range(n):
        a = (a @ a).clamp_(-1, 1)


def _calibrate(ms: float) -> int:
    a = torch.rand(128, 128)
    _work(a, 50)  # the first matmuls pay for lazy set-up, which would make a step too short
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.2:
        _work(a, 1)
        n += 1
    return max(1, round(n * ms / 200))


def _rank(rank: int, args, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.procs)
    control = Control(Dist(rank, args.procs, rank, args.procs, Device("cpu")))
    n = torch.tensor([_calibrate(args.work_ms)], dtype=torch.int64)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)  # every rank does the same work per step
    a, grads = torch.rand(128, 128), torch.zeros(256 << 10)

    def loop(check: bool) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            if args.idle:
                time.sleep(args.work_ms / 1e3)
            else:
                _work(a, int(n))
            dist.all_reduce(grads)
            if check:
                control.poll()
        control.sync()
        return (time.perf_counter() - t0) / args.steps

    plain, checked = [], []
    for _ in range(args.rounds):
        plain.append(loop(False))
        checked.append(loop(True))
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        control.poll()
    control.sync()
    alone = (time.perf_counter() - t0) / args.steps
    if rank == 0:
        out.put((plain, checked, alone))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--work-ms", type=float, default=20.0, help="compute per step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--idle", action="store_true", help="sleep instead of computing (an accelerator's host)")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.spawn(_rank, args=(args, _free_port(), out), nprocs=args.procs, join=True)
    plain, checked, alone = out.get()
    for r, (a, b) in enumerate(zip(plain, checked)):
        print(f"round {r}: step {a * 1e3:.3f} ms plain, {b * 1e3:.3f} ms with the check", flush=True)
    a, b = benchlib.median(plain), benchlib.median(checked)
    result = {"step_ms": round(a * 1e3, 3), "step_with_check_ms": round(b * 1e3, 3),
              "check_us_per_step": round((b - a) * 1e6, 1), "overhead": round(b / a - 1, 4),
              "poll_alone_us": round(alone * 1e6, 1), "procs": args.procs, "steps": args.steps,
              "work_ms": args.work_ms, "idle": args.idle, "rounds": args.rounds, "torch": torch.__version__,
              "host": benchlib.host()}
    result["report"] = [benchlib.row("preemption check", "step time with / without the check - 1", result["overhead"],
                                     args.rounds, f"{b * 1e3:.3f} vs {a * 1e3:.3f} ms per step",
                                     f"{args.procs} gloo processes, {args.work_ms:g} ms "
                                     f"{'idle' if args.idle else 'compute'} per step", fmt="+.2%")]
    print(f"median step {a * 1e3:.3f} ms, with the check {b * 1e3:.3f} ms: {(b - a) * 1e6:+.1f} us per step "
          f"({b / a - 1:+.2%}); poll() alone {alone * 1e6:.1f} us")
    benchlib.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
