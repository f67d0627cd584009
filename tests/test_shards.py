"""The minimal tar reader: formats, grouping, skip/take, damage, and agreement with webdataset."""
import io
import tarfile

import pytest

from pipeline.shards import ShardCorrupt, iter_samples, split_key


def make_tar(path, samples, fmt=tarfile.USTAR_FORMAT, mtime=0):
    with tarfile.open(path, "w", format=fmt) as tf:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), mtime
                tf.addfile(info, io.BytesIO(data))
    return path


def sample_set(n=7, long=False):
    prefix = "d" * 120 + "/" if long else ""
    return [(f"{prefix}s{i:03d}", {"cls": str(i).encode(), "jpg": bytes([i]) * (i * 300 + 1),
                                   "json": b"{}"}) for i in range(n)]


class NoSeek(io.RawIOBase):
    """A stream that cannot seek, like a pipe or an HTTP body."""

    def __init__(self, data):
        self.buf = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, b):
        chunk = self.buf.read(min(len(b), 1000))  # short reads, as pipes give
        b[:len(chunk)] = chunk
        return len(chunk)


def as_dicts(samples):
    return [{k: bytes(v) if not k.startswith("__") else v for k, v in s.items()} for s in samples]


@pytest.mark.parametrize("fmt,mtime,long", [(tarfile.USTAR_FORMAT, 0, False),
                                            (tarfile.PAX_FORMAT, 1.5, True),
                                            (tarfile.GNU_FORMAT, 0, True)])
def test_reads_ustar_pax_and_gnu(tmp_path, fmt, mtime, long):
    samples = sample_set(long=long)
    path = make_tar(tmp_path / "a.tar", samples, fmt, mtime)
    with open(path, "rb", buffering=0) as f:
        got = as_dicts(iter_samples(f))
    assert [s["__key__"] for s in got] == [k for k, _ in samples]
    assert all(g["jpg"] == m["jpg"] and g["cls"] == m["cls"] for g, (_, m) in zip(got, samples))


@pytest.mark.parametrize("seekable", [True, False])
@pytest.mark.parametrize("skip,take", [(0, None), (2, 3), (6, 5), (7, 1), (0, 0)])
def test_skip_and_take(tmp_path, seekable, skip, take):
    samples = sample_set()
    data = make_tar(tmp_path / "a.tar", samples).read_bytes()
    f = io.BytesIO(data) if seekable else NoSeek(data)
    got = [s["__key__"] for s in iter_samples(f, skip, take)]
    end = len(samples) if take is None else min(len(samples), skip + take)
    assert got == [k for k, _ in samples[skip:end]]


def test_agrees_with_webdataset(tmp_path):
    from webdataset.tariterators import group_by_keys, tar_file_expander
    samples = sample_set(5) + [("dir.with.dots/img.v2", {"JPG": b"x", "cls": b"1"})]
    path = make_tar(tmp_path / "a.tar", samples, tarfile.PAX_FORMAT, 3)
    with open(path, "rb") as f:
        ref = list(group_by_keys(tar_file_expander([{"stream": f, "url": str(path)}])))
    with open(path, "rb", buffering=0) as f:
        ours = as_dicts(iter_samples(f))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in ref]
    for a, b in zip(ours, ref):
        assert {k: v for k, v in a.items() if k != "__key__"} == \
               {k: v for k, v in b.items() if not k.startswith("__")}


def test_truncated_shard_keeps_samples_before_the_damage(tmp_path):
    data = make_tar(tmp_path / "a.tar", sample_set()).read_bytes()
    cut = data[: len(data) // 2]
    got = []
    with pytest.raises(ShardCorrupt):
        for s in iter_samples(NoSeek(cut)):
            got.append(s["__key__"])
    assert 1 <= len(got) < 7 and got == [f"s{i:03d}" for i in range(len(got))]


def test_damaged_header_is_reported(tmp_path):
    data = bytearray(make_tar(tmp_path / "a.tar", sample_set(3)).read_bytes())
    second = 512 + 512  # the header after the first (small) member
    data[second + 10: second + 20] = b"garbage!!!"
    with pytest.raises(ShardCorrupt, match="header"):
        list(iter_samples(io.BytesIO(bytes(data))))


def test_split_key_follows_webdataset():
    assert split_key("a/b.c/x.tar.gz") == ("a/b.c/x", "tar.gz")
    assert split_key("n01440764_10026.JPEG") == ("n01440764_10026", "jpeg")
    assert split_key("noext") == ("noext", "")
