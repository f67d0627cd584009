"""Stage 3a: the tar format, read and written in this one module.

Reading: samples out of one shard with a minimal reader instead of webdataset's
`tar_file_expander` + `group_by_keys`, whose per-member tarfile objects cost several times more
per sample (BENCHMARKS.md). It groups members into samples the webdataset way (key = path up to
the first dot of the file name, extension lower-cased), reads USTAR, PAX and GNU long-name
headers, skips the first `skip` samples by seeking where the file allows it, and reports a
truncated or corrupt shard instead of dying. A member is read once into one buffer; a sample
over the byte limit is skipped unread. Remote shards (http, pipe:, object stores) are opened by
`pipeline.remote`, with timeouts, through the node-local cache (`pipeline.cache`) when one is set.

Writing: USTAR headers built by hand (tarfile's addfile costs several times more per sample,
BENCHMARKS.md); the bytes equal tarfile's for the same members (tests/test_make_shards.py).
"""
from __future__ import annotations

import math
import os

from common.errors import DataLoadingError

from .info import MIN_SAMPLE_BYTES, is_remote

BLOCK = 512


class ShardCorrupt(Exception):
    """The shard ends early or holds a damaged header; samples before the damage were kept."""


def open_shard(url: str, remote=60.0, counters=None):
    """A local shard file, or a remote one read under `remote` (RemoteOptions, or a connect and
    stall timeout in seconds: pipeline/remote.py), from the cache when it sets one. `counters`:
    a loader worker's, told the cache hits, misses and bytes fetched."""
    if is_remote(url):
        from .remote import RemoteOptions, open_remote
        if isinstance(remote, RemoteOptions) and remote.cache_dir and not url.startswith("pipe:"):
            from .cache import open_cached
            return open_cached(url, remote, counters)
        return open_remote(url, remote, counters)
    return open(url, "rb", buffering=0)


def check_claim(f, url: str, samples: int) -> None:
    """Stop with one line when _info.json has this shard hold more samples than its size can (a
    remote shard's size is known only once it is opened: Content-Length, the object's size)."""
    size = getattr(f, "size", None)
    if size is not None and samples > size // MIN_SAMPLE_BYTES:
        raise DataLoadingError(f"_info.json lists at least {samples:,} samples for {url}, but its {size:,} "
                               f"bytes hold at most {size // MIN_SAMPLE_BYTES:,}: the info file does not belong "
                               "to these shards")


MAX_MEMBER = 1 << 30  # no image is this large; a header claiming more is damage, not data
MAX_HEADER_DATA = 1 << 20  # PAX / GNU long-name records
_CHUNK = 1 << 24


# Memory per worker is bounded by the data's size, not trusted to it: a sample over
# MAX_SAMPLE_BYTES is skipped unread (an ImageNet JPEG is under 20 MB), and the shuffle buffer
# holds at most SHUFFLE_BYTES besides its sample count (2048 ImageNet samples, ~110 KB each,
# take ~220 MB, so on ImageNet the count binds first and the order is the count-only order).
MAX_SAMPLE_BYTES = 64 << 20
SHUFFLE_BYTES = 256 << 20
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def byte_size(text, minimum: int = 1) -> int:
    """'64M', '1.5G', '4096' (bytes; K/M/G/T are powers of 1024) -> bytes; ValueError otherwise."""
    t = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS else ""
    try:
        value = float(t[:len(t) - len(unit)])
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 64M, 1G, 4096)") from None
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{text!r}: a size must be at least {minimum} byte{'s' if minimum != 1 else ''}")
    return int(value * _UNITS[unit])


def _holds(f, n: int) -> bool:
    """Whether a local file still holds n bytes after its position."""
    try:
        return os.fstat(f.fileno()).st_size - f.tell() >= n
    except (AttributeError, OSError, ValueError):
        return False


def _read_exact(f, n: int) -> bytearray:
    """n bytes, read into one buffer: a member is held once, never copied."""
    if n > _CHUNK and not _holds(f, n):
        # a large claim the stream may not hold: grow the buffer as bytes arrive (CPython grows a
        # large bytearray with realloc, in place), so a lying header costs only what arrives
        buf = bytearray()
        while len(buf) < n:
            chunk = f.read(min(n - len(buf), _CHUNK))
            if not chunk:
                raise ShardCorrupt(f"ends inside a member ({len(buf)} of {n} bytes)")
            buf += chunk
        return buf
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise ShardCorrupt(f"ends inside a member ({got} of {n} bytes)")
        got += k
    return buf


def _read_upto(f, n: int) -> bytes:
    """Up to n bytes; fewer only at the end of the stream."""
    out = b""
    while len(out) < n:
        chunk = f.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _skip(f, n: int, seekable: bool) -> None:
    if seekable:
        f.seek(n, os.SEEK_CUR)
        return
    while n > 0:
        n -= len(_read_exact(f, min(n, 1 << 20)))


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for members over 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(field, 8) if field else 0
    except ValueError:
        raise ShardCorrupt("damaged tar header (a number field is not octal)") from None


