#!/usr/bin/env python3
"""Loader throughput from an S3-compatible store against local disk, first epoch and cached epoch.

    python tools/bench_cloud.py [--data_path DIR] [-j WORKERS] [-b BATCH] [--img-size PX]

One run, same shards, same workers, one training epoch of our loader (pipeline/) per row:
  disk           the shard folder on local disk
  s3 stream      s3:// from a local moto server (a separate process on 127.0.0.1), no cache
  s3 fill        s3:// with --cache-dir, cache empty: every shard is downloaded, then read
  s3 cached      the same again: every shard comes from the cache
Without --data_path it makes a small demo data set (dataprep.demo) in a temporary folder. A
local server measures what the object-store path and the cache cost on this machine's CPUs,
not a real network. The last stdout line is a JSON object: `rows`, `host`.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.runtime import describe_host, host_facts, resolve_workers  # noqa: E402
from pipeline.info import load_info  # noqa: E402
from pipeline.loader import create_loader  # noqa: E402
from pipeline.remote import RemoteOptions  # noqa: E402

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", default=None, help="shard folder (default: a generated demo set)")
    p.add_argument("-j", "--workers", type=int, default=None, help="loader workers (default: cores - 1)")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=128)
    args = p.parse_args(argv)
    args.workers = resolve_workers(args.workers, 1)
    with tempfile.TemporaryDirectory(prefix="bench-cloud-") as tmp:
        folder = args.data_path
        if folder is None:
            from dataprep import make_shards
            from dataprep.demo import make_demo_data
            make_demo_data(os.path.join(tmp, "demo"), num_classes=10, train_per_class=80, val_per_class=1,
                           seed=0, image_size=(500, 375))
            folder = os.path.join(tmp, "wds")
            make_shards(os.path.join(tmp, "demo"), folder, max_count=100, progress=False)
        proc, url = start_store(folder)
        try:
            plain = RemoteOptions()
            cached = RemoteOptions(cache_dir=os.path.join(tmp, "cache"), cache_limit=1 << 40)
            rows = {"disk": epoch(folder, plain, args), "s3 stream": epoch(url, plain, args),
                    "s3 fill": epoch(url, cached, args), "s3 cached": epoch(url, cached, args)}
        finally:
            proc.terminate()
            proc.wait()
    host = host_facts()
    print(f"{describe_host(host)}; {args.workers} workers, batch {args.batch_size}, {args.img_size} px")
    for name, row in rows.items():
        print(f"{name:10s} {row['img_per_s']:8.1f} img/s  {row['images']} images in {row['seconds']} s, "
              f"fetched {row['fetched_mb']} MB, cache hits {row['cache_hits']}, misses {row['cache_misses']}")
    print(json.dumps({"rows": rows, "host": host}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
