"""Turn an ImageFolder (SRC/train/<class>/*, SRC/val/<class>/*) into webdataset tar shards.

    python tools/make_shards.py /data/imagenet                  # -> /data/imagenet-wds
    python tools/make_shards.py /data/imagenet --out /fast/in1k --workers 16
    python tools/make_shards.py --verify /data/imagenet-wds     # check an existing output

Output: <name>-train-000000.tar ..., <name>-validation-000000.tar ... and _info.json (timm's
schema), plus _skipped.tsv. Each sample is KEY.cls, KEY.jpg, KEY.json. Train samples are shuffled
with --seed; every shard of a split holds --max-count samples except the last. The same input and
settings give byte-identical output for any --workers. A killed run resumes where it stopped.
See docs/make_shards.md.
"""
import argparse
import errno
import fcntl
import hashlib
import io
import json
import os
import random
import re
import signal
import sys
import tarfile
import time
from multiprocessing import Pool

from PIL import Image, UnidentifiedImageError

TOOL_VERSION = "1"
SPLITS = (("train", "train"), ("val", "validation"))  # (source folder, split name)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
INFO, SKIPPED, STATE = "_info.json", "_skipped.tsv", ".make_shards.json"
TRANSCODE, RESIZE = 1, 2  # per-sample flags decided by the scan
JPEG_QUALITY = 95
SCAN_CHUNK = 64  # files per scan task: large enough to amortise inter-process overhead
KEY_STEM_MAX = 80  # key = 8-digit index + "_" + stem: at most 89 bytes
LIST_LIMIT = 10  # lines shown on screen for skipped files and warnings


class ShardError(Exception):
    """Bad input or environment; the message is one line meant for the user."""


# ---------------------------------------------------------------- tar writing
# Headers are built by hand: tarfile's addfile costs 4x as much per sample (BENCHMARKS.md).
# The bytes equal tarfile's USTAR output for the same members (tests/test_make_shards.py).
_USTAR_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(64 + 183)  # type, link, magic, names, dev, prefix
_USTAR_TAIL_SUM = sum(_USTAR_TAIL) + 8 * 32  # the checksum field itself counts as 8 spaces
_USTAR_MODE_IDS = b"0000644\0" b"0000000\0" b"0000000\0"  # mode 644, uid 0, gid 0
_USTAR_MTIME = b"00000000000\0"
_END_OF_ARCHIVE = bytes(1024)
_RECORD = 10240  # tar pads archives to whole records, as tarfile and GNU tar do


def _ustar_header(name, size):
    head = name.encode("ascii").ljust(100, b"\0") + _USTAR_MODE_IDS + b"%011o\0" % size + _USTAR_MTIME
    return head + b"%06o\0 " % (sum(head) + _USTAR_TAIL_SUM) + _USTAR_TAIL


def tar_members(members):
    """Bytes of tar members [(name, data), ...] (no end-of-archive marker)."""
    parts = []
    for name, data in members:
        parts += (_ustar_header(name, len(data)), data, bytes(-len(data) % 512))
    return b"".join(parts)


def tar_end(offset):
    """End-of-archive blocks for an archive whose members end at offset."""
    return _END_OF_ARCHIVE + bytes(-(offset + len(_END_OF_ARCHIVE)) % _RECORD)


# ---------------------------------------------------------------- listing
def _hidden(name):
    return name.startswith(".")


def _list_split(src, folder):
    """Class folder names, [(relpath, size)] per class (sorted) and the ignored count of one split."""
    split_dir = os.path.join(src, folder)
    classes, ignored = {}, 0
    for entry in os.scandir(split_dir):
        if _hidden(entry.name) or not entry.is_dir():
            ignored += 1
            continue
        files = []
        for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
            ignored += sum(map(_hidden, dirnames))
            dirnames[:] = [d for d in dirnames if not _hidden(d)]
            for f in filenames:
                if _hidden(f) or not f.lower().endswith(IMG_EXTENSIONS):
                    ignored += 1
                    continue
                path = os.path.join(dirpath, f)
                try:
                    size = os.stat(path).st_size
                except OSError:
                    size = -1  # a broken link: the scan skips it with the reason
                files.append((folder + path[len(split_dir):], size))  # os.path.relpath costs 10x more
        classes[entry.name] = sorted(files)
    return classes, ignored


