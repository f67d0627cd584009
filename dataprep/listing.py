"""What the source holds: class names and image files per split, in a fixed order.

A source is an ImageFolder (SRC/train/<class>/*, SRC/val/<class>/*), ImageNet's archives as
they ship (see imagenet.py), or a mix (a train folder and a flat val folder with its labels).
Each listed file is (rel, size, loc): rel is its path in the ImageFolder layout (what the
shards record), loc where its bytes are (None: SRC/rel; a path; or an archive byte range).
"""
from __future__ import annotations

import hashlib
import os
import re

from common.errors import ShardError

from . import imagenet

SPLITS = (("train", "train"), ("val", "validation"))  # (source folder, split name)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
_SHARD_FILE = re.compile(r".+-(?:train|validation)-\d{6}\.tar")


def _hidden(name):
    return name.startswith(".")


def _is_image(name):
    return name.lower().endswith(IMG_EXTENSIONS)


class _LinkGuard:
    """Which link targets would put one class's images into another: anything inside a class
    folder (of any split, the link's own class included: a duplicate) and any folder that holds a
    class folder (`up -> ..`, `-> /`)."""

    def __init__(self, class_dirs):
        self.inside = {os.path.realpath(d) for d in class_dirs}
        self.above = set()
        for real in self.inside:
            parent = os.path.dirname(real)
            while parent not in self.above and parent != os.path.dirname(parent):
                self.above.add(parent)
                parent = os.path.dirname(parent)
            self.above.add(parent)  # the root

    def blocks(self, real, folder=False):
        if folder and real in self.above:
            return True
        while True:
            if real in self.inside:
                return True
            parent = os.path.dirname(real)
            if parent == real:
                return False
            real = parent


def _class_dirs(split_dir):
    try:
        return sorted(e.path for e in os.scandir(split_dir) if not _hidden(e.name) and e.is_dir())
    except OSError as e:
        raise ShardError(f"cannot read {split_dir}: {e.strerror}") from None


def _list_class(split_dir, folder, class_dir, guard, ignored, links):
    """[(rel, size, None)] under one class folder. Linked folders and files are followed when
    they lead outside every class folder, each real folder once; other links are named in links."""
    files, visited, stack = [], {os.path.realpath(class_dir)}, [class_dir]
    while stack:
        try:  # sorted, depth first as os.walk: which of two links to one folder is listed must not vary
            entries = sorted(os.scandir(stack.pop()), key=lambda e: e.name)
        except OSError:
            continue  # an unreadable subfolder: like os.walk, pass over it
        subfolders = []
        for e in entries:
            rel = folder + e.path[len(split_dir):]  # os.path.relpath is far slower
            if _hidden(e.name):
                ignored.append(rel)
                continue
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                real = os.path.realpath(e.path)
                if e.is_symlink() and guard.blocks(real, folder=True):
                    links.append(f"{rel} -> {real}: leads into or above a class folder")
                elif real in visited:
                    links.append(f"{rel}: leads to a folder already listed (a link loop or a second link)")
                else:
                    visited.add(real)
                    subfolders.append(e.path)
                continue
            if not _is_image(e.name):
                ignored.append(rel)
                continue
            if e.is_symlink():
                real = os.path.realpath(e.path)
                if guard.blocks(real):
                    links.append(f"{rel} -> {real}: a link to a file in a class folder")
                    continue
            try:
                size = e.stat().st_size
            except OSError:
                size = -1  # a broken link: the scan skips it with the reason
            files.append((rel, size, None))
        stack += reversed(subfolders)
    return files


