#!/usr/bin/env python3
"""Loader-only throughput against the machine's decode ceiling, measured in one run.

    python tools/bench_loader.py --data_path DIR [-j WORKERS] [-b BATCH] [--steps N]
                                 [--decode cpu|pil|gpu] [--vs-timm] [--epochs E]
                                 [--train-interpolation random] [--color-jitter 0.4 --jitter-in device|workers]
                                 [--vs-plain]

Ceiling: one core decoding + cropping the same images with the same transform, in this process,
times the cores the workers can use (min(workers, cores)). Loader: our StreamLoader after warm-up
batches, with the train recipe's worker side: `--train-interpolation` (default bilinear) and, with
`--jitter-in workers`, torchvision's uint8 ColorJitter per image in the workers (the alternative to
train_stream.py's batched jitter on the device, which costs the loader nothing: `--jitter-in
device`, the default). `--vs-plain` also times today's plain loader (bilinear, no jitter) in the
same rounds and prints the ratio. `--vs-timm` also runs timm's `create_loader` (same shards, same
RandomResizedCrop + flip, no colour jitter, uint8 fast_collate output, no normalisation).
`--epochs E` runs E short epochs and reports the workers' resident memory after each one.
`--rounds R` repeats everything R times, alternating, and reports medians (this machine's
one-core rate drifts between runs). The last stdout line is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from itertools import islice

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common.errors import DataError  # noqa: E402
from common.host import usable_cores as cores  # noqa: E402
from pipeline.info import check_local_shards, load_info  # noqa: E402
from pipeline.loader import create_loader  # noqa: E402
from pipeline.shards import iter_samples, open_shard  # noqa: E402
from pipeline.stream import image_and_label  # noqa: E402
from pipeline.transforms import TrainTransform  # noqa: E402


def sample_bytes(split, n: int):
    out = []
    for url in split.urls:
        with open_shard(url) as f:
            for s in iter_samples(f):
                out.append(image_and_label(s)[0])
                if len(out) == n:
                    return out
    return out


class WorkerJitter:
    """torchvision's ColorJitter(b, c, s) on a worker's HWC uint8 crop (the design not taken)."""

    def __init__(self, strength: float):
        import torchvision.transforms.v2 as T2
        self.jitter = T2.ColorJitter(strength, strength, strength)

    def __call__(self, out, rng):
        out.copy_(self.jitter(out.permute(2, 0, 1)).permute(1, 2, 0))


def worker_augment(args, plain: bool = False):
    return WorkerJitter(args.color_jitter) if not plain and args.color_jitter and args.jitter_in == "workers" else None


def one_core_rate(split, img_size: int, decoder: str, seconds: float, interpolation: str = "bilinear",
                  augment=None) -> float:
    """Images/s of decode + RandomResizedCrop + flip on one thread of this process."""
    import random
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        datas = sample_bytes(split, 256)
        tf = TrainTransform(img_size, decoder="pil" if decoder == "pil" else "tv", interpolation=interpolation,
                            augment=augment)
        out, rng = torch.empty((img_size, img_size, 3), dtype=torch.uint8), random.Random(0)
        for d in datas[:16]:
            tf(d, out, rng)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            tf(datas[n % len(datas)], out, rng)
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def worker_rss_mb(parent: int) -> float:
    """Resident memory of the parent's child processes (the DataLoader workers), in MiB."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) != parent:
                    continue
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        except (OSError, StopIteration, ValueError):
            continue
    return total / 1024


def time_batches(batches, warmup: int, steps: int, sync=lambda: None):
    it = iter(batches)
    for _ in islice(it, warmup):
        pass
    sync()
    n, t0 = 0, time.perf_counter()
    for b in islice(it, steps):
        n += len(b[1]) if isinstance(b, (tuple, list)) else len(b)
    sync()
    return n / (time.perf_counter() - t0), n


def ours(args, split, device, plain: bool = False):
    # Batches are dropped at once, as the trainer's prefetcher does after copying them, so the
    # workers may reuse their buffers, as they do in training.
    loader = create_loader(split, train=True, batch_size=args.batch_size, img_size=args.img_size,
                           num_workers=args.workers, decoder=args.decode,
                           train_interpolation="bilinear" if plain else args.train_interpolation,
                           augment=worker_augment(args, plain),
                           pin_memory=device.type == "cuda", reuse_buffers=True)
    batches = iter(loader)
    sync = lambda: None  # noqa: E731
    if args.decode == "gpu":
        from model.device import resolve_device
        from pipeline.gpu_decode import make_to_device
        from pipeline.prefetch import DevicePrefetcher, Normalize
        dev = resolve_device(device.type)
        feeder = DevicePrefetcher(dev, Normalize(dev.torch), make_to_device())
        batches, sync = feeder(batches), dev.synchronize
    rate, n = time_batches(batches, args.warmup, args.steps, sync)
    rss = []
    for epoch in range(1, args.epochs):
        loader.set_epoch(epoch)
        for _ in islice(iter(loader), args.steps):
            pass
        rss.append(round(worker_rss_mb(os.getpid()), 1))
    return rate, n, loader.stats(), rss