def list_source(src):
    """What SRC holds: class names and, per split, its files, ignored count and empty classes.

    Also returns a digest of every listed path and size, part of the settings fingerprint.
    """
    if not os.path.isdir(src):
        raise ShardError(f"source folder {src} does not exist" if not os.path.exists(src)
                         else f"source {src} is not a folder")
    found = [(folder, split) for folder, split in SPLITS if os.path.isdir(os.path.join(src, folder))]
    if not found:
        raise ShardError(f"{src} has neither a train/ nor a val/ folder")
    listed = {split: _list_split(src, folder) for folder, split in found}
    classes = sorted(listed["train"][0] if "train" in listed else listed["validation"][0])
    if "train" in listed and "validation" in listed:
        extra = sorted(set(listed["validation"][0]) - set(classes))
        if extra:
            raise ShardError(f"val class {extra[0]!r} has no train/ folder ({len(extra)} such), "
                             "so class indices would not match")
    index = {name: i for i, name in enumerate(classes)}
    digest = hashlib.sha256()
    splits = {}
    for split, (by_class, ignored) in listed.items():
        files, empty = [], []
        for name in sorted(by_class):
            if not by_class[name]:
                empty.append(f"{split}/{name}")
            for rel, size in by_class[name]:
                files.append((rel, index[name]))
                digest.update(f"{rel}\t{size}\n".encode("utf-8", "surrogateescape"))
        digest.update(f"{split} ignored {ignored}\n".encode())
        splits[split] = {"files": files, "ignored": ignored, "empty": empty}
    if not any(s["files"] for s in splits.values()):
        raise ShardError(f"no image files found in {src} ({', '.join(f for f, _ in found)})")
    return {"classes": classes, "splits": splits, "digest": digest.hexdigest()}


# ---------------------------------------------------------------- checking images
_U16 = int.from_bytes
# After an SOS segment the entropy-coded data runs to the next marker: 0xFF followed by a byte
# other than 0x00 (byte stuffing) or 0xD0-0xD7 (restart markers).
_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_SOF_PLAIN = (0xC0, 0xC1, 0xC2)  # baseline, extended sequential, progressive (Huffman)


def jpeg_frame(data):
    """(width, height) if data is a complete, plainly built 8-bit baseline or progressive JPEG
    with 1 (gray) or 3 (colour) components, else None.

    Walks the marker segments and searches every scan's entropy-coded data for the marker that
    ends it, up to EOI: a file cut anywhere, or garbage, fails. 18-30x cheaper than even a 1/8-scale
    decode (BENCHMARKS.md); it does not check the Huffman-coded bits themselves.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, n, frame = 2, len(data), None
    while pos + 1 < n:
        marker = data[pos + 1]
        if data[pos] != 0xFF:
            return None
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            return frame
        if marker < 0xC0 or 0xD0 <= marker <= 0xD8 or pos + 4 > n:
            return None
        end = pos + 2 + _U16(data[pos + 2:pos + 4], "big")
        if end > n or end < pos + 4:
            return None
        if marker in _SOF:
            if marker not in _SOF_PLAIN or frame or end - pos < 12:
                return None
            precision, height, width, components = (data[pos + 4], _U16(data[pos + 5:pos + 7], "big"),
                                                    _U16(data[pos + 7:pos + 9], "big"), data[pos + 9])
            if precision != 8 or components not in (1, 3) or not height or not width:
                return None
            frame = (width, height)
        elif marker == 0xDA:  # SOS
            found = _ENTROPY_END.search(data, end) if frame else None
            if not found:
                return None
            end = found.start()
        pos = end
    return None


def classify(path, resize_max=None):
    """(flags, None) for a usable image, (None, reason) for one to skip.

    A plain JPEG keeps its bytes (flags 0); anything else that decodes is TRANSCODEd to RGB JPEG;
    RESIZE is added when the longer side exceeds resize_max.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"unreadable: {e.strerror}"
    if not data:
        return None, "empty file"
    frame = jpeg_frame(data)
    flags = 0
    if frame is None:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                frame = im.size
        except UnidentifiedImageError:
            return None, "not an image (unknown format)"
        except Exception as e:  # PIL raises many types for broken files; any of them means skip
            return None, f"cannot decode: {e}"
        flags = TRANSCODE
    if resize_max and max(frame) > resize_max:
        flags |= RESIZE
    return flags, None


def _scan_chunk(job):
    src, resize_max, rels = job
    return [classify(os.path.join(src, rel), resize_max) for rel in rels]