def _list_folder_split(src, folder, guard):
    """{class: [(rel, size, None)]}, [ignored rel], [link messages] of SRC/<folder>/<class>/...."""
    split_dir = os.path.join(src, folder)
    classes, ignored, links, reals = {}, [], [], {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if _hidden(entry.name) or not entry.is_dir():
            ignored.append(f"{folder}/{entry.name}")
            continue
        real = os.path.realpath(entry.path)
        if real in reals:
            raise ShardError(f"{folder}/{entry.name} and {folder}/{reals[real]} are the same folder ({real}): "
                             "one class's images would be two classes")
        reals[real] = entry.name
        classes[entry.name] = _list_class(split_dir, folder, entry.path, guard, ignored, links)
    return classes, ignored, links


def _flat_images(folder, guard):
    """[(name, size, path)] of the images directly in a flat folder (ImageNet's val/)."""
    files, ignored, links = [], [], []
    for e in sorted(os.scandir(folder), key=lambda e: e.name):
        if _hidden(e.name) or not _is_image(e.name) or e.is_dir():
            ignored.append(e.path)
            continue
        if e.is_symlink() and guard.blocks(os.path.realpath(e.path)):
            links.append(f"{e.path} -> {os.path.realpath(e.path)}: a link to a file in a class folder")
            continue
        try:
            size = e.stat().st_size
        except OSError:
            size = -1
        files.append((e.name, size, os.path.abspath(e.path)))
    return files, ignored, links


def _is_flat(folder):
    """A folder of images without class folders: ImageNet's val/ as it ships."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    return (not any(e.is_dir() and not _hidden(e.name) for e in entries)
            and any(_is_image(e.name) and not _hidden(e.name) for e in entries))


def _looks_like_a_split(src, probe=20):
    """Whether SRC's subfolders hold image files directly (SRC/<class>/*.jpg): a train/ or val/."""
    for entry in sorted(os.scandir(src), key=lambda e: e.name)[:probe]:
        if entry.is_dir() and not _hidden(entry.name):
            try:
                if any(_is_image(f) for f in os.listdir(entry.path)):
                    return True
            except OSError:
                continue
    return os.path.basename(os.path.abspath(src).rstrip(os.sep)) in ("train", "val", "validation")


def _no_splits_error(src):
    from .outdir import INFO  # here: engine/inference.py imports this module and needs none of outdir's imports

    names = os.listdir(src)
    if INFO in names or any(_SHARD_FILE.fullmatch(n) for n in names):
        return ShardError(f"{src} already holds shards (_info.json, *.tar): pass it to train_stream.py "
                          "--data_path, or check it with make_shards.py --verify")
    hint = ""
    if _looks_like_a_split(src):
        parent = os.path.dirname(os.path.abspath(src).rstrip(os.sep))
        hint = f"; it looks like a split folder itself (class folders of images): pass its parent {parent}"
    return ShardError(f"{src} has neither a train/ nor a val/ folder (nor {imagenet.TRAIN_TAR} / "
                      f"{imagenet.VAL_TAR}){hint}")


def _val_labels(devkit, val_labels, where):
    if devkit:
        return imagenet.devkit_labels(devkit)
    if val_labels:
        return imagenet.csv_labels(val_labels), None
    raise ShardError(f"{where} holds images without class folders (ImageNet's flat validation set): pass "
                     f"--devkit {imagenet.DEVKIT} or --val-labels {imagenet.LOC_CSV} for its labels")


def _resolve(src, train_tar, val_tar, val_dir, devkit, val_labels):
    """Where each split comes from: {split: (kind, path)}, plus the label files to use."""
    inputs = {}
    if src is not None:
        if not os.path.isdir(src):
            raise ShardError(f"source folder {src} does not exist" if not os.path.exists(src)
                             else f"source {src} is not a folder")
        found = {n: os.path.join(src, n) for n in (imagenet.TRAIN_TAR, imagenet.VAL_TAR, imagenet.DEVKIT,
                                                    imagenet.LOC_CSV) if os.path.isfile(os.path.join(src, n))}
        if os.path.isdir(os.path.join(src, "train")):
            inputs["train"] = ("folder", os.path.join(src, "train"))
        elif imagenet.TRAIN_TAR in found:
            inputs["train"] = ("train_tar", found[imagenet.TRAIN_TAR])
        if os.path.isdir(os.path.join(src, "val")):
            inputs["validation"] = ("folder", os.path.join(src, "val"))
        elif imagenet.VAL_TAR in found:
            inputs["validation"] = ("flat_tar", found[imagenet.VAL_TAR])
        if not devkit and not val_labels:  # label files beside the images are used when needed
            devkit = found.get(imagenet.DEVKIT)
            val_labels = None if devkit else found.get(imagenet.LOC_CSV)
    if devkit and val_labels:
        raise ShardError("pass --devkit or --val-labels, not both")
    if train_tar:
        inputs["train"] = ("train_tar", train_tar)
    if val_tar and val_dir:
        raise ShardError("pass --val-tar or --val-dir, not both")
    if val_tar:
        inputs["validation"] = ("flat_tar", val_tar)
    elif val_dir:
        if not os.path.isdir(val_dir):
            raise ShardError(f"--val-dir {val_dir} is not a folder")
        inputs["validation"] = ("folder", os.path.abspath(val_dir).rstrip(os.sep))
    for kind, path in inputs.values():
        if kind != "folder" and not os.path.isfile(path):
            raise ShardError(f"{path} does not exist" if not os.path.exists(path) else f"{path} is not a file")
    if not inputs:
        raise _no_splits_error(src) if src is not None else ShardError("nothing to read: pass SRC or --train-tar")
    return inputs, devkit, val_labels


def list_source(src=None, train_tar=None, val_tar=None, val_dir=None, devkit=None, val_labels=None):
    """What the source holds: class names and, per split, its files, ignored files and link refusals.

    Also returns a digest of every listed path and size, part of the settings fingerprint.
    """
    inputs, devkit, val_labels = _resolve(src, train_tar, val_tar, val_dir, devkit, val_labels)
    class_dirs = [d for kind, path in inputs.values() if kind == "folder" for d in _class_dirs(path)]
    guard = _LinkGuard(class_dirs)
    listed, descriptions = {}, None
    for split, (kind, path) in inputs.items():
        folder = "train" if split == "train" else "val"
        if kind == "train_tar":
            by_class, ignored = imagenet.list_train_tar(path, _is_image)
            links = []
        elif kind == "folder" and (split == "train" or not _is_flat(path)):
            by_class, ignored, links = _list_folder_split(os.path.dirname(path), os.path.basename(path), guard)
            if os.path.basename(path) != folder:  # --val-dir elsewhere: record ImageFolder paths
                by_class = {c: [(folder + rel[len(os.path.basename(path)):], size, os.path.join(
                    os.path.dirname(path), rel)) for rel, size, _ in fs] for c, fs in by_class.items()}
        else:
            if kind == "flat_tar":
                flat, ignored = imagenet.list_flat_tar(path, _is_image)
                links = []
            else:
                flat, ignored, links = _flat_images(path, guard)
            labels, descriptions = _val_labels(devkit, val_labels, path)
            by_class, unlabelled = imagenet.label_val(flat, labels, path)
            ignored += [f"{name} (no label)" for name in unlabelled]
        listed[split] = (by_class, ignored, links)
    classes = sorted(listed["train"][0] if "train" in listed else listed["validation"][0])
    if "train" in listed and "validation" in listed:
        extra = sorted(set(listed["validation"][0]) - set(classes))
        if extra:
            raise ShardError(f"val class {extra[0]!r} has no train/ folder ({len(extra)} such), "
                             "so class indices would not match")
    index = {name: i for i, name in enumerate(classes)}
    digest = hashlib.sha256()
    splits = {}
    for split, (by_class, ignored, links) in listed.items():
        files, empty = [], []
        for name in sorted(by_class):
            if not by_class[name]:
                empty.append(f"{'train' if split == 'train' else 'val'}/{name}")
            for rel, size, loc in sorted(by_class[name]):
                files.append((rel, index[name], loc))
                digest.update(f"{rel}\t{size}\n".encode("utf-8", "surrogateescape"))
        digest.update(f"{split} ignored {len(ignored) + len(links)}\n".encode())
        splits[split] = {"files": files, "ignored": sorted(ignored), "links": sorted(links), "empty": empty}
    if not any(s["files"] for s in splits.values()):
        raise ShardError(f"no image files found in {src or ', '.join(p for _, p in inputs.values())} "
                         f"({', '.join(os.path.basename(p) for _, p in inputs.values())})")
    if splits.get("train", {}).get("empty"):
        empty = splits["train"]["empty"]
        raise ShardError(f"{len(empty)} train class folder(s) hold no image, e.g. {empty[0]}: the model would "
                         "get an output that is never trained; remove the folder or add images")
    source = src if src is not None and all(kind == "folder" and os.path.dirname(path) == src
                                            for kind, path in inputs.values()) else \
        ", ".join(f"{split}: {os.path.abspath(path)}" for split, (_, path) in inputs.items())
    return {"classes": classes, "splits": splits, "digest": digest.hexdigest(), "source": source,
            "descriptions": descriptions}
