"""tools/make_shards.py: ImageFolder -> tar shards + _info.json, on tiny generated images."""
import errno
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from common.errors import ShardError
from dataprep import make_shards, verify_shards
from dataprep.cli import make_shards_main
from dataprep.demo import make_demo_data
from dataprep.outdir import INFO, SKIPPED, STATE
from dataprep.writer import sample_key
from pipeline.jpeg import jpeg_frame
from pipeline.shards import tar_end, tar_members

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "make_shards.py")
EMPTY_CLASS = "c001b-empty"  # sorts between the demo's c001 and c002, so later indices shift
KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,90}")


def _jpeg(size=(64, 48), colour=(200, 30, 30), **save):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", **save)
    return buf.getvalue()


def _encoded(fmt, mode="RGB", size=(40, 30)):
    buf = io.BytesIO()
    Image.new(mode, size, 120).save(buf, fmt)
    return buf.getvalue()


def _make_messy_source(root):
    """Demo data plus one file of every awkward kind; returns {relpath: expected outcome}.

    Outcomes: "copy" (bytes kept), "transcode" (converted to RGB JPEG) or "skip:<reason part>".
    """
    make_demo_data(root, num_classes=3, train_per_class=8, val_per_class=4, image_size=(64, 48))
    expected = {}
    for d, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(d, f), root)
            expected[rel] = "transcode" if "_odd_cmyk" in f else "copy"
    good = (root / "train/c000-circle-stripes/c000-circle-stripes_00000.JPEG").read_bytes()
    extra = {
        "train/c000-circle-stripes/truncated.JPEG": (good[:len(good) // 2], "skip:truncated"),
        "val/c002-triangle-dots/cut_short.JPEG": (good[:-200], "skip:truncated"),
        "train/c000-circle-stripes/garbage.JPEG": (np.random.default_rng(0).bytes(3000), "skip:not an image"),
        "train/c001-square-checker/empty.JPEG": (b"", "skip:empty file"),
        "train/c001-square-checker/png_named.JPEG": (_encoded("PNG"), "transcode"),
        "train/c001-square-checker/photo.webp": (_encoded("WEBP"), "transcode"),
        "train/c002-triangle-dots/bitmap.bmp": (_encoded("BMP"), "transcode"),
        "train/c002-triangle-dots/palette.png": (_encoded("PNG", "P"), "transcode"),
        "val/c000-circle-stripes/gray16.png": (_encoded("PNG", "I;16"), "transcode"),
        "train/c002-triangle-dots/trailing_bytes.JPEG": (_jpeg() + b"camera junk", "copy"),
        "train/c002-triangle-dots/progressive.jpg": (_jpeg(progressive=True), "copy"),
        "train/c000-circle-stripes/a b.c d.JPEG": (_jpeg(colour=(1, 2, 3)), "copy"),
        "train/c000-circle-stripes/a_b_c_d.JPEG": (_jpeg(colour=(4, 5, 6)), "copy"),
        "train/c000-circle-stripes/日本語 ünï.JPEG": (_jpeg(colour=(7, 8, 9)), "copy"),
        "train/c000-circle-stripes/" + "long" * 50 + ".JPEG": (_jpeg(colour=(9, 9, 9)), "copy"),
        "train/c001-square-checker/sub/nested.JPEG": (_jpeg(colour=(3, 3, 3)), "copy"),
    }
    ignored = {  # hidden files and folders, non-image files, files outside class folders
        "train/c000-circle-stripes/.DS_Store": b"x", "train/c000-circle-stripes/._hidden.JPEG": good,
        "train/c001-square-checker/notes.txt": b"hi", "train/.ipynb_checkpoints/x.JPEG": good,
        "train/README": b"readme", "val/c000-circle-stripes/labels.csv": b"a,b",
    }
    for rel, (data, outcome) in extra.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        expected[rel] = outcome
    for rel, data in ignored.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return expected, {"train": 5, "validation": 1}  # ignored counts (a hidden folder counts once)


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "messy"
    expected, ignored = _make_messy_source(root)
    return root, expected, ignored


@pytest.fixture(scope="module")
def built(messy, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "shards"
    summary = make_shards(messy[0], out, max_count=5, workers=2, progress=False)
    return out, summary


def read_shards(out):
    """{split: [sample dicts in stream order]} read with tarfile, checking member layout on the way."""
    info = json.loads((out / INFO).read_text())
    result = {}
    for split, s in info["splits"].items():
        samples = []
        for filename, length in zip(s["filenames"], s["shard_lengths"]):
            with tarfile.open(out / filename) as tar:
                assert not tar.pax_headers
                members = tar.getmembers()
                assert len(members) == 3 * length
                for i in range(0, len(members), 3):
                    group = members[i:i + 3]
                    key = group[0].name.split(".")[0]
                    assert [m.name for m in group] == [f"{key}.cls", f"{key}.jpg", f"{key}.json"]
                    for m in group:
                        assert (m.mtime, m.uid, m.gid, m.mode, m.uname, m.gname, m.pax_headers) == \
                               (0, 0, 0, 0o644, "", "", {})
                        assert m.isreg()
                    cls, jpg, meta = (tar.extractfile(m).read() for m in group)
                    samples.append({"key": key, "cls": int(cls), "jpg": jpg, "meta": json.loads(meta),
                                    "shard": filename})
        result[split] = samples
    return result


def _run_cli(*args, cwd=None, preexec_fn=None):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, preexec_fn=preexec_fn)


def _all_files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- output contents
def test_round_trip_every_valid_image_once_with_its_label(messy, built):
    src, expected, _ = messy
    out, summary = built
    info = json.loads((out / INFO).read_text())
    classes = sorted(d.name for d in (src / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    assert info["classes"] == classes
    seen = {}
    for split, samples in read_shards(out).items():
        keys = [s["key"] for s in samples]
        assert len(set(keys)) == len(keys) and all(KEY_RE.fullmatch(k) for k in keys)
        for s in samples:
            rel = s["meta"]["path"]
            assert rel not in seen
            seen[rel] = s
            assert rel.split("/")[0] == {"train": "train", "validation": "val"}[split]
            assert s["meta"]["class"] == rel.split("/")[1] == classes[s["cls"]]
            if expected[rel] == "copy":
                assert s["jpg"] == (src / rel).read_bytes(), rel
            else:
                with Image.open(io.BytesIO(s["jpg"])) as im:
                    assert (im.format, im.mode) == ("JPEG", "RGB"), rel
                    assert im.size == Image.open(src / rel).size
    assert set(seen) == {rel for rel, outcome in expected.items() if not outcome.startswith("skip")}
    transcoded = sum(o == "transcode" for o in expected.values())
    skipped = sum(o.startswith("skip") for o in expected.values())
    assert (summary["images"], summary["transcoded"], summary["skipped"]) == (len(seen), transcoded, skipped)


def test_bad_files_listed_with_reasons(messy, built):
    src, expected, ignored = messy
    out, summary = built
    lines = (out / SKIPPED).read_text().splitlines()
    assert lines[0] == "split\tpath\treason"
    rows = {path: (split, reason) for split, path, reason in (line.split("\t") for line in lines[1:])}
    skips = {rel: outcome[5:] for rel, outcome in expected.items() if outcome.startswith("skip:")}
    assert set(rows) == set(skips)
    for rel, part in skips.items():
        assert part in rows[rel][1], (rel, rows[rel])
    info = json.loads((out / INFO).read_text())
    assert {split: c["ignored"] for split, c in info["counts"].items()} == ignored
    assert summary["ignored"] == sum(ignored.values())


def test_info_json_schema(messy, built):
    src, _, _ = messy
    out, _ = built
    info = json.loads((out / INFO).read_text())
    assert set(info["splits"]) == {"train", "validation"}
    for split, s in info["splits"].items():
        assert set(s) == {"name", "filenames", "shard_lengths", "num_samples", "alt_label"}
        assert s["name"] == split and s["alt_label"] is None
        assert s["filenames"] == [f"messy-{split}-{i:06d}.tar" for i in range(len(s["filenames"]))]
        assert sum(s["shard_lengths"]) == s["num_samples"] == info["counts"][split]["images"]
        # every shard full except the last, although files were skipped
        assert s["shard_lengths"][:-1] == [5] * (len(s["shard_lengths"]) - 1) and 1 <= s["shard_lengths"][-1] <= 5
    assert info["num_classes"] == len(info["classes"])
    assert (info["name"], info["seed"], info["max_count"], info["resize_max"]) == ("messy", 0, 5, None)
    assert (info["source"], info["tool"], info["tool_version"]) == (str(src), "make_shards", "1")
    assert set(info["counts"]["train"]) == {"images", "skipped", "transcoded", "resized", "ignored"}
    assert not (out / STATE).exists()


def _tarfile_reference(shard):
    """The same members written by tarfile (USTAR): what a correct shard must equal byte for byte."""
    ref = io.BytesIO()
    with tarfile.open(shard) as src, tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m in src.getmembers():
            ti = tarfile.TarInfo(m.name)
            ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = m.size, 0, 0o644, "", ""
            tar.addfile(ti, src.extractfile(m))
    return ref.getvalue()


def test_shards_equal_a_tarfile_reference(built):
    out, _ = built
    for shard in sorted(out.glob("*.tar")):
        assert shard.read_bytes() == _tarfile_reference(shard), shard.name


def test_copy_through_memory_when_the_kernel_refuses(messy, built, tmp_path, monkeypatch):
    def refuse(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    make_shards(messy[0], tmp_path / "o", max_count=5, workers=1, progress=False)
    assert _all_files(tmp_path / "o") == _all_files(built[0])


def test_train_shuffled_validation_sorted(built):
    out, _ = built
    samples = read_shards(out)
    order = lambda ss: [(s["cls"], s["meta"]["path"]) for s in ss]  # noqa: E731
    assert order(samples["validation"]) == sorted(order(samples["validation"]))
    assert order(samples["train"]) != sorted(order(samples["train"]))
    for ss in samples.values():
        assert [int(s["key"][:8]) for s in ss] == list(range(len(ss)))


def test_an_empty_train_class_is_refused_an_empty_val_class_warned(tmp_path, capsys):
    """A train class without images would be a model output that is never trained (ImageFolder
    refuses it too); a val class without images only goes unvalidated."""
    src = tmp_path / "src"
    make_demo_data(src, num_classes=2, train_per_class=3, val_per_class=1, image_size=(32, 24), odd_images=False)
    (src / "train" / EMPTY_CLASS).mkdir()
    (src / "train" / EMPTY_CLASS / "notes.txt").write_text("no image")
    with pytest.raises(ShardError, match=rf"1 train class folder\(s\) hold no image, e.g. train/{EMPTY_CLASS}"):
        make_shards(src, tmp_path / "o", workers=1, progress=False)
    assert not (tmp_path / "o").exists()
    # a class whose only images are all unreadable is refused after the scan
    (src / "train" / EMPTY_CLASS / "broken.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(ShardError, match=rf"1 train class\(es\) have no usable image, e.g. {EMPTY_CLASS}"):
        make_shards(src, tmp_path / "o", workers=1, progress=False)
    assert not (tmp_path / "o" / INFO).exists()
    shutil.rmtree(src / "train" / EMPTY_CLASS)
    (src / "val" / "c000-circle-stripes").rename(tmp_path / "moved")
    (src / "val" / "c000-circle-stripes").mkdir()
    capsys.readouterr()
    make_shards(src, tmp_path / "o2", workers=1, progress=False)
    err = capsys.readouterr().err
    assert "1 validation class folder(s) hold no image" in err and "val/c000-circle-stripes" in err
    assert json.loads((tmp_path / "o2" / INFO).read_text())["num_classes"] == 2


def test_skipped_and_ignored_files_are_named(messy, tmp_path, capsys):
    make_shards(messy[0], tmp_path / "o", max_count=50, workers=1, progress=False)
    err = capsys.readouterr().err
    assert "skipped 4" in err and "truncated.JPEG" in err
    assert "5 file(s) in train ignored" in err and "1 file(s) in validation ignored" in err
    for rel in ("train/README", "train/c001-square-checker/notes.txt", "train/.ipynb_checkpoints",
                "val/c000-circle-stripes/labels.csv"):
        assert f"  {rel}\n" in err, rel
    src = tmp_path / "many"
    make_demo_data(src, num_classes=1, train_per_class=2, val_per_class=0, image_size=(32, 24), odd_images=False)
    for i in range(13):
        (src / "train" / "c000-circle-stripes" / f"note{i:02d}.txt").write_text("x")
    make_shards(src, tmp_path / "o2", workers=1, progress=False)
    err = capsys.readouterr().err
    assert "13 file(s) in train ignored" in err and "note09.txt" in err and "note10.txt" not in err
    assert "  ... and 3 more" in err


def _class_of_each_image(out):
    return {s["meta"]["path"]: s["meta"]["class"] for ss in read_shards(out).values() for s in ss}


def test_links_never_move_images_between_classes(tmp_path, capsys):
    """Links into a class folder (a parent, a sibling class, a val class, a file of another class,
    the class itself) are not followed and are named; links that lead outside every class folder are."""
    src = tmp_path / "src"
    make_demo_data(src, num_classes=3, train_per_class=2, val_per_class=1, image_size=(32, 24), odd_images=False)
    a, b, c = sorted(p for p in (src / "train").iterdir())
    (a / "up").symlink_to("..")
    (a / "top").symlink_to(src)
    (a / "sibling").symlink_to(f"../{b.name}")
    (a / "from_val").symlink_to(src / "val" / c.name)
    (a / "loop").symlink_to(".")
    (a / "stolen.JPEG").symlink_to(next(b.iterdir()))
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "more.JPEG").write_bytes(_jpeg(colour=(1, 1, 1)))
    (tmp_path / "outside.JPEG").write_bytes(_jpeg(colour=(2, 2, 2)))
    (a / "extra").symlink_to(extra)
    (a / "ext.JPEG").symlink_to(tmp_path / "outside.JPEG")
    make_shards(src, tmp_path / "o", workers=1, progress=False)
    err = capsys.readouterr().err
    got = _class_of_each_image(tmp_path / "o")
    assert all(path.split("/")[1] == cls for path, cls in got.items())
    in_a = sorted(p.split("/", 2)[2] for p, cls in got.items() if cls == a.name and p.startswith("train/"))
    assert in_a == sorted([p.name for p in a.iterdir() if p.suffix == ".JPEG" and not p.is_symlink()]
                          + ["ext.JPEG", "extra/more.JPEG"])
    assert sum(cls == b.name and p.startswith("train/") for p, cls in got.items()) == 2
    assert "6 link(s) in train not followed" in err
    for name in ("up", "top", "sibling", "from_val", "loop", "stolen.JPEG"):
        assert f"train/{a.name}/{name} -> " in err, name
    # a second link to the same outside folder is listed once
    (a / "extra_again").symlink_to(extra)
    make_shards(src, tmp_path / "o1", workers=1, progress=False)
    assert _class_of_each_image(tmp_path / "o1").keys() == got.keys()
    assert f"train/{a.name}/extra_again: leads to a folder already listed" in capsys.readouterr().err
    # two class folders that are one folder
    (src / "train" / "zz-same-as-b").symlink_to(b)
    with pytest.raises(ShardError, match=f"train/zz-same-as-b and train/{b.name} are the same folder"):
        make_shards(src, tmp_path / "o2", workers=1, progress=False)


def test_files_over_max_image_bytes_are_skipped_unread(tmp_path, capsys):
    src = tmp_path / "src"
    make_demo_data(src, num_classes=1, train_per_class=2, val_per_class=0, image_size=(32, 24), odd_images=False)
    big = src / "train" / "c000-circle-stripes" / "big.JPEG"
    big.write_bytes(_jpeg() + bytes(3 << 20))
    make_shards(src, tmp_path / "o", workers=1, progress=False, max_image_bytes=2 << 20)
    rows = (tmp_path / "o" / SKIPPED).read_text().splitlines()[1:]
    assert rows == [f"train\ttrain/c000-circle-stripes/big.JPEG\ttoo large: {big.stat().st_size:,} bytes, "
                    f"over --max-image-bytes {2 << 20:,}"]
    assert json.loads((tmp_path / "o" / INFO).read_text())["max_image_bytes"] == 2 << 20
    assert "big.JPEG: too large" in capsys.readouterr().err
    with pytest.raises(ShardError, match=r"max_image_bytes 2097152 -> 67108864"):
        make_shards(src, tmp_path / "o", workers=1, progress=False)  # another setting
    assert make_shards(src, tmp_path / "o3", workers=1, progress=False)["images"] == 3  # the default keeps it
    assert make_shards_main([str(src), "--out", str(tmp_path / "bad"), "--max-image-bytes", "0", "--quiet"]) == 1
    assert "--max-image-bytes must be positive" in capsys.readouterr().err


def test_keys_are_safe_for_any_file_name():
    names = ["train/c/a b.c d.JPEG", "train/c/日本語.JPEG", "train/c/" + "x" * 300 + ".jpeg", "train/c/.JPEG",
             "train/c/n01440764_10026.JPEG"]
    keys = [sample_key(i, n) for i, n in enumerate(names)]
    assert all(KEY_RE.fullmatch(k) for k in keys) and len(set(keys)) == len(keys)
    assert keys[-1] == "00000004_n01440764_10026"


def test_tar_bytes_equal_tarfile_ustar():
    members = [("k.cls", b"7"), ("k.jpg", bytes(range(256)) * 3), ("k.json", b"{}"), ("e.cls", b""),
               ("f.jpg", b"x" * 512), ("g.jpg", b"y" * 513)]
    mine = tar_members(members)
    mine += tar_end(len(mine))
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o644, "", ""
            tar.addfile(ti, io.BytesIO(data))
    assert mine == ref.getvalue()


# ---------------------------------------------------------------- readers
def test_timm_create_dataset_reads_all_samples(built):
    timm_data = pytest.importorskip("timm.data")
    out, _ = built
    info = json.loads((out / INFO).read_text())
    labels = {split: sorted(s["cls"] for s in ss) for split, ss in read_shards(out).items()}
    for split in ("train", "validation"):
        ds = timm_data.create_dataset("wds/messy", root=str(out), split=split, is_training=False, batch_size=1)
        got = [(img.size, int(target)) for img, target in ds]
        assert len(got) == info["splits"][split]["num_samples"]
        assert sorted(t for _, t in got) == labels[split]


def test_webdataset_reads_all_samples(built):
    wds = pytest.importorskip("webdataset")
    out, _ = built
    info = json.loads((out / INFO).read_text())
    urls = [str(out / f) for f in info["splits"]["train"]["filenames"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [s["key"] for s in read_shards(out)["train"]]
    assert all(set(s) >= {"cls", "jpg", "json"} for s in samples)


def test_tar_lists_every_shard(built):
    out, _ = built
    info = json.loads((out / INFO).read_text())
    for s in info["splits"].values():
        for filename, length in zip(s["filenames"], s["shard_lengths"]):
            r = subprocess.run(["tar", "-tf", str(out / filename)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            names = r.stdout.split()
            assert len(names) == 3 * length and [n.rsplit(".", 1)[1] for n in names[:3]] == ["cls", "jpg", "json"]


# ---------------------------------------------------------------- determinism, resume, settings
def test_byte_identical_for_any_worker_count(messy, built, tmp_path):
    out, _ = built
    make_shards(messy[0], tmp_path / "w1", max_count=5, workers=1, progress=False)
    make_shards(messy[0], tmp_path / "w3", max_count=5, workers=3, progress=False)
    assert _all_files(tmp_path / "w1") == _all_files(out) == _all_files(tmp_path / "w3")


KILL_AFTER_3_SHARDS = """
import os, signal, sys
import tools.make_shards as ms
real_replace, done = os.replace, []
def replace(a, b):
    real_replace(a, b)
    if b.endswith(".tar"):
        done.append(b)
        if len(done) == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # like kill -9: no cleanup runs
os.replace = replace
sys.exit(ms.main(sys.argv[1:]))
"""


def test_resume_after_kill_9_is_byte_identical(messy, built, tmp_path):
    ref, _ = built
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-c", KILL_AFTER_3_SHARDS, str(messy[0]), "--out", str(out),
                        "--max-count", "5", "--workers", "1", "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (out / STATE).exists() and not (out / INFO).exists()
    assert len(list(out.glob("*.tar"))) == 3
    (out / ".messy-train-000003.tar.tmp").write_bytes(b"half a shard")  # as if killed mid-write
    # different settings are refused while the partial output exists
    with pytest.raises(ShardError, match="other settings"):
        make_shards(messy[0], out, max_count=6, workers=2, progress=False)
    summary = make_shards(messy[0], out, max_count=5, workers=2, progress=False)
    assert summary["reused"] == 3 and not summary["up_to_date"]
    assert _all_files(out) == _all_files(ref)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


CTRL_C_AFTER_3_SHARDS = KILL_AFTER_3_SHARDS.replace(
    "os.kill(os.getpid(), signal.SIGKILL)  # like kill -9: no cleanup runs",
    "os.killpg(os.getpgrp(), signal.SIGINT)  # Ctrl-C reaches every process of the group").replace(
    "import tools.make_shards as ms\n",
    # Ctrl-C as in a terminal, also where the test runs as a background job (which inherits an
    # ignored SIGINT, so Python would never raise KeyboardInterrupt)
    "import tools.make_shards as ms\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n")


def test_ctrl_c_stops_workers_cleanly(messy, tmp_path):
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-c", CTRL_C_AFTER_3_SHARDS, str(messy[0]), "--out", str(out),
                        "--max-count", "2", "--workers", "2", "--quiet"], cwd=REPO, capture_output=True, text=True,
                       start_new_session=True)
    assert r.returncode == 130 and r.stderr.splitlines()[-1] == "make_shards: error: interrupted"
    assert "Traceback" not in r.stderr and "PoolWorker" not in r.stderr
    assert _no_temporaries(out) and not (out / INFO).exists() and (out / STATE).exists()


def test_rerun_is_up_to_date_and_rebuilds_a_deleted_shard(messy, tmp_path):
    out = tmp_path / "o"
    make_shards(messy[0], out, max_count=5, workers=2, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    reference = _all_files(out)
    summary = make_shards(messy[0], out, max_count=5, workers=2, progress=False)
    assert summary["up_to_date"] and summary["images"] == json.loads((out / INFO).read_text())["splits"]["train"][
        "num_samples"] + json.loads((out / INFO).read_text())["splits"]["validation"]["num_samples"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (out / "messy-train-000002.tar").unlink()
    summary = make_shards(messy[0], out, max_count=5, workers=2, progress=False)
    assert not summary["up_to_date"] and summary["reused"] == summary["shards"] - 1
    assert _all_files(out) == reference


def test_other_settings_refused_unless_overwrite(messy, tmp_path):
    out = tmp_path / "o"
    make_shards(messy[0], out, max_count=5, workers=2, progress=False)
    (out / "my_notes.txt").write_text("keep me")
    reference = _all_files(out)
    with pytest.raises(ShardError, match=r"other settings \(seed 0 -> 1\).*--overwrite"):
        make_shards(messy[0], out, max_count=5, seed=1, workers=2, progress=False)
    assert _all_files(out) == reference
    summary = make_shards(messy[0], out, max_count=7, seed=1, workers=2, overwrite=True, progress=False)
    info = json.loads((out / INFO).read_text())
    assert (info["seed"], info["max_count"]) == (1, 7) and not summary["up_to_date"]
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(
        f for s in info["splits"].values() for f in s["filenames"])  # old 5-sample shards removed
    assert (out / "my_notes.txt").read_text() == "keep me"
    # a changed source file list is a different setting too
    (messy[0] / "train/c000-circle-stripes/new.JPEG").write_bytes(_jpeg())
    try:
        with pytest.raises(ShardError, match="source files differ"):
            make_shards(messy[0], out, max_count=7, seed=1, workers=2, progress=False)
    finally:
        (messy[0] / "train/c000-circle-stripes/new.JPEG").unlink()


def test_resize_max(tmp_path):
    src = tmp_path / "small"
    make_demo_data(src, num_classes=2, train_per_class=10, val_per_class=2, image_size=(64, 48))
    make_shards(src, tmp_path / "o", resize_max=60, workers=2, progress=False)
    info = json.loads((tmp_path / "o" / INFO).read_text())
    resized = 0
    for ss in read_shards(tmp_path / "o").values():
        for s in ss:
            original = (src / s["meta"]["path"]).read_bytes()
            with Image.open(io.BytesIO(original)) as im:
                w, h = im.size
            with Image.open(io.BytesIO(s["jpg"])) as out_im:
                if max(w, h) > 60:
                    resized += 1
                    assert max(out_im.size) == 60 and out_im.mode == "RGB"
                    scale = 60 / max(w, h)  # aspect ratio kept, up to rounding
                    assert abs(out_im.size[0] - w * scale) <= 1 and abs(out_im.size[1] - h * scale) <= 1
                else:
                    assert s["jpg"] == original or "_odd_cmyk" in s["meta"]["path"]
    assert 0 < resized == sum(c["resized"] for c in info["counts"].values())
    assert info["resize_max"] == 60


def test_jpeg_quality_of_resized_images(tmp_path, capsys):
    """--jpeg-quality sets the quantisation tables of the re-encoded images (those of Pillow at
    that quality); images kept as they are keep their bytes; another quality is another setting."""
    src = tmp_path / "small"
    make_demo_data(src, num_classes=2, train_per_class=6, val_per_class=1, image_size=(64, 48), odd_images=False)

    def tables(quality):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, "JPEG", quality=quality)
        return Image.open(buf).quantization

    for quality in (95, 60):
        out = tmp_path / f"q{quality}"
        extra = {} if quality == 95 else {"jpeg_quality": quality}
        make_shards(src, out, resize_max=60, workers=1, progress=False, **extra)
        samples = [s for ss in read_shards(out).values() for s in ss]
        assert samples and json.loads((out / INFO).read_text())["jpeg_quality"] == quality
        resized = 0
        for s in samples:
            original = (src / s["meta"]["path"]).read_bytes()
            if max(Image.open(io.BytesIO(original)).size) > 60:
                resized += 1
                assert Image.open(io.BytesIO(s["jpg"])).quantization == tables(quality)
            else:
                assert s["jpg"] == original
        assert resized > 0
    assert tables(95) != tables(60)
    with pytest.raises(ShardError, match=r"jpeg_quality 60 -> 90"):
        make_shards(src, tmp_path / "q60", resize_max=60, workers=1, progress=False, jpeg_quality=90)
    assert make_shards(src, tmp_path / "q95", resize_max=60, workers=1, progress=False)["up_to_date"]
    code = make_shards_main([str(src), "--out", str(tmp_path / "bad"), "--jpeg-quality", "0", "--quiet"])
    assert code == 1 and "--jpeg-quality must be in 1..100" in capsys.readouterr().err


# ---------------------------------------------------------------- image checks
def test_jpeg_frame_accepts_plain_jpegs_and_rejects_truncated_or_garbage():
    assert jpeg_frame(_jpeg((30, 20))) == (30, 20)
    assert jpeg_frame(_jpeg((30, 20), progressive=True)) == (30, 20)
    assert jpeg_frame(_encoded("JPEG", "L")) == (40, 30)
    assert jpeg_frame(_jpeg() + b"trailing") == (64, 48)
    assert jpeg_frame(_encoded("JPEG", "CMYK")) is None
    assert jpeg_frame(b"\xff\xd8" + np.random.default_rng(1).bytes(500)) is None
    for data in (_jpeg((64, 48)), _jpeg((64, 48), progressive=True)):
        for cut in range(2, len(data) - 1, 7):
            assert jpeg_frame(data[:cut]) is None, cut


# ---------------------------------------------------------------- verify
def test_verify_accepts_good_output_and_reports_damage(built, tmp_path):
    out, _ = built
    assert verify_shards(out, progress=False)["ok"]
    cases = {
        "deleted": lambda d: (d / "messy-train-000001.tar").unlink(),
        "truncated": lambda d: (d / "messy-train-000001.tar").write_bytes(
            (d / "messy-train-000001.tar").read_bytes()[:7000]),
        "count": lambda d: (d / INFO).write_text((d / INFO).read_text().replace('"num_samples": ', '"num_samples": 1')),
    }
    for case, damage in cases.items():
        d = tmp_path / case
        shutil.copytree(out, d)
        damage(d)
        report = verify_shards(d, progress=False)
        assert not report["ok"] and report["problems"], case
        r = _run_cli("--verify", d, "--quiet")
        assert r.returncode == 1 and "verify FAILED" in r.stderr, (case, r.stderr)
    info = json.loads((out / INFO).read_text())
    info["splits"]["train"]["shard_lengths"][0] -= 1
    info["splits"]["train"]["num_samples"] -= 1
    d = tmp_path / "lengths"
    shutil.copytree(out, d)
    (d / INFO).write_text(json.dumps(info))
    report = verify_shards(d, progress=False)
    assert report["problems"] == ["messy-train-000000.tar: 5 samples, _info.json says 4"]


def test_verify_rejects_a_foreign_info_file(tmp_path):
    (tmp_path / INFO).write_text('{"name": "x", "splits": {"train": {"name": "train"}}}')
    _assert_one_line_error(_run_cli("--verify", tmp_path), "not a make_shards info file")


def test_cli_defaults_from_any_cwd_then_verify(tmp_path):
    make_demo_data(tmp_path / "mini", num_classes=2, train_per_class=3, val_per_class=2, image_size=(32, 24),
                   odd_images=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _run_cli(tmp_path / "mini", "--verify", "--quiet", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    assert "10 images" in r.stdout and "verify OK" in r.stdout
    assert sorted(p.name for p in (tmp_path / "mini-wds").iterdir()) == [
        INFO, SKIPPED, "mini-train-000000.tar", "mini-validation-000000.tar"]
    r = _run_cli("mini", cwd=tmp_path)
    assert r.returncode == 0 and "up to date" in r.stdout


# ---------------------------------------------------------------- clear errors
def _assert_one_line_error(r, *parts):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()  # warnings may come first; the error is one line, the last
    assert [line for line in lines if line.startswith("make_shards: error:")] == lines[-1:], r.stderr
    assert lines[-1].startswith("make_shards: error: ")
    for part in parts:
        assert part in lines[-1], lines[-1]


def _no_temporaries(out):
    return not out.exists() or not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_error_missing_source(tmp_path):
    _assert_one_line_error(_run_cli(tmp_path / "nope"), "does not exist")


def test_error_source_without_splits(tmp_path):
    (tmp_path / "src" / "images").mkdir(parents=True)
    _assert_one_line_error(_run_cli(tmp_path / "src"), "neither a train/ nor a val/")


def test_error_no_images(tmp_path):
    (tmp_path / "src" / "train" / "c0").mkdir(parents=True)
    (tmp_path / "src" / "train" / "c0" / "readme.txt").write_text("x")
    _assert_one_line_error(_run_cli(tmp_path / "src"), "no image files")


def test_error_only_broken_images_leaves_nothing_behind(tmp_path):
    (tmp_path / "src" / "train" / "c0").mkdir(parents=True)
    (tmp_path / "src" / "train" / "c0" / "x.JPEG").write_bytes(b"not a jpeg")
    _assert_one_line_error(_run_cli(tmp_path / "src", "--out", tmp_path / "o"), "no usable images")
    assert list((tmp_path / "o").iterdir()) == []


def test_error_val_class_missing_from_train(tmp_path):
    for split, cls in (("train", "a"), ("val", "a"), ("val", "b")):
        (tmp_path / "src" / split / cls).mkdir(parents=True)
        (tmp_path / "src" / split / cls / "x.JPEG").write_bytes(_jpeg())
    _assert_one_line_error(_run_cli(tmp_path / "src"), "val class 'b'")


def test_error_unwritable_output(messy, tmp_path):
    (tmp_path / "file").write_text("a regular file")
    _assert_one_line_error(_run_cli(messy[0], "--out", tmp_path / "file" / "shards"), "cannot create output folder")


def test_error_bad_name(messy, tmp_path):
    _assert_one_line_error(_run_cli(messy[0], "--out", tmp_path / "o", "--name", "a b/c"), "--name")


def _small_file_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit then fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


@pytest.mark.parametrize("workers", [1, 2])
def test_error_disk_full_leaves_no_temporaries(messy, tmp_path, workers):
    out = tmp_path / "o"
    r = _run_cli(messy[0], "--out", out, "--max-count", "20", "--workers", workers, "--quiet",
                 preexec_fn=_small_file_limit)
    _assert_one_line_error(r, "cannot write", "File too large")
    assert _no_temporaries(out) and not (out / INFO).exists()


# ---------------------------------------------------------------- what a new user runs into
def test_refuses_a_folder_it_did_not_make_unless_overwrite(messy, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"the user's own file")
    _assert_one_line_error(_run_cli(messy[0], "--out", out, "--quiet"), "is not empty", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]  # nothing written, nothing removed
    r = _run_cli(messy[0], "--out", out, "--quiet", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (out / "holiday.jpg").read_bytes() == b"the user's own file" and (out / INFO).is_file()
    assert _run_cli(messy[0], "--out", out, "--quiet").returncode == 0  # its own output: up to date


def test_a_split_folder_as_source_gets_a_hint_to_pass_its_parent(tmp_path):
    make_demo_data(tmp_path / "data", num_classes=2, train_per_class=2, val_per_class=0, image_size=(32, 24),
                   odd_images=False)
    _assert_one_line_error(_run_cli(tmp_path / "data" / "train"), "neither a train/ nor a val/",
                           f"pass its parent {tmp_path / 'data'}")


def test_progress_is_plain_lines_when_not_a_terminal(tmp_path):
    make_demo_data(tmp_path / "mini", num_classes=2, train_per_class=3, val_per_class=2, image_size=(32, 24),
                   odd_images=False)
    r = _run_cli(tmp_path / "mini")  # stderr is a pipe, as in a log file or CI
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "it/s" not in r.stderr  # no tqdm redraws
    lines = r.stderr.splitlines()
    assert any(line.startswith("make_shards: scan train: 6/6 img (100%)") for line in lines), r.stderr
    assert any(line.startswith("make_shards: write: 10/10 img (100%)") for line in lines), r.stderr
