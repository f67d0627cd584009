"""What make_shards shows the user: progress bars (only when asked) and capped lists."""
from __future__ import annotations

import sys

LIST_LIMIT = 10  # lines shown on screen for skipped files and warnings


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        pass

    def set_postfix_str(self, s, refresh=True):
        pass


def bar(progress, **kwargs):
    """A tqdm progress bar; tqdm is imported only when bars are shown (its import is slow)."""
    if not progress:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(dynamic_ncols=True, **kwargs)


def print_list(title, lines):
    print(f"make_shards: {title}", file=sys.stderr)
    for line in lines[:LIST_LIMIT]:
        print(f"  {line}", file=sys.stderr)
    if len(lines) > LIST_LIMIT:
        print(f"  ... and {len(lines) - LIST_LIMIT} more", file=sys.stderr)
