#!/usr/bin/env python3
"""Loader throughput from an S3-compatible store against local disk, first epoch and cached epoch.

    python tools/bench_cloud.py [--data_path DIR] [-j WORKERS] [-b BATCH] [--img-size PX] [--rounds R]

One run, same shards, same workers, one training epoch of our loader (pipeline/) per row, and
the same shards read without decoding (tar parsing only, in this process: what the source
itself delivers):
  disk           the shard folder on local disk
  s3 stream      s3:// from a local moto server (a separate process on 127.0.0.1), no cache
  s3 fill        s3:// with --cache-dir, cache empty: every shard is downloaded, then read
  s3 cached      the same again: every shard comes from the cache
The four rows run in turn `--rounds` times (a fresh cache each round) and each row reports its
median img/s: a shared machine's speed drifts. Without --data_path it makes a small demo data
set (dataprep.demo) in a temporary folder. A local server measures what the object-store path
and the cache cost on this machine's CPUs, not a real network. The last stdout line is a JSON
object: `rows`, `host`.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: the repository's packages are importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.runtime import resolve_workers  # noqa: E402
from pipeline.info import load_info  # noqa: E402
from pipeline.loader import create_loader  # noqa: E402
from pipeline.remote import RemoteOptions  # noqa: E402
from pipeline.shards import iter_samples, open_shard  # noqa: E402
from tools import benchlib  # noqa: E402

# not in `make bench`'s defaults: it starts a moto server (requirements-cloud.txt, moto[server])
benchlib.register(benchlib.Spec("cloud", __file__, "loader from a local S3 server vs disk, first and cached epoch"))

BUCKET, PREFIX = "bench-shards", "wds"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_store(folder: str):
    """A moto S3 server in its own process holding the folder's files; returns (process, url)."""
    import boto3
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL_S3=endpoint)
    client = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(100):
        try:
            client.create_bucket(Bucket=BUCKET)
            break
        except Exception:
            time.sleep(0.1)
    for name in os.listdir(folder):
        client.upload_file(os.path.join(folder, name), BUCKET, f"{PREFIX}/{name}")
    return proc, f"s3://{BUCKET}/{PREFIX}/"


def epoch(root: str, remote: RemoteOptions, args) -> dict:
    split = load_info(root, remote).split("train")
    loader = create_loader(split, train=True, batch_size=args.batch_size, img_size=args.img_size,
                           num_workers=args.workers, remote=remote, persistent=False)
    loader.set_epoch(0)
    t0, n = time.perf_counter(), 0
    for _, labels in loader:
        n += len(labels)
    seconds = time.perf_counter() - t0
    stats = loader.stats()
    return {"images": n, "seconds": round(seconds, 2), "img_per_s": round(n / seconds, 1),
            "fetched_mb": round(stats["fetched_bytes"] / 2 ** 20, 1), "cache_hits": stats["cache_hits"],
            "cache_misses": stats["cache_misses"]}


def read_only(root: str, remote: RemoteOptions) -> dict:
    """Every train shard opened and parsed into samples, nothing decoded."""
    split = load_info(root, remote).split("train")
    t0, n, nbytes = time.perf_counter(), 0, 0
    for url in split.urls:
        with open_shard(url, remote) as f:
            for sample in iter_samples(f):
                n += 1
                nbytes += sum(len(v) for k, v in sample.items() if k != "__key__")
    seconds = time.perf_counter() - t0
    return {"samples_per_s": round(n / seconds, 1), "mb_per_s": round(nbytes / seconds / 2 ** 20, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", default=None, help="shard folder (default: a generated demo set)")
    p.add_argument("-j", "--workers", type=int, default=None, help="loader workers (default: cores - 1)")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images-per-class", type=int, default=30, help="generated data set: train images per class")
    args = p.parse_args(argv)
    args.workers = resolve_workers(args.workers, 1)
    with tempfile.TemporaryDirectory(prefix="bench-cloud-") as tmp:
        folder = args.data_path
        if folder is None:
            demo = benchlib.demo_images(os.path.join(tmp, "demo"), args.images_per_class, val_per_class=1)
            folder = benchlib.demo_shards(demo, os.path.join(tmp, "wds"), max_count=100)
        proc, url = start_store(folder)
        try:
            plain, runs = RemoteOptions(), {}
            for r in range(args.rounds):
                cached = RemoteOptions(cache_dir=os.path.join(tmp, f"cache{r}"), cache_limit=1 << 40)
                for name, root, remote in (("disk", folder, plain), ("s3 stream", url, plain),
                                           ("s3 fill", url, cached), ("s3 cached", url, cached)):
                    runs.setdefault(name, []).append(epoch(root, remote, args))
                raw = RemoteOptions(cache_dir=os.path.join(tmp, f"raw{r}"), cache_limit=1 << 40)
                for name, root, remote in (("disk", folder, plain), ("s3 stream", url, plain),
                                           ("s3 fill", url, raw), ("s3 cached", url, raw)):
                    runs.setdefault(name, [])[-1].update(read_only(root, remote))
            rows = {name: dict(rs[-1], img_per_s=statistics.median(x["img_per_s"] for x in rs),
                               rounds=[x["img_per_s"] for x in rs],
                               read_mb_per_s=statistics.median(x["mb_per_s"] for x in rs))
                    for name, rs in runs.items()}
        finally:
            proc.terminate()
            proc.wait()
    host = benchlib.host()
    print(f"{benchlib.describe(host)}; {args.workers} workers, batch {args.batch_size}, {args.img_size} px")
    for name, row in rows.items():
        print(f"{name:10s} {row['img_per_s']:8.1f} img/s (rounds: {row['rounds']}), read only "
              f"{row['read_mb_per_s']:.1f} MB/s; {row['images']} images, "
              f"fetched {row['fetched_mb']} MB, cache hits {row['cache_hits']}, misses {row['cache_misses']}")
    disk = rows["disk"]["img_per_s"]
    report = [benchlib.row("cloud", f"{name} / disk img/s", round(row["img_per_s"] / disk, 3),
                           ", ".join(f"{x:.1f}" for x in row["rounds"]), f"{row['img_per_s']:.1f} vs {disk:.1f} img/s",
                           f"{args.workers} workers, batch {args.batch_size}, {args.img_size} px")
              for name, row in rows.items() if name != "disk"] if disk else \
        [benchlib.skipped_row("cloud", "s3 / disk img/s", "no full batch was read: more images or a smaller -b")]
    benchlib.emit({"rows": rows, "host": host, "report": report})
    return 0


if __name__ == "__main__":
    sys.exit(main())
