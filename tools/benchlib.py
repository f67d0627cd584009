"""The benchmark harness: timing, the generated data, the settings record, the JSON result and the
registry that `make bench` (tools/bench_all.py) and tools/gpu_bench.py run from.

A benchmark is one file, tools/bench_<name>.py (or tools/<name>_bench.py), that
  - measures with `timed` / `time_batches` / `alternate` (warm-up, rounds that alternate so that
    drift hits every side alike, medians, a ratio from one run),
  - describes each side of a ratio with a flat dict of settings and divides only through `ratio`
    (which refuses, with one line, when the settings that must match differ),
  - ends its stdout with `emit(result)`: one JSON line with the machine under `host` and the
    Markdown rows under `report` (made with `row` / `skipped_row`),
  - and registers itself: `register(Spec("name", __file__, "what it measures", argv=...))`;
    `argv(ctx)` gives the arguments of its default run in `make bench` (None: not part of it).
`discover()` imports every such file, so adding the file is all it takes (tools/bench_jitter.py is
a short example).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")

# What two loaders must share for an img/s ratio between them (bench_loader, gpu_bench).
LOADER_KEYS = ("cores", "batch_size", "img_size", "augment", "output")


def _noop() -> None:
    pass


# ---------------------------------------------------------------- timing
def timed(fn: Callable[[], object], seconds: float, sync: Callable[[], None] = _noop, warmup: int = 2) -> float:
    """Seconds per call of fn, after `warmup` calls, over at least `seconds` (at least one call)."""
    for _ in range(warmup):
        fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync()
    return (time.perf_counter() - t0) / n


def time_batches(batches, warmup: int, steps: int, sync: Callable[[], None] = _noop) -> tuple[float, int]:
    """(items/s, items) over `steps` batches after `warmup` untimed ones; a batch is a tensor or an
    (images, labels) pair."""
    it = iter(batches)
    for _ in islice(it, warmup):
        pass
    sync()
    n, t0 = 0, time.perf_counter()
    for b in islice(it, steps):
        n += len(b[1]) if isinstance(b, (tuple, list)) else len(b)
    sync()
    return n / (time.perf_counter() - t0), n


def alternate(measures: dict[str, Callable[[], float]], rounds: int, unit: str = "",
              echo: Callable[[str], None] | None = print) -> dict[str, list[float]]:
    """Run every measurement once per round, in order, `rounds` times (so drift hits all alike);
    echo one line per round; return each one's values."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    for r in range(rounds):
        for name, measure in measures.items():
            values[name].append(measure())
        if echo:
            echo(f"round {r}: " + ", ".join(f"{name} {v[-1]:.1f}" for name, v in values.items()) + unit)
    return values


def median(values) -> float:
    return statistics.median(values)


def median_ratio(numerators, denominators) -> float:
    """The median of the per-round ratios: steadier than the ratio of medians when rounds drift."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


# ---------------------------------------------------------------- settings and ratios
def host() -> dict:
    """The settings record of the machine (CPU, flags, fast bf16, cores, GPU, versions, date)."""
    from engine.runtime import host_facts
    return host_facts()


def describe(h: dict) -> str:
    from engine.runtime import describe_host
    return describe_host(h)


def ratio(numerator: float, denominator: float, sides: dict[str, dict], keys, digits: int = 3):
    """(numerator / denominator rounded, None) when the sides agree on `keys`, else (None, why)."""
    from common.compare import ratio as checked_ratio
    return checked_ratio(numerator, denominator, sides, keys, digits)


def row(benchmark: str, measure: str, value, rounds="", figures: str = "", settings: str = "",
        fmt: str = ".3f", refused: str | None = None) -> dict:
    """One line of the Markdown table: a measured value (a ratio, mostly) with what it came from."""
    return {"benchmark": benchmark, "measure": measure, "value": value, "fmt": fmt, "rounds": rounds,
            "figures": figures, "settings": settings, "refused": refused}


def skipped_row(benchmark: str, measure: str, why: str) -> dict:
    return dict(row(benchmark, measure, None, settings=why), skipped=True)


# ---------------------------------------------------------------- the JSON result
def emit(result: dict) -> None:
    """The last stdout line of every benchmark: its result as one JSON object."""
    print(json.dumps(result), flush=True)


def last_json(stdout: str) -> dict | None:
    lines = stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None


def run_tool(cmd: list[str], timeout: float | None = 900, echo: bool = False, env: dict | None = None) -> dict:
    """Run `python CMD...` from the repository root (`env`: extra variables) in a process of its
    own; {command, wall_s, result: its last stdout line's JSON} or {command, wall_s, error}."""
    t0 = time.perf_counter()
    entry = {"command": " ".join(["python", *cmd])}
    try:
        p = subprocess.run([sys.executable, *cmd], cwd=ROOT, text=True, capture_output=True, timeout=timeout,
                           env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})))
    except subprocess.TimeoutExpired:
        return dict(entry, wall_s=round(time.perf_counter() - t0, 1), error=f"timed out after {timeout:.0f} s")
    entry["wall_s"] = round(time.perf_counter() - t0, 1)
    if echo:
        print(p.stdout, end="", flush=True)
    result = last_json(p.stdout) if p.returncode == 0 else None
    if result is None:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(entry, error=f"exit {p.returncode}: {tail}")
    return dict(entry, result=result)


