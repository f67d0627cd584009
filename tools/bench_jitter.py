#!/usr/bin/env python3
"""Colour jitter: per image in a loader worker against batched on the device, measured in one run.

    python tools/bench_jitter.py [--device auto|cuda|cpu] [-b 256] [--img-size 224] [--rounds 3]

Worker: pipeline.augment.WorkerColorJitter(0.4, 0.4, 0.4) (torchvision's uint8 ops, random op
order per image) on one HWC 224 px crop, one thread, as a worker runs it (`--jitter-in workers`).
Device: pipeline.augment.ColorJitter on a batch of -b images (draws, three blends, clamps)
between the uint8 -> float conversion and the normalisation, timed between device
synchronisations and divided by the batch; the time of the conversion + normalisation alone
is printed beside it. The last stdout line is JSON.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

if __package__ in (None, ""):  # run as a script: the repository's packages are importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.device import resolve_device  # noqa: E402
from pipeline.augment import ColorJitter, WorkerColorJitter  # noqa: E402
from pipeline.prefetch import Normalize  # noqa: E402
from tools import benchlib  # noqa: E402
from tools.benchlib import timed  # noqa: E402

benchlib.register(benchlib.Spec("jitter", __file__, "colour jitter per image in a worker vs batched on the device"))


def worker_us(size: int, seconds: float) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        jitter, rng = WorkerColorJitter(0.4, 0.4, 0.4), random.Random(0)
        out = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8)
        return 1e6 * timed(lambda: jitter(out, rng), seconds)
    finally:
        torch.set_num_threads(threads)


def device_us(dev, batch: int, size: int, seconds: float) -> tuple[float, float]:
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=dev.torch)
    norm, jitter = Normalize(dev.torch), ColorJitter(0.4, 0.4, 0.4)
    gen = torch.Generator(device=dev.torch).manual_seed(0)
    with_jitter = timed(lambda: norm(images, adjust=lambda x: jitter(x, gen)), seconds, dev.synchronize)
    plain = timed(lambda: norm(images), seconds, dev.synchronize)
    return 1e6 * with_jitter / batch, 1e6 * plain / batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "npu", "cpu"))
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternate and report medians")
    args = p.parse_args(argv)
    dev = resolve_device(args.device)
    device_only = {}

    def on_device() -> float:
        d, device_only["n"] = device_us(dev, args.batch_size, args.img_size, args.seconds)
        return d

    def normalise_only() -> float:  # measured with the jitter, in the same call
        return device_only["n"]
    rounds = benchlib.alternate({"worker": lambda: worker_us(args.img_size, args.seconds), "device": on_device,
                                 "normalisation alone": normalise_only}, args.rounds, " us/image")
    w, d, n = (benchlib.median(rounds[k]) for k in ("worker", "device", "normalisation alone"))
    print(f"colour jitter per image: in a worker {w:.1f} us (one core), on {dev.name()} {d:.2f} us with the "
          f"normalisation ({d - n:.2f} us for the jitter), batch {args.batch_size}: workers / device {w / d:.1f}")
    report = [benchlib.row("colour jitter", "worker / device time per image", round(w / d, 2), args.rounds,
                           f"{w:.1f} vs {d:.2f} us", f"{dev.name()}, batch {args.batch_size}, {args.img_size} px, "
                           "worker on one thread", fmt=".1f")]
    benchlib.emit({"worker_us_per_image": round(w, 2), "device_us_per_image": round(d, 3),
                   "device_normalise_only_us_per_image": round(n, 3), "workers_over_device": round(w / d, 2),
                   "device": dev.type, "device_name": dev.name(), "batch_size": args.batch_size,
                   "img_size": args.img_size, "rounds": args.rounds, "torch": torch.__version__,
                   "host": benchlib.host(), "report": report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
