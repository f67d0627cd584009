"""A node-local cache of remote shards, shared by every rank and loader worker of the node.

    DIR/shards/<key>      complete shards only (put there by rename, after a size check)
    DIR/tmp/<key>.part    a download in progress (its own name: it never looks complete)
    DIR/locks/<key>.lock  one lock file per shard (flock), holding the shard's size in bytes;
                          DIR/cache.lock guards space

Reading shard K takes a shared flock on K's lock file and holds it until the reader is closed,
so K is never evicted while read. A miss takes K's lock exclusively (so a node downloads K
once, however many processes want it), reserves the space under DIR/cache.lock by evicting the
least recently read shards whose locks it can take without waiting, downloads to the temporary,
checks its size against the store's (Content-Length, the object's size), records that size in
the lock file, fsyncs and renames it; every later read checks the file against the record.
A download killed half-way leaves only a `.part` file; whoever next holds K's lock, or the next
reservation, deletes it. Shards and temporaries together never exceed the limit: a shard that
does not fit (larger than the limit, or everything else in use) is read without caching.
The cache key is the URL: a store whose shards change under the same names needs a new
cache folder.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re

from .remote import RemoteError, RemoteOptions, open_remote

log = logging.getLogger("pipeline")

_COPY = 1 << 20


def parse_size(text) -> int:
    """'50G', '500M', '1.5T', '4096', '0' (bytes; K/M/G/T are powers of 1024) -> bytes."""
    from .shards import byte_size
    return byte_size(text, minimum=0)


def cache_key(url: str) -> str:
    """A file name for a URL: readable tail, hash of the whole URL (two stores never collide)."""
    tail = re.sub(r"[^A-Za-z0-9_.-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[-80:]
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{tail}"


def _count(counters, name: str, n: int = 1) -> None:
    if counters is not None:
        from .stream import Stat
        counters.add(Stat[name], n)


class _Flock:
    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def recorded_size(self) -> int | None:
        text = os.pread(self.fd, 32, 0).strip()
        return int(text) if text.isdigit() else None

    def record_size(self, size: int) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, b"%d\n" % size, 0)

    def lock(self, how: int) -> bool:
        try:
            fcntl.flock(self.fd, how)
            return True
        except BlockingIOError:
            return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # releases the lock
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CachedShard:
    """A complete cached shard, open for reading under a shared lock (released by close())."""

    def __init__(self, path: str, lock: _Flock):
        self.file, self.lock = open(path, "rb", buffering=0), lock
        self.size = os.fstat(self.file.fileno()).st_size

    def read(self, n: int = -1) -> bytes:
        return self.file.read(n)

    def readinto(self, b) -> int:
        return self.file.readinto(b)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.file.close()
        self.lock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ShardCache:
    def __init__(self, root: str, limit: int):
        self.root, self.limit = root, limit
        for sub in ("shards", "tmp", "locks"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)

    def _paths(self, url: str):
        key = cache_key(url)
        return (os.path.join(self.root, "shards", key), os.path.join(self.root, "tmp", key + ".part"),
                os.path.join(self.root, "locks", key + ".lock"))

    def space_lock(self) -> _Flock:
        space = _Flock(os.path.join(self.root, "cache.lock"))
        space.lock(fcntl.LOCK_EX)
        return space

    def start(self) -> int:
        """Delete what killed downloads left; the bytes in use (call once at the start of a run)."""
        with self.space_lock():
            self.clean()
            return self.usage()

    def usage(self) -> int:
        """Bytes of complete shards and temporaries."""
        total = 0
        for sub in ("shards", "tmp"):
            with os.scandir(os.path.join(self.root, sub)) as it:
                for entry in it:
                    try:
                        total += entry.stat().st_size
                    except FileNotFoundError:
                        pass
        return total

    def clean(self) -> int:
        """Delete the temporaries of downloads that nobody runs (killed ones); call under the space lock."""
        removed = 0
        tmp = os.path.join(self.root, "tmp")
        for name in os.listdir(tmp):
            key = name[:-len(".part")] if name.endswith(".part") else name
            with _Flock(os.path.join(self.root, "locks", key + ".lock")) as lock:
                if lock.lock(fcntl.LOCK_EX | fcntl.LOCK_NB):
                    try:
                        os.unlink(os.path.join(tmp, name))
                        removed += 1
                    except FileNotFoundError:
                        pass
        return removed

    def _reserve(self, size: int) -> bool:
        """Evict least recently read shards that nobody reads until `size` more bytes fit; call
        under the space lock."""
        if size > self.limit:
            return False
        self.clean()
        used = self.usage()
        if used + size <= self.limit:
            return True
        folder = os.path.join(self.root, "shards")
        entries = []
        for name in os.listdir(folder):
            try:
                st = os.stat(os.path.join(folder, name))
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime_ns, name, st.st_size))
        for _, name, nbytes in sorted(entries):
            with _Flock(os.path.join(self.root, "locks", name + ".lock")) as lock:
                if not lock.lock(fcntl.LOCK_EX | fcntl.LOCK_NB):
                    continue  # being read or filled
                try:
                    os.unlink(os.path.join(folder, name))
                    used -= nbytes
                except FileNotFoundError:
                    pass
            if used + size <= self.limit:
                return True
        return False

    def open(self, url: str, remote: RemoteOptions, counters=None):
        """The shard, from the cache (filled first on a miss), or streamed when it cannot fit."""
        path, tmp, lock_path = self._paths(url)
        while True:
            lock = _Flock(lock_path)
            try:
                lock.lock(fcntl.LOCK_SH)
                if _complete(path, lock):
                    os.utime(path)  # recency for LRU eviction
                    _count(counters, "CACHE_HITS")
                    return CachedShard(path, lock)
                lock.lock(fcntl.LOCK_UN)
                lock.lock(fcntl.LOCK_EX)  # another process may have filled it meanwhile: look again
                if _complete(path, lock):
                    lock.close()
                    continue
                src = self._fill(url, remote, counters, path, tmp, lock)
                if src is not None:  # could not be cached: read it straight from the source
                    lock.close()
                    return src
                with self.space_lock():  # no eviction between taking the shared lock and opening
                    lock.lock(fcntl.LOCK_SH)
                    return CachedShard(path, lock)
            except BaseException:
                lock.close()
                raise

    def _fill(self, url: str, remote: RemoteOptions, counters, path: str, tmp: str, lock: _Flock):
        """Download `url` into the cache (holding its lock exclusively); returns None when it is
        cached, or the open source when it cannot be."""
        _count(counters, "CACHE_MISSES")
        try:
            os.unlink(tmp)  # a killed download of this shard (we hold its lock)
        except FileNotFoundError:
            pass
        src = open_remote(url, remote, counters)
        try:
            fd = self._claim(tmp, src.size, url) if src.size is not None else None
        except BaseException:
            src.close()
            raise
        if fd is None:
            return src
        size = src.size
        try:
            with src, os.fdopen(fd, "wb") as out:
                got = 0
                while chunk := src.read(_COPY):
                    out.write(chunk)
                    got += len(chunk)
                if got != size:
                    raise RemoteError(f"sent {got:,} of the {size:,} bytes it announced")
                out.flush()
                os.fsync(out.fileno())
            lock.record_size(size)
            os.rename(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
        _fsync_dir(os.path.dirname(path))
        return None

    def _claim(self, tmp: str, size: int, url: str) -> int | None:
        """The temporary, created at full size (its space is claimed), or None when it cannot fit."""
        with self.space_lock():
            if not self._reserve(size):
                return None
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                if size:
                    os.posix_fallocate(fd, 0, size)
                return fd
            except OSError as e:  # the disk is fuller than the limit assumed
                os.close(fd)
                _remove(tmp)
                log.warning("cache %s: cannot reserve %d bytes (%s); reading %s uncached",
                            self.root, size, e.strerror, url)
                return None


def _complete(path: str, lock: _Flock) -> bool:
    """The shard is cached whole: its file has the size recorded when it was filled."""
    try:
        return os.stat(path).st_size == lock.recorded_size()
    except FileNotFoundError:
        return False


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_caches: dict = {}


def open_cached(url: str, remote: RemoteOptions, counters=None):
    """open_shard for a remote URL when RemoteOptions names a cache folder."""
    key = (os.getpid(), remote.cache_dir, remote.cache_limit)
    cache = _caches.get(key)
    if cache is None:
        cache = _caches[key] = ShardCache(remote.cache_dir, remote.cache_limit)
    return cache.open(url, remote, counters)
