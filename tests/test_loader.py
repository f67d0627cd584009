"""The streaming loader end to end: real worker processes over generated shards."""
import hashlib
import http.server
import json
import logging
import os
import shutil
import threading
from functools import partial

import pytest
import torch
from conftest import copy_shards, garble_first_image

from common.errors import DataLoadingError
from pipeline.info import DataError, check_local_shards, load_info
from pipeline.loader import BatchLoader, StreamLoader, create_loader
from pipeline.plan import train_steps
from pipeline.shards import iter_samples
from pipeline.stream import STATS, ShardStream
from pipeline.synthetic import SyntheticBatches
from pipeline.transforms import TrainTransform

B, SIZE = 8, 32


class HashBatches:
    """A batch builder that records which samples arrive (md5 of the image bytes)."""

    def __init__(self, batch_size):
        self.batch_size = batch_size

    def new(self, memory):
        self.keys, self.labels = [], []

    def add(self, i, data, label, rng):
        self.keys.append(hashlib.md5(data).hexdigest())
        self.labels.append(label)

    def finish(self, n):
        return self.keys, torch.tensor(self.labels)


def hash_loader(split, *, train, world=1, rank=0, workers=2, seed=0):
    ds = ShardStream(split, HashBatches(B), batch_size=B, train=train, seed=seed,
                     world_size=world, rank=rank, num_workers=workers, shuffle_buffer=16)
    return StreamLoader(ds, num_workers=workers, pin_memory=False)


def epoch_keys(loader, epoch):
    loader.set_epoch(epoch)
    return [list(keys) for keys, _ in loader]


def all_keys(split):
    keys = []
    for url in split.urls:
        with open(url, "rb") as f:
            keys += [hashlib.md5(s["jpg"]).hexdigest() for s in iter_samples(f)]
    return keys


def test_batches_are_uint8_nhwc_with_exact_step_count(demo_shards):
    info = load_info(str(demo_shards))
    split = info.split("train")
    loader = create_loader(split, train=True, batch_size=B, img_size=SIZE, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader) == train_steps(split.num_samples, 1, B) > 2
    for images, labels in batches:
        assert images.shape == (B, SIZE, SIZE, 3) and images.dtype == torch.uint8
        assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < info.num_classes
    assert loader.stats()["samples"] == len(batches) * B and loader.stats()["skipped"] == 0


def test_three_ranks_same_steps_no_sample_twice(demo_shards):
    split = load_info(str(demo_shards)).split("train")
    steps = train_steps(split.num_samples, 3, B)
    seen = []
    for rank in range(3):
        batches = epoch_keys(hash_loader(split, train=True, world=3, rank=rank), epoch=2)
        assert len(batches) == steps and all(len(b) == B for b in batches)
        seen += [k for b in batches for k in b]
    assert len(seen) == len(set(seen)) == steps * 3 * B
    assert set(seen) <= set(all_keys(split))


def test_persistent_workers_see_new_epochs_and_resume_reproduces(demo_shards):
    split = load_info(str(demo_shards)).split("train")
    loader = hash_loader(split, train=True, workers=2)
    e0, e1 = epoch_keys(loader, 0), epoch_keys(loader, 1)
    assert e0 != e1 and sorted(map(sorted, e0)) != sorted(map(sorted, e1))
    resumed = hash_loader(split, train=True, workers=2)
    assert epoch_keys(resumed, 1) == e1  # a fresh loader started at epoch 1 = uninterrupted run


