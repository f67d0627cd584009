#!/usr/bin/env python3
"""Train a timm model (default resnet50.gluon_in1k = ResNet-50 v1b) on ImageNet streamed from tar shards, fast.

Runbook:
  python train_stream.py                                  # demo: makes demo data once, trains on it
  python tools/make_shards.py /data/imagenet             # ImageFolder -> /data/imagenet-wds
  torchrun --nproc_per_node=8 train_stream.py --data_path /data/imagenet-wds --output runs/r50
  torchrun --nproc_per_node=8 train_stream.py --data_path /data/imagenet-wds --performance
  python train_stream.py --device_id 0 --data_path /data/imagenet-wds --performance   # 1 device
  python train_stream.py --synthetic --performance        # compute only: no data loading
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      train_stream.py --data_path /data/imagenet-wds    # several nodes
  python train_stream.py --resume runs/r50/<run>/last.pth   # continue at the step it was written
  python train_stream.py --output runs/r50 --auto-resume      # or: the newest run under runs/r50
  python tools/make_shards.py /data/imagenet --out /data/in500-wds --resize-max 500 --jpeg-quality 90
  torchrun --nproc_per_node=8 train_stream.py --data_path /data/in500-wds -c configs/fast_16ep.yaml
                                                          # FFCV's 16-epoch ResNet-50 recipe (README "Recipes")

Flags keep the meaning they have in timm's train.py (the reference port): -b is the batch per
device, the LR scales with the global batch. `-c CONFIG.yaml` sets defaults for any flag.
With --performance the last stdout line is one JSON object (fps, fps_per_device, ...).
The code lives in engine/ (loop), pipeline/ (data), model/ (model, optimizer, precision).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from a clone, any cwd

from engine.cli import main  # noqa: E402
from engine.flags import parse_args  # noqa: E402,F401  (tests and tools use train_stream.parse_args)

if __name__ == "__main__":
    sys.exit(main())
