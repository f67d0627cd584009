#!/usr/bin/env python3
"""Loader-only throughput: ours against the machine's decode ceiling, timm's and DALI's loaders.

    python tools/bench_loader.py --data_path DIR [-j WORKERS] [-b BATCH] [--steps N]
                                 [--loader ours timm dali] [--decode cpu|pil|gpu ...] [--epochs E]
                                 [--train-interpolation random] [--color-jitter 0.4 --jitter-in device|workers]
                                 [--vs-plain]

Every loader named by `--loader` is timed in the same run, on the same shards, with the same
cores (-j: workers, or DALI's threads; default train_stream.py's: cores - 1), batch size and train
augmentation (RandomResizedCrop 0.08-1, 3/4-4/3, + flip, no colour jitter, uint8 output):
  ours      our StreamLoader (pipeline/), once per `--decode` (cpu: torchvision, pil, gpu: nvJPEG)
  timm      timm's `create_loader` on `create_dataset("wds/...")` (PIL), its uint8 fast_collate
            output (the prefetcher is not iterated)
  dali      NVIDIA DALI fed from our epoch plan (pipeline/dali.py), once per `--decode`
            (cpu: DALI's cpu decoder, gpu: its mixed nvJPEG decoder); skipped with a note when
            DALI is not installed (or, for gpu, without CUDA)
The worker side of the train recipe is the same for every row: `--train-interpolation` (default
bilinear; random: bilinear or bicubic per image, as timm) and, with `--jitter-in workers`, colour
jitter per image in the workers (pipeline.augment.WorkerColorJitter, as train_stream.py runs it
on a CPU; timm's loader gets its own ColorJitter). On an accelerator train_stream.py jitters
batched on the device instead (`--jitter-in device`, the default there: `--jitter-in auto`),
which costs the loader nothing. `--vs-plain` adds a row of our loader with today's plain settings
(bilinear, no jitter) and the median of the per-round ratios ours/plain: the loader cost of the
recipe's augmentation.
Ceiling: one core decoding + cropping the same images with our CPU transform, in this process,
times the cores the workers can use. `--rounds R` repeats everything R times, alternating, and
reports medians (this machine's one-core rate drifts between runs). `--epochs E` runs E short
epochs of our first loader and reports its workers' resident memory after each one.

Each row names its settings; a ratio between two rows is printed only when the settings that
must match (cores, batch, image size, augmentation, output) do, else one line says why. The last
stdout line is a JSON object: `rows`, `ratios`, `refused`, `host`.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from itertools import islice

if __package__ in (None, ""):  # run as a script: the repository's packages are importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common.compare import mismatch  # noqa: E402
from common.errors import DataError, UserError  # noqa: E402
from common.host import usable_cores  # noqa: E402
from engine.config import Config  # noqa: E402
from engine.resolved import jitter_place  # noqa: E402
from engine.runtime import resolve_workers  # noqa: E402
from pipeline.augment import WorkerColorJitter  # noqa: E402
from pipeline.info import check_local_shards, load_info  # noqa: E402
from pipeline.loader import create_loader  # noqa: E402
from pipeline.shards import iter_samples, open_shard  # noqa: E402
from pipeline.stream import image_and_label  # noqa: E402
from pipeline.transforms import TrainTransform  # noqa: E402
from tools import benchlib  # noqa: E402
from tools.benchlib import LOADER_KEYS, time_batches  # noqa: E402

AUGMENT = "RandomResizedCrop(0.08-1, 3/4-4/3) + flip"
CEILING_KEYS = ("cores", "img_size", "augment", "decoder", "device")  # ours vs one core x cores


def bench_argv(ctx: benchlib.Context) -> list[str]:
    """`make bench`: the make_shards benchmark's 4,000 photos, 100 per shard, on every core,
    against the ceiling, timm's loader and DALI's CPU pipeline."""
    src = benchlib.bench_images(ctx.workdir, 4000)
    shards = benchlib.demo_shards(src, os.path.join(ctx.workdir, "wds-4000"), 100)
    return ["--data_path", shards, "-j", str(ctx.cores), "--loader", "ours", "timm", "dali"]


benchlib.register(benchlib.Spec("loader", __file__, "loader img/s: ours against the decode ceiling, timm, DALI",
                                argv=bench_argv, order=20))


def sample_bytes(split, n: int):
    out = []
    for url in split.urls:
        with open_shard(url) as f:
            for s in iter_samples(f):
                out.append(image_and_label(s)[0])
                if len(out) == n:
                    return out
    return out


def jitter_in_workers(args, plain: bool = False) -> bool:
    """train_stream.py's own rule (engine.resolved.jitter_place) for our CPU-decoding loader."""
    run = Config.create(color_jitter=args.color_jitter, jitter_in=args.jitter_in, loader="ours", decode="cpu")
    return not plain and jitter_place(run, "cpu") == "workers"


