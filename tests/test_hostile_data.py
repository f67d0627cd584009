"""Hostile data and a hostile machine: memory bounded by the limits, not by what a shard holds;
a /dev/shm too small refused in one line; nothing left in /dev/shm after a failure or kill -9."""
import io
import logging
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from conftest import ROOT, child_env, replace_first_image, run_folder
from PIL import Image

import train_stream
from common.errors import SharedMemoryError
from pipeline import loader as loader_module
from pipeline.info import load_info
from pipeline.jpeg import MAX_DECODED_BYTES, MAX_PIXELS
from pipeline.loader import create_loader
from pipeline.shards import byte_size, iter_samples, tar_end, tar_members
from pipeline.stream import empty, shuffled
from pipeline.transforms import DecodeError, EvalTransform, _decode_tv, check_decoded_bytes

B, SIZE = 8, 32
MB = 1 << 20


class Reader:
    """A file wrapper that counts the bytes handed out; `seekable=False` plays a pipe or socket."""

    def __init__(self, f, seekable=True):
        self.f, self._seekable, self.read_bytes = f, seekable, 0

    def seekable(self):
        return self._seekable

    def read(self, n=-1):
        data = self.f.read(n)
        self.read_bytes += len(data)
        return data

    def readinto(self, buf):
        k = self.f.readinto(buf)
        self.read_bytes += k or 0
        return k

    def seek(self, *args):
        assert self._seekable
        return self.f.seek(*args)

    def tell(self):
        return self.f.tell()

    def fileno(self):
        if not self._seekable:
            raise OSError("a stream")
        return self.f.fileno()


def write_shard(path, samples):
    """samples: [(key, image bytes)], each with a .cls of 0."""
    members = []
    for key, data in samples:
        members += [(f"{key}.jpg", data), (f"{key}.cls", b"0")]
    body = tar_members(members)
    path.write_bytes(body + tar_end(len(body)))
    return path


@pytest.mark.parametrize("seekable", [True, False])
def test_a_sample_over_the_byte_limit_is_skipped_unread(tmp_path, seekable):
    shard = write_shard(tmp_path / "a.tar", [("a", b"x" * 100), ("big", b"y" * (5 * MB)), ("c", b"z" * 100)])
    with open(shard, "rb", buffering=0) as raw:
        f = Reader(raw, seekable)
        tracemalloc.start()
        samples = list(iter_samples(f, max_bytes=MB))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert [s["__key__"] for s in samples] == ["a", "big", "c"]
    assert "jpg" not in samples[1] and "big.jpg (5,242,880 bytes)" in samples[1]["__oversize__"]
    assert bytes(samples[2]["jpg"]) == b"z" * 100
    if seekable:
        assert f.read_bytes < MB  # seeked over, never read
    else:
        assert peak < 2 * MB  # read and dropped in small pieces


def test_the_loader_skips_counts_and_names_an_oversize_sample(demo_shards, tmp_path, caplog):
    root = shutil.copytree(demo_shards, tmp_path / "wds")
    split = load_info(str(root)).split("validation")
    replace_first_image(split.urls[0], b"\xff\xd8" + bytes(3 * MB))
    loader = create_loader(split, train=False, batch_size=B, img_size=SIZE, num_workers=0, max_sample_bytes=2 * MB)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            n = sum(len(labels) for _, labels in loader)
            assert n == split.num_samples - 1
    assert loader.stats()["skipped"] == 2  # counted each epoch...
    # the library's words, or the flag's where train_stream's wording filter is on (an in-process main())
    lines = [r.getMessage() for r in caplog.records
             if "per-sample byte limit" in r.getMessage() or "--max-sample-bytes" in r.getMessage()]
    assert len(lines) == 1 and "3,145,730 bytes" in lines[0]  # ...named once


@pytest.mark.parametrize("seekable", [True, False])
def test_a_large_member_is_held_once_not_copied(tmp_path, seekable):
    size = 48 * MB
    shard = write_shard(tmp_path / "a.tar", [("big", bytes(size))])
    with open(shard, "rb", buffering=0) as raw:
        tracemalloc.start()
        sample = next(iter_samples(Reader(raw, seekable)))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert len(sample["jpg"]) == size
    assert peak < (1.1 if seekable else 1.6) * size  # was three copies


def fake_samples(sizes):
    return [{"__key__": str(i), "jpg": bytearray(n)} for i, n in enumerate(sizes)]


