"""`--loader dali` on the CPU (DALI's cpu decoder, device_id=None): the loader contract, exact
epochs from our plan, timm's eval geometry, our train crops, and bad data skipped and counted.

`make test` installs DALI (requirements-dali.txt); without it these tests skip, except the one
that checks the one-line error a user gets. The mixed (GPU) decoder is marked `gpu`.
"""
import importlib.util
import io
import json
import os
import random
import shutil
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import run_folder
from PIL import Image

from engine.cli import main as train_stream_main
from pipeline.dali import DaliLoader, PlanSource, ShardIndex, eval_roi
from pipeline.info import load_info
from pipeline.loader import BatchLoader
from pipeline.plan import train_steps
from pipeline.shards import iter_samples
from pipeline.stream import STATS

SIZE = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None,
                                reason="DALI is not installed (pip install -r requirements-dali.txt)")


def loader(root, split="train", **kw):
    kw.setdefault("num_threads", 2)
    return DaliLoader(load_info(str(root)).split(split), train=split == "train", img_size=kw.pop("img_size", SIZE),
                      **kw)


def labels_of(split):
    out = []
    for url in split.urls:
        with open(url, "rb") as f:
            out += [int(s["cls"]) for s in iter_samples(f)]
    return out


@needs_dali
@pytest.mark.parametrize("interpolation", ["bilinear", "random"])
def test_source_draws_what_our_train_transform_draws(photo_shards, interpolation):
    """Box, interpolation and flip come from the seeded generator in our transform's order, so
    --loader dali augments each sample as our loader would for the same (seed, epoch, sample)."""
    from pipeline.transforms import TrainTransform
    root, _ = photo_shards
    split = load_info(str(root)).split("train")
    index = ShardIndex(split.urls, split.lengths)
    source = PlanSource(index, train=True, batch_size=6, seed=3, world_size=1, rank=0, img_size=64,
                        crop_pct=0.875, interpolation=interpolation)
    tf = TrainTransform(64, interpolation=interpolation)
    modes = set()
    for p, g in enumerate(source.order(0).tolist()):
        out = source.sample(0, p)
        w, h = Image.open(io.BytesIO(out[0].tobytes())).size
        rng = random.Random(f"dali-augment:3:0:{g}")
        x, y, bw, bh = tf.box(w, h, rng)
        mode, flip = tf.mode(rng), tf.flip(rng)
        assert (tuple(out[3]), tuple(out[4]), bool(out[5])) == ((x, y), (bw, bh), flip)
        assert ("bilinear", "bicubic")[int(out[6])] == mode
        modes.add(mode)
    assert modes == ({"bilinear"} if interpolation == "bilinear" else {"bilinear", "bicubic"})


@needs_dali
def test_train_runs_exact_steps_new_epochs_and_resumes_bit_for_bit(demo_shards):
    split = load_info(str(demo_shards)).split("train")
    train = loader(demo_shards, batch_size=16)
    assert isinstance(train, BatchLoader) and len(train) == train_steps(split.num_samples, 1, 16) == 7
    firsts = []
    for epoch in range(2):
        train.set_epoch(epoch)
        batches = list(train)
        assert len(batches) == len(train)
        for images, labels in batches:
            assert images.shape == (16, SIZE, SIZE, 3) and images.dtype == torch.uint8
            assert labels.dtype == torch.int64 and images.device.type == "cpu"
        firsts.append(batches[0])
    assert not torch.equal(firsts[0][1], firsts[1][1]) or not torch.equal(firsts[0][0], firsts[1][0])
    stats = train.stats()
    assert set(STATS) <= set(stats) and stats["samples"] == 2 * 7 * 16 and stats["skipped"] == 0
    assert stats["rebuilds"] == 0  # one pipeline ran both epochs
    resumed = loader(demo_shards, batch_size=16, index=train.index)
    resumed.set_epoch(1)  # a new run resuming at epoch 1 sees the same pixels and labels
    images, labels = next(iter(resumed))
    assert torch.equal(labels, firsts[1][1]) and torch.equal(images, firsts[1][0])


def test_ranks_take_disjoint_equal_parts_of_the_plan(demo_shards):
    split = load_info(str(demo_shards)).split("train")
    index = ShardIndex(split.urls, split.lengths)
    for world in (2, 3):
        steps = train_steps(split.num_samples, world, 8)
        for epoch in (0, 1):
            orders = [PlanSource(index, train=True, batch_size=8, seed=0, world_size=world, rank=r,
                                 img_size=SIZE, crop_pct=0.875).order(epoch) for r in range(world)]
            ids = np.concatenate(orders).tolist()
            assert [len(o) for o in orders] == [steps * 8] * world and len(set(ids)) == len(ids)
    rank0 = [PlanSource(index, train=True, batch_size=8, seed=0, world_size=2, rank=0, img_size=SIZE,
                        crop_pct=0.875).order(epoch).tolist() for epoch in (0, 1)]
    assert rank0[0] != rank0[1]  # a new order every epoch