def worker_augment(args, plain: bool = False):
    return WorkerColorJitter(*[args.color_jitter] * 3) if jitter_in_workers(args, plain) else None


def augment_desc(args, plain: bool = False) -> str:
    """The loader-side train augmentation of a row, as its settings name it."""
    interp = "bilinear" if plain else args.train_interpolation
    jitter = f", colour jitter {args.color_jitter:g} per image" if jitter_in_workers(args, plain) else ""
    return f"{AUGMENT}, {interp} interpolation{jitter}"


def one_core_rate(split, img_size: int, decoder: str, seconds: float, interpolation: str = "bilinear",
                  augment=None) -> float:
    """Images/s of decode + RandomResizedCrop + flip on one thread of this process."""
    import random
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        datas = sample_bytes(split, 256)
        tf = TrainTransform(img_size, decoder=decoder, interpolation=interpolation, augment=augment)
        out, rng = torch.empty((img_size, img_size, 3), dtype=torch.uint8), random.Random(0)
        images = itertools.cycle(datas)
        return 1 / benchlib.timed(lambda: tf(next(images), out, rng), seconds, warmup=16)
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


def settings(args, loader: str, decode: str, device: str, workers: int, plain: bool = False, **extra) -> dict:
    """A row's settings; `workers` is read back from the loader object (processes or threads)."""
    return {"loader": loader, "decode": decode, "device": device, "workers": workers,
            "cores": min(workers, usable_cores()) if workers > 0 else 1, "batch_size": args.batch_size,
            "img_size": args.img_size, "augment": augment_desc(args, plain), "output": "uint8 NHWC", **extra}


def run_ours(args, split, decode: str, memory_epochs: int, plain: bool = False):
    # Batches are dropped at once, as the trainer's prefetcher does after copying them, so the
    # workers may reuse their buffers, as they do in training.
    cuda = decode == "gpu" and torch.cuda.is_available()
    loader = create_loader(split, train=True, batch_size=args.batch_size, img_size=args.img_size,
                           num_workers=args.workers, decoder=decode, pin_memory=cuda, reuse_buffers=True,
                           train_interpolation="bilinear" if plain else args.train_interpolation,
                           augment=worker_augment(args, plain))
    batches, sync = iter(loader), (lambda: None)
    if cuda:  # nvJPEG: decode, crop and resize on the device (on the CPU only the loader runs)
        from model.device import resolve_device
        from pipeline.gpu_decode import make_to_device
        from pipeline.prefetch import DevicePrefetcher
        dev = resolve_device("cuda")
        feeder = DevicePrefetcher(dev, lambda images: images, make_to_device())  # uint8, like the others
        batches, sync = feeder(batches), dev.synchronize
    rate, n = time_batches(batches, args.warmup, args.steps, sync)
    rss = []
    for epoch in range(1, memory_epochs):
        loader.set_epoch(epoch)
        for _ in islice(iter(loader), args.steps):
            pass
        rss.append(round(worker_rss_mb(os.getpid()), 1))
    decoder = {"cpu": "torchvision", "pil": "PIL", "gpu": "nvJPEG" if cuda else "nvJPEG path on the CPU"}[decode]
    side = settings(args, "ours-plain" if plain else "ours", decode, "cuda" if cuda else "cpu",
                    loader.loader.num_workers, plain, decoder=decoder)
    if decode == "gpu" and not cuda:
        side["output"] = "JPEG bytes + crop boxes (no device to decode them)"
    return rate, n, dict(loader.stats(), worker_rss_mb_per_epoch=rss), side


def run_timm(args, split, decode, memory_epochs):
    from timm.data import create_dataset
    from timm.data import create_loader as timm_create_loader
    ds = create_dataset(f"wds/{os.path.basename(args.data_path.rstrip('/'))}", root=args.data_path,
                        split="train", is_training=True, batch_size=args.batch_size)
    loader = timm_create_loader(ds, input_size=(3, args.img_size, args.img_size),
                                batch_size=args.batch_size, is_training=True,
                                color_jitter=args.color_jitter if jitter_in_workers(args) else 0.0,
                                interpolation=args.train_interpolation,
                                num_workers=args.workers, use_prefetcher=True,
                                device=torch.device("cpu"), persistent_workers=True)
    raw = getattr(loader, "loader", loader)  # timm's uint8 DataLoader under its prefetcher
    rate, n = time_batches(raw, args.warmup, args.steps)
    return rate, n, {}, settings(args, "timm", "pil", "cpu", raw.num_workers, decoder="PIL")


