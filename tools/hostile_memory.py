#!/usr/bin/env python3
"""Peak memory of one training epoch of the loader over hostile shards (BENCHMARKS.md, "Memory
bounded by the data").

    python tools/hostile_memory.py [--work /tmp/hostile-memory] [--code REPO] [--only NAME ...]

Builds, once, one data set per scenario under --work (each: 24 small JPEG samples plus the hostile
members), then runs each scenario in a fresh process: a train loader with the library's defaults
(batch 8, 32 px, no workers, so the loading runs in that process) reads one epoch, and the process
reports its peak resident memory (getrusage ru_maxrss) and the loader's counters. `--code REPO`
imports `pipeline` from another checkout (e.g. the code before a change) with the same data.

Scenarios:
  plain       24 small JPEGs only (the baseline: torch and the loader themselves)
  member1000  + one sample whose image member is 1000 MB
  ten150      + ten samples of 150 MB members (all of them sit in the shuffle buffer)
  twelve40    + twelve samples of 40 MB members (under the sample limit: the shuffle budget binds)
  png16       + a 9000x9000 16-bit RGB PNG (81 MP: under the pixel limit, 486 MB of pixels)
  png16max    + a 7000x7000 16-bit RGB PNG (294 MB of pixels: under both limits, decoded)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20
SCENARIOS = ("plain", "member1000", "ten150", "twelve40", "png16", "png16max")


def _header(name: str, size: int) -> bytes:
    sys.path.insert(0, ROOT)
    from pipeline.shards import ustar_header
    return ustar_header(name, size)


def _small_jpegs(n: int):
    from PIL import Image
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (96, 72), (i * 10 % 256, 80, 160)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _png16(side: int) -> bytes:
    """A 16-bit RGB PNG of side x side, compressed row by row (it stays small on disk)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 2, 0, 0, 0)
    z, row = zlib.compressobj(6), b"\0" + bytes(range(256)) * (side * 6 // 256) + bytes(side * 6 % 256)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _write(folder: str, samples) -> None:
    """samples: [(key, ext, size, bytes or None = zeros after a JPEG start)], each with a .cls."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "train-000000.tar")
    offset = 0
    with open(path + ".tmp", "wb") as f:
        for key, ext, size, data in samples:
            for name, payload, n in ((f"{key}.{ext}", data, size), (f"{key}.cls", b"0", 1)):
                f.write(_header(name, n))
                if payload is None:  # a huge member: a JPEG start, then zeros, written in pieces
                    f.write(b"\xff\xd8")
                    left = n - 2
                    while left:
                        f.write(bytes(min(left, 64 * MB)))
                        left -= min(left, 64 * MB)
                else:
                    f.write(payload)
                f.write(bytes(-n % 512))
                offset += 512 + n + (-n % 512)
        f.write(bytes(1024 + (-(offset + 1024) % 10240)))
    os.replace(path + ".tmp", path)
    info = {"name": "hostile", "classes": ["a"], "num_classes": 1,
            "splits": {"train": {"name": "train", "filenames": ["train-000000.tar"],
                                 "shard_lengths": [len(samples)], "num_samples": len(samples)}}}
    with open(os.path.join(folder, "_info.json"), "w") as f:
        json.dump(info, f)


def build(work: str, name: str) -> str:
    folder = os.path.join(work, name)
    if os.path.isfile(os.path.join(folder, "_info.json")):
        return folder
    small = [(f"s{i:03d}", "jpg", len(d), d) for i, d in enumerate(_small_jpegs(24))]
    hostile = {
        "plain": lambda: [],
        "member1000": lambda: [("big", "jpg", 1000 * MB, None)],
        "ten150": lambda: [(f"big{i}", "jpg", 150 * MB, None) for i in range(10)],
        "twelve40": lambda: [(f"mid{i}", "jpg", 40 * MB, None) for i in range(12)],
        "png16": lambda: [("png16", "png", 0, _png16(9000))],
        "png16max": lambda: [("png16", "png", 0, _png16(7000))],
    }[name]()
    hostile = [(k, e, len(d) if d is not None else n, d) for k, e, n, d in hostile]
    _write(folder, small[:12] + hostile + small[12:])
    return folder


CHILD = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
from pipeline.info import load_info
from pipeline.loader import create_loader
split = load_info(sys.argv[2]).split("train")
loader = create_loader(split, train=True, batch_size=8, img_size=32, num_workers=0)
loader.set_epoch(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(len(labels) for _, labels in loader)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_mb": before / 1024, "peak_mb": peak / 1024, "images": n, **loader.stats()}))
"""


def measure(code: str, folder: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, code, folder], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/hostile-memory", help="where the data sets are built (once)")
    p.add_argument("--code", default=ROOT, help="the checkout whose pipeline/ is measured (default: this one)")
    p.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    args = p.parse_args(argv)
    print(f"{'scenario':<12} {'peak RSS':>10} {'loader set up':>14} {'images':>7} {'skipped':>8}")
    for name in args.only:
        r = measure(os.path.abspath(args.code), build(args.work, name))
        if "error" in r:
            print(f"{name:<12} error: {r['error']}")
            continue
        print(f"{name:<12} {r['peak_mb']:>7.0f} MB {r['before_mb']:>11.0f} MB {r['images']:>7} {r['skipped']:>8}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
