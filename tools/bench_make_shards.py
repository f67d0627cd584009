"""Benchmark tools/make_shards.py against `tar -cf` on the same demo folder, in one run.

    python tools/bench_make_shards.py                     # N=2000 and 2N=4000 images of ~500x375
    python tools/bench_make_shards.py --images 1000 --repeats 5 --workdir /tmp/bench --keep

Prints, for N and 2N images (files warm in the page cache): the median wall time of make_shards
(a fresh output each time, default workers, --quiet: silent like tar) and of `tar -cf` over the
same folder, their ratio,
and the peak RSS of the make_shards parent and of its largest worker; then the per-image cost of
the ways to check an image and to write tar members. Each size names the settings of both sides
(images and bytes in, page cache warm, processes: tar's one, make_shards' default workers as its
child resolved them); a ratio is printed only when the images and bytes match (e.g. not when
make_shards skipped a file), else one line says why. The last line is one JSON object.
"""
import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from PIL import Image

if __package__ in (None, ""):  # run as a script: the repository's packages are importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.compare import mismatch  # noqa: E402
from common.host import usable_cores  # noqa: E402
from pipeline.jpeg import jpeg_frame  # noqa: E402
from pipeline.shards import tar_members  # noqa: E402
from tools import benchlib  # noqa: E402

benchlib.register(benchlib.Spec("make_shards", __file__, "make_shards against `tar -cf` on the same photos",
                                argv=lambda ctx: ["--workdir", ctx.workdir, "--keep"], order=10))

CLASSES = 20
SIDE_KEYS = ("images", "skipped", "transcoded", "cache")  # what tar and make_shards must share for a ratio
# Runs make_shards' main in a child and reports its peak RSS and that of its largest worker. The parent
# reads VmHWM: its ru_maxrss would include the benchmark process it was forked from (Linux keeps
# the larger of the pre- and post-exec peaks).
# It also reports what make_shards wrote (from its _info.json) and the workers its default resolves to.
RUN_WITH_RSS = """
import json, os, resource, sys
sys.path.insert(0, sys.argv[1])
from common.host import usable_cores
from dataprep.cli import make_shards_main
rc = make_shards_main(sys.argv[2:])
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
info = json.load(open(os.path.join(sys.argv[sys.argv.index("--out") + 1], "_info.json")))
total = {k: sum(c[k] for c in info["counts"].values()) for k in ("images", "skipped", "transcoded")}
print(json.dumps({"rc": rc, "parent_kb": int(hwm.split()[1]),
                  "worker_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                  "workers": usable_cores(), **total}))
"""


def make_data(workdir, n):
    """The 2N-image `make bench` photos (benchlib.bench_images) and an N-image folder made of hard
    links to half of them."""
    big = benchlib.bench_images(workdir, 2 * n, CLASSES)
    small = os.path.join(workdir, f"half-of-{2 * n}")
    shutil.rmtree(small, ignore_errors=True)  # links are cheap: always in step with the big folder
    for d, _, files in os.walk(big):
        target = d.replace(big, small, 1)
        os.makedirs(target, exist_ok=True)
        for f in sorted(files)[: (len(files) + 1) // 2]:
            os.link(os.path.join(d, f), os.path.join(target, f))
    return {"n": small, "2n": big}


def folder_stats(root):
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs]
    for d, _, fs in os.walk(root):  # warm the page cache
        for f in fs:
            with open(os.path.join(d, f), "rb") as fh:
                fh.read()
    return len(sizes), sum(sizes)


def time_tar(root, workdir):
    target = os.path.join(workdir, "folder.tar")
    os.sync()  # no writeback of the previous run's output during this one
    t = time.perf_counter()
    subprocess.run(["tar", "-cf", target, "-C", os.path.dirname(root), os.path.basename(root)], check=True)
    seconds = time.perf_counter() - t
    os.remove(target)
    return seconds


def time_make_shards(root, workdir):
    out = os.path.join(workdir, "shards")
    shutil.rmtree(out, ignore_errors=True)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.sync()
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", RUN_WITH_RSS, repo, root, "--out", out, "--quiet"],
                       check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    rss = json.loads(r.stdout.strip().splitlines()[-1])
    assert rss["rc"] == 0, r.stderr
    shutil.rmtree(out)
    return seconds, rss


