"""Object stores: `s3://`, `gs://` and any other scheme an installed fsspec implementation knows.

Read through fsspec (s3fs for S3, gcsfs for GCS: docs/cloud.md says why), never a hand-written
client. Credentials come from the library's usual sources (for S3: AWS_* variables,
~/.aws/credentials, the instance or pod role; for GCS: application-default credentials), never
from a flag, and no message prints them.

A store's own timeouts and retries differ per library and cannot bound a server that trickles,
so a helper thread reads the object in CHUNK-sized ranged reads into a small queue and the
consumer waits for each chunk under the same rules as http (pipeline/remote.py: `timeout`
per wait, `Budget` for the minimum rate). A reader that gave up leaves its thread to end at
the library's own timeout; it stops at its next chunk.
"""
from __future__ import annotations

import queue
import re
import threading
import time

from common.errors import DataError

from .remote import Budget, RemoteError, RemoteMissing, RemoteOptions, _Reader

CHUNK = 4 << 20  # one ranged GET: large enough for throughput, small enough to notice a stall
_SCHEME = re.compile(r"([a-z][a-z0-9+.-]*)://")
NOT_STORES = ("http", "https", "file", "local")  # http(s) has its own reader; file:// is a local path


def scheme(url: str) -> str | None:
    """The object-store scheme of a URL ('s3', 'gs', ...), or None."""
    m = _SCHEME.match(url)
    return m.group(1) if m and m.group(1) not in NOT_STORES else None


def _options(protocol: str, remote: RemoteOptions) -> dict:
    """Per-library timeouts where the library takes them (the thread bounds the rest)."""
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": remote.timeout, "read_timeout": remote.timeout}}
    return {}


def filesystem(url: str, remote: RemoteOptions):
    """(fsspec filesystem, path in it); DataError when no installed library handles the scheme."""
    protocol = scheme(url)
    try:
        import fsspec
    except ImportError:
        raise DataError(f"{protocol}:// needs fsspec: pip install -r requirements-cloud.txt") from None
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        raise DataError(f"{protocol}:// needs a package that is not installed ({str(e).splitlines()[0]}); "
                        "pip install -r requirements-cloud.txt") from None
    except ValueError:
        raise DataError(f"{protocol}:// is not a storage scheme that fsspec knows") from None
    try:
        return fsspec.core.url_to_fs(url, **_options(protocol, remote))
    except Exception as e:  # a library's own refusal of its settings
        raise DataError(f"{protocol}:// cannot be set up: {_reason(e)}") from None


def _reason(e: BaseException) -> str:
    """One short line about a library error, without a traceback."""
    if isinstance(e, FileNotFoundError):
        return "not found"
    if isinstance(e, PermissionError):
        return f"access denied ({_first_line(e)}): check the credentials (docs/cloud.md)"
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


class ObjectReader(_Reader):
    """A whole object, read front to back, with the stall and minimum-rate rules of http."""

    def __init__(self, url: str, remote: RemoteOptions):
        self.url, self.timeout = url, remote.timeout
        self.budget = Budget(remote.timeout, remote.min_rate)
        fs, path = filesystem(url, remote)
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.stop = threading.Event()
        self.rest, self.pos, self.done = b"", 0, False
        threading.Thread(target=self._pump, args=(fs, path), daemon=True, name="objstore-read").start()
        item = self._next(opening=True)
        if isinstance(item, BaseException):
            raise (RemoteMissing if isinstance(item, FileNotFoundError) else RemoteError)(_reason(item))
        self.size = item

    def _pump(self, fs, path) -> None:
        try:
            with fs.open(path, "rb", block_size=CHUNK, cache_type="none") as f:
                if not self._put(f.size):
                    return
                while not self.stop.is_set():
                    chunk = f.read(CHUNK)
                    if not self._put(chunk) or not chunk:
                        return
        except BaseException as e:  # handed to the consumer, which raises it as one line
            self._put(e)

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _next(self, opening: bool = False):
        t0 = time.monotonic()
        try:
            item = self.queue.get(timeout=self.timeout if opening else self.budget.allowed())
        except queue.Empty:
            waited = time.monotonic() - t0
            self.close()
            if opening:
                raise RemoteError(f"no response within {self.timeout:g} s") from None
            if waited >= self.timeout * 0.99:
                raise RemoteError(f"stalled: no data for {self.timeout:g} s") from None
            self.budget.spent(waited, 0)  # raises: below the minimum rate
            raise RemoteError(f"stalled: no data for {waited:.0f} s") from None
        if not opening and isinstance(item, bytes):
            try:
                self.budget.spent(time.monotonic() - t0, len(item))
            except RemoteError:
                self.close()
                raise
        return item

    def read(self, n: int) -> bytes:
        if not n or self.done:
            return b""
        if self.pos >= len(self.rest):
            item = self._next()
            if isinstance(item, BaseException):
                self.close()
                raise RemoteError(_reason(item))
            if not item:
                self.done = True
                if self.size is not None and self.budget.got != self.size:
                    raise RemoteError(f"ended after {self.budget.got:,} of {self.size:,} bytes")
                return b""
            self.rest, self.pos = item, 0
        data = self.rest[self.pos:self.pos + n]
        self.pos += len(data)
        return data

    def close(self) -> None:
        self.count_fetched()
        self.stop.set()