def _pax_path(data: bytes) -> str | None:
    for record in bytes(data).split(b"\n"):
        _, _, kv = record.partition(b" ")
        key, _, value = kv.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
    return None


def members(f):
    """Yield (name, size, read) for every regular file; read() returns its bytes once.

    A member's data must be read (or is skipped) before the next member is produced.
    """
    seekable = getattr(f, "seekable", lambda: False)()
    long_name = None
    while True:
        hdr = _read_upto(f, BLOCK)
        if not hdr:
            return  # clean EOF without the end-of-archive blocks: nothing lost
        if len(hdr) < BLOCK:
            raise ShardCorrupt("ends inside a header")
        if hdr.count(0) == BLOCK:
            return  # end-of-archive marker
        if _octal(hdr[148:156]) != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise ShardCorrupt("damaged tar header")
        size = _octal(hdr[124:136])
        padded = size + (-size) % BLOCK
        kind = hdr[156:157]
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if hdr[257:262] == b"ustar" and hdr[345]:
            name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        if kind in (b"x", b"L"):  # PAX extended header / GNU long name for the next member
            if size > MAX_HEADER_DATA:
                raise ShardCorrupt(f"damaged tar header (a {size:,}-byte name record)")
            data = _read_exact(f, padded)[:size]
            long_name = _pax_path(data) if kind == b"x" else data.split(b"\0", 1)[0].decode()
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global headers
            _skip(f, padded, seekable)
            continue
        name, long_name = long_name or name, None
        state = {"done": False}

        def read(size=size, padded=padded, state=state):
            state["done"] = True
            if size > MAX_MEMBER:
                raise ShardCorrupt(f"damaged tar header (a member of {size:,} bytes)")
            data = _read_exact(f, size)
            if padded > size:
                _skip(f, padded - size, seekable)
            return data

        yield name, size, read
        if not state["done"]:
            _skip(f, padded, seekable)


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key ends at the first dot of the file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def iter_samples(f, skip: int = 0, take: int | None = None, max_bytes: int | None = None):
    """Yield samples {'__key__': key, ext: bytearray} number skip .. skip+take-1 of the shard.

    `max_bytes`: a sample whose members add up to more is yielded as {'__key__': key,
    '__oversize__': why}, its large member skipped unread (seeked over where the
    stream allows it), so a hostile member never enters memory. Raises ShardCorrupt after the
    last intact sample when the shard is damaged.
    """
    index, key, sample, held = -1, None, None, 0
    end = None if take is None else skip + take
    for name, size, read in members(f):
        k, ext = split_key(name)
        if k != key:
            if sample is not None:
                yield sample
            index, key, sample, held = index + 1, k, None, 0
            if end is not None and index >= end:
                return
            if index >= skip:
                sample = {"__key__": k}
        if sample is None or not ext or "__oversize__" in sample:
            continue
        held += size
        if max_bytes is not None and held > max_bytes:
            sample = {"__key__": k, "__oversize__": f"member {name} ({size:,} bytes) takes it over the "
                                                    f"limit of {max_bytes:,} bytes a sample"}
            continue
        sample[ext] = read()
    if sample is not None:
        yield sample


# ---------------------------------------------------------------- writing
_USTAR_TAIL = b"0" + bytes(100) + b"ustar\x0000" + bytes(64 + 183)  # type, link, magic, names, dev, prefix
_USTAR_TAIL_SUM = sum(_USTAR_TAIL) + 8 * 32  # the checksum field itself counts as 8 spaces
_USTAR_MODE_IDS = b"0000644\0" b"0000000\0" b"0000000\0"  # mode 644, uid 0, gid 0
_USTAR_MTIME = b"00000000000\0"
_END_OF_ARCHIVE = bytes(2 * BLOCK)
_RECORD = 20 * BLOCK  # tar pads archives to whole records, as tarfile and GNU tar do


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte header of a regular file: mode 644, uid/gid 0, mtime 0 (reproducible)."""
    head = name.encode("ascii").ljust(100, b"\0") + _USTAR_MODE_IDS + b"%011o\0" % size + _USTAR_MTIME
    return head + b"%06o\0 " % (sum(head) + _USTAR_TAIL_SUM) + _USTAR_TAIL


def tar_members(members) -> bytes:
    """Bytes of tar members [(name, data), ...] (no end-of-archive marker)."""
    parts = []
    for name, data in members:
        parts += (ustar_header(name, len(data)), data, bytes(-len(data) % BLOCK))
    return b"".join(parts)


def tar_end(offset: int) -> bytes:
    """End-of-archive blocks for an archive whose members end at offset."""
    return _END_OF_ARCHIVE + bytes(-(offset + len(_END_OF_ARCHIVE)) % _RECORD)