@needs_dali
def test_validation_counts_every_image_once_across_ranks(demo_shards):
    split = load_info(str(demo_shards)).split("validation")
    seen, sizes = [], []
    for rank in range(2):
        val = loader(demo_shards, "validation", batch_size=16, world_size=2, rank=rank)
        got = [labels for _, labels in val]
        assert len(got) == len(val)
        sizes += [len(y) for y in got]
        seen += torch.cat(got).tolist()
        assert val.stats()["skipped"] == 0
    assert sizes == [16, 2, 16, 2]  # 18 per rank: the last batch partial, nothing padded in
    assert sorted(seen) == sorted(labels_of(split)) and len(seen) == split.num_samples == 36


def _photo(w, h, seed):
    """A smooth, photo-like JPEG: upsampled colour noise plus fine grain."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (h // 40 + 2, w // 40 + 2, 3), np.uint8))
    img = np.asarray(small.resize((w, h), Image.BICUBIC), np.int16) + rng.integers(-12, 13, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """One class per photo in odd sizes (label = which photo), sharded by make_shards."""
    from dataprep import make_shards
    src = tmp_path_factory.mktemp("photos")
    sizes = [(500, 375), (375, 500), (500, 333), (640, 480), (256, 256), (301, 255)]
    for i, (w, h) in enumerate(sizes):
        for split in ("train", "val"):
            os.makedirs(src / split / f"c{i}", exist_ok=True)
            (src / split / f"c{i}" / "a.jpg").write_bytes(_photo(w, h, i))
    out = tmp_path_factory.mktemp("photos-wds") / "wds"
    make_shards(str(src), str(out), max_count=4, workers=1, progress=False)
    return out, src


@needs_dali
def test_eval_images_are_within_half_a_level_of_timm(photo_shards):
    from timm.data import create_transform
    root, src = photo_shards
    ref = create_transform(224, crop_pct=0.875, interpolation="bicubic").transforms[:2]  # Resize, CenterCrop
    val = loader(root, "validation", batch_size=6, img_size=224)
    (images, labels), = list(val)
    diffs = []
    for image, label in zip(images, labels.tolist()):
        pil = Image.open(src / "val" / f"c{label}" / "a.jpg").convert("RGB")
        for t in ref:
            pil = t(pil)
        diffs.append(float((image.float() - torch.from_numpy(np.array(pil)).float()).abs().mean()))
    assert sorted(labels.tolist()) == list(range(6)) and max(diffs) < 0.5, diffs
    print("eval |DALI - timm| per image (uint8 levels):", [round(x, 3) for x in diffs])


@needs_dali
@pytest.mark.parametrize("interpolation", ["bilinear", "random"])
def test_train_images_are_our_crop_boxes_resized_and_flipped(photo_shards, interpolation):
    """The DALI crop is decoded from the box our source draws: equal to cropping the decoded
    image at that box and resizing it with torch's antialiased kernel of the drawn
    interpolation, within a level."""
    from pipeline import dali as d
    from pipeline.geometry import pick_interpolation
    root, src = photo_shards
    train = loader(root, "train", batch_size=6, img_size=64, interpolation=interpolation)
    (images, labels), = list(train)
    source = PlanSource(train.index, train=True, batch_size=6, seed=0, world_size=1, rank=0, img_size=64,
                        crop_pct=0.875, interpolation=interpolation)
    for row, g in enumerate(source.order(0).tolist()):
        label = int(train.index.label[g])
        assert labels[row] == label
        pil = Image.open(src / "train" / f"c{label}" / "a.jpg").convert("RGB")
        rng = random.Random(f"dali-augment:0:0:{g}")
        x, y, w, h = d.rrc_box(*pil.size, rng)
        mode = pick_interpolation(interpolation, rng)
        crop = torch.from_numpy(np.array(pil)[y:y + h, x:x + w]).permute(2, 0, 1)[None].float()
        want = torch.nn.functional.interpolate(crop, size=(64, 64), mode=mode, antialias=True,
                                               align_corners=False)[0].permute(1, 2, 0)
        if rng.random() < 0.5:
            want = want.flip(1)
        assert (images[row].float() - want.round().clamp(0, 255)).abs().mean() < 1.0, (row, label)


def _bogus_huffman(jpg: bytes) -> bytes:
    """Passes the structure check (segment lengths intact) but no decoder accepts its table."""
    data = bytearray(jpg)
    i = data.find(b"\xff\xc4")
    data[i + 5:i + 21] = b"\xff" * 16
    return bytes(data)


def _rewrite(path, change, keep=None):
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            k = keys.index(m.name.split(".")[0])
            if keep is not None and k >= keep:
                continue
            data = change(k, m.name.split(".", 1)[1], data)
            if data is None:
                continue
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    if keep is not None:  # then a damaged header where the next sample should start
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size - 1024)
            f.seek(size - 1024)
            f.write(b"\x7f" * 512)


@needs_dali
def test_bad_images_and_a_damaged_shard_are_skipped_and_counted(demo_shards, tmp_path):
    root = tmp_path / "wds"
    shutil.copytree(demo_shards, root)
    info = load_info(str(root))
    train, val = info.split("train"), info.split("validation")
    bad_train = {1: "truncated", 3: "garbage", 5: "huffman", 7: "no-jpg", 9: "bad-cls"}

    def damage(bad):
        def change(k, ext, data):
            kind = bad.get(k)
            if ext == "jpg" and kind == "truncated":
                return data[:len(data) // 2]
            if ext == "jpg" and kind == "garbage":
                return b"\xff\xd8" + bytes(random.Random(k).randrange(256) for _ in range(3000))
            if ext == "jpg" and kind == "huffman":
                return _bogus_huffman(data)
            if ext == "jpg" and kind == "no-jpg":
                return None
            if ext == "cls" and kind == "bad-cls":
                return b"x7"
            return data
        return change
    _rewrite(train.urls[0], damage(bad_train))
    _rewrite(train.urls[3], lambda k, ext, data: data, keep=5)  # 8 of its 13 samples lost
    _rewrite(val.urls[1], damage({2: "truncated", 4: "huffman"}))

    t = loader(root, batch_size=14)  # 126 = 9 x 14: every sample is planned every epoch
    batches = [len(y) for _, y in t]
    assert batches == [14] * 9 == [14] * len(t)  # full batches: the bad ones were replaced
    stats = t.stats()
    assert stats["skipped"] == len(bad_train) + 8 == stats["padded"] and stats["shard_errors"] == 1
    assert stats["rebuilds"] >= 1 and stats["samples"] == 126  # the Huffman table broke a pipeline
    v = loader(root, "validation", batch_size=16)
    assert sum(len(y) for _, y in v) == 34 and v.stats()["skipped"] == 2  # dropped, not replaced


@needs_dali
@pytest.mark.slow
def test_train_stream_trains_and_validates_with_dali(demo_shards, tmp_path, capsys):
    code = train_stream_main(["--data_path", str(demo_shards), "--loader", "dali", "--model", "resnet10t",
                              "--img-size", "32", "-b", "16", "--epochs", "1", "--warmup-epochs", "0",
                              *run_folder(tmp_path / "run"), "--log-interval", "100"])
    out = capsys.readouterr().out
    assert code == 0 and "DALI (DALI cpu" in out
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    val = [r for r in records if r["kind"] == "val"]
    epoch = [r for r in records if r["kind"] == "epoch"][0]
    assert len(val) == 1 and "validation:" in out and "(36 images)" in out
    assert epoch["steps_min"] == epoch["steps_max"] == 7 and epoch["samples"] == 7 * 16 and epoch["skipped"] == 0


@needs_dali
def test_dali_flags_are_checked_before_anything_runs(demo_shards, capsys):
    assert train_stream_main(["--data_path", str(demo_shards), "--loader", "dali", "--decode", "pil"]) == 2
    assert capsys.readouterr().err.strip() == \
        "train_stream: error: --loader dali decodes with DALI: choose --decode cpu or gpu"
    if not torch.cuda.is_available():
        assert train_stream_main(["--data_path", str(demo_shards), "--loader", "dali", "--decode", "gpu"]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err


@needs_dali
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_decoder_gives_the_cpu_decoders_images_on_the_device(photo_shards):
    root, _ = photo_shards
    cpu = list(loader(root, "validation", batch_size=6, img_size=224))[0]
    gpu = list(loader(root, "validation", batch_size=6, img_size=224, decode="gpu", device_id=0))[0]
    assert gpu[0].device.type == "cuda" and gpu[1].device.type == "cuda"
    assert torch.equal(gpu[1].cpu(), cpu[1])
    assert (gpu[0].cpu().float() - cpu[0].float()).abs().mean() < 2.0  # nvJPEG's IDCT and upsampling differ slightly


def test_eval_roi_is_the_centre_crop_of_timms_resize():
    """Spot values worked out by hand from torchvision's Resize(256) + CenterCrop(224)."""
    # 500x375: resized to 341x256 (int(256*500/375) = 341), crop left round(58.5) = 58 (half to even)
    (y0, x0), (y1, x1) = eval_roi(500, 375, 224, 0.875)
    assert (y0, y1) == pytest.approx((16 * 375 / 256, 240 * 375 / 256))
    assert (x0, x1) == pytest.approx((58 * 500 / 341, 282 * 500 / 341))
    (y0, x0), (y1, x1) = eval_roi(256, 256, 224, 0.875)
    assert (y0, x0, y1, x1) == pytest.approx((16, 16, 240, 240))


def test_without_dali_the_user_gets_one_line(demo_shards, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if it were not installed
    assert train_stream_main(["--data_path", str(demo_shards), "--loader", "dali"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "train_stream: error: --loader dali needs NVIDIA DALI, which is not installed: "
        "pip install -r requirements-dali.txt")
    from tools import bench_loader  # the benchmark notes it and goes on
    assert bench_loader.main(["--data_path", str(demo_shards), "--loader", "dali", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "dali-cpu: skipped: the DALI loader needs NVIDIA DALI" in out  # the library's words
    assert json.loads(out.strip().splitlines()[-1])["rows"]["dali-cpu"]["skipped"].startswith("the DALI loader")
