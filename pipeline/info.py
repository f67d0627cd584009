"""Stage 1: the shard list of a split, read from `_info.json` at the shard root.

`data_path` is a local folder by default. Remote shards are used only when the user names them on
the command line: an `http(s)://` root, an object-store root (`s3://bucket/prefix/`, `gs://...`,
any scheme an installed fsspec library knows: pipeline/objstore.py), or a `pipe:` command template
in which `{}` stands for a file name. Names inside `_info.json` must be plain relative paths: an
info file must never make us run a command or read outside its root. Its numbers are bounded too
(MAX_SHARD_SAMPLES, MAX_SPLIT_SAMPLES, MAX_CLASSES): a remote info file cannot be checked against
shard sizes before training, and a claim of 10^12 samples or 10^9 classes must be one line, not an
endless epoch or a terabyte allocation.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from common.errors import DataError

INFO_NAMES = ("_info.json", "info.json")
MAX_INFO_BYTES = 64 << 20  # ImageNet's is ~80 KB; anything this large is not an info file
MIN_SAMPLE_BYTES = 2 * 512  # an image and a .cls member, each behind a 512-byte tar header
# Bounds no real data set reaches (ImageNet: 1,281,167 samples in 1,024 shards, 1,000 classes;
# LAION-5B: 5.85e9 samples in shards of 10,000): a 10^7-sample shard would be >= 10 GB.
MAX_SHARD_SAMPLES = 10 ** 7
MAX_SPLIT_SAMPLES = 10 ** 11
MAX_CLASSES = 10 ** 6  # a ResNet-50 head of 2048 x 10^6 fp32 weights is already 8 GB
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.+=-]+(/[A-Za-z0-9_.+=-]+)*")
# timm's readers name the validation split "validation"; accept the common aliases.
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val", "valid")}


@dataclass(frozen=True)
class Split:
    name: str
    urls: tuple[str, ...]
    lengths: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


@dataclass(frozen=True)
class DatasetInfo:
    root: str
    splits: dict = field(default_factory=dict)
    classes: tuple[str, ...] = ()
    raw: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        return int(self.raw.get("num_classes", 0))

    def identity(self) -> dict:
        """What a checkpoint records to recognise this data set again."""
        train = self.splits.get("train")
        return {"name": self.raw.get("name"), "fingerprint": self.raw.get("fingerprint"),
                "train_samples": train.num_samples if train else None}

    def split(self, name: str) -> Split:
        for alias in SPLIT_ALIASES.get(name, (name,)):
            if alias in self.splits:
                return self.splits[alias]
        raise DataError(f"{self.root}: _info.json has no {name!r} split "
                        f"(it has: {', '.join(sorted(self.splits)) or 'none'})")


def is_remote(root: str) -> bool:
    """http(s), pipe: or an object store (any `scheme://` but file://)."""
    from .objstore import scheme
    return root.startswith(("http://", "https://", "pipe:")) or scheme(root) is not None


def shard_url(root: str, name: str) -> str:
    if root.startswith("pipe:"):
        return root.replace("{}", name)
    if is_remote(root):
        return root.rstrip("/") + "/" + name
    return os.path.join(root, name)


def check_name(name, split: str) -> str:
    """A shard name must be a plain relative path: no scheme, no '..', not absolute."""
    ok = (isinstance(name, str) and _SAFE_NAME.fullmatch(name) is not None
          and not any(part in (".", "..") for part in name.split("/")))
    if not ok:
        raise DataError(f"_info.json: shard name {name!r} in split {split!r} is not a plain "
                        "relative path; refusing to use it")
    return name


def _read_remote(url: str, remote) -> str:
    import time

    from .remote import RemoteError, RemoteMissing, open_remote
    delays = remote.delays()
    while True:
        try:
            with open_remote(url, remote) as f:
                if f.size is not None and f.size > MAX_INFO_BYTES:
                    raise DataError(f"{url} is larger than {MAX_INFO_BYTES >> 20} MB: not an _info.json")
                chunks = []
                while chunk := f.read(1 << 20):
                    chunks.append(chunk)
                    if sum(map(len, chunks)) > MAX_INFO_BYTES:
                        raise DataError(f"{url} is larger than {MAX_INFO_BYTES >> 20} MB: not an _info.json")
                return b"".join(chunks).decode("utf-8")
        except RemoteError as e:
            if not delays or isinstance(e, RemoteMissing):  # a missing file will not appear by waiting
                raise
            time.sleep(delays.pop(0))


def _read_info_text(root: str, remote=None) -> str:
    if is_remote(root):
        if root.startswith("pipe:") and "{}" not in root:
            raise DataError(f"{root!r}: a pipe: data path needs '{{}}' where the file name goes, "
                            "e.g. 'pipe:aws s3 cp s3://bucket/imagenet-wds/{} -'")
        from .remote import RemoteError, RemoteOptions
        errors = []
        for name in INFO_NAMES:
            try:
                return _read_remote(shard_url(root, name), remote or RemoteOptions())
            except RemoteError as e:
                errors.append(f"{name}: {e}")
        raise DataError(f"could not read _info.json from {root} ({'; '.join(errors)})")
    if not os.path.isdir(root):
        raise DataError(f"the shard root {root!r} does not exist or is not a folder")
    for name in INFO_NAMES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            if os.path.getsize(path) > MAX_INFO_BYTES:
                raise DataError(f"{path} is larger than {MAX_INFO_BYTES >> 20} MB: not an _info.json")
            with open(path, "rb") as f:
                return f.read().decode("utf-8")
    hint = (" (it looks like an ImageFolder: run `python tools/make_shards.py "
            f"{root}` first)") if os.path.isdir(os.path.join(root, "train")) else ""
    raise DataError(f"no _info.json in {root}{hint}")


def _is_count(value) -> bool:
    """A whole number >= 0 as JSON gives it (3.0, true and "3" are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _no_constant(name: str):
    raise DataError(f"_info.json contains {name}, which is not a number JSON allows")


def _parse_split(key: str, s, root: str) -> Split:
    if not isinstance(s, dict):
        raise DataError(f"_info.json: split {key!r} is not an object")
    names, lengths = s.get("filenames"), s.get("shard_lengths")
    if not isinstance(names, list) or not isinstance(lengths, list):
        raise DataError(f"_info.json: split {key!r} needs the lists 'filenames' and 'shard_lengths'")
    if len(names) != len(lengths):
        raise DataError(f"_info.json: split {key!r} lists {len(names)} files but {len(lengths)} shard lengths")
    for n in lengths:
        if not _is_count(n):
            raise DataError(f"_info.json: split {key!r} has the shard length {n!r}; "
                            "lengths must be whole numbers, 0 or more")
        if n > MAX_SHARD_SAMPLES:
            raise DataError(f"_info.json: split {key!r} has the shard length {n:,}, more than the "
                            f"{MAX_SHARD_SAMPLES:,} samples a shard can hold: not an info file for real shards")
    names = [check_name(n, key) for n in names]
    seen = set()
    for name in names:
        if name in seen:
            raise DataError(f"_info.json: split {key!r} lists the shard {name!r} twice")
        seen.add(name)
    total = sum(lengths)
    if total > MAX_SPLIT_SAMPLES:
        raise DataError(f"_info.json: split {key!r} claims {total:,} samples, more than {MAX_SPLIT_SAMPLES:,}")
    if "num_samples" in s and s["num_samples"] != total:
        raise DataError(f"_info.json: split {key!r} says num_samples={s['num_samples']!r} "
                        f"but its shard lengths add up to {total}")
    return Split(key, tuple(shard_url(root, n) for n in names), tuple(lengths))


def load_info(root: str, remote=None) -> DatasetInfo:
    """Parse and validate `_info.json` (timm's webdataset schema plus our class names).

    Every malformed file is one line (DataError): bad JSON, Infinity/NaN, deep nesting, lengths
    that are negative or not whole numbers, duplicate or unsafe file names, a wrong num_samples.
    `remote`: RemoteOptions (timeouts, retries) for an http(s)/pipe root.
    """
    root = root if is_remote(root) else os.path.abspath(os.path.expanduser(root))
    try:
        raw = json.loads(_read_info_text(root, remote), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise DataError(f"{root}: _info.json is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{root}: _info.json is not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{root}: _info.json is nested too deeply to be an info file") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("splits"), dict):
        raise DataError(f"{root}: _info.json does not follow the expected schema (no 'splits' object)")
    splits = {str(key): _parse_split(str(key), s, root) for key, s in raw["splits"].items()}
    classes = raw.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{root}: _info.json: 'classes' must be a list of class names")
    if "num_classes" in raw and not _is_count(raw["num_classes"]):
        raise DataError(f"{root}: _info.json: num_classes={raw['num_classes']!r} is not a whole number")
    if max(raw.get("num_classes", 0), len(classes)) > MAX_CLASSES:
        raise DataError(f"{root}: _info.json says there are {max(raw.get('num_classes', 0), len(classes)):,} "
                        f"classes, more than {MAX_CLASSES:,}: not an info file for a classifier's data")
    if classes and raw.get("num_classes", len(classes)) != len(classes):
        raise DataError(f"{root}: _info.json lists {len(classes)} classes but says num_classes="
                        f"{raw['num_classes']}")
    return DatasetInfo(root, splits, tuple(classes), raw)


def check_local_shards(split: Split) -> None:
    """Fail before training, naming the shard, when a local shard is missing or unreadable, or
    is too small to hold the samples _info.json lists (each sample needs an image and a .cls
    member, each behind a 512-byte tar header, so a shard of S bytes holds at most S // 1024)."""
    bad = [u for u in split.urls if not is_remote(u)
           and not (os.path.isfile(u) and os.access(u, os.R_OK))]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise DataError(f"shard missing or unreadable: {bad[0]}{more}")
    for url, n in zip(split.urls, split.lengths):
        if not is_remote(url):
            size = os.path.getsize(url)
            if n > size // MIN_SAMPLE_BYTES:
                raise DataError(f"_info.json lists {n:,} samples for {url}, but its {size:,} bytes hold at "
                                f"most {size // MIN_SAMPLE_BYTES:,}: the info file does not belong to these shards")