# ---------------------------------------------------------------- the generated data
def demo_images(folder: str, per_class: int, classes: int = 10, val_per_class: int = 2,
                image_size=(500, 375), seed: int = 0) -> str:
    """An ImageFolder of photo-like JPEGs (dataprep.demo, sizes +-30% around image_size), made
    once: a record beside the folder (not in it: the benchmarks count its files) lets the next run
    reuse it when it was made with the same settings."""
    from dataprep.demo import make_demo_data
    made = {"per_class": per_class, "classes": classes, "val_per_class": val_per_class,
            "image_size": list(image_size), "seed": seed}
    record = folder.rstrip("/") + ".made.json"
    try:
        with open(record) as f:
            if json.load(f) == made and os.path.isdir(folder):
                return folder
    except (OSError, ValueError):
        pass
    shutil.rmtree(folder, ignore_errors=True)
    make_demo_data(folder, num_classes=classes, train_per_class=per_class, val_per_class=val_per_class,
                   seed=seed, image_size=tuple(image_size), odd_images=False)
    with open(record, "w") as f:
        json.dump(made, f)
    return folder


def demo_shards(src: str, out: str, max_count: int, **make_shards_kw) -> str:
    """Shards of an ImageFolder (dataprep.make_shards), made once (reused while _info.json is there)."""
    from dataprep import make_shards
    if not os.path.isfile(os.path.join(out, "_info.json")):
        make_shards(src, out, max_count=max_count, progress=False, **make_shards_kw)
    return out


def bench_images(workdir: str, images: int, classes: int = 20) -> str:
    """The `make bench` photos: `images` JPEGs of ~500x375 in `classes` classes, 9/10 train."""
    per_class = images // classes
    return demo_images(os.path.join(workdir, f"data-{images}"), per_class * 9 // 10, classes,
                       per_class - per_class * 9 // 10)


# ---------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Context:
    """What a default `make bench` run may use: a work folder shared by all benchmarks, the cores."""
    workdir: str
    cores: int


@dataclass(frozen=True)
class Spec:
    name: str
    script: str  # the tool's file; run as `python tools/<file>`
    summary: str
    argv: Callable[[Context], list[str]] | None = None  # its `make bench` run; None: not in `make bench`
    order: int = 50  # `make bench` runs benchmarks by order (data made by one can serve the next)
    extra: dict = field(default_factory=dict)

    def command(self, args: list[str]) -> list[str]:
        return [os.path.relpath(self.script, ROOT), *args]


REGISTRY: dict[str, Spec] = {}


def register(spec: Spec) -> Spec:
    REGISTRY[spec.name] = spec
    return spec


def discover() -> dict[str, Spec]:
    """Import every tools/bench_*.py and *_bench.py (each registers itself); return the registry
    by run order."""
    for file in sorted(os.listdir(TOOLS)):
        name = file[:-3] if file.endswith(".py") else ""
        if name != "bench_all" and (name.startswith("bench_") or name.endswith("_bench")):
            importlib.import_module(f"tools.{name}")
    return dict(sorted(REGISTRY.items(), key=lambda kv: (kv[1].order, kv[0])))


# ---------------------------------------------------------------- the Markdown report
def _value(r: dict) -> str:
    if r.get("skipped"):
        return "skipped"
    if r.get("refused"):
        return f"refused: {r['refused']}"
    v = r["value"]
    if v is None:
        return "-"
    return f"**{v:{r.get('fmt') or ''}}**" if isinstance(v, (int, float)) else str(v)


def _line(*cells) -> str:
    """A Markdown table line; an empty cell is one space wide."""
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


def host_lines(h: dict) -> list[str]:
    return [f"- machine: {h['machine']}, {h['cores']} usable cores ({h['cpus']} CPUs)"
            + (f", GPU {h['gpu']}" if h.get("gpu") else ""),
            f"- date: {h['date']}",
            f"- CPU: {h['cpu']}; flags: {' '.join(h['cpu_flags']) or 'none of ' + 'avx2/avx512/amx'}",
            f"- fast bf16: {'yes' if h['fast_bf16'] else 'no'}{' (forced)' if h['fast_bf16_forced'] else ''}",
            f"- torch {h['torch']}, Python {h['python']}"]


def table(results: dict, title: str = "Benchmark results (`make bench`)") -> str:
    """Markdown from results = {host, wall_s, benchmarks: {name: {command, wall_s, result | error}}}:
    the machine, then every row each benchmark put under result["report"], then the commands."""
    lines = [f"# {title}", "", *host_lines(results["host"])]
    if "wall_s" in results:
        lines.append(f"- total time: {results['wall_s']:.0f} s")
    lines += ["", "| benchmark | measure | value | rounds | figures | settings |", "|---|---|---|---|---|---|"]
    benchmarks = results["benchmarks"]
    for entry in benchmarks.values():
        for r in (entry.get("result") or {}).get("report", []):
            lines.append(_line(r["benchmark"], r["measure"], _value(r), r["rounds"], r["figures"], r["settings"]))
    for name, entry in benchmarks.items():
        if "error" in entry:
            lines.append(_line(name, f"failed: {entry['error']}", "", "", "", f"`{entry['command']}`"))
    lines += ["", "Commands (each ends its output with the JSON line stored beside this table):", ""]
    lines += [f"- {name}: `{entry['command']}` ({entry['wall_s']} s)" for name, entry in benchmarks.items()]
    return "\n".join(lines) + "\n"
