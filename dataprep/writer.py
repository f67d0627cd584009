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

from .images import JPEG_QUALITY, MAX_IMAGE_BYTES, RESIZE, TRANSCODE, classify, read_image, reencode
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
def locate(src, rel, loc):
    """Where a listed file's bytes are: a path, or (archive, offset, size) (see listing.py)."""
    return os.path.join(src, rel) if loc is None else loc


def _open_source(path, rel):
    try:
        return open(path, "rb")
    except OSError as e:
        raise ShardError(f"cannot read {rel} ({path}): {e.strerror}") from None


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def _copy_into(out, f, size, offset=None):
    """Append size bytes of the open file f (from offset, or from its position) to the flushed
    file out; returns the count copied.

    copy_file_range copies in the kernel, saving a read and a write through Python buffers;
    where the system refuses it (other OS, some cross-filesystem copies) the bytes go through memory.
    """
    copied = 0
    try:
        while copied < size:
            n = os.copy_file_range(f.fileno(), out.fileno(), size - copied,
                                   None if offset is None else offset + copied)
            if not n:
                break
            copied += n
    except (AttributeError, OSError) as e:
        if copied or getattr(e, "errno", errno.ENOSYS) not in _NO_KERNEL_COPY:
            raise
    if not copied:
        copied = out.write(f.read(size) if offset is None else os.pread(f.fileno(), size, offset))
    return copied


def _write_shard(job):
    """Write one whole shard under a temporary name, then rename it: a shard file is always complete."""
    out, src, filename, classes, (resize_max, quality, max_bytes), start, samples = job
    path = os.path.join(out, filename)
    tmp = tmp_path(path)
    archives = {}  # archive path -> open file, for the whole shard
    try:
        with open(tmp, "wb") as f:
            tail = b""  # padding of the previous image and its .json member
            for index, (rel, cls, flags, loc) in enumerate(samples, start):
                key = sample_key(index, rel)
                head = tail + tar_members(((key + ".cls", b"%d" % cls),))
                where = locate(src, rel, loc)
                if flags:
                    data, reason = read_image(where, max_bytes)
                    if reason:
                        raise ShardError(f"cannot read {rel} (changed since the scan?): {reason}")
                    try:
                        data = reencode(data, resize_max, quality)
                    except Exception as e:
                        raise ShardError(f"cannot convert {rel} (changed since the scan?): {e}") from None
                    size = len(data)
                    f.write(head + ustar_header(key + ".jpg", size))
                    f.write(data)
                elif isinstance(where, tuple):  # a member of an uncompressed archive
                    archive, offset, size = where
                    if archive not in archives:
                        archives[archive] = _open_source(archive, rel)
                    f.write(head + ustar_header(key + ".jpg", size))
                    f.flush()
                    if _copy_into(f, archives[archive], size, offset) != size:
                        raise ShardError(f"{archive} changed while make_shards ran; run it again")
                else:
                    with _open_source(where, rel) as source:
                        size = os.fstat(source.fileno()).st_size
                        f.write(head + ustar_header(key + ".jpg", size))
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
    finally:
        for archive in archives.values():
            archive.close()
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
    src, resize_max, max_bytes, files = job
    return [classify(locate(src, rel, loc), resize_max, max_bytes) for rel, loc in files]


def _scan(pool, listing, src, resize_max, max_bytes, progress):
    """Classify every listed file; returns {split: [(rel, cls, flags, loc)]} and [(split, rel, reason)]."""
    good, skipped = {}, []
    for split, entry in listing["splits"].items():
        files = entry["files"]
        chunks = [(src, resize_max, max_bytes, [(rel, loc) for rel, _, loc in files[i:i + SCAN_CHUNK]])
                  for i in range(0, len(files), SCAN_CHUNK)]
        good[split] = []
        with bar(progress, total=len(files), desc=f"scan {split}", unit="img") as b:
            for start, results in zip(range(0, len(files), SCAN_CHUNK), _imap(pool, _scan_chunk, chunks)):
                for (rel, cls, loc), (flags, reason) in zip(files[start:start + SCAN_CHUNK], results):
                    if reason is None:
                        good[split].append((rel, cls, flags, loc))
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
        flags = [f for _, _, f, _ in good[split]]
        counts[split] = {"images": len(flags), "skipped": sum(s == split for s, _, _ in skipped),
                         "transcoded": sum(bool(f & TRANSCODE) for f in flags),
                         "resized": sum(bool(f & RESIZE) for f in flags),
                         "ignored": len(entry["ignored"]) + len(entry["links"])}
    return counts


