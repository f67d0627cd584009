#!/usr/bin/env python3
"""Fault drills: serve a shard folder over HTTP from a server that can stall, trickle or fail on
demand, or put a proxy with the same faults in front of any TCP server (an S3 endpoint).

    python tools/chaos.py serve DIR [--port 8000] [--stall-after SECONDS] [--fail-first N]
                                    [--trickle BYTES/SECONDS]
    python tools/chaos.py proxy HOST:PORT [--port 9000] [--stall-after SECONDS] [--trickle BYTES/SECONDS]

Then train from it: `train_stream.py --data_path http://127.0.0.1:8000/ --io-timeout 10`, or
with AWS_ENDPOINT_URL_S3=http://127.0.0.1:9000 and `--data_path s3://bucket/prefix/`.
`--stall-after S` stops sending data S seconds after the start (the connection stays open, as
with a hung server), which the reader must notice within --io-timeout and retry; `--fail-first
N` answers the first N requests with 503; `--trickle 512/4` sends 512 bytes every 4 seconds
(alive, but far below --io-min-rate). tests/test_faults.py and tests/test_cloud.py drive
`ShardServer` and `ChaosProxy` directly.
"""
from __future__ import annotations

import argparse
import http.server
import os
import socket
import sys
import threading
import time
from functools import partial

CHUNK = 16 << 10


class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, chaos=None, **kwargs):
        self.chaos = chaos
        super().__init__(*args, **kwargs)

    def log_message(self, *args):
        pass

    def do_GET(self):
        chaos = self.chaos
        chaos.requests += 1
        if chaos.take_failure():
            self.send_error(503, "chaos: failing on purpose")
            return
        chaos.wait_while_paused()
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404, "not found")
            return
        with open(path, "rb") as f:
            data = f.read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        step = chaos.trickle[0] if chaos.trickle else CHUNK
        for i in range(0, len(data), step):  # a pause stalls a transfer half-way, connection open
            if not chaos.wait_while_paused():
                return
            self.wfile.write(data[i:i + step])
            if chaos.trickle:
                self.wfile.flush()
                time.sleep(chaos.trickle[1])


class ShardServer:
    """A threaded HTTP server for a folder; pause() makes every transfer stall (new and in
    flight) until resume(); fail_next(n) answers the next n requests with 503."""

    def __init__(self, root: str, port: int = 0, host: str = "127.0.0.1"):
        self.requests, self._failures, self._lock = 0, 0, threading.Lock()
        self.trickle = None  # (bytes, seconds): send this little, then wait, for every transfer
        self._running = threading.Event()
        self._running.set()
        self._closing = False
        handler = partial(_Handler, directory=str(root), chaos=self)
        self.server = http.server.ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._closing = True
        self._running.set()
        self.server.shutdown()
        self.server.server_close()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def fail_next(self, n: int) -> None:
        with self._lock:
            self._failures = n

    def take_failure(self) -> bool:
        with self._lock:
            if self._failures > 0:
                self._failures -= 1
                return True
            return False

    def wait_while_paused(self) -> bool:
        """False once the server is closing (the handler then gives up)."""
        self._running.wait()
        return not self._closing


class ChaosProxy:
    """A TCP proxy to HOST:PORT whose replies can be stalled (`mode = "stall"`: requests pass,
    no byte comes back, connections stay open), trickled (`"trickle"`, `trickle` = (bytes,
    seconds)) or refused (`"reset"`: connections, new and open, are closed at the next byte).
    `connections` and `request_bytes` count what clients sent: a read served from a cache sends
    nothing."""

    def __init__(self, target: tuple[str, int], port: int = 0, host: str = "127.0.0.1"):
        self.target, self.mode, self.trickle = target, "pass", (512, 4.0)
        self.connections, self.request_bytes = 0, 0
        self.sock = socket.create_server((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._closing = True
        self.sock.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.mode == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src, dst, reply: bool) -> None:
        try:
            while not self._closing:
                if reply and self.mode == "stall":
                    time.sleep(0.05)
                    continue
                trickling = reply and self.mode == "trickle"
                data = src.recv(self.trickle[0] if trickling else CHUNK)
                if not reply:
                    self.request_bytes += len(data)
                if not data or self.mode == "reset":
                    break
                dst.sendall(data)
                if trickling:
                    time.sleep(self.trickle[1])
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def _trickle(text: str) -> tuple[int, float]:
    nbytes, _, seconds = text.partition("/")
    return int(nbytes), float(seconds or 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve DIR over HTTP with injected faults")
    s.add_argument("dir")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--stall-after", type=float, default=None, metavar="SECONDS")
    s.add_argument("--fail-first", type=int, default=0, metavar="N")
    s.add_argument("--trickle", type=_trickle, default=None, metavar="BYTES/SECONDS")
    x = sub.add_parser("proxy", help="a TCP proxy to HOST:PORT (an S3 endpoint) with injected faults")
    x.add_argument("target", metavar="HOST:PORT")
    x.add_argument("--port", type=int, default=9000)
    x.add_argument("--stall-after", type=float, default=None, metavar="SECONDS")
    x.add_argument("--trickle", type=_trickle, default=None, metavar="BYTES/SECONDS")
    args = p.parse_args(argv)
    if args.cmd == "proxy":
        host, _, port = args.target.rpartition(":")
        with ChaosProxy((host, int(port)), args.port) as proxy:
            if args.trickle:
                proxy.mode, proxy.trickle = "trickle", args.trickle
            print(f"chaos: proxy {proxy.url} -> {args.target}", flush=True)
            try:
                if args.stall_after is not None:
                    time.sleep(args.stall_after)
                    proxy.mode = "stall"
                    print("chaos: stalled (Ctrl-C to stop)", flush=True)
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 0
    with ShardServer(args.dir, args.port) as server:
        server.fail_next(args.fail_first)
        server.trickle = args.trickle
        print(f"chaos: serving {args.dir} at {server.url}", flush=True)
        try:
            if args.stall_after is not None:
                time.sleep(args.stall_after)
                server.pause()
                print("chaos: stalled (Ctrl-C to stop)", flush=True)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
