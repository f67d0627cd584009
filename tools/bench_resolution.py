#!/usr/bin/env python3
"""What progressive resizing buys, each part measured in one run (rounds alternate, medians):

    python tools/bench_resolution.py compute [--sizes 160 192 224] [--model resnet50.gluon_in1k] [-b 64]
                                             [--steps 10] [--warmup 3] [--rounds 3] [--device auto]
                                             [--blurpool] [--torchcompile [BACKEND]]
    python tools/bench_resolution.py data DIR [--image-size 1024 768] [--images 2000]
    python tools/bench_resolution.py loader --data_path DIR [DIR ...] [--sizes 160 224] [-j N] [-b 64]
                                            [--steps N] [--warmup 3] [--rounds 3]
    python tools/bench_resolution.py compile [--sizes 64 96 128 64] [--model resnet10t] [-b 8]
                                             [--backend inductor] [--modes static auto dynamic]

compute  training img/s at each size on device-resident batches (train_stream.py's Trainer and
         step, --synthetic), one model for all sizes; ratios to the last size.
data     a photo-like ImageFolder (dataprep.demo images, +-30% around --image-size) and two shard
         sets of it: DIR/full-wds (the files as they are) and DIR/500-wds (--resize-max 500
         --jpeg-quality 90, FFCV's preparation).
loader   loader img/s (train transform of the fast recipes: RandomResizedCrop, bilinear, flip) at
         each size on each shard folder; ratios to the last size and to the first folder.
compile  how torch.compile meets a change of image size: each mode in a fresh process with an
         empty inductor cache; graphs compiled, seconds of each first step at a new size, steady
         ms per step. static = model.factory.compile_model (what train_stream.py does), auto =
         torch.compile's default (automatic dynamic shapes), dynamic = dynamic=True.
The last stdout line of each is a JSON object (with the machine under `host`).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from itertools import islice

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a script: the repository's packages are importable
    sys.path.insert(0, HERE)

import torch  # noqa: E402

from engine.runtime import compute_settings, configure_torch, resolve_workers  # noqa: E402
from tools import benchlib  # noqa: E402

benchlib.register(benchlib.Spec("resolution", __file__, "what progressive resizing buys: compute, data, loader, "
                                "compile"))


def _ratios(rates: dict, base) -> dict:
    return {k: round(v / rates[base], 4) for k, v in rates.items()}


# ---------------------------------------------------------------- compute
def compute(args) -> dict:
    from engine.config import parse_args
    from engine.data import make_data
    from engine.dist import setup_distributed
    from engine.trainer import Trainer
    argv = ["--synthetic", "--model", args.model, "-b", str(args.batch_size), "--device", args.device,
            "--color-jitter", "0", "--img-size", str(args.sizes[0]), "--log-interval", "1000"]
    argv += ["--blurpool"] if args.blurpool else []
    argv += ["--torchcompile", args.torchcompile] if args.torchcompile else []
    targs = parse_args(argv)
    d = setup_distributed(targs.device, targs.device_id, targs.local_rank)
    configure_torch()  # train_stream.py's switches (cudnn.benchmark, TF32)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(targs, d, make_data(targs, d))
    dev, g = d.device, torch.Generator().manual_seed(0)
    labels = torch.randint(0, 1000, (args.batch_size,), generator=g).to(dev.torch)
    feed = trainer.data.feed
    batches = {s: feed.normalize(torch.randint(0, 256, (args.batch_size, s, s, 3), dtype=torch.uint8,
                                               generator=g).to(dev.torch)) for s in args.sizes}
    for s in args.sizes:  # warm-up (and compilation) at every size before any timing
        for i in range(args.warmup):
            trainer.step(batches[s], labels, i)
    def rate(s: int) -> float:
        dev.synchronize()
        t0 = time.perf_counter()
        for i in range(args.steps):
            trainer.step(batches[s], labels, i)
        dev.synchronize()
        return args.steps * args.batch_size / (time.perf_counter() - t0)
    rounds = benchlib.alternate({f"{s} px": lambda s=s: rate(s) for s in args.sizes}, args.rounds, " img/s")
    rates = {str(s): round(benchlib.median(rounds[f"{s} px"]), 2) for s in args.sizes}
    base = str(args.sizes[-1])
    return {"img_per_s": rates, f"vs_{base}": _ratios(rates, base),
            f"pixels_{base}_over": {str(s): round((args.sizes[-1] / s) ** 2, 4) for s in args.sizes},
            "model": args.model, "batch_size": args.batch_size, "blurpool": args.blurpool,
            "compile": args.torchcompile, "steps": args.steps, "rounds": args.rounds,
            "settings": compute_settings(dev, trainer.precision, targs.channels_last)}


# ---------------------------------------------------------------- data
def data(args) -> dict:
    from dataprep import make_shards
    src = benchlib.demo_images(os.path.join(args.dir, "photos"), max(1, args.images // 10), classes=10,
                               val_per_class=1, image_size=args.image_size)
    result = {"image_size": args.image_size}
    for name, extra in (("full", {}), ("500", {"resize_max": 500, "jpeg_quality": 90})):
        out = os.path.join(args.dir, f"{name}-wds")
        summary = make_shards(src, out, max_count=max(16, args.images // 16), progress=False, **extra)
        result[name] = {"path": out, "images": summary["images"], "mb": round(summary["bytes"] / 1e6, 1),
                        "resized": summary["resized"]}
    return result


# ---------------------------------------------------------------- loader
def loader(args) -> dict:
    from pipeline.info import load_info
    from pipeline.loader import create_loader
    workers = resolve_workers(args.workers)  # train_stream.py's -j default
    loaders = {}
    for path in args.data_path:
        split = load_info(path).split("train")
        for s in args.sizes:
            loaders[path, s] = create_loader(split, train=True, batch_size=args.batch_size, img_size=s,
                                             num_workers=workers, seed=0, train_interpolation="bilinear",
                                             shuffle_buffer=64, reuse_buffers=True)
    epoch = {key: 0 for key in loaders}

    def rate(key) -> float:
        ld = loaders[key]
        steps = args.steps or len(ld) - args.warmup  # default: the rest of the epoch
        if args.warmup + steps > len(ld) or steps < 1:
            raise SystemExit(f"bench_resolution: {key[0]} has {len(ld)} batches of {args.batch_size} per epoch; "
                             f"--warmup + --steps need {args.warmup + steps}: lower -b or --steps")
        ld.set_epoch(epoch[key])
        epoch[key] += 1
        it = iter(ld)
        for _ in islice(it, args.warmup):
            pass
        t0 = time.perf_counter()
        n = sum(len(labels) for _, labels in islice(it, steps))
        elapsed = time.perf_counter() - t0
        for _ in it:  # finish the epoch so the persistent workers are ready for the next
            pass
        return n / elapsed

    names = {key: f"{os.path.basename(key[0].rstrip('/'))} {key[1]} px" for key in loaders}
    rounds = benchlib.alternate({names[key]: lambda key=key: rate(key) for key in loaders}, args.rounds, " img/s")
    rates = {f"{p}@{s}": round(benchlib.median(rounds[names[p, s]]), 2) for p, s in loaders}
    base, first = args.sizes[-1], args.data_path[0]
    by_size = {p: _ratios({str(s): rates[f"{p}@{s}"] for s in args.sizes}, str(base)) for p in args.data_path}
    by_data = {str(s): _ratios({p: rates[f"{p}@{s}"] for p in args.data_path}, first) for s in args.sizes}
    return {"img_per_s": rates, f"vs_{base}px": by_size, "vs_first_data": by_data, "workers": workers,
            "batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps or "rest of epoch",
            "rounds": args.rounds}


# ---------------------------------------------------------------- compile
def compile_one(args) -> dict:
    """One mode, in this (fresh) process: graphs compiled and step times at each size in order."""
    import timm
    from torch._dynamo.utils import counters

    from model.device import resolve_device
    from model.factory import compile_model
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10).to(device.torch, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sizes = sorted(set(args.sizes))
    if args.mode == "static":
        compiled = compile_model(model, args.backend, sizes=len(sizes))
    else:
        compiled = torch.compile(model, backend=args.backend, dynamic=True if args.mode == "dynamic" else None)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(compiled(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    first, steady, seen = [], {}, set()
    for s in args.sizes:
        x = torch.randn(args.batch_size, 3, s, s, device=device.torch).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.batch_size,), device=device.torch)
        device.synchronize()
        t0 = time.perf_counter()
        step(x, y)
        device.synchronize()
        first.append([s, round(time.perf_counter() - t0, 2), s not in seen])
        seen.add(s)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(x, y)
        device.synchronize()
        steady.setdefault(str(s), []).append(round((time.perf_counter() - t0) / args.steps * 1000, 2))
    return {"mode": args.mode, "graphs": counters["stats"]["unique_graphs"],
            "first_step_s": first, "steady_ms": steady}


def compile_modes(args) -> dict:
    results = {}
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as cache:
            cmd = [os.path.abspath(__file__), "compile-one", "--mode", mode, "--model", args.model,
                   "-b", str(args.batch_size), "--backend", args.backend, "--device", args.device,
                   "--steps", str(args.steps), "--sizes", *map(str, args.sizes)]
            entry = benchlib.run_tool(cmd, timeout=None, env=dict(
                TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0"))
        if "error" in entry:
            raise SystemExit(f"bench_resolution: compile mode {mode} failed: {entry['error']}")
        results[mode] = entry["result"]
        r = results[mode]
        print(f"{mode}: {r['graphs']} graph(s); first steps (size, s, new size): {r['first_step_s']}; "
              f"steady ms/step: {r['steady_ms']}", flush=True)
    return {"modes": results, "sizes": args.sizes, "model": args.model, "batch_size": args.batch_size,
            "backend": args.backend, "device": args.device}


def report_rows(command: str, result: dict) -> list[dict]:
    """The Markdown rows of compute and loader: img/s at each size against the last size."""
    out = []
    if command == "compute":
        base = next(k for k in result if k.startswith("vs_"))
        for size, value in result[base].items():
            out.append(benchlib.row("image size, compute", f"{size} px / {base[3:]} px img/s", value, result["rounds"],
                                    f"{result['img_per_s'][size]} img/s", f"{result['model']}, batch "
                                    f"{result['batch_size']}, {result['settings']['amp_dtype']}"))
    elif command == "loader":
        base = next(k for k in result if k.startswith("vs_") and k.endswith("px"))
        for path, by_size in result[base].items():
            for size, value in by_size.items():
                out.append(benchlib.row("image size, loader", f"{size} px / {base[3:]} img/s", value, result["rounds"],
                                        f"{result['img_per_s'][f'{path}@{size}']} img/s",
                                        f"{os.path.basename(path.rstrip('/'))}, {result['workers']} workers"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compute", help="training img/s per image size")
    c.add_argument("--sizes", type=int, nargs="+", default=[160, 192, 224])
    c.add_argument("--model", default="resnet50.gluon_in1k")
    c.add_argument("-b", "--batch-size", type=int, default=64)
    c.add_argument("--steps", type=int, default=10)
    c.add_argument("--warmup", type=int, default=3)
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--device", default="auto", choices=("auto", "cuda", "npu", "cpu"))
    c.add_argument("--blurpool", action="store_true")
    c.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND")
    d = sub.add_parser("data", help="photo-like ImageFolder + full-size and 500-px-max shards")
    d.add_argument("dir")
    d.add_argument("--image-size", type=int, nargs=2, default=[1024, 768], metavar=("W", "H"))
    d.add_argument("--images", type=int, default=2000)
    ld = sub.add_parser("loader", help="loader img/s per image size and shard folder")
    ld.add_argument("--data_path", "--data-path", dest="data_path", nargs="+", required=True)
    ld.add_argument("--sizes", type=int, nargs="+", default=[160, 224])
    ld.add_argument("-j", "--workers", type=int, default=None, help="default: train_stream.py's (cores - 1)")
    ld.add_argument("-b", "--batch-size", type=int, default=64)
    ld.add_argument("--steps", type=int, default=None, help="timed batches (default: the rest of the epoch)")
    ld.add_argument("--warmup", type=int, default=3)
    ld.add_argument("--rounds", type=int, default=3)
    for name in ("compile", "compile-one"):
        k = sub.add_parser(name, help="graphs and times of torch.compile across size changes"
                           if name == "compile" else argparse.SUPPRESS)
        k.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128, 64])
        k.add_argument("--model", default="resnet10t")
        k.add_argument("-b", "--batch-size", type=int, default=8)
        k.add_argument("--backend", default="inductor")
        k.add_argument("--device", default="auto", choices=("auto", "cuda", "npu", "cpu"))
        k.add_argument("--steps", type=int, default=3)
        if name == "compile":
            k.add_argument("--modes", nargs="+", default=["static", "auto", "dynamic"],
                           choices=("static", "auto", "dynamic"))
        else:
            k.add_argument("--mode", required=True, choices=("static", "auto", "dynamic"))
    args = p.parse_args(argv)
    run = {"compute": compute, "data": data, "loader": loader, "compile": compile_modes,
           "compile-one": compile_one}[args.command]
    result = run(args)
    if args.command != "compile-one":
        result["host"] = benchlib.host()
        result["report"] = report_rows(args.command, result)
        print(f"host: {benchlib.describe(result['host'])}")
    benchlib.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
