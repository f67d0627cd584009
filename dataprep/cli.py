"""Command lines of the data tools: `make_shards` and `make_demo_data` (tools/*.py call these)."""
from __future__ import annotations

import argparse
import os
import sys

from common.errors import ShardError

from . import imagenet
from .demo import make_demo_data
from .images import MAX_IMAGE_BYTES
from .outdir import INFO
from .verify import verify_shards
from .writer import make_shards

MAKE_SHARDS_DOC = """Turn an ImageFolder (SRC/train/<class>/*, SRC/val/<class>/*) or ImageNet's archives into
webdataset tar shards.

    python tools/make_shards.py /data/imagenet                  # -> /data/imagenet-wds
    python tools/make_shards.py /data/imagenet --out /fast/in1k --workers 16
    python tools/make_shards.py --train-tar ILSVRC2012_img_train.tar --val-tar ILSVRC2012_img_val.tar \\
        --devkit ILSVRC2012_devkit_t12.tar.gz --out /data/imagenet-wds   # the archives, never extracted
    python tools/make_shards.py --verify /data/imagenet-wds     # check an existing output

Output: <name>-train-000000.tar ..., <name>-validation-000000.tar ... and _info.json (timm's
schema), plus _skipped.tsv. Each sample is KEY.cls, KEY.jpg, KEY.json. Train samples are shuffled
with --seed; every shard of a split holds --max-count samples except the last. The same input and
settings give byte-identical output for any --workers. A killed run resumes where it stopped.
See docs/make_shards.md.
"""


def make_shards_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="make_shards.py", description=MAKE_SHARDS_DOC.split("\n\n")[0],
                                epilog="With --verify, a PATH holding _info.json is only checked; "
                                       "a source folder is built first, then its output is checked.")
    p.add_argument("src", metavar="SRC", nargs="?",
                   help="ImageFolder with train/ and/or val/, or a folder holding ImageNet's archives "
                        f"({imagenet.TRAIN_TAR}, {imagenet.VAL_TAR}, {imagenet.DEVKIT}); a shard folder with "
                        "--verify")
    g = p.add_argument_group("ImageNet as it ships (read in place, never extracted)")
    g.add_argument("--train-tar", metavar="TAR", help=f"{imagenet.TRAIN_TAR}: a tar of class tars")
    g.add_argument("--val-tar", metavar="TAR", help=f"{imagenet.VAL_TAR}: a tar of the validation images")
    g.add_argument("--val-dir", metavar="DIR",
                   help="validation images, flat (with --devkit or --val-labels) or in class folders")
    g.add_argument("--devkit", metavar="TGZ",
                   help=f"{imagenet.DEVKIT}: labels of a flat validation set (needs scipy)")
    g.add_argument("--val-labels", metavar="CSV",
                   help=f"Kaggle's {imagenet.LOC_CSV}: labels of a flat validation set")
    p.add_argument("--out", metavar="DIR", help="output folder (default: SRC-wds beside SRC)")
    p.add_argument("--max-count", type=int, default=1250, metavar="N", help="samples per shard (default: 1250)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="train shuffle seed (default: 0)")
    p.add_argument("--resize-max", type=int, default=None, metavar="PX",
                   help="re-encode images whose longer side exceeds PX, shrunk to PX (default: keep all; FFCV: 500)")
    p.add_argument("--jpeg-quality", type=int, default=95, metavar="Q",
                   help="JPEG quality of re-encoded (resized or transcoded) images (default: 95; FFCV: 90)")
    p.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, metavar="N",
                   help=f"skip (and name) image files larger than N bytes, unread (default: {MAX_IMAGE_BYTES})")
    p.add_argument("--name", help="shard name prefix (default: SRC folder name; imagenet when archives are read)")
    p.add_argument("--verify", action="store_true", help="check shards, counts and images against _info.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output made with other settings; write into a folder holding other files")
    p.add_argument("--quiet", action="store_true",
                   help="no progress (default: a bar on a terminal, a plain line every 30 s otherwise)")
    args = p.parse_args(argv)
    try:
        if args.verify and args.src and os.path.isfile(os.path.join(args.src, INFO)):
            target = args.src
        else:
            target = make_shards(args.src, args.out, args.max_count, args.workers, args.seed, args.resize_max,
                                 args.overwrite, args.name, progress=not args.quiet,
                                 jpeg_quality=args.jpeg_quality, train_tar=args.train_tar, val_tar=args.val_tar,
                                 val_dir=args.val_dir, devkit=args.devkit, val_labels=args.val_labels,
                                 max_image_bytes=args.max_image_bytes)["out"]
            if not args.verify:
                return 0
        return 0 if verify_shards(target, progress=not args.quiet)["ok"] else 1
    except ShardError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("make_shards: error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # environment trouble not caught where it happened
        where = f": {e.filename}" if e.filename else ""
        print(f"make_shards: error: {e.strerror or e}{where}", file=sys.stderr)
    return 1


def make_demo_data_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="make_demo_data.py",
                                description="Write a small, learnable ImageFolder of real JPEG files.")
    p.add_argument("root", help="output folder (gets train/ and val/)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default: 10)")
    p.add_argument("--train-per-class", type=int, default=100, help="train images per class (default: 100)")
    p.add_argument("--val-per-class", type=int, default=20, help="val images per class (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = p.parse_args(argv)
    if args.classes < 1 or args.train_per_class < 0 or args.val_per_class < 0:
        p.error("--classes must be at least 1 and the per-class counts 0 or more")
    counts = make_demo_data(args.root, args.classes, args.train_per_class, args.val_per_class, args.seed)
    print(f"make_demo_data: {counts['train']} train + {counts['val']} val images, "
          f"{len(counts['classes'])} classes -> {args.root}")
    return 0