def timm_rate(args) -> float:
    from timm.data import create_dataset
    from timm.data import create_loader as timm_create_loader
    ds = create_dataset(f"wds/{os.path.basename(args.data_path.rstrip('/'))}", root=args.data_path,
                        split="train", is_training=True, batch_size=args.batch_size)
    loader = timm_create_loader(ds, input_size=(3, args.img_size, args.img_size),
                                batch_size=args.batch_size, is_training=True, color_jitter=0.0,
                                num_workers=args.workers, use_prefetcher=True,
                                device=torch.device("cpu"), persistent_workers=True)
    raw = getattr(loader, "loader", loader)  # timm's uint8 DataLoader under its prefetcher
    return time_batches(raw, args.warmup, args.steps)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", required=True, help="shard folder with _info.json")
    p.add_argument("-j", "--workers", type=int, default=cores(), help="DataLoader workers (default: all cores)")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40, help="measured batches")
    p.add_argument("--warmup", type=int, default=5, help="batches before timing")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--decode", choices=("cpu", "pil", "gpu"), default="cpu")
    p.add_argument("--ceiling-seconds", type=float, default=5.0)
    p.add_argument("--vs-timm", action="store_true", help="also time timm's create_loader")
    p.add_argument("--epochs", type=int, default=1, help="epochs for the worker-memory check")
    p.add_argument("--rounds", type=int, default=1, help="repeat and report medians")
    p.add_argument("--train-interpolation", choices=("bilinear", "bicubic", "random"), default="bilinear")
    p.add_argument("--color-jitter", type=float, default=0.0, help="colour jitter strength (0: none)")
    p.add_argument("--jitter-in", choices=("device", "workers"), default="device",
                   help="device: train_stream.py's batched jitter, no loader work; workers: per image in the workers")
    p.add_argument("--vs-plain", action="store_true",
                   help="also time the plain loader (bilinear, no jitter) in the same rounds")
    args = p.parse_args(argv)
    try:
        info = load_info(args.data_path)
        split = info.split("train")
        check_local_shards(split)
    except DataError as e:
        print(f"bench_loader: error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.decode == "gpu" and torch.cuda.is_available() else "cpu")

    used = min(args.workers, cores()) if args.workers > 0 else 1
    ones, rates, timms, rss, plains = [], [], [], [], []
    for r in range(args.rounds):  # alternate the measurements so that drift hits all of them
        ones.append(one_core_rate(split, args.img_size, args.decode, args.ceiling_seconds,
                                  args.train_interpolation, worker_augment(args)))
        rate, n, stats, rss = ours(args, split, device)
        rates.append(rate)
        line = f"round {r}: ours {rate:.1f} img/s, one core {ones[-1]:.1f} img/s"
        if args.vs_plain:
            plains.append(ours(args, split, device, plain=True)[0])
            line += f", plain {plains[-1]:.1f} img/s"
        if args.vs_timm:
            timms.append(timm_rate(args))
            line += f", timm {timms[-1]:.1f} img/s"
        print(line, flush=True)
    one, rate = statistics.median(ones), statistics.median(rates)
    result = {"img_per_s": round(rate, 1), "ceiling_img_per_s": round(one * used, 1),
              "ratio": round(rate / (one * used), 3), "one_core_img_per_s": round(one, 1),
              "cores_used": used, "workers": args.workers, "batch_size": args.batch_size,
              "decode": args.decode, "img_size": args.img_size, "images": n, "rounds": args.rounds,
              "skipped": stats.get("skipped", 0), "train_interpolation": args.train_interpolation,
              "color_jitter": args.color_jitter, "jitter_in": args.jitter_in if args.color_jitter else None}
    if rss:
        result["worker_rss_mb_per_epoch"] = rss
    print(f"ours  {rate:8.1f} img/s   ceiling {one * used:8.1f} img/s "
          f"({used} x {one:.1f})   ratio {rate / (one * used):.3f}   (medians of {args.rounds})")
    if args.vs_plain:
        plain = statistics.median(plains)
        ratios = [a / b for a, b in zip(rates, plains)]
        result.update(plain_img_per_s=round(plain, 1), vs_plain=round(statistics.median(ratios), 3),
                      vs_plain_rounds=[round(x, 3) for x in ratios])
        print(f"plain {plain:8.1f} img/s   ours/plain {statistics.median(ratios):.3f} "
              f"(median of the per-round ratios)")
    if args.vs_timm:
        t = statistics.median(timms)
        result.update(timm_img_per_s=round(t, 1), vs_timm=round(rate / t, 3))
        print(f"timm  {t:8.1f} img/s   ours/timm {rate / t:.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