def test_same_seed_same_pixels(demo_shards):
    split = load_info(str(demo_shards)).split("train")
    runs = []
    for seed in (3, 3, 4):
        loader = create_loader(split, train=True, batch_size=B, img_size=SIZE, num_workers=2, seed=seed)
        loader.set_epoch(1)
        runs.append(torch.cat([x for x, _ in loader]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_validation_every_sample_exactly_once_across_ranks(demo_shards):
    split = load_info(str(demo_shards)).split("validation")
    seen, counts = [], []
    for rank in range(3):
        batches = epoch_keys(hash_loader(split, train=False, world=3, rank=rank, workers=2), 0)
        counts.append(len(batches))
        seen += [k for b in batches for k in b]
    assert sorted(seen) == sorted(all_keys(split))
    loader = create_loader(split, train=False, batch_size=B, img_size=SIZE, num_workers=2)
    assert sum(len(y) for _, y in loader) == split.num_samples


def test_corrupt_sample_is_skipped_and_counted(demo_shards, tmp_path):
    root = copy_shards(demo_shards, tmp_path / "wds")
    split = load_info(str(root)).split("train")
    garble_first_image(split.urls[0])
    loader = create_loader(split, train=True, batch_size=B, img_size=SIZE, num_workers=2)
    assert sum(1 for _ in loader) == len(loader)
    stats = loader.stats()
    assert stats["skipped"] == 1 and stats["samples"] == len(loader) * B


def test_truncated_shard_loses_only_its_tail_and_is_reported(demo_shards, tmp_path, caplog):
    root = copy_shards(demo_shards, tmp_path / "wds")
    split = load_info(str(root)).split("train")
    victim = split.urls[2]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    loader = create_loader(split, train=True, batch_size=B, img_size=SIZE, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert sum(1 for _ in loader) == len(loader)
    assert loader.stats()["shard_errors"] == 1
    assert os.path.basename(victim) in caplog.text


def test_missing_shard_is_a_clear_error_before_training(demo_shards, tmp_path):
    root = copy_shards(demo_shards, tmp_path / "wds")
    split = load_info(str(root)).split("train")
    os.remove(split.urls[1])
    with pytest.raises(DataError, match=os.path.basename(split.urls[1])):
        check_local_shards(split)


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "http://evil/x.tar",
                                  "pipe:rm -rf ~", "a/../../b.tar", "x.tar; rm -rf /", ""])
def test_info_entries_that_escape_the_root_are_rejected(tmp_path, name):
    (tmp_path / "_info.json").write_text(json.dumps(
        {"splits": {"train": {"filenames": [name], "shard_lengths": [1], "num_samples": 1}}}))
    with pytest.raises(DataError, match="not a plain relative path"):
        load_info(str(tmp_path))


def test_clear_errors_for_missing_info(tmp_path, demo_folder):
    with pytest.raises(DataError, match="does not exist"):
        load_info(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="make_shards"):
        load_info(str(demo_folder))  # an ImageFolder, not shards


class DieInWorker(TrainTransform):
    def __call__(self, data, out, rng):
        if torch.utils.data.get_worker_info() is not None:
            os._exit(3)
        super().__call__(data, out, rng)


@pytest.mark.timeout(60)
def test_a_dying_worker_is_an_error_not_a_hang(demo_shards):
    from pipeline.stream import PixelBatches
    split = load_info(str(demo_shards)).split("train")
    ds = ShardStream(split, PixelBatches(DieInWorker(SIZE), B), batch_size=B, train=True,
                     num_workers=2)
    with pytest.raises(DataLoadingError, match=r"DataLoader worker \(pid\(s\) [\d, ]+\) exited unexpectedly"):
        list(StreamLoader(ds, num_workers=2, pin_memory=False))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(demo_shards):
    handler = partial(QuietHandler, directory=str(demo_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http:// through curl")
def test_reads_shards_over_http(demo_shards, http_root):
    local = load_info(str(demo_shards)).split("train")
    remote = load_info(http_root).split("train")
    assert remote.urls[0].startswith("http://127.0.0.1") and remote.lengths == local.lengths
    check_local_shards(remote)  # remote shards are not stat()ed
    assert epoch_keys(hash_loader(remote, train=True), 4) == epoch_keys(hash_loader(local, train=True), 4)


def test_reads_shards_through_a_pipe_command(demo_shards):
    local = load_info(str(demo_shards)).split("validation")
    piped = load_info(f"pipe:cat {demo_shards}/{{}}").split("validation")
    assert piped.urls[0].startswith("pipe:cat ")
    assert epoch_keys(hash_loader(piped, train=False), 0) == epoch_keys(hash_loader(local, train=False), 0)


def test_reused_buffers_give_the_same_batches_with_few_allocations(demo_shards):
    split = load_info(str(demo_shards)).split("train")
    runs = {}
    for reuse in (False, True):
        loader = create_loader(split, train=True, batch_size=B, img_size=SIZE, num_workers=2,
                               prefetch_factor=2, reuse_buffers=reuse)
        batches = []
        for epoch in range(3):
            loader.set_epoch(epoch)
            batches += [(x.clone(), y.clone()) for x, y in loader]  # read before asking for more
        runs[reuse] = batches, loader.stats()["new_buffers"]
    (plain, fresh), (reused, pooled) = runs[False], runs[True]
    assert len(plain) == len(reused) == 3 * len(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, reused))
    assert fresh == len(plain)  # one new shared buffer per batch without reuse
    assert pooled <= 2 * (2 + 2) < fresh  # at most the pools of both workers with reuse


def test_loaders_fulfil_the_batch_loader_contract(demo_shards):
    split = load_info(str(demo_shards)).split("train")
    shard = create_loader(split, train=True, batch_size=B, img_size=SIZE, num_workers=0)
    synthetic = SyntheticBatches("cpu", batch_size=B, img_size=SIZE, num_classes=3, steps=2)
    for loader in (shard, synthetic):
        assert isinstance(loader, BatchLoader)
        loader.set_epoch(1)
        n = sum(len(labels) for _, labels in loader)
        assert n == len(loader) * B
        stats = loader.stats()
        assert set(STATS) <= set(stats) and stats["samples"] == n and stats["skipped"] == 0


@pytest.mark.parametrize("workers,k", [(0, 5), (2, 5), (3, 13)])  # 13 of 15: worker 0 has run out
def test_mid_epoch_resume_gives_the_identical_remaining_batches(demo_shards, tmp_path, workers, k):
    """A loader resumed from progress(k) yields the batches an uninterrupted epoch yields after
    its first k, pixels included, though undecodable samples were skipped in the consumed part."""
    root = copy_shards(demo_shards, tmp_path / "wds")
    split = load_info(str(root)).split("train")
    for url in split.urls:
        garble_first_image(url)

    def make():
        loader = create_loader(split, train=True, batch_size=B, img_size=SIZE, num_workers=workers, seed=5,
                               shuffle_buffer=16, num_classes=6)
        return loader

    full = make()
    full.set_epoch(2)
    batches = [(x.clone(), y.clone()) for x, y in full]
    first = make()
    first.set_epoch(2)
    it = iter(first)
    for _ in range(k):
        next(it)
    progress = first.progress(k)
    del it
    assert sum(row[0] for row in progress) == k and sum(row[1] for row in progress) > k * B  # skips replayed
    resumed = make()
    resumed.set_epoch(2, progress)
    rest = [(x.clone(), y.clone()) for x, y in resumed]
    assert len(rest) == resumed.remaining() == len(batches) - k
    for (a, la), (b, lb) in zip(batches[k:], rest):
        assert torch.equal(a, b) and torch.equal(la, lb)
    resumed.set_epoch(3)  # the next epoch starts from its beginning again
    assert resumed.remaining() == len(resumed)


def test_a_samples_pixels_do_not_depend_on_the_worker_that_decodes_it(demo_shards):
    """Each sample draws its crop and flip from its own generator, so the epoch's images are the
    same whether 1 or 3 workers (in any order) decode them: what exact resume relies on."""
    split = load_info(str(demo_shards)).split("train")
    images = []
    for workers in (1, 3):
        loader = create_loader(split, train=True, batch_size=B, img_size=SIZE, num_workers=workers, seed=2)
        loader.set_epoch(1)
        images.append(sorted(bytes(img.numpy()) for x, _ in loader for img in x))
    assert images[0] == images[1]
