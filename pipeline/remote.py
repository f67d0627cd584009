"""Remote shards: `http(s)://`, `pipe:` and object stores, read with a connect and a stall timeout
and a minimum rate.

webdataset's `gopen` runs curl with a connect timeout but no stall limit and the DataLoader
waits forever by default, so a server that stops sending hung training without a word. Here
http is read with the standard library (urllib), whose socket timeout bounds both the connect
and every read, a `pipe:` command runs under a reader that waits at most `timeout` seconds
for its next bytes, and object stores (s3://, gs://, any installed fsspec scheme) are read by
pipeline/objstore.py under the same rules. A stall alone would let a server that trickles a few
bytes every few seconds hold a shard for hours, so the time spent waiting for data is also
budgeted (`Budget`): at most `timeout` + bytes received / `min_rate`. Failures raise
`RemoteError`; the loader retries a shard with backoff (`RemoteOptions`) and then stops the run
with one line naming the shard.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass


class RemoteError(OSError):
    """A remote read failed in a way that may heal: connect, stall, dropped connection, exit status."""


class RemoteMissing(RemoteError):
    """The server or store says the file does not exist (HTTP 404, no such object)."""


MIN_RATE = 1 << 20  # 1 MiB/s: far below any working store or disk, far above a trickling server


@dataclass(frozen=True)
class RemoteOptions:
    timeout: float = 60.0  # seconds to connect, and at most between two pieces of data
    retries: int = 3  # further tries of a shard after a failure
    backoff: float = 2.0  # seconds before the first retry, doubled for each next one
    min_rate: float = MIN_RATE  # bytes/s: a read slower than this on average (after `timeout` s) fails
    cache_dir: str | None = None  # node-local shard cache (pipeline/cache.py); None: stream every read
    cache_limit: int = 0  # bytes the cache may hold

    def delays(self) -> list[float]:
        return [self.backoff * 2 ** k for k in range(self.retries)]

    def worst_case(self) -> float:
        """Seconds one shard may take to fail for good, stalls and waits included. A source far
        slower than min_rate (a trickle) fails after about `timeout` per try, as a stall does;
        one just under it may take up to `timeout` + shard size / min_rate per try (`Budget`)."""
        return (self.retries + 1) * 2 * self.timeout + sum(self.delays())


class Budget:
    """How long one read of a shard may wait for data: each wait at most `timeout` (a stall), and
    all waits together at most `timeout` + bytes received / `min_rate` (a trickle), so one try
    of a shard of S bytes waits at most 2 x `timeout` + S / `min_rate` in all. Time the
    consumer spends elsewhere (decoding, training) does not count, so a slow consumer never
    makes a healthy source look slow."""

    def __init__(self, timeout: float, min_rate: float = 0.0):
        self.timeout, self.min_rate = timeout, min_rate
        self.waited, self.got = 0.0, 0

    def allowed(self) -> float:
        """Seconds the next wait may take."""
        if not self.min_rate:
            return self.timeout
        return max(0.0, min(self.timeout, self.timeout + self.got / self.min_rate - self.waited))

    def spent(self, seconds: float, nbytes: int) -> None:
        self.waited += seconds
        self.got += nbytes
        if self.min_rate and self.waited >= self.timeout + self.got / self.min_rate:
            raise RemoteError(f"too slow: {self.got:,} bytes in {self.waited:.0f} s of waiting, below the minimum "
                              f"rate of {self.min_rate / 1024:g} KiB/s set for remote reads")


def open_remote(url: str, remote: RemoteOptions | float, counters=None):
    """A reader of a remote file; `remote`: RemoteOptions (or a plain timeout in seconds).
    `counters` (a loader worker's, or None) is told the bytes fetched."""
    if not isinstance(remote, RemoteOptions):
        remote = RemoteOptions(timeout=float(remote))
    if url.startswith("pipe:"):
        reader = PipeReader(url[len("pipe:"):], remote.timeout, remote.min_rate)
    elif url.startswith(("http://", "https://")):
        reader = HttpReader(url, remote.timeout, remote.min_rate)
    else:
        from .objstore import ObjectReader
        reader = ObjectReader(url, remote)
    reader.counters = counters
    return reader


class _Reader:
    size: int | None = None  # bytes the source says it will send (Content-Length, object size), if known
    counters = None
    budget: Budget

    def seekable(self) -> bool:
        return False

    def count_fetched(self) -> None:
        """Add the bytes read to the worker's FETCHED_BYTES counter, once."""
        if self.counters is not None:
            from .stream import Stat
            self.counters.add(Stat.FETCHED_BYTES, self.budget.got)
            self.counters = None

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HttpReader(_Reader):
    def __init__(self, url: str, timeout: float, min_rate: float = 0.0):
        self.timeout, self.budget = timeout, Budget(timeout, min_rate)
        request = urllib.request.Request(url, headers={"User-Agent": "stream-imagenet"})
        try:
            self.resp = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise (RemoteMissing if e.code == 404 else RemoteError)(f"HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise RemoteError(f"no connection within {timeout:g} s") from None
            raise RemoteError(f"cannot connect: {reason}") from None
        except (TimeoutError, socket.timeout):
            raise RemoteError(f"no response within {timeout:g} s") from None
        except OSError as e:
            raise RemoteError(f"cannot connect: {e}") from None
        self.size = self.resp.length

    def read(self, n: int) -> bytes:
        if not n:
            return b""
        t0 = time.monotonic()
        try:
            data = self.resp.read1(n)  # one receive at most: a trickle cannot hold a long read
        except (TimeoutError, socket.timeout):
            raise RemoteError(f"stalled: no data for {self.timeout:g} s") from None
        except OSError as e:
            raise RemoteError(f"connection lost: {e}") from None
        except Exception as e:  # http.client.IncompleteRead and friends
            raise RemoteError(f"connection lost: {type(e).__name__}") from None
        if not data and n and self.resp.length:  # closed before Content-Length bytes came
            raise RemoteError(f"connection closed with {self.resp.length} bytes still to come")
        self.budget.spent(time.monotonic() - t0, len(data))
        return data

    def close(self) -> None:
        self.count_fetched()
        self.resp.close()


class PipeReader(_Reader):
    """stdout of a shell command; each read waits at most `timeout` seconds for data."""

    def __init__(self, cmd: str, timeout: float, min_rate: float = 0.0):
        self.cmd, self.timeout, self.budget = cmd, timeout, Budget(timeout, min_rate)
        self.err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command never blocks on it
        self.proc = subprocess.Popen(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.err, start_new_session=True)
        self.fd = self.proc.stdout.fileno()

    def read(self, n: int) -> bytes:
        if not n:
            return b""
        t0 = time.monotonic()
        ready, _, _ = select.select([self.fd], [], [], self.budget.allowed())
        if not ready:
            waited = time.monotonic() - t0
            self.close()
            if waited >= self.timeout * 0.99:
                raise RemoteError(f"stalled: no data for {self.timeout:g} s from `{self.cmd}`")
            self.budget.spent(waited, 0)  # raises: the minimum rate is not met
        data = os.read(self.fd, n)
        try:
            self.budget.spent(time.monotonic() - t0, len(data))
        except RemoteError as e:
            self.close()
            raise RemoteError(f"{e} from `{self.cmd}`") from None
        if not data:
            status = self.proc.wait()
            if status != 0:
                raise RemoteError(f"`{self.cmd}` exited with status {status}{self._stderr_tail()}")
        return data

    def _stderr_tail(self) -> str:
        self.err.seek(0)
        lines = self.err.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
        return f": {lines[-1].strip()}" if lines else ""

    def close(self) -> None:
        self.count_fetched()
        if self.proc.poll() is None:  # stopped reading early or stalled: end the command
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.stdout.close()
        self.proc.wait()
        self.err.close()
