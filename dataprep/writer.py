"""make_shards: ImageFolder -> equal-size, reproducible, resumable tar shards + _info.json.

Scan first (every file checked, in parallel), then plan (train shuffled with the seed, every
shard full but the last), then write each shard under a temporary name and rename it, and write
`_info.json` last: it marks the output complete. Skipped files are known before any shard is
planned, so they cannot unbalance the shards. The same input and settings give byte-identical
output for any number of workers; a killed run resumes where it stopped.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import time
from multiprocessing import Pool

from common.errors import ShardError
from common.host import usable_cores
from pipeline.shards import tar_end, tar_members, ustar_header

from .images import RESIZE, TRANSCODE, classify, reencode
from .listing import list_source
from .outdir import INFO, SKIPPED, STATE, lock, own_files, prepare, remove, tmp_path, write_atomic
from .report import bar, print_list

TOOL_VERSION = "1"
SCAN_CHUNK = 64  # files per scan task: large enough to amortise inter-process overhead
KEY_STEM_MAX = 80  # key = 8-digit index + "_" + stem: at most 89 bytes
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(index, rel):
    """Unique, dot-free key: the sample's index in its split and a sanitised, truncated file stem."""
    stem = os.path.splitext(os.path.basename(rel))[0]
    return f"{index:08d}_" + _KEY_UNSAFE.sub("_", stem)[:KEY_STEM_MAX]


def shard_name(name, split, i):
    return f"{name}-{split}-{i:06d}.tar"


# ---------------------------------------------------------------- writing one shard
def _open_source(src, rel):
    try:
        return open(os.path.join(src, rel), "rb")
    except OSError as e:
        raise ShardError(f"cannot read {rel} in {src}: {e.strerror}") from None


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def _copy_into(out, f, size):
    """Append size bytes of the open file f to the flushed file out; returns the count copied.

    copy_file_range copies in the kernel, saving a read and a write through Python buffers;
    where the system refuses it (other OS, some cross-filesystem copies) the bytes go through memory.
    """
    copied = 0
    try:
        while copied < size:
            n = os.copy_file_range(f.fileno(), out.fileno(), size - copied)
            if not n:
                break
            copied += n
    except (AttributeError, OSError) as e:
        if copied or getattr(e, "errno", errno.ENOSYS) not in _NO_KERNEL_COPY:
            raise
    if not copied:
        copied = out.write(f.read(size))
    return copied


def _write_shard(job):
    """Write one whole shard under a temporary name, then rename it: a shard file is always complete."""
    out, src, filename, classes, resize_max, start, samples = job
    path = os.path.join(out, filename)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            tail = b""  # padding of the previous image and its .json member
            for index, (rel, cls, flags) in enumerate(samples, start):
                key = sample_key(index, rel)
                with _open_source(src, rel) as source:
                    if flags:
                        try:
                            data = reencode(source.read(), resize_max)
                        except Exception as e:
                            raise ShardError(f"cannot convert {rel} (changed since the scan?): {e}") from None
                    size = len(data) if flags else os.fstat(source.fileno()).st_size
                    f.write(tail + tar_members(((key + ".cls", b"%d" % cls),)) + ustar_header(key + ".jpg", size))
                    if flags:
                        f.write(data)
                    else:
                        f.flush()
                        if _copy_into(f, source, size) != size:
                            raise ShardError(f"{rel} changed while make_shards ran; run it again")
                meta = json.dumps({"path": rel, "class": classes[cls]}).encode()
                tail = bytes(-size % 512) + tar_members(((key + ".json", meta),))
            f.write(tail + tar_end(f.tell() + len(tail)))
            size = f.tell()
        os.replace(tmp, path)
    except OSError as e:
        remove(tmp)
        raise ShardError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        remove(tmp)
        raise
    return filename, len(samples), size


# ---------------------------------------------------------------- the job
def _pool(workers):
    # Workers ignore Ctrl-C: the parent stops them and removes their temporaries, without a
    # traceback from every worker.
    return Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))


def _imap(pool, func, jobs, ordered=True):
    if pool is None:
        return map(func, jobs)
    return pool.imap(func, jobs) if ordered else pool.imap_unordered(func, jobs)


def _scan_chunk(job):
    src, resize_max, rels = job
    return [classify(os.path.join(src, rel), resize_max) for rel in rels]