def _summary(out, info, seconds, up_to_date, reused=0):
    totals = {k: sum(c[k] for c in info["counts"].values())
              for k in ("images", "skipped", "transcoded", "resized", "ignored")}
    files = [f for s in info["splits"].values() for f in s["filenames"]]
    nbytes = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    return {"out": out, "name": info["name"], "up_to_date": up_to_date, **totals, "bytes": nbytes,
            "shards": len(files), "reused": reused, "seconds": round(seconds, 3), "counts": info["counts"]}


def make_shards(src, out=None, max_count=1250, workers=None, seed=0, resize_max=None,
                overwrite=False, name=None, progress=True, jpeg_quality=JPEG_QUALITY,
                train_tar=None, val_tar=None, val_dir=None, devkit=None, val_labels=None,
                max_image_bytes=MAX_IMAGE_BYTES):
    """Build (or resume, or confirm up to date) the shards of SRC in OUT; returns a summary dict.

    SRC is an ImageFolder or a folder holding ImageNet's archives; or None, with train_tar and/or
    val_tar (and out) given. devkit or val_labels label a flat validation set (listing.py).
    """
    start = time.monotonic()
    if src is None:
        if not (train_tar or val_tar or val_dir):
            raise ShardError("pass a source folder SRC, or --train-tar and/or --val-tar (or --val-dir)")
        if not out:
            raise ShardError("pass --out DIR: where the shards go (there is no SRC to put them beside)")
    else:
        src = os.path.abspath(src).rstrip(os.sep) or os.sep
    out = os.path.abspath(out or src + "-wds")
    workers = workers or usable_cores()
    if name is not None and not re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*", name):
        raise ShardError(f"shard name {name!r} may only hold letters, digits and . _ + -; pass --name")
    if max_count < 1 or workers < 1 or (resize_max is not None and resize_max < 1):
        raise ShardError("--max-count, --workers and --resize-max must be positive")
    if not 1 <= jpeg_quality <= 100:
        raise ShardError(f"--jpeg-quality must be in 1..100 (got {jpeg_quality})")
    if max_image_bytes is not None and max_image_bytes < 1:
        raise ShardError(f"--max-image-bytes must be positive (got {max_image_bytes})")
    listing = list_source(src, train_tar, val_tar, val_dir, devkit, val_labels)
    if name is None:  # an ImageFolder's own name; "imagenet" for the archives (SRC is then a download folder)
        name = os.path.basename(src) if listing["source"] == src else "imagenet"
        if not re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*", name):
            raise ShardError(f"shard name {name!r} (SRC's folder name) may only hold letters, digits and "
                             ". _ + -; pass --name")
    settings = {"name": name, "seed": seed, "max_count": max_count, "resize_max": resize_max,
                "tool_version": TOOL_VERSION, "classes": listing["classes"]}
    if jpeg_quality != JPEG_QUALITY:  # only then: outputs made before the option keep their fingerprint
        settings["jpeg_quality"] = jpeg_quality
    if max_image_bytes != MAX_IMAGE_BYTES:
        settings["max_image_bytes"] = max_image_bytes
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
        _warn(listing)
        return _build(src, out, listing, settings, workers, progress, start)
    finally:
        os.close(fd)


def _warn(listing):
    """Name what the listing left out: ignored files, refused links, val classes without images."""
    for split, entry in listing["splits"].items():
        if entry["links"]:
            print_list(f"warning: {len(entry['links'])} link(s) in {split} not followed (counted as ignored): "
                       "a link into another class folder would copy its images under the wrong class",
                       entry["links"])
        if entry["ignored"]:
            print_list(f"{len(entry['ignored'])} file(s) in {split} ignored: hidden, not an image file "
                       "name, outside a class folder, or without a label", entry["ignored"])
        if entry["empty"]:
            print_list(f"warning: {len(entry['empty'])} {split} class folder(s) hold no image "
                       "(those classes are not validated):", entry["empty"])