def test_the_shuffle_buffer_holds_at_most_its_byte_budget():
    rng = random.Random(0)
    sizes = [rng.choice([1000, 30_000, 400_000]) for _ in range(3000)]
    samples, budget = fake_samples(sizes), 2 * MB
    pulled = [0]

    def source():
        for s in samples:
            pulled[0] += len(s["jpg"])
            yield s
    emitted, out_bytes, worst = [], 0, 0
    for s in shuffled(source(), 2048, random.Random(1), budget):
        emitted.append(s["__key__"])
        worst = max(worst, pulled[0] - out_bytes)  # held: the buffer and the sample just handed out
        out_bytes += len(s["jpg"])
    assert sorted(emitted, key=int) == [s["__key__"] for s in samples]  # each exactly once
    assert budget < worst <= budget + max(sizes)  # the buffer, plus the sample that just arrived
    assert emitted != sorted(emitted, key=int)  # shuffled all the same
    # a budget that never binds leaves the count-only order unchanged (and it is deterministic)
    plain = [s["__key__"] for s in shuffled(iter(samples), 64, random.Random(1))]
    roomy = [s["__key__"] for s in shuffled(iter(samples), 64, random.Random(1), 10 ** 12)]
    assert plain == roomy
    again = [s["__key__"] for s in shuffled(iter(samples), 2048, random.Random(1), budget)]
    assert again == emitted


@pytest.mark.parametrize("workers,k", [(0, 4), (2, 5)])
def test_mid_epoch_resume_is_exact_when_the_byte_budget_binds(demo_shards, tmp_path, workers, k):
    split = load_info(str(demo_shards)).split("train")

    def make(budget):
        return create_loader(split, train=True, batch_size=B, img_size=SIZE, num_workers=workers, seed=5,
                             shuffle_buffer=64, shuffle_bytes=budget)

    def epoch(loader, start=None):
        loader.set_epoch(2, start)
        return [(x.clone(), y.clone()) for x, y in loader]
    budget = 12_000  # a few of the demo's JPEGs: the budget, not the count of 64, limits the buffer
    full = epoch(make(budget))
    unbounded = epoch(make(None))
    assert [y.tolist() for _, y in full] != [y.tolist() for _, y in unbounded]  # the budget changed the order
    first = make(budget)
    first.set_epoch(2)
    it = iter(first)
    for _ in range(k):
        next(it)
    progress = first.progress(k)
    del it
    rest = epoch(make(budget), progress)
    assert len(rest) == len(full) - k
    for (a, la), (b, lb) in zip(full[k:], rest):
        assert torch.equal(a, b) and torch.equal(la, lb)


