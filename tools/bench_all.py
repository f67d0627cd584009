#!/usr/bin/env python3
"""Every registered CPU benchmark in its default size, in one go: `make bench`.

    python tools/bench_all.py [--out bench-results.json] [--workdir DIR] [--keep] [--only NAME ...] [--list]

Runs, one after another, each in its own process, every benchmark of the registry
(tools/benchlib.py) that names a `make bench` run; today:
  make_shards   tools/bench_make_shards.py (N = 2,000 and 2N = 4,000 demo JPEGs of ~500x375)
  loader        tools/bench_loader.py on those 4,000 images sharded 100 per shard, with every
                core (-j = usable cores), against the decode ceiling, timm's loader and DALI's
                CPU pipeline (pipeline/dali.py; a "skipped" row where DALI is not installed)
  overhead      tools/bench_overhead.py (gluon_resnet50_v1b, 64 px, batch 32, train_stream's
                own precision for this CPU)
then writes every tool's JSON line to --out (bench-results.json) and a Markdown table beside it
(bench-results.md: machine, date, CPU model and flags, fast bf16 yes/no, torch version, and the
rows each benchmark reports under `report`), and prints the table. GPU figures come from
tools/gpu_bench.py instead.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: the repository's packages are importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.host import usable_cores  # noqa: E402
from tools import benchlib  # noqa: E402


def table(results: dict) -> str:
    """The Markdown report: the machine, then one row per measured value (benchlib.table)."""
    return benchlib.table(results)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-results.json", help="JSON results; the table goes beside it as .md")
    p.add_argument("--workdir", default=None, help="where the generated data goes (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (its data is reused next time)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks of `make bench`")
    p.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    args = p.parse_args(argv)
    registry = benchlib.discover()
    if args.list:
        for spec in registry.values():
            print(f"{spec.name:12s} {'make bench' if spec.argv else '          '}  "
                  f"{os.path.relpath(spec.script, benchlib.ROOT)}: {spec.summary}")
        return 0
    chosen = [s for s in registry.values() if s.argv and (not args.only or s.name in args.only)]
    unknown = set(args.only or ()) - {s.name for s in registry.values() if s.argv}
    if unknown:
        p.error(f"--only: not a `make bench` benchmark: {', '.join(sorted(unknown))} (see --list)")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_all-")
    os.makedirs(workdir, exist_ok=True)
    host = benchlib.host()
    print(f"bench: {benchlib.describe(host)}", flush=True)
    ctx = benchlib.Context(workdir=workdir, cores=usable_cores())
    t0 = time.perf_counter()
    results = {"host": host, "benchmarks": {}}
    b = results["benchmarks"]
    try:
        for spec in chosen:
            cmd = spec.command(spec.argv(ctx))
            print(f"\n== {spec.name}: {' '.join(cmd)}", flush=True)
            b[spec.name] = benchlib.run_tool(cmd, timeout=900, echo=True)
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