def _check_every_class_trained(listing, good, skipped):
    """Refuse a train split in which some class has no usable image: the model would get an
    output that is never trained (torchvision's and timm's ImageFolder refuse an empty class too)."""
    if "train" not in good:
        return
    seen = {cls for _, cls, _, _ in good["train"]}
    missing = [c for i, c in enumerate(listing["classes"]) if i not in seen]
    if missing:
        raise ShardError(f"{len(missing)} train class(es) have no usable image, e.g. {missing[0]} "
                         f"({sum(s == 'train' for s, _, _ in skipped)} train files skipped as unreadable): "
                         "the model would get an output that is never trained; fix or remove them")


def _build(src, out, listing, settings, workers, progress, start):
    """Scan, plan and write the shards, then _skipped.tsv and _info.json; returns the summary."""
    n_files = sum(len(entry["files"]) for entry in listing["splits"].values())
    workers = min(workers, -(-n_files // SCAN_CHUNK))  # no idle processes for small jobs
    pool = _pool(workers) if workers > 1 else None
    try:
        max_bytes = settings.get("max_image_bytes", MAX_IMAGE_BYTES)
        good, skipped = _scan(pool, listing, src, settings["resize_max"], max_bytes, progress)
        if not any(good.values()):
            raise ShardError(f"no usable images in {listing['source']} ({len(skipped)} skipped)")
        _check_every_class_trained(listing, good, skipped)
        plan = _plan(good, settings["name"], settings["seed"], settings["max_count"])
        write_atomic(os.path.join(out, STATE), json.dumps(settings))  # shards in out now belong to these settings
        encoding = (settings["resize_max"], settings.get("jpeg_quality", JPEG_QUALITY), max_bytes)
        reused = _write_all(pool, src, out, listing["classes"], encoding, plan, progress)
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
    info = _info_json(listing, settings, plan, _counts(listing, good, skipped))
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


def _info_json(listing, settings, plan, counts):
    """timm's _info.json schema (name, splits) plus our own keys."""
    splits = {}
    for split, shards in plan.items():
        if shards:
            lengths = [len(samples) for _, _, samples in shards]
            splits[split] = {"name": split, "filenames": [f for f, _, _ in shards], "shard_lengths": lengths,
                             "num_samples": sum(lengths), "alt_label": None}
    info = {"name": settings["name"], "splits": splits, "classes": listing["classes"],
            "num_classes": len(listing["classes"]), "seed": settings["seed"], "max_count": settings["max_count"],
            "resize_max": settings["resize_max"], "jpeg_quality": settings.get("jpeg_quality", JPEG_QUALITY),
            "max_image_bytes": settings.get("max_image_bytes", MAX_IMAGE_BYTES),
            "source": listing["source"], "tool": "make_shards",
            "tool_version": TOOL_VERSION, "counts": counts, "fingerprint": settings["fingerprint"]}
    if listing["descriptions"]:  # the devkit's label words, in class order (classes stay wnids)
        info["class_descriptions"] = [listing["descriptions"].get(c, "") for c in listing["classes"]]
    return info


def _write_all(pool, src, out, classes, encoding, plan, progress):
    """Write every planned shard that is not already there; returns how many were reused."""
    jobs, reused, total = [], 0, 0
    for shards in plan.values():
        for filename, start, samples in shards:
            total += len(samples)
            if os.path.exists(os.path.join(out, filename)):
                reused += 1  # renamed into place only when complete, with the same settings
            else:
                jobs.append((out, src, filename, classes, encoding, start, samples))
    written = sum(len(job[-1]) for job in jobs)
    t0, nbytes = time.monotonic(), 0
    with bar(progress, total=total, initial=total - written, desc="write", unit="img") as b:
        for _, count, size in _imap(pool, _write_shard, jobs, ordered=False):
            nbytes += size
            b.set_postfix_str(f"{nbytes / 1e6 / max(time.monotonic() - t0, 1e-6):.0f} MB/s", refresh=False)
            b.update(count)
    return reused