def _scan(pool, listing, src, resize_max, progress):
    """Classify every listed file; returns {split: [(rel, cls, flags)]} and [(split, rel, reason)]."""
    good, skipped = {}, []
    for split, entry in listing["splits"].items():
        files = entry["files"]
        chunks = [(src, resize_max, [rel for rel, _ in files[i:i + SCAN_CHUNK]])
                  for i in range(0, len(files), SCAN_CHUNK)]
        good[split] = []
        with bar(progress, total=len(files), desc=f"scan {split}", unit="img") as b:
            for start, results in zip(range(0, len(files), SCAN_CHUNK), _imap(pool, _scan_chunk, chunks)):
                for (rel, cls), (flags, reason) in zip(files[start:start + SCAN_CHUNK], results):
                    if reason is None:
                        good[split].append((rel, cls, flags))
                    else:
                        skipped.append((split, rel, reason))
                b.update(len(results))
    return good, skipped


def _plan(good, name, seed, max_count):
    """[(shard file name, index of its first sample, samples)] per split: train shuffled with the
    seed, validation in sorted order; every shard full but the last."""
    plan = {}
    for split, samples in good.items():
        if split == "train":
            random.Random(seed).shuffle(samples)
        plan[split] = [(shard_name(name, split, j), i, samples[i:i + max_count])
                       for j, i in enumerate(range(0, len(samples), max_count))]
    return plan


def _counts(listing, good, skipped):
    counts = {}
    for split, entry in listing["splits"].items():
        flags = [f for _, _, f in good[split]]
        counts[split] = {"images": len(flags), "skipped": sum(s == split for s, _, _ in skipped),
                         "transcoded": sum(bool(f & TRANSCODE) for f in flags),
                         "resized": sum(bool(f & RESIZE) for f in flags), "ignored": entry["ignored"]}
    return counts


def _summary(out, info, seconds, up_to_date, reused=0):
    totals = {k: sum(c[k] for c in info["counts"].values())
              for k in ("images", "skipped", "transcoded", "resized", "ignored")}
    files = [f for s in info["splits"].values() for f in s["filenames"]]
    nbytes = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    return {"out": out, "name": info["name"], "up_to_date": up_to_date, **totals, "bytes": nbytes,
            "shards": len(files), "reused": reused, "seconds": round(seconds, 3), "counts": info["counts"]}


def make_shards(src, out=None, max_count=1250, workers=None, seed=0, resize_max=None,
                overwrite=False, name=None, progress=True):
    """Build (or resume, or confirm up to date) the shards of SRC in OUT; returns a summary dict."""
    start = time.monotonic()
    src = os.path.abspath(src)
    out = os.path.abspath(out or src.rstrip(os.sep) + "-wds")
    name = name or os.path.basename(src.rstrip(os.sep))
    workers = workers or usable_cores()
    if not re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*", name):
        raise ShardError(f"shard name {name!r} may only hold letters, digits and . _ + -; pass --name")
    if max_count < 1 or workers < 1 or (resize_max is not None and resize_max < 1):
        raise ShardError("--max-count, --workers and --resize-max must be positive")
    listing = list_source(src)
    settings = {"name": name, "seed": seed, "max_count": max_count, "resize_max": resize_max,
                "tool_version": TOOL_VERSION, "classes": listing["classes"]}
    settings["fingerprint"] = hashlib.sha256(
        (json.dumps(settings, sort_keys=True) + listing["digest"]).encode()).hexdigest()
    try:
        os.makedirs(out, exist_ok=True)
        fd = lock(out)
    except OSError as e:
        raise ShardError(f"cannot create output folder {out}: {e.strerror or e}") from None
    try:
        done = prepare(out, settings, overwrite)
        if done is not None:
            summary = _summary(out, done, time.monotonic() - start, up_to_date=True)
            print(f"make_shards: {out} is up to date ({summary['images']} images in {summary['shards']} shards)")
            return summary
        for split, entry in listing["splits"].items():
            if entry["empty"]:
                print_list(f"warning: {len(entry['empty'])} empty class folder(s) in {split}, "
                           "their class indices are kept:", entry["empty"])
            if entry["repeated"]:
                print_list(f"warning: {len(entry['repeated'])} linked folder(s) in {split} skipped (counted as "
                           "ignored): each leads to a folder already listed (a link loop or a second link)",
                           entry["repeated"])
        return _build(src, out, listing, settings, workers, progress, start)
    finally:
        os.close(fd)


