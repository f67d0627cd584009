#!/usr/bin/env python3
"""Turn an ImageFolder into webdataset tar shards + _info.json: see `--help` and docs/make_shards.md.

    python tools/make_shards.py /data/imagenet                  # -> /data/imagenet-wds
    python tools/make_shards.py --verify /data/imagenet-wds     # check an existing output
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from dataprep.cli import make_shards_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
