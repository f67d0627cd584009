"""make_shards on ImageNet as it ships: a miniature with the exact archive layouts and real wnids."""
import csv
import errno
import io
import json
import os
import random
import tarfile
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from common.errors import ShardError
from dataprep import make_shards
from dataprep.cli import make_shards_main
from dataprep.imagenet import devkit_labels, list_train_tar
from dataprep.listing import _is_image
from dataprep.outdir import INFO, SKIPPED

timm_data = pytest.importorskip("timm.data")
scipy_io = pytest.importorskip("scipy.io")

TIMM_WNIDS = timm_data.ImageNetInfo().label_names()  # timm's ImageNet-1k classes, in index order
CHOSEN = [TIMM_WNIDS[i] for i in (999, 3, 640, 250)]  # real wnids, not in sorted order
TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 2


def _jpeg(seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _add(tar, name, data):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tar.addfile(ti, io.BytesIO(data))


def _tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)
    return buf.getvalue()


def _meta_mat(path, id_of):
    """meta.mat as the devkit ships it: a 'synsets' struct array (leaves have num_children 0,
    then the inner synsets with IDs above 1000), read by torchvision's ImageNet class."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(i, w, f"words of {w}, alias", "a gloss", 0, np.zeros((1, 0)), 0, TRAIN_PER_CLASS)
            for w, i in sorted(id_of.items(), key=lambda kv: kv[1])]
    rows.append((1001, "n00001740", "entity", "that which exists", 2, np.array([[1, 2]]), 19, 0))
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        for f, v in zip(fields, row):
            synsets[k, 0][f] = v
    scipy_io.savemat(path, {"synsets": synsets})


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The archives (train tar of class tars, flat val tar, devkit, LOC csv), the same images
    extracted as an ImageFolder, and the val images as a flat folder."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = random.Random(0)
    arch, folder, flat = root / "archives", root / "folder", root / "flat_val"
    for d in (arch, folder, flat):
        d.mkdir()
    class_tars, seed = [], 0
    for wnid in CHOSEN:  # outer tar in an unsorted order
        members = []
        for n in rng.sample(range(10000), TRAIN_PER_CLASS):
            seed += 1
            members.append((f"{wnid}_{n}.JPEG", _jpeg(seed)))
            (folder / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (folder / "train" / wnid / f"{wnid}_{n}.JPEG").write_bytes(members[-1][1])
        if wnid == CHOSEN[0]:  # ignored in both forms
            members.append(("readme.txt", b"not an image"))
            (folder / "train" / wnid / "readme.txt").write_bytes(b"not an image")
        class_tars.append((f"{wnid}.tar", _tar_bytes(members)))
    (arch / "ILSVRC2012_img_train.tar").write_bytes(_tar_bytes(class_tars))

    id_of = {w: i for i, w in enumerate(rng.sample(CHOSEN, len(CHOSEN)), 1)}  # IDs not in wnid order
    labels = [w for w in CHOSEN for _ in range(VAL_PER_CLASS)]
    rng.shuffle(labels)
    val_members = []
    for i, wnid in enumerate(labels, 1):
        seed += 1
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        val_members.append((name, _jpeg(seed)))
        (folder / "val" / wnid).mkdir(parents=True, exist_ok=True)
        (folder / "val" / wnid / name).write_bytes(val_members[-1][1])
        (flat / name).write_bytes(val_members[-1][1])
    (arch / "ILSVRC2012_img_val.tar").write_bytes(_tar_bytes(val_members))

    devkit_dir = root / "devkit_src" / "ILSVRC2012_devkit_t12" / "data"
    devkit_dir.mkdir(parents=True)
    _meta_mat(devkit_dir / "meta.mat", id_of)
    (devkit_dir / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{id_of[w]}\n" for w in labels))
    with tarfile.open(arch / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar.add(root / "devkit_src" / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    with open(arch / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for i, wnid in reversed(list(enumerate(labels, 1))):  # Kaggle's file is not in image order
            w.writerow([f"ILSVRC2012_val_{i:08d}", f"{wnid} 10 20 30 40 {wnid} 1 2 3 4 "])
    return {"arch": arch, "folder": folder, "flat": flat, "labels": labels, "devkit_root": devkit_dir.parent}


@pytest.fixture(scope="module")
def from_folder(mini, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "shards"
    make_shards(mini["folder"], out, max_count=5, workers=1, name="imagenet", progress=False)
    return out


def _shard_files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.endswith(".tar") or p.name == SKIPPED}


def _samples(out):
    info = json.loads((out / INFO).read_text())
    result = {}
    for split, s in info["splits"].items():
        result[split] = []
        for f in s["filenames"]:
            with tarfile.open(out / f) as tar:
                ms = tar.getmembers()
                for i in range(0, len(ms), 3):
                    cls, _, meta = (tar.extractfile(m).read() for m in ms[i:i + 3])
                    result[split].append((int(cls), json.loads(meta)))
    return result


def test_sorted_wnids_are_timms_class_order():
    """The whole rule: make_shards numbers classes by sorted folder (wnid) name, and timm's
    ImageNet-1k class i is the i-th wnid in sorted order, so a checkpoint's class i is timm's."""
    assert len(TIMM_WNIDS) == 1000 and TIMM_WNIDS == sorted(TIMM_WNIDS)


def test_archives_give_timm_indices_and_the_extracted_folders_shards(mini, from_folder, tmp_path):
    out = tmp_path / "o"
    arch = mini["arch"]
    make_shards(None, out, max_count=5, workers=2, progress=False, train_tar=arch / "ILSVRC2012_img_train.tar",
                val_tar=arch / "ILSVRC2012_img_val.tar", devkit=arch / "ILSVRC2012_devkit_t12.tar.gz")
    info = json.loads((out / INFO).read_text())
    assert info["classes"] == sorted(CHOSEN) and info["name"] == "imagenet"
    assert [TIMM_WNIDS.index(w) for w in info["classes"]] == sorted(TIMM_WNIDS.index(w) for w in CHOSEN)
    assert info["class_descriptions"] == [f"words of {w}, alias" for w in info["classes"]]
    samples = _samples(out)
    assert len(samples["train"]) == TRAIN_PER_CLASS * len(CHOSEN)
    for ss in samples.values():
        for cls, meta in ss:
            wnid = meta["path"].split("/")[1]
            assert cls == sorted(CHOSEN).index(wnid) and meta["class"] == wnid
    val = {meta["path"].split("/")[-1]: meta["class"] for _, meta in samples["validation"]}
    assert val == {f"ILSVRC2012_val_{i:08d}.JPEG": w for i, w in enumerate(mini["labels"], 1)}
    # byte for byte what the extracted ImageFolder gives
    assert _shard_files(out) == _shard_files(from_folder)
    ref = json.loads((from_folder / INFO).read_text())
    assert info["splits"] == ref["splits"] and info["fingerprint"] == ref["fingerprint"]
    assert info["counts"]["train"]["ignored"] == 1  # the class tar's readme.txt


@pytest.mark.parametrize("labels", ["devkit", "csv"])
def test_a_folder_holding_the_archives_is_recognised(mini, from_folder, tmp_path, labels, capsys):
    src = tmp_path / "downloads"
    src.mkdir()
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                 "ILSVRC2012_devkit_t12.tar.gz" if labels == "devkit" else "LOC_val_solution.csv"):
        (src / name).symlink_to(mini["arch"] / name)
    assert make_shards_main([str(src), "--out", str(tmp_path / "o"), "--max-count", "5",
                             "--workers", "1", "--quiet"]) == 0
    assert _shard_files(tmp_path / "o") == _shard_files(from_folder)  # named "imagenet", not "downloads"
    err = capsys.readouterr().err
    assert "1 file(s) in train ignored" in err and f"{CHOSEN[0]}.tar/readme.txt" in err


def test_a_flat_val_folder_with_kaggle_labels(mini, from_folder, tmp_path):
    out = tmp_path / "o"
    make_shards(mini["folder"], out, max_count=5, workers=1, name="imagenet", progress=False,
                val_dir=mini["flat"], val_labels=mini["arch"] / "LOC_val_solution.csv")
    assert _shard_files(out) == _shard_files(from_folder)
    assert "class_descriptions" not in json.loads((out / INFO).read_text())
    # a val folder sorted into class folders, kept elsewhere under another name
    (tmp_path / "sorted_val").symlink_to(mini["folder"] / "val")
    make_shards(mini["folder"], tmp_path / "o2", max_count=5, workers=1, name="imagenet", progress=False,
                val_dir=tmp_path / "sorted_val")
    assert _shard_files(tmp_path / "o2") == _shard_files(from_folder)


def test_a_flat_val_folder_without_labels_is_a_one_line_error(mini, from_folder, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train").symlink_to(mini["folder"] / "train")
    (src / "val").symlink_to(mini["flat"])
    assert make_shards_main([str(src), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make_shards: error: ")
    assert "without class folders" in lines[0] and "--devkit ILSVRC2012_devkit_t12.tar.gz" in lines[0] \
        and "--val-labels LOC_val_solution.csv" in lines[0]
    assert not (tmp_path / "o" / INFO).exists()
    # the devkit beside the folders is found by name
    (src / "ILSVRC2012_devkit_t12.tar.gz").symlink_to(mini["arch"] / "ILSVRC2012_devkit_t12.tar.gz")
    assert make_shards_main([str(src), "--out", str(tmp_path / "o"), "--name", "imagenet", "--max-count", "5",
                             "--quiet"]) == 0
    assert _shard_files(tmp_path / "o") == _shard_files(from_folder)


def test_devkit_is_read_as_torchvision_reads_it(mini, tmp_path, monkeypatch):
    """torchvision's own devkit parser (its checksum check aside) finds the same labels in our miniature."""
    import torch
    from torchvision.datasets import imagenet as tv
    monkeypatch.setattr(tv, "_verify_archive", lambda *a: None)  # the miniature is not the real file
    (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").symlink_to(mini["arch"] / "ILSVRC2012_devkit_t12.tar.gz")
    tv.parse_devkit_archive(str(tmp_path))
    wnid_to_classes, val_wnids = torch.load(tmp_path / tv.META_FILE, weights_only=False)
    labels, words = devkit_labels(mini["arch"] / "ILSVRC2012_devkit_t12.tar.gz")
    assert labels == {f"ILSVRC2012_val_{i:08d}": w for i, w in enumerate(val_wnids, 1)}
    assert val_wnids == mini["labels"]
    assert {w: tuple(t.split(", ")) for w, t in words.items()} == wnid_to_classes
    assert "n00001740" not in words  # an inner synset, not a class


def test_resume_and_up_to_date_from_archives(mini, from_folder, tmp_path):
    arch = mini["arch"]
    kw = dict(max_count=5, workers=1, progress=False, train_tar=arch / "ILSVRC2012_img_train.tar",
              val_tar=arch / "ILSVRC2012_img_val.tar", val_labels=arch / "LOC_val_solution.csv")
    out = tmp_path / "o"
    make_shards(None, out, **kw)
    (out / "imagenet-train-000001.tar").unlink()
    (out / ".imagenet-validation-000000.tar.tmp").write_bytes(b"half a shard")
    summary = make_shards(None, out, **kw)
    assert summary["reused"] == summary["shards"] - 1 and not summary["up_to_date"]
    assert _shard_files(out) == _shard_files(from_folder) and not (out / ".imagenet-validation-000000.tar.tmp").exists()
    assert make_shards(None, out, **kw)["up_to_date"]


def test_archive_copy_through_memory_when_the_kernel_refuses(mini, from_folder, tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    make_shards(mini["arch"], tmp_path / "o", max_count=5, workers=1, progress=False)
    assert _shard_files(tmp_path / "o") == _shard_files(from_folder)


def test_listing_a_class_tar_reads_headers_not_images(tmp_path):
    """A class tar with a 30 MB member is listed without holding it in memory, and a member over
    --max-image-bytes is skipped by name, unread."""
    big = _jpeg(1) + bytes(30 << 20)  # a JPEG followed by 30 MB
    inner = tmp_path / "n01440764.tar"
    with tarfile.open(inner, "w") as tar:
        _add(tar, "n01440764_1.JPEG", _jpeg(2))
        _add(tar, "n01440764_2.JPEG", big)
    outer = tmp_path / "ILSVRC2012_img_train.tar"
    with tarfile.open(outer, "w") as tar:
        tar.add(inner, arcname="n01440764.tar")
    inner.unlink()
    tracemalloc.start()
    try:
        classes, ignored = list_train_tar(outer, _is_image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20 and ignored == []
    assert [(rel, size) for rel, size, _ in classes["n01440764"]] == [
        ("train/n01440764/n01440764_1.JPEG", len(_jpeg(2))), ("train/n01440764/n01440764_2.JPEG", len(big))]
    for (_, size, (path, offset, _)), data in zip(classes["n01440764"], (_jpeg(2), big)):  # the ranges hold them
        with open(path, "rb") as f:
            f.seek(offset)
            assert f.read(size) == data
    out = tmp_path / "o"
    tracemalloc.start()
    try:
        make_shards(None, out, workers=1, progress=False, train_tar=outer, max_image_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the 30 MB member was never read
    skipped = (out / SKIPPED).read_text().splitlines()[1:]
    assert skipped == [f"train\ttrain/n01440764/n01440764_2.JPEG\ttoo large: {len(big):,} bytes, "
                       f"over --max-image-bytes {1 << 20:,}"]


def test_hostile_archives_are_refused_or_named(tmp_path, capsys):
    """A link member inside a class tar is ignored by name (never followed); a damaged or
    compressed archive is one line."""
    inner = _tar_bytes([("n01440764_1.JPEG", _jpeg(1))])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        ti = tarfile.TarInfo("n01440764_2.JPEG")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(ti)
        _add(t, "n01440764_1.JPEG", _jpeg(1))
    outer = tmp_path / "train.tar"
    outer.write_bytes(_tar_bytes([("n01440764.tar", buf.getvalue()), ("n01443537.tar", inner)]))
    classes, ignored = list_train_tar(outer, _is_image)
    assert ignored == ["train.tar/n01440764.tar/n01440764_2.JPEG"] and len(classes["n01440764"]) == 1
    bad = tmp_path / "cut.tar"
    bad.write_bytes(outer.read_bytes()[:700])
    gz = tmp_path / "train.tar.gz"
    with tarfile.open(gz, "w:gz") as t:
        t.add(outer, arcname="x.tar")
    for path, part in ((bad, "cut.tar"), (gz, "not an uncompressed tar"), (tmp_path / "nope.tar", "does not exist")):
        with pytest.raises(ShardError, match=part):
            make_shards(None, tmp_path / "o", workers=1, progress=False, train_tar=path)
    assert make_shards_main(["--train-tar", str(outer)]) == 1
    assert "pass --out DIR" in capsys.readouterr().err


def test_source_folder_that_already_holds_shards(from_folder):
    with pytest.raises(ShardError, match=r"already holds shards .*train_stream.py --data_path"):
        make_shards(from_folder, from_folder.parent / "again", workers=1, progress=False)


def test_val_labels_must_fit_the_images(mini, tmp_path):
    wrong = tmp_path / "LOC_val_solution.csv"
    wrong.write_text("ImageId,PredictionString\nsomething_else,n01440764 1 2 3 4\n")
    with pytest.raises(ShardError, match="none of the .* val images .* has a label"):
        make_shards(None, tmp_path / "o", workers=1, progress=False,
                    val_tar=mini["arch"] / "ILSVRC2012_img_val.tar", val_labels=wrong)
    (tmp_path / "other.csv").write_text("a,b\n")
    with pytest.raises(ShardError, match="not LOC_val_solution.csv"):
        make_shards(None, tmp_path / "o", workers=1, progress=False,
                    val_tar=mini["arch"] / "ILSVRC2012_img_val.tar", val_labels=tmp_path / "other.csv")
    # a label file that misses some images: those are named and left out
    partial = tmp_path / "partial.csv"
    rows = list(csv.reader(open(mini["arch"] / "LOC_val_solution.csv")))
    partial.write_text("\n".join(",".join(r) for r in rows[:-1]) + "\n")
    summary = make_shards(None, tmp_path / "p", workers=1, progress=False,
                          val_tar=mini["arch"] / "ILSVRC2012_img_val.tar", val_labels=partial)
    assert summary["images"] == len(mini["labels"]) - 1 and summary["ignored"] == 1


KILL_AFTER_2_SHARDS = """
import os, signal, sys
import tools.make_shards as ms
real_replace, done = os.replace, []
def replace(a, b):
    real_replace(a, b)
    if b.endswith(".tar"):
        done.append(b)
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # like kill -9: no cleanup runs
os.replace = replace
sys.exit(ms.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_while_reading_the_archives_then_resume(mini, tmp_path):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ref, out = tmp_path / "ref", tmp_path / "o"
    args = [str(mini["arch"]), "--max-count", "3", "--workers", "1", "--quiet"]
    assert make_shards_main(args + ["--out", str(ref)]) == 0
    r = subprocess.run([sys.executable, "-c", KILL_AFTER_2_SHARDS, *args, "--out", str(out)], cwd=repo,
                       capture_output=True, text=True)
    assert r.returncode < 0 and not (out / INFO).exists() and len(list(out.glob("*.tar"))) == 2, r.stderr
    assert make_shards_main(args + ["--out", str(out)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in ref.iterdir()}