def png_header(width, height, bits, colour):
    """A PNG that has only its IHDR: what a decoder reads before it allocates the pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_a_16_bit_png_under_the_pixel_limit_is_refused_by_its_decoded_size():
    side = 9000  # 81 MP: under the pixel limit, but 486 MB as 16-bit RGB
    assert side * side < MAX_PIXELS
    with pytest.raises(DecodeError, match="486,000,000 bytes to decode"):
        EvalTransform(SIZE)(png_header(side, side, 16, 2), torch.empty(SIZE, SIZE, 3, dtype=torch.uint8))
    with pytest.raises(DecodeError, match="bytes to decode"):  # RGBA counts its alpha channel
        check_decoded_bytes(7000, 7000, 4, 2)
    check_decoded_bytes(side, side, 3, 1)  # 8-bit RGB at the same size: decoded as before
    check_decoded_bytes(9459, 9459, 4, 1)  # 8-bit RGBA up to the pixel limit
    assert MAX_DECODED_BYTES == MAX_PIXELS * 4


@pytest.mark.parametrize("mode,shape", [("gray", (40, 50)), ("rgb", (40, 50, 3))])
def test_16_bit_images_keep_their_high_byte(mode, shape):
    values = np.random.default_rng(0).integers(0, 65536, size=shape, dtype=np.uint16)
    buf = io.BytesIO()
    if mode == "gray":
        Image.fromarray(values).save(buf, "PNG")
        expect = np.repeat((values >> 8)[None], 3, axis=0)
    else:  # PIL writes no 16-bit RGB: a minimal encoder (filter 0 rows, big-endian samples)
        rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
        body = struct.pack(">IIBBBBB", shape[1], shape[0], 16, 2, 0, 0, 0)
        chunks = [(b"IHDR", body), (b"IDAT", zlib.compress(rows)), (b"IEND", b"")]
        buf.write(b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(d)) + t + d + struct.pack(
            ">I", zlib.crc32(t + d)) for t, d in chunks))
        expect = (values >> 8).transpose(2, 0, 1)
    img = _decode_tv(bytearray(buf.getvalue()))
    assert img.dtype == torch.uint8 and np.array_equal(img.numpy(), expect)


def test_byte_sizes_parse_as_the_flags_take_them():
    assert byte_size("64M") == 64 * MB and byte_size("1.5g") == 3 << 29 and byte_size("4096") == 4096
    assert byte_size("256MiB") == 256 * MB
    for bad in ("0", "-5", "lots", "nan", ""):
        with pytest.raises(ValueError):
            byte_size(bad)


def test_a_small_dev_shm_is_refused_in_one_line_before_set_up(demo_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loader_module, "shm_free", lambda path=None: 2 * MB)  # a container's /dev/shm
    code = train_stream.main(["--data_path", str(demo_shards), "--model", "resnet10t", "--img-size", "64",
                              "-b", "32", "-j", "1", "--epochs", "1", *run_folder(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert re.search(r"/dev/shm has 2\.0 MB free .* need \d+\.\d MB: .*--shm-size", lines[0]), lines[0]


def test_a_loader_checks_dev_shm_before_its_workers_start(demo_shards, monkeypatch):
    split = load_info(str(demo_shards)).split("train")
    loader = create_loader(split, train=True, batch_size=B, img_size=SIZE, num_workers=2)
    need = loader.shared_memory_need()
    assert need == 2 * (4 + 2) * B * (SIZE * SIZE * 3 + 8)  # workers x (prefetch + 2) batches
    monkeypatch.setattr(loader_module, "shm_free", lambda path=None: need - 1)
    loader.set_epoch(0)
    with pytest.raises(SharedMemoryError, match="fewer loader workers, smaller batches"):
        next(iter(loader))
    monkeypatch.setattr(loader_module, "shm_free", lambda path=None: need)
    assert len(next(iter(loader))[1]) == B


def ours(pids):
    """Entries of /dev/shm that name one of these processes (torch_PID_*, pym-PID-*)."""
    names = os.listdir("/dev/shm")
    return sorted(n for n in names if any(re.search(rf"(^|\D){p}(\D|$)", n) for p in pids))


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_a_full_dev_shm_is_one_line_and_leaves_no_file(tmp_path):
    st = os.statvfs("/dev/shm")
    if not st.f_blocks:
        pytest.skip("/dev/shm has no size limit")
    too_big = st.f_blocks * st.f_frsize + (1 << 30)  # over the whole tmpfs: refused at once, nothing written
    with pytest.raises(SharedMemoryError, match="/dev/shm is full"):
        empty((too_big,), torch.uint8, shared=True)
    assert ours([os.getpid()]) == []  # torch leaves its sparse file of too_big bytes behind


def group_pids(pgid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_kill_9_of_a_run_leaves_nothing_in_dev_shm(demo_shards, tmp_path):
    """SIGKILL to the trainer and its loader workers mid-epoch: no segment or file of theirs stays in
    /dev/shm, and the next run starts and finishes."""
    args = [sys.executable, os.path.join(ROOT, "train_stream.py"), "--data_path", str(demo_shards),
            "--model", "resnet10t", "--img-size", "32", "-b", "8", "-j", "2", "--log-interval", "1",
            "--epochs", "3", "--shuffle-buffer", "16"]
    proc = subprocess.Popen([*args, *run_folder(tmp_path / "killed")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=child_env(), cwd=ROOT, start_new_session=True)
    seen, pids = [], set()
    guard = threading.Timer(240, os.killpg, (proc.pid, signal.SIGKILL))  # a hang ends the output, and the test
    guard.start()
    try:
        for line in proc.stdout:  # wait for a few training steps: workers up, batches in shared memory
            seen.append(line)
            pids |= set(group_pids(proc.pid))
            if re.search(r"epoch 0 step ([3-9]|\d\d+)/", line):
                break
        pids |= set(group_pids(proc.pid))
        assert re.search(r"epoch 0 step", seen[-1]) and len(pids) >= 3, "".join(seen[-20:])  # trainer + 2 workers
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        guard.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.5)
    assert ours(pids) == []
    again = subprocess.run([*args, "--epochs", "1", *run_folder(tmp_path / "next")], capture_output=True, text=True,
                           env=child_env(), cwd=ROOT, timeout=300, start_new_session=True)
    assert again.returncode == 0, again.stderr[-2000:]
