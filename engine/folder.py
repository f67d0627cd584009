"""--data_path an ImageFolder, for a quick try before sharding: train/ and val/ class folders (what
make_shards reads), or one folder of class folders (trained on, no validation).

The run shards it once with make_shards into a cache under --demo-dir (folders/<name>-<hash of the
path>), then streams those shards like any others: the same epoch plan, augmentation and exact
resume. make_shards resumes a killed build and only confirms an up-to-date one, so a later run
costs a listing of the folder. For ImageNet-sized folders run make_shards yourself (its output can
go to fast storage; with several processes the others wait for the local first one here)."""
from __future__ import annotations

import hashlib
import os

from pipeline.info import INFO_NAMES


def is_image_folder(path: str | None) -> bool:
    """A local folder without _info.json that holds train/ or val/, or class folders of images."""
    if not path or "://" in path or path.startswith("pipe:") or not os.path.isdir(path):
        return False
    if any(os.path.isfile(os.path.join(path, n)) for n in INFO_NAMES):
        return False
    if any(os.path.isdir(os.path.join(path, n)) for n in ("train", "val")):
        return True
    from dataprep.listing import _looks_like_a_split
    return _looks_like_a_split(path)


def shard_root(data_path: str, cache: str) -> str:
    """Where the shards of the ImageFolder `data_path` are cached."""
    full = os.path.realpath(data_path)
    tag = hashlib.sha1(full.encode()).hexdigest()[:10]
    return os.path.join(cache, "folders", f"{os.path.basename(full.rstrip(os.sep)) or 'data'}-{tag}")


def source_of(data_path: str, out: str) -> str:
    """make_shards' SRC: the folder itself, or for one folder of class folders a folder beside the
    shards whose train/ links to it."""
    if any(os.path.isdir(os.path.join(data_path, n)) for n in ("train", "val")):
        return data_path
    src = out + ".src"
    os.makedirs(src, exist_ok=True)
    link = os.path.join(src, "train")
    if os.path.realpath(link) != os.path.realpath(data_path):
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.realpath(data_path), link)
    return src


def prepare_folder(args, d) -> None:
    """Shard the ImageFolder --data_path into args.data_root (local rank 0; the others wait)."""
    out = args.data_root
    if d.local_rank == 0:
        from dataprep import make_shards
        d.say(f"data: {args.data_path} is an ImageFolder: sharding it into {out} (once; make_shards.py does "
              "this ahead of time)")
        make_shards(source_of(args.data_path, out), out, progress=False)
    d.barrier()
