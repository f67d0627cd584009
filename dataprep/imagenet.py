"""ImageNet as it ships: the train tar of class tars, the flat validation set and its labels.

Nothing is extracted. An uncompressed tar stores each member's bytes contiguously, so an image
inside a class tar inside ILSVRC2012_img_train.tar is a byte range of the outer file: the
listing records (archive, offset, size) per image, reading only the 512-byte headers, and the
scan and the writer read each image with one pread (or copy it in the kernel). Memory holds one
image and one class tar's member list at a time.

Images get the paths they have in the extracted ImageFolder layout (train/<wnid>/<file>,
val/<wnid>/<file>), so the archives give the same shards as their extracted folders.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import tarfile

from common.errors import ShardError

TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
DEVKIT, LOC_CSV = "ILSVRC2012_devkit_t12.tar.gz", "LOC_val_solution.csv"
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_0*(\d+)$")


def _members(tar):
    """The regular and other members of an open tar, one at a time; the member list is not kept."""
    while True:
        m = tar.next()
        if m is None:
            return
        tar.members.clear()  # tarfile keeps every header it read; we need only the current one
        yield m


def _open_tar(path, fileobj=None, what=None):
    try:
        return tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj)
    except (OSError, tarfile.TarError) as e:
        where = what or path
        if isinstance(e, FileNotFoundError):
            raise ShardError(f"{where} does not exist") from None
        raise ShardError(f"{where} is not an uncompressed tar archive ({e})") from None


@contextlib.contextmanager
def _read_errors(path):
    """A tar that breaks while it is read is one line naming it."""
    try:
        yield
    except tarfile.TarError as e:
        raise ShardError(f"{path} is damaged: {e}") from None
    except OSError as e:
        raise ShardError(f"cannot read {path}: {e.strerror or e}") from None


def list_train_tar(path, is_image):
    """{wnid: [(rel, size, (path, offset, size))]} and [ignored names] of a tar of class tars
    (ILSVRC2012_img_train.tar: n01440764.tar, ...) or of class folders (n01440764/x.JPEG)."""
    path = os.path.abspath(path)
    base = os.path.basename(path)
    classes, ignored = {}, []
    with _read_errors(path):
        with _open_tar(path) as outer:
            for m in _members(outer):
                name = m.name.strip("/")
                if m.isdir():
                    continue
                if m.isreg() and name.lower().endswith(".tar"):
                    wnid = os.path.basename(name)[:-4]
                    files = classes.setdefault(wnid, [])
                    inner_name = f"{base}/{name}"
                    with _open_tar(None, outer.extractfile(m), inner_name) as inner:
                        for im in _members(inner):
                            member = im.name.strip("/")
                            if im.isdir():
                                continue
                            if im.isreg() and is_image(member) and not os.path.basename(member).startswith("."):
                                files.append((f"train/{wnid}/{member}", im.size,
                                              (path, m.offset_data + im.offset_data, im.size)))
                            else:
                                ignored.append(f"{inner_name}/{member}")
                elif m.isreg() and "/" in name and is_image(name) and not os.path.basename(name).startswith("."):
                    wnid, member = name.split("/", 1)
                    classes.setdefault(wnid, []).append((f"train/{name}", m.size, (path, m.offset_data, m.size)))
                else:
                    ignored.append(f"{base}/{name}")
    return classes, ignored


def list_flat_tar(path, is_image):
    """[(name, size, (path, offset, size))] and [ignored names] of a tar of images
    (ILSVRC2012_img_val.tar: ILSVRC2012_val_00000001.JPEG, ...)."""
    path = os.path.abspath(path)
    files, ignored = [], []
    with _read_errors(path):
        with _open_tar(path) as tar:
            for m in _members(tar):
                name = m.name.strip("/")
                if m.isdir():
                    continue
                if m.isreg() and is_image(name) and not os.path.basename(name).startswith("."):
                    files.append((os.path.basename(name), m.size, (path, m.offset_data, m.size)))
                else:
                    ignored.append(f"{os.path.basename(path)}/{name}")
    return files, ignored


# ---------------------------------------------------------------- validation labels
def devkit_labels(path):
    """({val image stem: wnid}, {wnid: label words}) from ILSVRC2012_devkit_t12.tar.gz.

    data/ILSVRC2012_validation_ground_truth.txt holds one ILSVRC2012_ID per val image, in image
    order; data/meta.mat maps the IDs of the 1,000 leaf synsets to wnids (read as torchvision's
    ImageNet class reads it).
    """
    try:
        import scipy.io
    except ImportError:
        raise ShardError("reading the devkit's meta.mat needs scipy (pip install scipy); "
                         f"or pass --val-labels {LOC_CSV}") from None
    wanted = {"data/meta.mat": None, "data/ILSVRC2012_validation_ground_truth.txt": None}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                for suffix in wanted:
                    if m.isreg() and (m.name == suffix or m.name.endswith("/" + suffix)) and m.size < 64 << 20:
                        wanted[suffix] = tar.extractfile(m).read()
    except FileNotFoundError:
        raise ShardError(f"devkit {path} does not exist") from None
    except (OSError, tarfile.TarError, EOFError) as e:
        raise ShardError(f"devkit {path} is not a readable tar.gz ({e})") from None
    missing = [k for k, v in wanted.items() if v is None]
    if missing:
        raise ShardError(f"devkit {path} has no {missing[0]} (is it ILSVRC2012_devkit_t12.tar.gz?)")
    try:
        synsets = scipy.io.loadmat(io.BytesIO(wanted["data/meta.mat"]), squeeze_me=True)["synsets"]
        leaves = [s for s in synsets if int(s[4]) == 0]  # num_children == 0: the 1,000 classes
        id_to_wnid = {int(s[0]): str(s[1]) for s in leaves}
        words = {str(s[1]): str(s[2]) for s in leaves}
        ids = [int(line) for line in wanted["data/ILSVRC2012_validation_ground_truth.txt"].split()]
    except Exception as e:  # scipy and int() raise many types for a malformed file
        raise ShardError(f"devkit {path}: cannot read meta.mat or the ground truth ({e})") from None
    unknown = sorted(set(ids) - set(id_to_wnid))
    if unknown:
        raise ShardError(f"devkit {path}: ground truth ID {unknown[0]} is not a class in meta.mat")
    return {f"ILSVRC2012_val_{i:08d}": id_to_wnid[n] for i, n in enumerate(ids, 1)}, words


def csv_labels(path):
    """{val image stem: wnid} from Kaggle's LOC_val_solution.csv (ImageId,PredictionString: the
    string starts with the wnid of the image's first box)."""
    labels = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if not header or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                raise ShardError(f"{path} is not LOC_val_solution.csv (its header is not ImageId,PredictionString)")
            for row in rows:
                if len(row) >= 2 and row[1].split():
                    labels[row[0].strip()] = row[1].split()[0]
    except FileNotFoundError:
        raise ShardError(f"val labels {path} do not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ShardError(f"cannot read val labels {path}: {e}") from None
    return labels


def label_val(files, labels, where):
    """Sort flat val files [(name, size, loc)] into {wnid: [(rel, size, loc)]}; unlabelled ones are
    returned by name. Labels are looked up by file stem (ILSVRC2012_val_00000001)."""
    classes, unlabelled = {}, []
    for name, size, loc in files:
        stem = os.path.splitext(name)[0]
        wnid = labels.get(stem)
        if wnid is None and _VAL_NUMBER.match(stem):  # tolerate other zero padding of the number
            wnid = labels.get(f"ILSVRC2012_val_{int(_VAL_NUMBER.match(stem).group(1)):08d}")
        if wnid is None:
            unlabelled.append(f"{where}/{name}")
        else:
            classes.setdefault(wnid, []).append((f"val/{wnid}/{name}", size, loc))
    if files and not classes:
        raise ShardError(f"none of the {len(files)} val images in {where} has a label in the given labels "
                         f"(e.g. {files[0][0]}); are they ImageNet's ILSVRC2012_val_*.JPEG?")
    return classes, unlabelled
