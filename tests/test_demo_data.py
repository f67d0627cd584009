"""dataprep/demo.py and tools/make_demo_data.py: deterministic, well-formed, learnable demo ImageFolder."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dataprep.demo import ODD_KINDS, class_names, make_demo_data

SMALL = dict(num_classes=5, train_per_class=12, val_per_class=6, image_size=(64, 48))


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    return root, make_demo_data(root, seed=3, **SMALL)


def test_layout_and_counts(demo):
    root, counts = demo
    names = class_names(5)
    assert counts["classes"] == names == sorted(names)
    assert counts["train"] == 5 * 12 + len(ODD_KINDS) and counts["val"] == 5 * 6 + len(ODD_KINDS)
    for split, per_class in (("train", 12), ("val", 6)):
        assert sorted(os.listdir(root / split)) == names
        files = _files(root / split)
        assert len(files) == counts[split]
        assert all(f.endswith(".JPEG") for f in files)
        for name in names:
            regular = [f for f in os.listdir(root / split / name) if "_odd_" not in f]
            assert len(regular) == per_class


def test_deterministic_for_a_seed(demo, tmp_path):
    root, _ = demo
    make_demo_data(tmp_path / "same", seed=3, **SMALL)
    make_demo_data(tmp_path / "other", seed=4, **SMALL)
    files = _files(root)
    assert files == _files(tmp_path / "same")
    for f in files:
        assert (root / f).read_bytes() == (tmp_path / "same" / f).read_bytes(), f
    assert sum((root / f).read_bytes() != (tmp_path / "other" / f).read_bytes() for f in files) == len(files)


def test_real_jpegs_with_varied_sizes(demo):
    root, _ = demo
    sizes = []
    for f in _files(root):
        with Image.open(root / f) as im:
            assert im.format == "JPEG"
            im.load()
            if "_odd_" not in f:
                assert im.mode == "RGB"
                sizes.append(im.size)
    w, h = np.array(sizes).T
    assert 64 * 0.7 - 1 <= w.min() < w.max() <= 64 * 1.3 + 1 and len(set(w)) > 5
    assert 48 * 0.7 - 1 <= h.min() < h.max() <= 48 * 1.3 + 1 and len(set(h)) > 5


def test_odd_images(demo):
    root, _ = demo
    for split in ("train", "val"):
        odd = {}
        for f in _files(root / split):
            if "_odd_" in f:
                with Image.open(root / split / f) as im:
                    odd[f.rsplit("_odd_", 1)[1][:-5]] = (im.size, im.mode, im.info.get("progressive"))
        assert sorted(odd) == sorted(ODD_KINDS)
        assert odd["tiny"][0] == (40, 30)
        (w, h) = odd["elongated"][0]
        assert w / h >= 4
        assert odd["large"][0] == (1200, 900)
        assert odd["gray"][1] == "L"
        assert odd["cmyk"][1] == "CMYK"
        assert odd["progressive"][2] and odd["progressive"][1] == "RGB"


def _colour_feature(path):
    """Mean colour of the saturated (object) pixels at 32 px: what a tiny model could pick up first."""
    with Image.open(path) as im:
        hsv = np.asarray(im.convert("RGB").resize((32, 24)).convert("HSV"), np.float32)
    obj = hsv[hsv[..., 1] > 100]
    angle = obj[:, 0] / 255 * 2 * np.pi
    return np.array([np.cos(angle).mean(), np.sin(angle).mean()]) if len(obj) else np.zeros(2)


def test_classes_are_distinguishable(tmp_path):
    root = tmp_path / "d"
    make_demo_data(root, num_classes=8, train_per_class=10, val_per_class=10, image_size=(96, 72),
                   odd_images=False)
    names = class_names(8)
    centroids = np.array([np.mean([_colour_feature(p) for p in (root / "train" / n).iterdir()], 0)
                          for n in names])
    right = total = 0
    for c, n in enumerate(names):
        for p in (root / "val" / n).iterdir():
            right += int(np.argmin(((centroids - _colour_feature(p)) ** 2).sum(1)) == c)
            total += 1
    assert right / total >= 0.9


def test_cli(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "tools", "make_demo_data.py")
    r = subprocess.run([sys.executable, script, str(tmp_path / "d"), "--classes", "2", "--train-per-class", "3",
                        "--val-per-class", "1", "--seed", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "12 train + 8 val" in r.stdout
    assert len(_files(tmp_path / "d" / "train")) == 2 * 3 + len(ODD_KINDS)
