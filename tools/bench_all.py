#!/usr/bin/env python3
"""Every CPU benchmark in its default size, in one go: `make bench`.

    python tools/bench_all.py [--out bench-results.json] [--workdir DIR] [--keep]

Runs, one after another, each in its own process and at its default size:
  make_shards   tools/bench_make_shards.py (N = 2,000 and 2N = 4,000 demo JPEGs of ~500x375)
  loader        tools/bench_loader.py on those 4,000 images sharded 100 per shard, with every
                core (-j = usable cores), against the decode ceiling, timm's loader and DALI's
                CPU pipeline (pipeline/dali.py; a "skipped" row where DALI is not installed)
  overhead      tools/bench_overhead.py (gluon_resnet50_v1b, 64 px, batch 32, train_stream's
                own precision for this CPU)
then writes every tool's JSON line to --out (bench-results.json) and a Markdown table beside it
(bench-results.md: machine, date, CPU model and flags, fast bf16 yes/no, torch version, each
ratio with its rounds), and prints the table. GPU figures come from tools/gpu_bench.py instead.
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
from engine.runtime import describe_host, host_facts  # noqa: E402


def run(name: str, cmd: list[str], timeout: float = 900) -> dict:
    """Run one benchmark tool, echo its output, and return {command, wall_s, result or error}."""
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *cmd], cwd=HERE, text=True, stdout=subprocess.PIPE, timeout=timeout,
                       env=dict(os.environ, PYTHONPATH=HERE))
    wall = round(time.perf_counter() - t0, 1)
    print(p.stdout, end="", flush=True)
    lines = p.stdout.strip().splitlines()
    entry = {"command": " ".join(["python", *cmd]), "wall_s": wall}
    if p.returncode != 0 or not lines or not lines[-1].startswith("{"):
        entry["error"] = f"exit {p.returncode}"
    else:
        entry["result"] = json.loads(lines[-1])
    return entry


def loader_data(workdir: str) -> str:
    """The 4,000 JPEGs of the make_shards benchmark, sharded 100 per shard (40 shards)."""
    from dataprep import make_shards
    out = os.path.join(workdir, "wds")
    if not os.path.isfile(os.path.join(out, "_info.json")):
        make_shards(os.path.join(workdir, "data-2n"), out, max_count=100, progress=False)
    return out


def table(results: dict) -> str:
    """The Markdown report: the machine, then one row per ratio."""
    h = results["host"]
    lines = ["# Benchmark results (`make bench`)", "",
             f"- machine: {h['machine']}, {h['cores']} usable cores ({h['cpus']} CPUs)",
             f"- date: {h['date']}",
             f"- CPU: {h['cpu']}; flags: {' '.join(h['cpu_flags']) or 'none of ' + 'avx2/avx512/amx'}",
             f"- fast bf16: {'yes' if h['fast_bf16'] else 'no'}{' (forced)' if h['fast_bf16_forced'] else ''}",
             f"- torch {h['torch']}, Python {h['python']}",
             f"- total time: {results['wall_s']:.0f} s", "",
             "| benchmark | ratio | value | rounds | figures | settings |", "|---|---|---|---|---|---|"]
    b = results["benchmarks"]
    ms = b.get("make_shards", {}).get("result")
    if ms:
        for label, row in ms["sizes"].items():
            ours = row["sides"]["make_shards"]
            value = f"**{row['ratio']:.2f}**" if row["ratio"] is not None else f"refused: {ms['refused'][label]}"
            lines.append(f"| make_shards, {label.upper()} = {row['images']:,} images | make_shards / `tar -cf` time "
                         f"| {value} | {ms['repeats']} | {row['make_shards_s']} s vs {row['tar_s']} s "
                         f"| {ours['processes']} workers vs 1 process, {row['mb']} MB, warm cache |")
        if "marginal_ratio" in ms:
            lines.append(f"| make_shards, 2N - N | marginal time ratio | {ms['marginal_ratio']:.2f} | {ms['repeats']} "
                         f"| | cost of the extra N images alone |")
    ld = b.get("loader", {}).get("result")
    if ld:
        rows = ld["rows"]
        for name, value in [*ld["ratios"].items(), *ld["refused"].items()]:
            a, c = name.split("/")
            s = rows[a]["settings"]
            shown = f"**{value:.3f}**" if isinstance(value, float) else f"refused: {value}"
            lines.append(f"| loader | {a} / {c} | {shown} | {ld['rounds']} "
                         f"| {rows[a]['img_per_s']} vs {rows[c]['img_per_s']} img/s "
                         f"| {s['cores']} cores, {s['img_size']} px, batch {s['batch_size']}, "
                         f"{s['decoder']} vs {rows[c]['settings']['decoder']} |")
        for name, row in rows.items():
            if "skipped" in row:
                lines.append(f"| loader | {name} | skipped | | | {row['skipped']} |")
    oh = b.get("overhead", {}).get("result")
    if oh:
        s = oh["sides"]["train_stream"]
        value = f"**{oh['overhead']:+.1%}**" if oh["overhead"] is not None else f"refused: {oh['refused']}"
        lines.append(f"| training step overhead | bare / train_stream time - 1 | {value} | {oh['rounds']} "
                     f"| {oh['bare_img_per_s']} vs {oh['train_stream_img_per_s']} img/s "
                     f"| {s['model']}, {s['img_size']} px, batch {s['batch_size']}, {s['amp_dtype']}, "
                     f"{'channels-last' if s['channels_last'] else 'NCHW'}, {s['threads']} threads, both sides |")
    for name, entry in b.items():
        if "error" in entry:
            lines.append(f"| {name} | failed: {entry['error']} | | | | `{entry['command']}` |")
    lines += ["", "Commands (each ends its output with the JSON line stored in bench-results.json):", ""]
    lines += [f"- {name}: `{entry['command']}` ({entry['wall_s']} s)" for name, entry in b.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-results.json", help="JSON results; the table goes beside it as .md")
    p.add_argument("--workdir", default=None, help="where the generated data goes (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (its data is reused next time)")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_all-")
    os.makedirs(workdir, exist_ok=True)
    host = host_facts()
    print(f"bench: {describe_host(host)}", flush=True)
    t0 = time.perf_counter()
    results = {"host": host, "benchmarks": {}}
    b = results["benchmarks"]
    try:
        b["make_shards"] = run("make_shards", ["tools/bench_make_shards.py", "--workdir", workdir, "--keep"])
        loader = ["tools/bench_loader.py", "--data_path", loader_data(workdir), "-j", str(usable_cores()),
                  "--loader", "ours", "timm", "dali"]
        b["loader"] = run("loader", loader)
        b["overhead"] = run("overhead", ["tools/bench_overhead.py"])
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    md = os.path.splitext(args.out)[0] + ".md"
    report = table(results)
    with open(md, "w") as f:
        f.write(report)
    print(f"\n{report}\nwrote {args.out} and {md} in {results['wall_s']:.0f} s")
    return 1 if any("error" in e for e in b.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
