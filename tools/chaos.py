#!/usr/bin/env python3
"""Fault drills: serve a shard folder over HTTP from a server that can stall or fail on demand.

    python tools/chaos.py serve DIR [--port 8000] [--stall-after SECONDS] [--fail-first N]

Then train from it: `train_stream.py --data_path http://127.0.0.1:8000/ --io-timeout 10`.
`--stall-after S` stops sending data S seconds after the start (the connection stays open, as
with a hung server), which the reader must notice within --io-timeout and retry; `--fail-first
N` answers the first N requests with 503. tests/test_faults.py drives `ShardServer` directly
(pause(), resume(), fail_next()).
"""
from __future__ import annotations

import argparse
import http.server
import os
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
        for i in range(0, len(data), CHUNK):  # a pause stalls a transfer half-way, connection open
            if not chaos.wait_while_paused():
                return
            self.wfile.write(data[i:i + CHUNK])


class ShardServer:
    """A threaded HTTP server for a folder; pause() makes every transfer stall (new and in
    flight) until resume(); fail_next(n) answers the next n requests with 503."""

    def __init__(self, root: str, port: int = 0, host: str = "127.0.0.1"):
        self.requests, self._failures, self._lock = 0, 0, threading.Lock()
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve DIR over HTTP with injected faults")
    s.add_argument("dir")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--stall-after", type=float, default=None, metavar="SECONDS")
    s.add_argument("--fail-first", type=int, default=0, metavar="N")
    args = p.parse_args(argv)
    with ShardServer(args.dir, args.port) as server:
        server.fail_next(args.fail_first)
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
