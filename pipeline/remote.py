"""Remote shards: `http(s)://` and `pipe:` sources, read with a connect and a stall timeout.

webdataset's `gopen` runs curl with a connect timeout but no stall limit and the DataLoader
waits forever by default, so a server that stops sending hung training without a word. Here
http is read with the standard library (urllib), whose socket timeout bounds both the connect
and every read, and a `pipe:` command runs under a reader that waits at most `timeout` seconds
for its next bytes. Failures raise `RemoteError`; the loader retries a shard with backoff
(`RemoteOptions`) and then stops the run with one line naming the shard.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass


class RemoteError(OSError):
    """A remote read failed in a way that may heal: connect, stall, dropped connection, exit status."""


@dataclass(frozen=True)
class RemoteOptions:
    timeout: float = 60.0  # seconds to connect, and at most between two pieces of data
    retries: int = 3  # further tries of a shard after a failure
    backoff: float = 2.0  # seconds before the first retry, doubled for each next one

    def delays(self) -> list[float]:
        return [self.backoff * 2 ** k for k in range(self.retries)]

    def worst_case(self) -> float:
        """Seconds one shard may take to fail for good, stalls and waits included."""
        return (self.retries + 1) * 2 * self.timeout + sum(self.delays())


def open_remote(url: str, timeout: float):
    if url.startswith("pipe:"):
        return PipeReader(url[len("pipe:"):], timeout)
    return HttpReader(url, timeout)


class _Reader:
    def seekable(self) -> bool:
        return False

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HttpReader(_Reader):
    def __init__(self, url: str, timeout: float):
        self.timeout = timeout
        request = urllib.request.Request(url, headers={"User-Agent": "stream-imagenet"})
        try:
            self.resp = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise RemoteError(f"HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise RemoteError(f"no connection within {timeout:g} s") from None
            raise RemoteError(f"cannot connect: {reason}") from None
        except (TimeoutError, socket.timeout):
            raise RemoteError(f"no response within {timeout:g} s") from None
        except OSError as e:
            raise RemoteError(f"cannot connect: {e}") from None

    def read(self, n: int) -> bytes:
        try:
            data = self.resp.read(n)
        except (TimeoutError, socket.timeout):
            raise RemoteError(f"stalled: no data for {self.timeout:g} s") from None
        except OSError as e:
            raise RemoteError(f"connection lost: {e}") from None
        except Exception as e:  # http.client.IncompleteRead and friends
            raise RemoteError(f"connection lost: {type(e).__name__}") from None
        if not data and n and self.resp.length:  # closed before Content-Length bytes came
            raise RemoteError(f"connection closed with {self.resp.length} bytes still to come")
        return data

    def close(self) -> None:
        self.resp.close()


class PipeReader(_Reader):
    """stdout of a shell command; each read waits at most `timeout` seconds for data."""

    def __init__(self, cmd: str, timeout: float):
        self.cmd, self.timeout = cmd, timeout
        self.err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty command never blocks on it
        self.proc = subprocess.Popen(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.err, start_new_session=True)
        self.fd = self.proc.stdout.fileno()

    def read(self, n: int) -> bytes:
        if not n:
            return b""
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            self.close()
            raise RemoteError(f"stalled: no data for {self.timeout:g} s from `{self.cmd}`")
        data = os.read(self.fd, n)
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
        if self.proc.poll() is None:  # stopped reading early or stalled: end the command
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.stdout.close()
        self.proc.wait()
        self.err.close()