# ---------------------------------------------------------------- writing shards
def _tmp(path):
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp")


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def reencode(data, resize_max=None):
    """RGB JPEG (quality 95) of an image, its longer side shrunk to resize_max if larger."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "JPEG":  # palette and 16-bit images resample badly in their own mode
            im = im.convert("RGB")
        if resize_max and max(im.size) > resize_max:
            im.thumbnail((resize_max, resize_max))  # keeps the aspect ratio; JPEGs decode at reduced scale
        out = io.BytesIO()
        im.convert("RGB").save(out, "JPEG", quality=JPEG_QUALITY)
        return out.getvalue()


def _open_source(src, rel):
    try:
        return open(os.path.join(src, rel), "rb")
    except OSError as e:
        raise ShardError(f"cannot read {rel} in {src}: {e.strerror}") from None


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def _copy_into(out, f, size):
    """Append size bytes of the open file f to the flushed file out; returns the count copied.

    copy_file_range copies in the kernel, saving a read and a write through Python buffers (15 us
    of CPU per 80 KB image, BENCHMARKS.md); where the system refuses it (other OS, some
    cross-filesystem copies) the bytes go through memory.
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
    tmp = _tmp(path)
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
                    f.write(tail + tar_members(((key + ".cls", b"%d" % cls),)) + _ustar_header(key + ".jpg", size))
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
        _remove(tmp)
        raise ShardError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        _remove(tmp)
        raise
    return filename, len(samples), size


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(index, rel):
    """Unique, dot-free key: the sample's index in its split and a sanitised, truncated file stem."""
    stem = os.path.splitext(os.path.basename(rel))[0]
    return f"{index:08d}_" + _KEY_UNSAFE.sub("_", stem)[:KEY_STEM_MAX]


def shard_name(name, split, i):
    return f"{name}-{split}-{i:06d}.tar"


# ---------------------------------------------------------------- output folder state
def _write_atomic(path, text):
    tmp = _tmp(path)
    try:
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise ShardError(f"cannot write {path}: {e.strerror or e}") from None


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as made with unknown settings


def _own_files(out, names):
    """Files in out that this tool makes (for any of the shard names), temporaries included."""
    shard = re.compile(r"(?:%s)-(?:train|validation)-\d{6}\.tar" % "|".join(map(re.escape, names)))
    for entry in os.listdir(out):
        base = entry[1:-4] if entry.startswith(".") and entry.endswith(".tmp") else entry
        if base in (INFO, SKIPPED, STATE) or shard.fullmatch(base):
            yield entry


def _lock(out):
    """Hold an exclusive lock on the output folder so that two runs cannot interleave."""
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ShardError(f"another make_shards is writing {out}") from None
    return fd


def _settings_change(old, new):
    changed = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in ("name", "seed", "max_count", "resize_max")
               if old.get(k) != new[k]]
    return ", ".join(changed) or "the source files differ"


def _prepare(out, settings, overwrite):
    """Check what out already holds. Returns the _info.json when it is complete and up to date."""
    info, state = _read_json(os.path.join(out, INFO)), _read_json(os.path.join(out, STATE))
    names = {settings["name"]} | {d.get("name") for d in (info, state) if d and isinstance(d.get("name"), str)}
    own = list(_own_files(out, names))
    if overwrite:
        for entry in own:
            _remove(os.path.join(out, entry))
        return None
    old = [d for d in (info, state) if d is not None]
    stale = [d for d in old if d.get("fingerprint") != settings["fingerprint"]]
    if stale or (own and not old):
        why = _settings_change(stale[0], settings) if stale else "no _info.json to compare"
        raise ShardError(f"{out} holds shards made with other settings ({why}); "
                         "pass --overwrite to replace them")
    if info and state is None and all(os.path.exists(os.path.join(out, f))
                                      for s in info["splits"].values() for f in s["filenames"]):
        return info
    for entry in own:  # temporaries of a killed run
        if entry.endswith(".tmp"):
            _remove(os.path.join(out, entry))
    return None


# ---------------------------------------------------------------- the job
def _default_workers():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix_str(self, s, refresh=True):
        pass


def _bar(progress, **kwargs):
    """A tqdm progress bar; tqdm (40 ms to import) is only imported when bars are shown."""
    if not progress:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(dynamic_ncols=True, **kwargs)


def _print_list(title, lines):
    print(f"make_shards: {title}", file=sys.stderr)
    for line in lines[:LIST_LIMIT]:
        print(f"  {line}", file=sys.stderr)
    if len(lines) > LIST_LIMIT:
        print(f"  ... and {len(lines) - LIST_LIMIT} more", file=sys.stderr)


