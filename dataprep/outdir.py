"""The output folder's state: which files make_shards owns, locking, atomic writes, resuming."""
from __future__ import annotations

import fcntl
import json
import os
import re

from common.errors import ShardError

from .images import JPEG_QUALITY, MAX_IMAGE_BYTES

INFO, SKIPPED, STATE = "_info.json", "_skipped.tsv", ".make_shards.json"


def tmp_path(path):
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp")


def remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_atomic(path, text):
    tmp = tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        remove(tmp)
        raise ShardError(f"cannot write {path}: {e.strerror or e}") from None


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as made with unknown settings


def own_files(out, names):
    """Files in out that this tool makes (for any of the shard names), temporaries included."""
    shard = re.compile(r"(?:%s)-(?:train|validation)-\d{6}\.tar" % "|".join(map(re.escape, names)))
    for entry in os.listdir(out):
        base = entry[1:-4] if entry.startswith(".") and entry.endswith(".tmp") else entry
        if base in (INFO, SKIPPED, STATE) or shard.fullmatch(base):
            yield entry


def lock(out):
    """Hold an exclusive lock on the output folder so that two runs cannot interleave."""
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ShardError(f"another make_shards is writing {out}") from None
    return fd


def _settings_change(old, new):
    defaults = {"jpeg_quality": JPEG_QUALITY, "max_image_bytes": MAX_IMAGE_BYTES}  # keys written only when not these
    changed = [f"{k} {old.get(k, defaults.get(k))!r} -> {new.get(k, defaults.get(k))!r}"
               for k in ("name", "seed", "max_count", "resize_max", "jpeg_quality", "max_image_bytes")
               if old.get(k, defaults.get(k)) != new.get(k, defaults.get(k))]
    return ", ".join(changed) or "the source files differ"


def prepare(out, settings, overwrite):
    """Check what out already holds. Returns the _info.json when it is complete and up to date.

    A non-empty folder that holds nothing this tool made is refused unless `overwrite` (then
    its files are left alone and the shards are written beside them).
    """
    info, state = read_json(os.path.join(out, INFO)), read_json(os.path.join(out, STATE))
    names = {settings["name"]} | {d.get("name") for d in (info, state) if d and isinstance(d.get("name"), str)}
    own = list(own_files(out, names))
    foreign = sorted(set(os.listdir(out)) - set(own))
    if foreign and not own and not overwrite:
        raise ShardError(f"{out} is not empty and make_shards did not make what it holds ({len(foreign)} "
                         f"entries, e.g. {foreign[0]!r}); choose an empty --out, or pass --overwrite to "
                         "write the shards beside them")
    if overwrite:
        for entry in own:
            remove(os.path.join(out, entry))
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
            remove(os.path.join(out, entry))
    return None