def per_image_us(func, items, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for item in items:
            func(item)
        best = min(best, time.perf_counter() - t)
    return round(best / len(items) * 1e6, 1)


def check_costs(root, count=300):
    """Per-image cost of each way to check an image (bytes already in memory)."""
    paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)[:count]
    datas = [open(p, "rb").read() for p in paths]

    def read(p):
        with open(p, "rb") as f:
            f.read()

    def header(d):
        return Image.open(io.BytesIO(d)).size

    def draft(d):
        with Image.open(io.BytesIO(d)) as im:
            im.draft(im.mode, (im.width // 8, im.height // 8))
            im.load()

    def full(d):
        Image.open(io.BytesIO(d)).load()

    return {"read_file": per_image_us(read, paths), "jpeg_frame_walk": per_image_us(jpeg_frame, datas),
            "pil_open_headers": per_image_us(header, datas), "pil_draft_1_8_load": per_image_us(draft, datas),
            "pil_full_decode": per_image_us(full, datas)}


def writer_costs(root, count=300):
    """Per-image cost of writing one sample (3 members) into memory: tarfile vs make_shards' writer."""
    datas = [open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(root) for f in fs][:count]
    members = [((f"{i:08d}_x.cls", b"7"), (f"{i:08d}_x.jpg", d), (f"{i:08d}_x.json", b'{"path": "x"}'))
               for i, d in enumerate(datas)]

    def with_tarfile(sample, tar=tarfile.open(fileobj=io.BytesIO(), mode="w", format=tarfile.USTAR_FORMAT)):
        tar.fileobj.seek(0)
        for name, data in sample:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o644, "", ""
            tar.addfile(ti, io.BytesIO(data))

    buf = io.BytesIO()

    def by_hand(sample):
        buf.seek(0)
        buf.write(tar_members(sample))

    return {"tarfile_addfile": per_image_us(with_tarfile, members), "tar_members": per_image_us(by_hand, members)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="N (default: 2000); 2N is measured too")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per tool and size (default: 5)")
    p.add_argument("--workdir", help="where data and outputs go (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the workdir (generated data is reused)")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_make_shards-")
    os.makedirs(workdir, exist_ok=True)
    try:
        t = time.perf_counter()
        data = make_data(workdir, args.images)
        print(f"data ready in {time.perf_counter() - t:.1f} s under {workdir}")
        host = benchlib.host()
        print(f"host: {benchlib.describe(host)}", flush=True)
        result = {"workers": usable_cores(), "repeats": args.repeats, "sizes": {}, "host": host, "refused": {}}
        for label, root in data.items():
            count, nbytes = folder_stats(root)
            rss = []

            def shards(root=root, rss=rss):
                seconds, r = time_make_shards(root, workdir)
                rss.append(r)
                return seconds
            timings = benchlib.alternate({"tar": lambda root=root: time_tar(root, workdir), "make_shards": shards},
                                         args.repeats, echo=None)  # alternate, so drift hits both alike
            tar_s, shard_s = timings["tar"], timings["make_shards"]
            row = {"images": count, "mb": round(nbytes / 1e6, 1), "tar_s": round(statistics.median(tar_s), 3),
                   "make_shards_s": round(statistics.median(shard_s), 3),
                   "parent_rss_mb": round(max(r["parent_kb"] for r in rss) / 1024, 1),
                   "worker_rss_mb": round(max(r["worker_kb"] for r in rss) / 1024, 1)}
            last = rss[-1]
            row["sides"] = {
                "tar": {"tool": "tar -cf", "processes": 1, "images": count, "skipped": 0, "transcoded": 0,
                        "cache": "warm"},
                "make_shards": {"tool": "make_shards --quiet", "processes": last["workers"], "images": last["images"],
                                "skipped": last["skipped"], "transcoded": last["transcoded"], "cache": "warm"}}
            why = mismatch(row["sides"], SIDE_KEYS)
            row["ratio"] = None if why else round(row["make_shards_s"] / row["tar_s"], 2)
            result["sizes"][label] = row
            print(f"{label:>2}: {count} images, {row['mb']} MB: tar -cf {row['tar_s']:.3f} s, make_shards "
                  f"{row['make_shards_s']:.3f} s ({last['workers']} workers), "
                  + (f"no ratio: {why}" if why else f"ratio {row['ratio']:.2f}")
                  + f"; peak RSS parent {row['parent_rss_mb']} MB, largest worker {row['worker_rss_mb']} MB")
            if why:
                result["refused"][label] = why
        n, n2 = result["sizes"]["n"], result["sizes"]["2n"]
        # Cost of the extra N images alone, without the fixed start-up cost of either tool.
        extra_tar = n2["tar_s"] - n["tar_s"]
        if n["ratio"] is not None and n2["ratio"] is not None and extra_tar > 0:  # tiny runs: tar's times may tie
            result["marginal_ratio"] = round((n2["make_shards_s"] - n["make_shards_s"]) / extra_tar, 2)
            print(f"marginal ratio (2N minus N): {result['marginal_ratio']:.2f}")
        result["check_us_per_image"] = check_costs(data["n"])
        result["write_us_per_image"] = writer_costs(data["n"])
        print("check cost per image (us):", result["check_us_per_image"])
        print("write cost per image into memory (us):", result["write_us_per_image"])
        result["report"] = report_rows(result)
        benchlib.emit(result)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report_rows(result: dict) -> list[dict]:
    out = []
    for label, row in result["sizes"].items():
        ours = row["sides"]["make_shards"]
        measure = f"{label.upper()} = {row['images']:,} images: make_shards / `tar -cf` time"
        out.append(benchlib.row("make_shards", measure, row["ratio"], result["repeats"],
                                f"{row['make_shards_s']} s vs {row['tar_s']} s",
                                f"{ours['processes']} workers vs 1 process, {row['mb']} MB, warm cache", fmt=".2f",
                                refused=result["refused"].get(label)))
    if "marginal_ratio" in result:
        out.append(benchlib.row("make_shards", "2N - N: marginal time ratio", result["marginal_ratio"],
                                result["repeats"], "", "cost of the extra N images alone", fmt=".2f"))
    return out


if __name__ == "__main__":
    sys.exit(main())