def run_dali(args, split, decode, memory_epochs):
    from pipeline.dali import DaliLoader
    gpu = decode == "gpu"
    loader = DaliLoader(split, train=True, batch_size=args.batch_size, img_size=args.img_size,
                        num_threads=args.workers, decode=decode, interpolation=args.train_interpolation,
                        device_id=torch.cuda.current_device() if gpu else None)
    try:
        rate, n = time_batches(loader, args.warmup, args.steps)
    finally:
        loader.close()
    extra = loader.settings()
    side = settings(args, "dali", decode, "cuda" if gpu else "cpu", extra.pop("threads"), **extra)
    return rate, n, loader.stats(), side


def rows_to_run(args) -> list[tuple[str, str, str]]:
    """(row name, loader, decode) in the order they run each round."""
    rows = []
    for loader in args.loader:
        if loader == "timm":
            rows.append(("timm", "timm", "pil"))
            continue
        for decode in args.decode:
            if loader == "dali" and decode == "pil":
                continue  # DALI has no PIL decoder
            rows.append((f"{loader}-{decode}", loader, decode))
    if args.vs_plain and "ours" in args.loader:
        rows.append(("plain", "plain", args.decode[0]))
    return rows


def unavailable(loader: str, decode: str) -> str | None:
    """Why a row cannot run on this machine (None: it can)."""
    if loader == "dali":
        from pipeline.dali import dali_missing
        missing = dali_missing()
        if missing:
            return missing
        if decode == "gpu" and not torch.cuda.is_available():
            return "DALI's mixed decoder needs a CUDA device"
    return None


def run_plain(args, split, decode, memory_epochs):
    return run_ours(args, split, decode, 1, plain=True)


