"""What make_shards shows the user: progress (a bar on a terminal, plain lines in a log) and
capped lists."""
from __future__ import annotations

import sys
import time

LIST_LIMIT = 10  # lines shown on screen for skipped files and warnings
LINE_EVERY = 30.0  # seconds between plain progress lines (logs, CI, nohup)


class _NoBar:
    def __init__(self, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix_str(self, s, refresh=True):
        pass


class _Lines(_NoBar):
    """Progress as a plain line every LINE_EVERY seconds and one at the end: tqdm's
    carriage-return redraws would fill a log file with thousands of lines."""

    def __init__(self, total=None, initial=0, desc="", unit="it", **_):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.postfix, self.start = "", time.monotonic()
        self.last = self.start

    def update(self, n=1):
        self.n += n
        now = time.monotonic()
        if now - self.last >= LINE_EVERY:
            self.last = now
            self._print(now)

    def set_postfix_str(self, s, refresh=True):
        self.postfix = s

    def __exit__(self, *exc):
        if exc[0] is None:
            self._print(time.monotonic())
        return False

    def _print(self, now):
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"make_shards: {self.desc}: {self.n}{of} {self.unit}{pct}, {now - self.start:.0f} s{extra}",
              file=sys.stderr, flush=True)


def bar(progress, **kwargs):
    """A tqdm bar on a terminal, plain periodic lines otherwise, nothing when not `progress`."""
    if not progress:
        return _NoBar()
    if not sys.stderr.isatty():
        return _Lines(**kwargs)
    from tqdm import tqdm  # imported only when a bar is shown (its import is slow)
    return tqdm(dynamic_ncols=True, **kwargs)


def print_list(title, lines):
    print(f"make_shards: {title}", file=sys.stderr)
    for line in lines[:LIST_LIMIT]:
        print(f"  {line}", file=sys.stderr)
    if len(lines) > LIST_LIMIT:
        print(f"  ... and {len(lines) - LIST_LIMIT} more", file=sys.stderr)