def _scan(pool, listing, src, resize_max, progress):
    """Classify every listed file; returns {split: [(rel, cls, flags)]} and [(split, rel, reason)]."""
    good, skipped = {}, []
    for split, entry in listing["splits"].items():
        files = entry["files"]
        chunks = [(src, resize_max, [rel for rel, _ in files[i:i + SCAN_CHUNK]])
                  for i in range(0, len(files), SCAN_CHUNK)]
        good[split] = []
        with _bar(progress, total=len(files), desc=f"scan {split}", unit="img") as bar:
            for start, results in zip(range(0, len(files), SCAN_CHUNK), _imap(pool, _scan_chunk, chunks)):
                for (rel, cls), (flags, reason) in zip(files[start:start + SCAN_CHUNK], results):
                    if reason is None:
                        good[split].append((rel, cls, flags))
                    else:
                        skipped.append((split, rel, reason))
                bar.update(len(results))
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


def _pool(workers):
    # Workers ignore Ctrl-C: the parent stops them and removes their temporaries, without a
    # traceback from every worker.
    return Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))


def _imap(pool, func, jobs, ordered=True):
    if pool is None:
        return map(func, jobs)
    return pool.imap(func, jobs) if ordered else pool.imap_unordered(func, jobs)


def make_shards(src, out=None, max_count=1250, workers=None, seed=0, resize_max=None,
                overwrite=False, name=None, progress=True):
    """Build (or resume, or confirm up to date) the shards of SRC in OUT; returns a summary dict."""
    start = time.monotonic()
    src = os.path.abspath(src)
    out = os.path.abspath(out or src.rstrip(os.sep) + "-wds")
    name = name or os.path.basename(src.rstrip(os.sep))
    workers = workers or _default_workers()
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
        lock = _lock(out)
    except OSError as e:
        raise ShardError(f"cannot create output folder {out}: {e.strerror or e}") from None
    try:
        done = _prepare(out, settings, overwrite)
        if done is not None:
            summary = _summary(out, done, time.monotonic() - start, up_to_date=True)
            print(f"make_shards: {out} is up to date ({summary['images']} images in {summary['shards']} shards)")
            return summary
        for split, entry in listing["splits"].items():
            if entry["empty"]:
                _print_list(f"warning: {len(entry['empty'])} empty class folder(s) in {split}, "
                            "their class indices are kept:", entry["empty"])
        return _build(src, out, listing, settings, workers, progress, start)
    finally:
        os.close(lock)


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
        _write_atomic(os.path.join(out, STATE), json.dumps(settings))  # shards in out now belong to these settings
        reused = _write_all(pool, src, out, listing["classes"], settings["resize_max"], plan, progress)
    except BaseException:
        if pool is not None:
            pool.terminate()  # workers killed mid-shard leave temporaries: remove them
            pool.join()
        for entry in _own_files(out, [settings["name"]]):
            if entry.endswith(".tmp"):
                _remove(os.path.join(out, entry))
        raise
    if pool is not None:
        pool.close()
        pool.join()
    _write_skipped(out, skipped)
    info = _info_json(src, listing, settings, plan, _counts(listing, good, skipped))
    _write_atomic(os.path.join(out, INFO), json.dumps(info, indent=1) + "\n")  # last: marks the output complete
    _remove(os.path.join(out, STATE))
    summary = _summary(out, info, time.monotonic() - start, up_to_date=False, reused=reused)
    print("make_shards: {images} images ({mb:.1f} MB) in {shards} shards ({reused} reused), {skipped} skipped, "
          "{transcoded} transcoded, {resized} resized, {ignored} ignored, {seconds:.1f} s -> {out}".format(
              mb=summary["bytes"] / 1e6, **summary))
    return summary