RUNNERS = {"ours": run_ours, "timm": run_timm, "dali": run_dali, "plain": run_plain}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", required=True, help="shard folder with _info.json")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="loader workers (DALI: threads); default: train_stream.py's (cores - 1)")
    p.add_argument("-b", "--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=40, help="measured batches")
    p.add_argument("--warmup", type=int, default=5, help="batches before timing")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--loader", nargs="+", choices=("ours", "timm", "dali"), default=["ours"],
                   help="loaders to time in this run (default: ours)")
    p.add_argument("--decode", nargs="+", choices=("cpu", "pil", "gpu"), default=["cpu"],
                   help="decoders for ours and dali (default: cpu)")
    p.add_argument("--ceiling-seconds", type=float, default=5.0)
    p.add_argument("--vs-timm", action="store_true", help="same as adding timm to --loader")
    p.add_argument("--epochs", type=int, default=1, help="epochs for the worker-memory check")
    p.add_argument("--rounds", type=int, default=3, help="repeat, alternating, and report medians")
    p.add_argument("--train-interpolation", choices=("bilinear", "bicubic", "random"), default="bilinear")
    p.add_argument("--color-jitter", type=float, default=0.0, help="colour jitter strength (0: none)")
    p.add_argument("--jitter-in", choices=("auto", "device", "workers"), default="device",
                   help="device: train_stream.py's batched jitter, no loader work; workers: per image in the workers; "
                        "auto: where train_stream.py puts it for a CPU run of this loader (the workers)")
    p.add_argument("--vs-plain", action="store_true",
                   help="also time our plain loader (bilinear, no jitter) in the same rounds")
    args = p.parse_args(argv)
    if args.vs_timm and "timm" not in args.loader:
        args.loader.append("timm")
    try:
        info = load_info(args.data_path)
        split = info.split("train")
        check_local_shards(split)
    except DataError as e:
        print(f"bench_loader: error: {e}", file=sys.stderr)
        return 2
    args.workers = resolve_workers(args.workers)
    args.cores = min(args.workers, usable_cores()) if args.workers > 0 else 1
    host = benchlib.host()
    print(f"host: {benchlib.describe(host)}", flush=True)

    rows = {}
    for name, loader, decode in rows_to_run(args):
        why = unavailable(loader, decode)
        rows[name] = {"skipped": why} if why else {"rounds": [], "loader": loader, "decode": decode}
        if why:
            print(f"{name}: skipped: {why}", flush=True)
    ceiling_decoder = next((d for d in args.decode if d in ("cpu", "pil")), None) if "ours" in args.loader else None
    ones = []
    memory_epochs = args.epochs
    for r in range(args.rounds):  # alternate the measurements so that drift hits all of them
        line = [f"round {r}:"]
        if ceiling_decoder:
            ones.append(one_core_rate(split, args.img_size, "pil" if ceiling_decoder == "pil" else "tv",
                                      args.ceiling_seconds, args.train_interpolation, worker_augment(args)))
            line.append(f"one core {ones[-1]:.1f}")
        for name, row in rows.items():
            if "skipped" in row:
                continue
            try:
                rate, n, stats, side = RUNNERS[row["loader"]](args, split, row["decode"], memory_epochs)
            except UserError as e:  # e.g. DALI present but unusable here: a row, not a crash
                row.clear()
                row["skipped"] = str(e)
                print(f"{name}: skipped: {e}", flush=True)
                continue
            if row["loader"] == "ours":
                memory_epochs = 1  # the memory check runs once, on our first loader
            row["rounds"].append(round(rate, 1))
            rss = stats.pop("worker_rss_mb_per_epoch", None)
            if rss:
                row["worker_rss_mb_per_epoch"] = rss
            row.update(images=n, settings=side, stats={k: v for k, v in stats.items() if v})
            line.append(f"{name} {rate:.1f}")
        print(" ".join(line[:1]) + " " + ", ".join(line[1:]) + " img/s", flush=True)

    result = {"rows": {}, "ratios": {}, "refused": {}, "rounds": args.rounds, "workers": args.workers,
              "cores_used": args.cores, "batch_size": args.batch_size, "img_size": args.img_size,
              "data_path": args.data_path, "host": host}
    sides = {}
    for name, row in rows.items():
        if "skipped" in row:
            result["rows"][name] = row
            continue
        med = statistics.median(row["rounds"])
        result["rows"][name] = dict(img_per_s=round(med, 1), **{k: v for k, v in row.items()
                                                                 if k not in ("loader", "decode")})
        sides[name] = (med, row["settings"])
    if ones:
        one = statistics.median(ones)
        ceiling = {"loader": "one core x cores", "decode": ceiling_decoder, "device": "cpu", "cores": args.cores,
                   "img_size": args.img_size, "augment": augment_desc(args), "output": "uint8 HWC",
                   "threads_per_core": 1,
                   "decoder": "PIL" if ceiling_decoder == "pil" else "torchvision"}
        result["rows"]["ceiling"] = {"img_per_s": round(one * args.cores, 1), "one_core_img_per_s": round(one, 1),
                                     "rounds": [round(x, 1) for x in ones], "settings": ceiling}
        sides["ceiling"] = (one * args.cores, ceiling)

    print(f"\n{'row':12s} {'img/s':>9s}  settings")
    for name, row in result["rows"].items():
        if "skipped" in row:
            print(f"{name:12s} {'-':>9s}  skipped: {row['skipped']}")
            continue
        s = row["settings"]
        print(f"{name:12s} {row['img_per_s']:9.1f}  {s['decoder']}, {s['cores']} cores, {s['device']} "
              f"(rounds: {', '.join(map(str, row['rounds']))})")
    for a, (rate_a, side_a) in sides.items():  # ours against every other row
        if side_a["loader"] != "ours":
            continue
        for b, (rate_b, side_b) in sides.items():
            if b == a or side_b["loader"] == "ours":
                continue
            keys = CEILING_KEYS if b == "ceiling" else LOADER_KEYS
            if b == "plain":  # the point of this row: the same loader without the recipe's augmentation
                keys = tuple(k for k in LOADER_KEYS if k != "augment")
            why = mismatch({a: side_a, b: side_b}, keys)
            if why:
                result["refused"][f"{a}/{b}"] = why
                print(f"{a}/{b}: no ratio: {why}")
            elif b == "plain":  # rounds alternate: the median of the per-round ratios is steadier
                per_round = [x / y for x, y in zip(rows[a]["rounds"], rows[b]["rounds"])]
                result["ratios"][f"{a}/{b}"] = round(benchlib.median_ratio(rows[a]["rounds"], rows[b]["rounds"]), 3)
                result["ratios"][f"{a}/{b} rounds"] = [round(x, 3) for x in per_round]
                print(f"{a}/{b}: {result['ratios'][f'{a}/{b}']:.3f} (median of the per-round ratios)")
            else:
                result["ratios"][f"{a}/{b}"] = round(rate_a / rate_b, 3)
                print(f"{a}/{b}: {rate_a / rate_b:.3f}")
    result["report"] = report_rows(result)
    benchlib.emit(result)
    return 0


def report_rows(result: dict) -> list[dict]:
    """The Markdown rows: each ratio (or why it was refused) with both rates and the settings."""
    rows, out = result["rows"], []
    for name, value in [*result["ratios"].items(), *result["refused"].items()]:
        if name.endswith(" rounds"):
            continue
        a, c = name.split("/")
        s = rows[a]["settings"]
        refused = value if isinstance(value, str) else None
        out.append(benchlib.row("loader", f"{a} / {c}", None if refused else value, result["rounds"],
                                f"{rows[a]['img_per_s']} vs {rows[c]['img_per_s']} img/s",
                                f"{s['cores']} cores, {s['img_size']} px, batch {s['batch_size']}, "
                                f"{s['decoder']} vs {rows[c]['settings']['decoder']}", refused=refused))
    for name, row in rows.items():
        if "skipped" in row:
            out.append(benchlib.skipped_row("loader", name, row["skipped"]))
    return out


if __name__ == "__main__":
    sys.exit(main())
