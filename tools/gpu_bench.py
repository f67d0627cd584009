#!/usr/bin/env python3
"""One-command GPU benchmark: compute-only, loader-only and end-to-end training FPS in one run.

    python tools/gpu_bench.py [--out gpu_bench.json]          # one GPU, ~8 minutes
    python tools/gpu_bench.py --tiny                          # the same stages, tiny, on the CPU

Stages (each a subprocess of the project's own tools, so each starts clean):
  data      a few thousand ImageNet-like JPEGs (~500x375) -> shards on local disk
  compute   train_stream.py --synthetic --performance: eager, then torch.compile
            (--cudagraphs adds mode=reduce-overhead, i.e. CUDA graphs)
  loader    tools/bench_loader.py: our loader with CPU decode on all cores and with nvJPEG, and
            DALI fed from our plan with its cpu and its mixed (nvJPEG) decoder
  e2e       train_stream.py --performance on the shards with the faster compute mode: our
            loader with the faster of our decoders, and --loader dali --decode gpu
and reports the ratios end-to-end / compute-only and DALI mixed / our CPU decode, peak GPU
memory, the card, driver, CPU, torch and CUDA versions. The DALI rows need requirements-dali.txt;
without it they say "skipped" and why. `--tiny` runs every stage on the CPU: the DALI rows then
use DALI's cpu decoder (its mixed decoder needs CUDA). Every run resolves device, precision,
channels-last, threads and workers as train_stream.py does (it is train_stream.py, or
bench_loader.py resolving workers the same way), and reports them; a ratio is printed only when
both sides ran the same settings (same model, classes, image size, batch, precision, layout,
threads, compile mode), else one line says why.
Prints a table, writes everything to --out as JSON and its Markdown table beside it (.md), and
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

if __package__ in (None, ""):  # run as a script: the repository's packages are importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.compare import mismatch  # noqa: E402
from engine.runtime import describe_host, resolve_workers  # noqa: E402
from pipeline.dali import dali_missing  # noqa: E402
from tools import benchlib  # noqa: E402
from tools.benchlib import LOADER_KEYS  # noqa: E402

benchlib.register(benchlib.Spec("gpu", __file__, "compute-only, loader-only and end-to-end training FPS on one GPU"))
# what must match between an end-to-end run and the compute-only run it is divided by
COMPUTE_KEYS = ("device", "amp_dtype", "amp_mode", "channels_last", "threads", "fast_bf16", "cudnn_benchmark",
                "tf32", "model", "img_size", "batch_size", "num_classes", "compile", "compile_mode")


def environment() -> dict:
    env = benchlib.host()
    env.update(device=env["gpu"] or "cpu", driver=None)
    if env["gpu"]:
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            pass
    return env


def run_json(cmd, timeout: float) -> dict:
    """Run a tool that ends its stdout with one JSON line: that object with `wall_s`, or {'error': ...}."""
    entry = benchlib.run_tool(cmd, timeout)
    if "error" in entry:
        return {"error": entry["error"]}
    return dict(entry["result"], wall_s=entry["wall_s"])


def make_data(root: str, images: int, size, workers: int) -> str:
    out = os.path.join(root, "bench-wds")
    if os.path.isfile(os.path.join(out, "_info.json")):
        return out
    per_class = max(2, images // 10)
    src = benchlib.demo_images(os.path.join(root, "bench"), per_class, classes=10, val_per_class=2, image_size=size)
    # at least two shards per worker so every worker streams from the start
    return benchlib.demo_shards(src, out, max(8, (10 * per_class) // max(2, 2 * workers)), workers=workers)


def compute_side(r: dict) -> dict:
    """The settings of a train_stream --performance result that decide a step's speed."""
    return dict(r.get("settings", {}), **{k: r.get(k) for k in ("model", "img_size", "batch_size", "num_classes")},
                compile=r.get("compile"), compile_mode=r.get("compile_mode"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu_bench.json")
    p.add_argument("--data-dir", default=None, help="where to build the shards (default: a temp dir)")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--model", default="resnet50.gluon_in1k")
    p.add_argument("-b", "--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=60, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=15, help="untimed steps before each measurement")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help="loader workers (default: train_stream.py's, cores - 1)")
    p.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16"),
                   help="default: train_stream.py's own choice for the device")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    p.add_argument("--cudagraphs", action="store_true", help="also measure compile mode reduce-overhead")
    p.add_argument("--no-dali", action="store_true", help="skip the DALI rows")
    p.add_argument("--stage-timeout", type=float, default=300)
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: 120 small images, resnet10t, 32 px, batch 8, 2 steps, no compile")
    args = p.parse_args(argv)
    if args.tiny:
        args.images, args.model, args.batch_size, args.img_size = 120, "resnet10t", 8, 32
        args.steps, args.warmup, args.no_compile = 2, 1, True
    env = environment()
    cuda = env["gpu"] is not None
    workers = resolve_workers(args.workers)
    print(f"gpu_bench: {env['device']}, driver {env['driver']}, CUDA {env['cuda']}; host {describe_host(env)}",
          flush=True)

    root = args.data_dir or tempfile.mkdtemp(prefix="gpu_bench_")
    t0 = time.perf_counter()
    data = make_data(root, args.images, (96, 72) if args.tiny else (500, 375), workers)
    results = {"env": env, "data": {"path": data, "images": args.images, "seconds": round(time.perf_counter() - t0, 1)},
               "ratios": {}, "refused": {}}
    print(f"data: {args.images} images -> {data} ({results['data']['seconds']} s)", flush=True)

    # --data_path on the synthetic runs too: the same class count (classifier size) as end-to-end
    perf = ["train_stream.py", "--performance", "--data_path", data, "--model", args.model,
            "-b", str(args.batch_size), "--img-size", str(args.img_size), "--perf-steps", str(args.steps),
            "--perf-warmup", str(args.warmup), "--device", "cuda" if cuda else "cpu", "-j", str(workers)]
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

    loader = benchlib.discover()["loader"].command([
        "--data_path", data, "-j", str(workers), "-b", str(args.batch_size), "--img-size", str(args.img_size),
        "--steps", str(max(args.steps // 2, 2)), "--warmup", str(max(args.warmup // 3, 1)),
        "--ceiling-seconds", "2" if args.tiny else "5", "--rounds", "1",
        "--loader", "ours", *([] if args.no_dali else ["dali"]), "--decode", "cpu", "gpu"])
    r = run_json(loader, 2 * args.stage_timeout)
    results["loader"] = r.get("rows", {"ours-cpu": r, "ours-gpu": r})  # an error fills both rows
    results["loader_ratios"], results["loader_refused"] = r.get("ratios", {}), r.get("refused", {})
    for name, row in results["loader"].items():
        print(f"loader-only {name}: {row.get('img_per_s', row.get('error') or row.get('skipped'))}", flush=True)

    ok_modes = {k: v for k, v in results["compute"].items() if "fps" in v}
    best_mode = max(ok_modes, key=lambda k: ok_modes[k]["fps"]) if ok_modes else "eager"
    # nvJPEG needs CUDA: on the CPU the "gpu" loader only exercises the code path
    ours = {k.split("-", 1)[1]: v for k, v in results["loader"].items()
            if k.startswith("ours-") and "img_per_s" in v and (cuda or k == "ours-cpu")}
    decode = max(ours, key=lambda k: ours[k]["img_per_s"]) if ours else "cpu"
    results["e2e"] = {}
    r = run_json([*perf, "--decode", decode, *modes[best_mode]], args.stage_timeout)
    results["e2e"][f"ours-{decode}"] = dict(r, decode=decode, compute_mode=best_mode)
    dali_decode = "gpu" if cuda else "cpu"  # DALI's mixed decoder needs CUDA
    missing = "--no-dali" if args.no_dali else dali_missing()
    if missing:
        results["e2e"][f"dali-{dali_decode}"] = {"skipped": missing}
    else:
        r = run_json([*perf, "--loader", "dali", "--decode", dali_decode, *modes[best_mode]], args.stage_timeout)
        results["e2e"][f"dali-{dali_decode}"] = dict(r, decode=dali_decode, compute_mode=best_mode)
    for name, e in results["e2e"].items():
        print(f"end-to-end {name}: {e.get('fps', e.get('error') or e.get('skipped'))}", flush=True)
    dali_gpu, ours_cpu = results["loader"].get("dali-gpu", {}), results["loader"].get("ours-cpu", {})
    if "img_per_s" in dali_gpu and "img_per_s" in ours_cpu:  # the target: DALI mixed >= 2x our CPU decode
        why = mismatch({"dali-gpu": dali_gpu["settings"], "ours-cpu": ours_cpu["settings"]}, LOADER_KEYS)
        if why:
            results["refused"]["loader dali-gpu / ours-cpu"] = why
        else:
            results["ratios"]["loader dali-gpu / ours-cpu"] = round(dali_gpu["img_per_s"] / ours_cpu["img_per_s"], 3)
    for name, e in results["e2e"].items():
        base = ok_modes.get(e.get("compute_mode"))
        if "fps" not in e or base is None:
            continue
        key = f"e2e {name} / compute {e['compute_mode']}"
        why = mismatch({f"e2e {name}": compute_side(e), f"compute {e['compute_mode']}": compute_side(base)},
                       COMPUTE_KEYS)
        if why:
            results["refused"][key] = why
        else:
            results["ratios"][key] = round(e["fps"] / base["fps"], 4)
    print_table(results)
    results["report"] = report_rows(results)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(benchlib.table({"host": env, "benchmarks": {"gpu": {
            "command": " ".join(["python", "tools/gpu_bench.py", *(argv if argv is not None else sys.argv[1:])]),
            "wall_s": round(time.perf_counter() - t0, 1), "result": results}}}, title="GPU benchmark (`gpu_bench.py`)"))
    print(f"wrote {args.out} and {md}")
    print(json.dumps(summary(results)))
    if not args.data_dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def summary(results: dict) -> dict:
    """The headline numbers, for the last stdout line."""
    out = {"device": results["env"]["device"], "date": results["env"]["date"], "cpu": results["env"]["cpu"],
           "fast_bf16": results["env"]["fast_bf16"]}
    out.update({f"compute_{k}_fps": v.get("fps") for k, v in results["compute"].items()})
    out.update({f"loader_{k}_img_per_s": v.get("img_per_s") for k, v in results["loader"].items()})
    out.update({f"e2e_{k}_fps": v.get("fps") for k, v in results["e2e"].items()})
    out["ratios"], out["refused"] = results["ratios"], results["refused"]
    return out


def report_rows(results: dict) -> list[dict]:
    """The Markdown rows: every rate (img/s) and every ratio, or why a ratio was refused."""
    out = []
    for name, r in results["compute"].items():
        out.append(benchlib.row("compute-only", name, r.get("fps"), "", "img/s", r.get("error") or
                                f"{r.get('amp_dtype')}, peak {r.get('peak_mem_gb')} GB", fmt=".1f"))
    for name, r in results["loader"].items():
        if "skipped" in r:
            out.append(benchlib.skipped_row("loader-only", name, r["skipped"]))
            continue
        s = r.get("settings", {})
        out.append(benchlib.row("loader-only", name, r.get("img_per_s"), 1, "img/s",
                                r.get("error") or f"{s.get('decoder')}, {s.get('cores')} cores", fmt=".1f"))
    for name, e in results["e2e"].items():
        if "skipped" in e:
            out.append(benchlib.skipped_row("end-to-end", name, e["skipped"]))
            continue
        out.append(benchlib.row("end-to-end", name, e.get("fps"), "", "img/s", e.get("error") or
                                f"{e.get('compute_mode')}, data wait {e.get('data_wait_fraction')}", fmt=".1f"))
    for name, value in results["ratios"].items():
        out.append(benchlib.row("ratio", name, value))
    for name, why in results["refused"].items():
        out.append(benchlib.row("ratio", name, None, refused=why))
    return out


def print_table(results: dict) -> None:
    rows = []
    for name, r in results["compute"].items():
        note = f"{r['amp_dtype']}, {r['settings']['threads']} threads" if "fps" in r else r.get("error", "")
        rows.append((f"compute-only, {name}", r.get("fps"), r.get("peak_mem_gb"), note))
    for name, r in results["loader"].items():
        ratio = results["loader_ratios"].get(f"{name}/ceiling")
        if "img_per_s" in r:
            s = r["settings"]
            note = f"{s['decoder']}, {s['cores']} cores" + (f", {ratio} of the CPU ceiling" if ratio else "")
        else:
            note = r.get("error") or f"skipped: {r.get('skipped')}"
        rows.append((f"loader-only, {name}", r.get("img_per_s"), None, note))
    for name, e in results["e2e"].items():
        note = (f"{e['compute_mode']}, data wait {e.get('data_wait_fraction')}" if "fps" in e
                else e.get("error") or f"skipped: {e.get('skipped')}")
        rows.append((f"end-to-end training, {name}", e.get("fps"), e.get("peak_mem_gb"), note))
    print(f"\n{'measurement':40s} {'img/s':>10s} {'peak GB':>8s}  notes")
    for name, fps, mem, note in rows:
        fps_s = f"{fps:10.1f}" if isinstance(fps, (int, float)) else f"{'-':>10s}"
        mem_s = f"{mem:8.2f}" if isinstance(mem, (int, float)) else f"{'':8s}"
        print(f"{name:40s} {fps_s} {mem_s}  {note}")
    for name, value in results["ratios"].items():
        print(f"{name:40s} {value:10.3f}")
    for name, why in results["refused"].items():
        print(f"{name}: no ratio: {why}")


if __name__ == "__main__":
    sys.exit(main())
