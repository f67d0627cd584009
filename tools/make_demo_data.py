#!/usr/bin/env python3
"""Write a small, learnable ImageFolder of real JPEG files (no download needed).

    python tools/make_demo_data.py .demo/imagenet --classes 10 --train-per-class 100 --val-per-class 20
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from dataprep.cli import make_demo_data_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
