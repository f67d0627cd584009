"""Stage 1: the shard list of a split, read from `_info.json` at the shard root.

`data_path` is a local folder by default. Remote shards are used only when the user names them on
the command line: an `http(s)://` root, or a `pipe:` command template in which `{}` stands for a
file name (`pipe:aws s3 cp s3://bucket/imagenet-wds/{} -`). Names inside `_info.json` must be plain
relative paths: an info file must never make us run a command or read outside its root.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from common.errors import DataError

INFO_NAMES = ("_info.json", "info.json")
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

    def split(self, name: str) -> Split:
        for alias in SPLIT_ALIASES.get(name, (name,)):
            if alias in self.splits:
                return self.splits[alias]
        raise DataError(f"{self.root}: _info.json has no {name!r} split "
                        f"(it has: {', '.join(sorted(self.splits)) or 'none'})")


def is_remote(root: str) -> bool:
    return root.startswith(("http://", "https://", "pipe:"))


def shard_url(root: str, name: str) -> str:
    if root.startswith("pipe:"):
        return root.replace("{}", name)
    if root.startswith(("http://", "https://")):
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


def _read_info_text(root: str) -> str:
    if is_remote(root):
        if root.startswith("pipe:") and "{}" not in root:
            raise DataError(f"{root!r}: a pipe: data path needs '{{}}' where the file name goes, "
                            "e.g. 'pipe:aws s3 cp s3://bucket/imagenet-wds/{} -'")
        import webdataset as wds
        errors = []
        for name in INFO_NAMES:
            try:
                with wds.gopen(shard_url(root, name), "rb") as f:
                    return f.read().decode("utf-8")
            except Exception as e:  # curl/pipe failures surface as several exception types
                errors.append(f"{name}: {e}")
        raise DataError(f"could not read _info.json from {root} ({'; '.join(errors)})")
    if not os.path.isdir(root):
        raise DataError(f"--data_path {root!r} does not exist or is not a folder")
    for name in INFO_NAMES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    hint = (" (it looks like an ImageFolder: run `python tools/make_shards.py "
            f"{root}` first)") if os.path.isdir(os.path.join(root, "train")) else ""
    raise DataError(f"no _info.json in {root}{hint}")


def load_info(root: str) -> DatasetInfo:
    """Parse and validate `_info.json` (timm's webdataset schema plus our class names)."""
    root = root if is_remote(root) else os.path.abspath(os.path.expanduser(root))
    try:
        raw = json.loads(_read_info_text(root))
        splits = {}
        for key, s in raw["splits"].items():
            names = tuple(check_name(n, key) for n in s["filenames"])
            lengths = tuple(int(n) for n in s["shard_lengths"])
            if len(names) != len(lengths) or any(n < 0 for n in lengths):
                raise DataError(f"_info.json: split {key!r} lists {len(names)} files but "
                                f"{len(lengths)} shard lengths")
            if "num_samples" in s and int(s["num_samples"]) != sum(lengths):
                raise DataError(f"_info.json: split {key!r} says num_samples="
                                f"{s['num_samples']} but its shard lengths add up to {sum(lengths)}")
            splits[key] = Split(key, tuple(shard_url(root, n) for n in names), lengths)
    except json.JSONDecodeError as e:
        raise DataError(f"{root}: _info.json is not valid JSON ({e})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{root}: _info.json does not follow the expected schema ({e!r})") from None
    return DatasetInfo(root, splits, tuple(raw.get("classes", ())), raw)


def check_local_shards(split: Split) -> None:
    """Fail before training, naming the shard, when a local shard is missing or unreadable."""
    bad = [u for u in split.urls if not is_remote(u)
           and not (os.path.isfile(u) and os.access(u, os.R_OK))]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise DataError(f"shard missing or unreadable: {bad[0]}{more}")
