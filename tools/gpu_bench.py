#!/usr/bin/env python3
"""One-command GPU benchmark: compute-only, loader-only and end-to-end training FPS in one run.

    python tools/gpu_bench.py [--out gpu_bench.json]          # one GPU, ~8 minutes
    python tools/gpu_bench.py --tiny                          # the same stages, tiny, on the CPU

Stages (each a subprocess of the project's own tools, so each starts clean):
  data      a few thousand ImageNet-like JPEGs (~500x375) -> shards on local disk
  compute   train_stream.py --synthetic --performance: eager, then torch.compile
            (--cudagraphs adds mode=reduce-overhead, i.e. CUDA graphs)
  loader    tools/bench_loader.py: CPU decode on all cores, then nvJPEG (--decode gpu)
  e2e       train_stream.py --performance on the shards with the faster decoder and the
            faster compute mode
and reports the ratio end-to-end / compute-only (same compute mode), peak GPU memory, the
card, driver, torch and CUDA versions. Prints a table, writes everything to --out as JSON, and
ends stdout with one JSON line of the headline numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from common.host import usable_cores  # noqa: E402


def environment() -> dict:
    import torch
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
           "device": "cpu", "driver": None, "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    return env


def run_json(cmd, timeout: float) -> dict:
    """Run a tool that ends its stdout with one JSON line; {'error': ...} if it fails."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=timeout,
                           cwd=HERE, env=dict(os.environ, PYTHONPATH=HERE))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines or not lines[-1].startswith("{"):
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {p.returncode}: {tail}"}
    result = json.loads(lines[-1])
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def make_data(root: str, images: int, size, workers: int) -> str:
    from dataprep import make_shards
    from dataprep.demo import make_demo_data
    src, out = os.path.join(root, "bench"), os.path.join(root, "bench-wds")
    if not os.path.isfile(os.path.join(out, "_info.json")):
        per_class = max(2, images // 10)
        make_demo_data(src, num_classes=10, train_per_class=per_class, val_per_class=2, seed=0,
                       image_size=size, odd_images=False)
        # at least two shards per worker so every worker streams from the start
        max_count = max(8, (10 * per_class) // max(2, 2 * workers))
        make_shards(src, out, max_count=max_count, workers=workers, progress=False)
    return out


def main(argv=None) -> int:
    import torch
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_bench.json")
    p.add_argument("--data-dir", default=None, help="where to build the shards (default: a temp dir)")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--model", default="resnet50.gluon_in1k")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps before each measurement")
    p.add_argument("-j", "--workers", type=int, default=None, help="loader workers (default: all cores - 1)")
    p.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16"),
                   help="default: train_stream.py's own choice for the device")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    p.add_argument("--cudagraphs", action="store_true", help="also measure compile mode reduce-overhead")
    p.add_argument("--stage-timeout", type=float, default=300)
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: 120 small images, resnet10t, 32 px, batch 8, 2 steps, no compile")
    args = p.parse_args(argv)
    if args.tiny:
        args.images, args.model, args.batch_size, args.img_size = 120, "resnet10t", 8, 32
        args.steps, args.warmup, args.no_compile = 2, 1, True
    cuda = torch.cuda.is_available()
    workers = args.workers or max(1, usable_cores() - 1)
    env = environment()
    print(f"gpu_bench: {env['device']}, driver {env['driver']}, torch {env['torch']}, CUDA {env['cuda']}, "
          f"{env['cpus']} CPUs", flush=True)

    root = args.data_dir or tempfile.mkdtemp(prefix="gpu_bench_")
    t0 = time.perf_counter()
    data = make_data(root, args.images, (96, 72) if args.tiny else (500, 375), workers)
    results = {"env": env, "data": {"path": data, "images": args.images, "seconds": round(time.perf_counter() - t0, 1)}}
    print(f"data: {args.images} images -> {data} ({results['data']['seconds']} s)", flush=True)

    perf = ["train_stream.py", "--performance", "--model", args.model, "-b", str(args.batch_size),
            "--img-size", str(args.img_size), "--perf-steps", str(args.steps),
            "--perf-warmup", str(args.warmup), "--device", "cuda" if cuda else "cpu"]
    if args.amp_dtype:
        perf += ["--amp-dtype", args.amp_dtype]
    modes = {"eager": []}
    if not args.no_compile:
        modes["compile"] = ["--torchcompile"]
    if args.cudagraphs:
        modes["compile+cudagraphs"] = ["--torchcompile", "--compile-mode", "reduce-overhead"]
    results["compute"] = {}
    for name, extra in modes.items():
        r = run_json([*perf, "--synthetic", *extra], args.stage_timeout)
        results["compute"][name] = r
        print(f"compute-only {name}: {r.get('fps', r.get('error'))}", flush=True)

    loader = ["tools/bench_loader.py", "--data_path", data, "-j", str(workers), "-b", str(args.batch_size),
              "--img-size", str(args.img_size), "--steps", str(max(args.steps // 2, 2)),
              "--warmup", str(max(args.warmup // 3, 1)), "--ceiling-seconds", "2" if args.tiny else "5"]
    results["loader"] = {}
    for decode in ("cpu", "gpu"):
        r = run_json([*loader, "--decode", decode], args.stage_timeout)
        results["loader"][decode] = r
        print(f"loader-only decode {decode}: {r.get('img_per_s', r.get('error'))}", flush=True)

    ok_modes = {k: v for k, v in results["compute"].items() if "fps" in v}
    best_mode = max(ok_modes, key=lambda k: ok_modes[k]["fps"]) if ok_modes else "eager"
    # nvJPEG needs CUDA: on the CPU the "gpu" loader only exercises the code path
    ok_loaders = {k: v for k, v in results["loader"].items() if "img_per_s" in v and (cuda or k == "cpu")}
    decode = max(ok_loaders, key=lambda k: ok_loaders[k]["img_per_s"]) if ok_loaders else "cpu"
    r = run_json([*perf, "--data_path", data, "-j", str(workers), "--decode", decode, *modes[best_mode]],
                 args.stage_timeout)
    results["e2e"] = dict(r, decode=decode, compute_mode=best_mode)
    if "fps" in r and best_mode in ok_modes:
        results["e2e_over_compute"] = round(r["fps"] / ok_modes[best_mode]["fps"], 4)
    print_table(results)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    print(json.dumps(summary(results)))
    if not args.data_dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def summary(results: dict) -> dict:
    """The headline numbers, for the last stdout line."""
    out = {"device": results["env"]["device"], "date": results["env"]["date"]}
    out.update({f"compute_{k}_fps": v.get("fps") for k, v in results["compute"].items()})
    out.update({f"loader_{k}_img_per_s": v.get("img_per_s") for k, v in results["loader"].items()})
    out["e2e_fps"] = results["e2e"].get("fps")
    out["e2e_over_compute"] = results.get("e2e_over_compute")
    return out


def print_table(results: dict) -> None:
    rows = []
    for name, r in results["compute"].items():
        rows.append((f"compute-only, {name}", r.get("fps"), r.get("peak_mem_gb"), r.get("error", "")))
    for name, r in results["loader"].items():
        note = f"ceiling {r['ceiling_img_per_s']} (ratio {r['ratio']})" if "ratio" in r else r.get("error", "")
        rows.append((f"loader-only, decode {name}", r.get("img_per_s"), None, note))
    e = results["e2e"]
    note = f"decode {e['decode']}, {e['compute_mode']}, data wait {e.get('data_wait_fraction')}" \
        if "fps" in e else e.get("error", "")
    rows.append(("end-to-end training", e.get("fps"), e.get("peak_mem_gb"), note))
    print(f"\n{'measurement':34s} {'img/s':>10s} {'peak GB':>8s}  notes")
    for name, fps, mem, note in rows:
        fps_s = f"{fps:10.1f}" if isinstance(fps, (int, float)) else f"{'-':>10s}"
        mem_s = f"{mem:8.2f}" if isinstance(mem, (int, float)) else f"{'':8s}"
        print(f"{name:34s} {fps_s} {mem_s}  {note}")
    if "e2e_over_compute" in results:
        print(f"{'end-to-end / compute-only':34s} {results['e2e_over_compute']:10.3f}")


if __name__ == "__main__":
    sys.exit(main())