def _write_skipped(out, skipped):
    lines = ["split\tpath\treason"] + [f"{split}\t{rel}\t{reason}" for split, rel, reason in skipped]
    _write_atomic(os.path.join(out, SKIPPED), "".join(line.replace("\n", "\\n") + "\n" for line in lines))
    if skipped:
        _print_list(f"skipped {len(skipped)} unreadable image file(s), listed in {os.path.join(out, SKIPPED)}:",
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
    with _bar(progress, total=total, initial=total - written, desc="write", unit="img") as bar:
        for _, count, size in _imap(pool, _write_shard, jobs, ordered=False):
            nbytes += size
            bar.set_postfix_str(f"{nbytes / 1e6 / max(time.monotonic() - t0, 1e-6):.0f} MB/s", refresh=False)
            bar.update(count)
    return reused


# ---------------------------------------------------------------- verify
def _verify_shard(job):
    """Problems found in one shard: samples not grouped as cls/jpg/json, bad labels, undecodable images."""
    path, expected, num_classes = job
    problems, count, keys = [], 0, set()
    name = os.path.basename(path)
    try:
        with tarfile.open(path, "r:") as tar:
            members = iter(tar)
            for cls_m in members:
                group = [cls_m, next(members, None), next(members, None)]
                key = cls_m.name.split(".", 1)[0]
                if [m.name if m else None for m in group] != [f"{key}.cls", f"{key}.jpg", f"{key}.json"]:
                    problems.append(f"{name}: sample {key!r} is not the members .cls, .jpg, .json in order")
                    break
                cls_b, jpg, meta = (tar.extractfile(m).read() for m in group)
                count += 1
                if key in keys:
                    problems.append(f"{name}: duplicate key {key!r}")
                keys.add(key)
                if not cls_b.isdigit() or int(cls_b) >= num_classes:
                    problems.append(f"{name}: {key}: bad class {cls_b[:20]!r}")
                try:
                    if "path" not in json.loads(meta):
                        problems.append(f"{name}: {key}: .json has no path")
                    with Image.open(io.BytesIO(jpg)) as im:
                        im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                        im.load()  # reduced-size decode still reads all the coded data
                        if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                            problems.append(f"{name}: {key}: image is {im.format} {im.mode}, not an RGB/gray JPEG")
                except Exception as e:
                    problems.append(f"{name}: {key}: {e}")
    except (OSError, tarfile.TarError, EOFError) as e:
        problems.append(f"{name}: cannot read: {e}")
    if count != expected:
        problems.append(f"{name}: {count} samples, _info.json says {expected}")
    return count, problems


def verify_shards(out, progress=True):
    """Re-read a shard folder against its _info.json; returns a report with report['ok']."""
    out = os.path.abspath(out)
    info = _read_json(os.path.join(out, INFO))
    if not info:
        raise ShardError(f"{out} has no readable {INFO}" if os.path.isdir(out) else f"{out} is not a folder")
    problems, jobs, splits = [], [], {}
    try:
        for split, s in info["splits"].items():
            if len(s["filenames"]) != len(s["shard_lengths"]) or sum(s["shard_lengths"]) != s["num_samples"]:
                problems.append(f"{split}: filenames, shard_lengths and num_samples disagree")
            splits[split] = {"shards": len(s["filenames"]), "samples": 0}
            for filename, expected in zip(s["filenames"], s["shard_lengths"]):
                path = os.path.join(out, filename)
                if os.path.isfile(path):
                    jobs.append((split, (path, expected, info["num_classes"])))
                else:
                    problems.append(f"{filename}: missing")
    except (KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{os.path.join(out, INFO)} is not a make_shards info file (no {e})") from None
    workers = min(_default_workers(), max(1, len(jobs)))
    with _pool(workers) as pool, _bar(progress, total=len(jobs), desc="verify", unit="shard") as bar:
        for (split, _), (count, found) in zip(jobs, pool.imap(_verify_shard, [j for _, j in jobs])):
            splits[split]["samples"] += count
            problems += found
            bar.update()
    report = {"ok": not problems, "out": out, "splits": splits, "problems": problems}
    for split, s in splits.items():
        print(f"make_shards: verify {split}: {s['samples']} samples in {s['shards']} shards")
    if problems:
        _print_list(f"verify FAILED, {len(problems)} problem(s) in {out}:", problems)
    else:
        print(f"make_shards: verify OK: {out}")
    return report


# ---------------------------------------------------------------- command line
def main(argv=None):
    p = argparse.ArgumentParser(prog="make_shards.py", description=__doc__.split("\n\n")[0],
                                epilog="With --verify, a PATH holding _info.json is only checked; "
                                       "a source folder is built first, then its output is checked.")
    p.add_argument("src", metavar="SRC", help="ImageFolder with train/ and/or val/ (or a shard folder with --verify)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: SRC-wds beside SRC)")
    p.add_argument("--max-count", type=int, default=1250, metavar="N", help="samples per shard (default: 1250)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="train shuffle seed (default: 0)")
    p.add_argument("--resize-max", type=int, default=None, metavar="PX",
                   help="re-encode images whose longer side exceeds PX (default: keep all)")
    p.add_argument("--name", help="shard name prefix (default: SRC folder name)")
    p.add_argument("--verify", action="store_true", help="check shards, counts and images against _info.json")
    p.add_argument("--overwrite", action="store_true", help="replace an output made with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        if args.verify and os.path.isfile(os.path.join(args.src, INFO)):
            target = args.src
        else:
            target = make_shards(args.src, args.out, args.max_count, args.workers, args.seed, args.resize_max,
                                 args.overwrite, args.name, progress=not args.quiet)["out"]
            if not args.verify:
                return 0
        return 0 if verify_shards(target, progress=not args.quiet)["ok"] else 1
    except ShardError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("make_shards: error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # environment trouble not caught where it happened
        where = f": {e.filename}" if e.filename else ""
        print(f"make_shards: error: {e.strerror or e}{where}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
