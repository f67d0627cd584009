"""What an ImageFolder holds: class folders and image files per split, in a fixed order."""
from __future__ import annotations

import hashlib
import os

from common.errors import ShardError

SPLITS = (("train", "train"), ("val", "validation"))  # (source folder, split name)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's


def _hidden(name):
    return name.startswith(".")


def _list_split(src, folder):
    """Class folder names, [(relpath, size)] per class (sorted), the ignored count of one split
    and the linked folders skipped because they lead to a folder already listed.

    Links to folders are followed, each real folder once per class: a link back into the class
    (`ln -s . loop`) or a second link to the same folder is skipped and counted as ignored, so
    link loops neither repeat images nor hang the listing.
    """
    split_dir = os.path.join(src, folder)
    classes, ignored, repeated = {}, 0, []
    for entry in os.scandir(split_dir):
        if _hidden(entry.name) or not entry.is_dir():
            ignored += 1
            continue
        files, visited = [], {os.path.realpath(entry.path)}
        for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
            keep = []
            for d in sorted(dirnames):
                real = os.path.realpath(os.path.join(dirpath, d))
                if _hidden(d) or real in visited:
                    ignored += 1
                    if not _hidden(d):
                        repeated.append(folder + os.path.join(dirpath, d)[len(split_dir):])
                    continue
                visited.add(real)
                keep.append(d)
            dirnames[:] = keep
            for f in filenames:
                if _hidden(f) or not f.lower().endswith(IMG_EXTENSIONS):
                    ignored += 1
                    continue
                path = os.path.join(dirpath, f)
                try:
                    size = os.stat(path).st_size
                except OSError:
                    size = -1  # a broken link: the scan skips it with the reason
                files.append((folder + path[len(split_dir):], size))  # os.path.relpath is far slower
        classes[entry.name] = sorted(files)
    return classes, ignored, sorted(repeated)


def _looks_like_a_split(src, probe=20):
    """Whether SRC's subfolders hold image files directly (SRC/<class>/*.jpg): a train/ or val/."""
    for entry in sorted(os.scandir(src), key=lambda e: e.name)[:probe]:
        if entry.is_dir() and not _hidden(entry.name):
            try:
                if any(f.lower().endswith(IMG_EXTENSIONS) for f in os.listdir(entry.path)):
                    return True
            except OSError:
                continue
    return os.path.basename(os.path.abspath(src).rstrip(os.sep)) in ("train", "val", "validation")


def list_source(src):
    """What SRC holds: class names and, per split, its files, ignored count and empty classes.

    Also returns a digest of every listed path and size, part of the settings fingerprint.
    """
    if not os.path.isdir(src):
        raise ShardError(f"source folder {src} does not exist" if not os.path.exists(src)
                         else f"source {src} is not a folder")
    found = [(folder, split) for folder, split in SPLITS if os.path.isdir(os.path.join(src, folder))]
    if not found:
        hint = ""
        if _looks_like_a_split(src):
            parent = os.path.dirname(os.path.abspath(src).rstrip(os.sep))
            hint = f"; it looks like a split folder itself (class folders of images): pass its parent {parent}"
        raise ShardError(f"{src} has neither a train/ nor a val/ folder{hint}")
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
    for split, (by_class, ignored, repeated) in listed.items():
        files, empty = [], []
        for name in sorted(by_class):
            if not by_class[name]:
                empty.append(f"{split}/{name}")
            for rel, size in by_class[name]:
                files.append((rel, index[name]))
                digest.update(f"{rel}\t{size}\n".encode("utf-8", "surrogateescape"))
        digest.update(f"{split} ignored {ignored}\n".encode())
        splits[split] = {"files": files, "ignored": ignored, "empty": empty, "repeated": repeated}
    if not any(s["files"] for s in splits.values()):
        raise ShardError(f"no image files found in {src} ({', '.join(f for f, _ in found)})")
    return {"classes": classes, "splits": splits, "digest": digest.hexdigest()}