def _build(src, out, listing, settings, workers, progress, start):
    """Scan, plan and write the shards, then _skipped.tsv and _info.json; returns the summary."""
    n_files = sum(len(entry["files"]) for entry in listing["splits"].values())
    workers = min(workers, -(-n_files // SCAN_CHUNK))  # no idle processes for small jobs
    pool = _pool(workers) if workers > 1 else None
    try:
        good, skipped = _scan(pool, listing, src, settings["resize_max"], progress)
        if not any(good.values()):
            raise ShardError(f"no usable images in {src} ({len(skipped)} skipped)")
        plan = _plan(good, settings["name"], settings["seed"], settings["max_count"])
        write_atomic(os.path.join(out, STATE), json.dumps(settings))  # shards in out now belong to these settings
        reused = _write_all(pool, src, out, listing["classes"], settings["resize_max"], plan, progress)
    except BaseException:
        if pool is not None:
            pool.terminate()  # workers killed mid-shard leave temporaries: remove them
            pool.join()
        for entry in own_files(out, [settings["name"]]):
            if entry.endswith(".tmp"):
                remove(os.path.join(out, entry))
        raise
    if pool is not None:
        pool.close()
        pool.join()
    _write_skipped(out, skipped)
    info = _info_json(src, listing, settings, plan, _counts(listing, good, skipped))
    write_atomic(os.path.join(out, INFO), json.dumps(info, indent=1) + "\n")  # last: marks the output complete
    remove(os.path.join(out, STATE))
    summary = _summary(out, info, time.monotonic() - start, up_to_date=False, reused=reused)
    print("make_shards: {images} images ({mb:.1f} MB) in {shards} shards ({reused} reused), {skipped} skipped, "
          "{transcoded} transcoded, {resized} resized, {ignored} ignored, {seconds:.1f} s -> {out}".format(
              mb=summary["bytes"] / 1e6, **summary))
    return summary


def _write_skipped(out, skipped):
    lines = ["split\tpath\treason"] + [f"{split}\t{rel}\t{reason}" for split, rel, reason in skipped]
    write_atomic(os.path.join(out, SKIPPED), "".join(line.replace("\n", "\\n") + "\n" for line in lines))
    if skipped:
        print_list(f"skipped {len(skipped)} unreadable image file(s), listed in {os.path.join(out, SKIPPED)}:",
                   [f"{rel}: {reason}" for _, rel, reason in skipped])


def _info_json(src, listing, settings, plan, counts):
    """timm's _info.json schema (name, splits) plus our own keys."""
    splits = {}
    for split, shards in plan.items():
        if shards:
            lengths = [len(samples) for _, _, samples in shards]
            splits[split] = {"name": split, "filenames": [f for f, _, _ in shards], "shard_lengths": lengths,
                             "num_samples": sum(lengths), "alt_label": None}
    return {"name": settings["name"], "splits": splits, "classes": listing["classes"],
            "num_classes": len(listing["classes"]), "seed": settings["seed"], "max_count": settings["max_count"],
            "resize_max": settings["resize_max"], "source": src, "tool": "make_shards",
            "tool_version": TOOL_VERSION, "counts": counts, "fingerprint": settings["fingerprint"]}


def _write_all(pool, src, out, classes, resize_max, plan, progress):
    """Write every planned shard that is not already there; returns how many were reused."""
    jobs, reused, total = [], 0, 0
    for shards in plan.values():
        for filename, start, samples in shards:
            total += len(samples)
            if os.path.exists(os.path.join(out, filename)):
                reused += 1  # renamed into place only when complete, with the same settings
            else:
                jobs.append((out, src, filename, classes, resize_max, start, samples))
    written = sum(len(job[-1]) for job in jobs)
    t0, nbytes = time.monotonic(), 0
    with bar(progress, total=total, initial=total - written, desc="write", unit="img") as b:
        for _, count, size in _imap(pool, _write_shard, jobs, ordered=False):
            nbytes += size
            b.set_postfix_str(f"{nbytes / 1e6 / max(time.monotonic() - t0, 1e-6):.0f} MB/s", refresh=False)
            b.update(count)
    return reused
