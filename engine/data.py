"""This rank's data: the train and validation loaders and the feeders that take them to the device."""
from __future__ import annotations

import os
from dataclasses import dataclass

from common.errors import ConfigError, DataError
from common.host import default_workers
from pipeline.info import check_local_shards, load_info
from pipeline.loader import BatchLoader, create_loader
from pipeline.prefetch import IMAGENET_MEAN, IMAGENET_STD, DevicePrefetcher, Normalize
from pipeline.remote import RemoteOptions
from pipeline.synthetic import SyntheticBatches

from .config import DEMO, build_parser
from .dist import Dist


@dataclass
class Data:
    train: BatchLoader
    val: BatchLoader | None
    num_classes: int
    feed: DevicePrefetcher  # train batches -> normalised device tensors
    val_feed: DevicePrefetcher
    identity: dict | None = None  # the data set's name, fingerprint and size (checkpoints record it)
    val_samples: int = 0  # validation images _info.json lists: fewer seen = an incomplete validation


def prepare_demo(args, d: Dist) -> None:
    """No --data_path: make the demo ImageFolder + shards once (local rank 0), then use them."""
    shards = os.path.join(args.demo_dir, "demo-wds")
    defaults = build_parser()
    for key, value in DEMO.items():  # only what the user left at its default
        if getattr(args, key) == defaults.get_default(key):
            setattr(args, key, value)
    if d.local_rank == 0 and not os.path.isfile(os.path.join(shards, "_info.json")):
        from dataprep import make_shards
        from dataprep.demo import make_demo_data
        d.say(f"demo: writing a 10-class demo dataset to {args.demo_dir} (once)")
        make_demo_data(os.path.join(args.demo_dir, "demo"), num_classes=10, seed=0)
        make_shards(os.path.join(args.demo_dir, "demo"), shards, max_count=100, progress=False)
    d.barrier()
    args.data_path = shards
    d.say(f"demo: {args.img_size} px, batch {args.batch_size}, {args.epochs} epochs, LR {args.lr} "
          f"(pass --data_path for real data)")


def make_data(args, d: Dist) -> Data:
    dev = d.device
    if args.decode == "gpu" and dev.type != "cuda":
        raise ConfigError(f"--decode gpu needs a CUDA device (nvJPEG); this run is on {dev.type}")
    if args.data_path is None and not args.synthetic:
        prepare_demo(args, d)
    normalize = Normalize(dev.torch, IMAGENET_MEAN, IMAGENET_STD, channels_last=args.channels_last)
    feed = val_feed = DevicePrefetcher(dev, normalize)
    if args.decode == "gpu":
        from pipeline.gpu_decode import make_to_device
        feed = DevicePrefetcher(dev, normalize, make_to_device(args.train_interpolation))
        val_feed = DevicePrefetcher(dev, normalize, make_to_device(args.interpolation))

    remote = RemoteOptions(timeout=args.io_timeout, retries=args.io_retries)
    info = load_info(args.data_path, remote) if args.data_path else None
    num_classes = info.num_classes if info else 1000
    if args.synthetic:
        steps = args.perf_steps + args.perf_warmup if args.performance else 100
        train = SyntheticBatches(dev.torch, batch_size=args.batch_size, img_size=args.img_size,
                                 num_classes=num_classes, steps=steps, seed=args.seed)
        return Data(train, None, num_classes, feed, val_feed)
    if num_classes < 1:
        raise DataError(f"{args.data_path}: _info.json has no class list or num_classes")
    split = info.split("train")
    check_local_shards(split)
    workers = args.workers if args.workers is not None else default_workers(d.local_world)
    common = dict(batch_size=args.batch_size, img_size=args.img_size, num_workers=workers,
                  seed=args.seed, world_size=d.world, rank=d.rank, decoder=args.decode,
                  crop_pct=args.crop_pct, pin_memory=dev.pin_memory(),
                  prefetch_factor=args.prefetch_factor, persistent=args.use_multi_epochs_loader,
                  reuse_buffers=True,  # DevicePrefetcher copies each batch before the next
                  num_classes=num_classes, remote=remote)
    train = create_loader(split, train=True, shuffle_buffer=args.shuffle_buffer,
                          train_interpolation=args.train_interpolation, **common)
    if len(train) < 1:
        raise DataError(f"{split.num_samples} training samples are fewer than one global batch "
                        f"({args.batch_size} x {d.world} processes); lower -b")
    val, val_samples = None, 0
    has_val = any(name in info.splits for name in ("validation", "val", "valid"))
    if has_val and not (args.no_val or args.performance):
        vsplit = info.split("validation")
        check_local_shards(vsplit)
        val = create_loader(vsplit, train=False, eval_interpolation=args.interpolation, **common)
        val_samples = vsplit.num_samples
    d.say(f"data: {args.data_path}: {split.num_samples:,} train samples, {num_classes} classes, "
          f"{len(train)} steps/epoch/rank, {workers} workers/rank, decode {args.decode}")
    return Data(train, val, num_classes, feed, val_feed, info.identity(), val_samples)
