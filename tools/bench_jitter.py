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
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.device import resolve_device  # noqa: E402
from pipeline.augment import ColorJitter, WorkerColorJitter  # noqa: E402
from pipeline.prefetch import Normalize  # noqa: E402


def timed(fn, seconds: float, sync=lambda: None) -> float:
    """Seconds per call, after two warm-up calls, over at least `seconds`."""
    fn(), fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - t0) / n


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
    workers, devices, norms = [], [], []
    for r in range(args.rounds):
        workers.append(worker_us(args.img_size, args.seconds))
        d, n = device_us(dev, args.batch_size, args.img_size, args.seconds)
        devices.append(d)
        norms.append(n)
        print(f"round {r}: worker {workers[-1]:.1f} us/image, device {devices[-1]:.2f} us/image "
              f"(normalisation alone {norms[-1]:.2f})", flush=True)
    w, d, n = statistics.median(workers), statistics.median(devices), statistics.median(norms)
    print(f"colour jitter per image: in a worker {w:.1f} us (one core), on {dev.name()} {d:.2f} us with the "
          f"normalisation ({d - n:.2f} us for the jitter), batch {args.batch_size}: workers / device {w / d:.1f}")
    print(json.dumps({"worker_us_per_image": round(w, 2), "device_us_per_image": round(d, 3),
                      "device_normalise_only_us_per_image": round(n, 3), "workers_over_device": round(w / d, 2),
                      "device": dev.type, "device_name": dev.name(), "batch_size": args.batch_size,
                      "img_size": args.img_size, "rounds": args.rounds, "torch": torch.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
