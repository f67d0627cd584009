"""This rank's data: the train and validation loaders and the feeders that take them to the device."""
from __future__ import annotations

import os
from dataclasses import dataclass

from common.errors import ConfigError, DataError
from pipeline.augment import (
    ColorJitter,
    DeviceAugment,
    ErasingOp,
    JitterOp,
    Mixup,
    MixupOp,
    RandomErasing,
    WorkerColorJitter,
)
from pipeline.autoaugment import create_augment, resolve_mean_std
from pipeline.info import check_local_shards, load_info
from pipeline.loader import BatchLoader, check_shared_memory, create_loader
from pipeline.prefetch import DevicePrefetcher, Normalize
from pipeline.remote import RemoteOptions
from pipeline.resolution import ResolutionSchedule
from pipeline.synthetic import SyntheticBatches

from .dist import Dist
from .resolved import Resolved, jitter_place, mixup_active
from .runtime import resolve_workers


@dataclass
class Data:
    train: BatchLoader
    val: BatchLoader | None
    num_classes: int
    feed: DevicePrefetcher  # train batches -> normalised (augmented) device tensors
    val_feed: DevicePrefetcher
    augment: DeviceAugment | None = None  # the feed's device-side augmentation (set_epoch each epoch)
    workers: int | None = None  # loader workers per process (None: synthetic data)
    identity: dict | None = None  # the data set's name, fingerprint and size (checkpoints record it)
    val_samples: int = 0  # validation images _info.json lists: fewer seen = an incomplete validation
    classes: tuple = ()  # class names in index order (_info.json), recorded in checkpoints
    jitter_in: str | None = None  # where colour jitter runs: "device", "workers" or None (off)


def prepare_demo(args, d: Dist) -> None:
    """No --data_path: make the demo ImageFolder + shards once (local rank 0) where the resolved
    data path says (the demo's settings were applied by engine.config.parse_config)."""
    shards = args.data_root
    if d.local_rank == 0 and not os.path.isfile(os.path.join(shards, "_info.json")):
        from dataprep import make_shards
        from dataprep.demo import make_demo_data
        d.say(f"demo: writing a 10-class demo dataset to {args.demo_dir} (once)")
        make_demo_data(os.path.join(args.demo_dir, "demo"), num_classes=10, seed=0)
        make_shards(os.path.join(args.demo_dir, "demo"), shards, max_count=100, progress=False)
    d.barrier()
    d.say(f"demo: {args.img_size} px, batch {args.batch_size}, {args.epochs} epochs, LR {args.lr} "
          f"per update (pass --data_path for real data)")


def resolve_num_classes(args, info) -> int:
    """The head's class count: --num-classes, checked against _info.json's class list."""
    known = info.num_classes if info else 0
    if args.num_classes is None:
        return known if known > 0 else 1000
    if known > 0 and args.num_classes != known:
        raise ConfigError(f"--num-classes {args.num_classes} does not match the {known} classes of "
                          f"{args.data_root}/_info.json (leave it out to use them)")
    return args.num_classes


def make_augment(args, d: Dist, num_classes: int, jitter: str | None) -> DeviceAugment | None:
    """The device-side ops, in timm's order: colour jitter (unless it runs in the workers) before
    normalisation, then mixup/cutmix and random erasing. A new device op: append it here."""
    ops = []
    if jitter == "device":
        ops.append(JitterOp(ColorJitter(*[args.color_jitter] * 3)))
    if mixup_active(args):
        ops.append(MixupOp(Mixup(args.mixup, args.cutmix, args.cutmix_minmax, args.mixup_prob, args.mixup_switch_prob,
                                 label_smoothing=args.smoothing, num_classes=num_classes), args.mixup_off_epoch))
    if args.reprob > 0:
        ops.append(ErasingOp(RandomErasing(args.reprob, args.remode, max_count=args.recount)))
    return DeviceAugment(d.device.torch, seed=args.seed, rank=d.rank, ops=ops) if ops else None


def has_validation(args, d: Dist, info) -> bool:
    """Whether the shards have a validation split; says so when they have none."""
    found = any(name in info.splits for name in ("validation", "val", "valid"))
    if not found and not (args.no_val or args.performance):
        d.say(f"warning: {args.data_root} has no validation split: no validation and no best.pth "
              "(make_shards writes one from SRC/val/)")
    if found and not info.split("validation").num_samples:  # 0 images validated is no result
        if not (args.no_val or args.performance):
            d.say(f"warning: {args.data_root}: the validation split lists 0 samples: no validation and no best.pth")
        return False
    return found


def remote_options(args, d: Dist) -> RemoteOptions:
    """How remote shards are read (timeouts, retries, minimum rate) and cached (docs/cloud.md)."""
    if args.cache_dir is not None:
        from pipeline.cache import ShardCache
        try:
            used = ShardCache(os.path.abspath(args.cache_dir), args.cache_limit).start()  # cleans killed downloads
        except OSError as e:
            raise ConfigError(f"--cache-dir {args.cache_dir}: {e.strerror or e}") from None
        d.say(f"cache: {args.cache_dir}: {used / 2 ** 30:.2f} of {args.cache_limit / 2 ** 30:.2f} GiB in use")
    return RemoteOptions(timeout=args.io_timeout, retries=args.io_retries, min_rate=args.io_min_rate,
                         cache_dir=os.path.abspath(args.cache_dir) if args.cache_dir else None,
                         cache_limit=args.cache_limit or 0)


def make_data(args: Resolved, d: Dist) -> Data:
    """This rank's loaders and feeders for a resolved configuration."""
    from .inference import with_model_eval_defaults
    args = with_model_eval_defaults(args)  # --crop-pct, --interpolation: the model's where not given
    dev = d.device
    if args.decode == "gpu" and dev.type != "cuda":
        raise ConfigError(f"--decode gpu needs a CUDA device (nvJPEG); this run is on {dev.type}")
    if args.demo:
        prepare_demo(args, d)
    elif args.image_folder:
        from .folder import prepare_folder
        prepare_folder(args, d)
    remote = remote_options(args, d)
    info = load_info(args.data_root, remote) if args.data_root else None
    if info is not None and not args.synthetic and info.num_classes < 1 and args.num_classes is None:
        raise DataError(f"{args.data_root}: _info.json has no class list or num_classes (or pass --num-classes)")
    num_classes = resolve_num_classes(args, info)
    mean, std = resolve_mean_std(args.mean, args.std)  # timm's --mean/--std (one value: every channel)
    normalize = Normalize(dev.torch, mean, std, channels_last=args.channels_last)
    jitter = jitter_place(args, dev.type)  # decided once per run: "device", "workers" or None
    augment = make_augment(args, d, num_classes, jitter)
    to_train = to_val = None
    if args.decode == "gpu" and args.loader == "ours":  # DALI's mixed decoder hands over device tensors
        from pipeline.gpu_decode import make_to_device
        to_train, to_val = make_to_device(), make_to_device()
    feed = DevicePrefetcher(dev, normalize, to_train, augment)
    val_feed = DevicePrefetcher(dev, normalize, to_val)
    resolution = ResolutionSchedule.from_args(args)  # the trainer sets each epoch's size
    if args.synthetic:
        steps = args.perf_steps + args.perf_warmup if args.performance else 100
        train = SyntheticBatches(dev.torch, batch_size=args.batch_size, img_size=resolution.min_res,
                                 num_classes=num_classes, steps=steps, seed=args.seed)
        return Data(train, None, num_classes, feed, val_feed, augment, jitter_in=jitter)
    split = info.split("train")
    check_local_shards(split)
    workers = resolve_workers(args.workers, d.local_world)
    make = _dali_maker(args, d, workers, num_classes) if args.loader == "dali" else \
        _our_maker(args, d, workers, num_classes, remote, resolution, jitter)
    train = make(split, True, args.batch_size)
    if len(train) < 1:
        raise DataError(f"{split.num_samples} training samples are fewer than one global batch "
                        f"({args.batch_size} x {d.world} processes); lower -b")
    val, val_samples = None, 0
    if has_validation(args, d, info) and not (args.no_val or args.performance):
        vsplit = info.split("validation")
        val = make(vsplit, False, args.validation_batch_size or args.batch_size)
        val_samples = vsplit.num_samples
    if args.loader == "dali":
        how = f"DALI ({train.settings()['decoder']}, {workers} threads, {train.py_workers} reader processes)/rank"
    else:
        how = f"{workers} workers/rank, decode {args.decode}"
    if args.loader == "ours":  # before set-up: the workers' batches must fit the node's /dev/shm
        check_shared_memory([train, val], d.local_world)
    d.say(f"data: {args.data_root}: {split.num_samples:,} train samples, {num_classes} classes, "
          f"{len(train)} steps/epoch/rank, {how}")
    if val is not None:
        d.say(f"validation: {_val_size(args)} px, centre crop {_val_crop(args):g}, "
              f"{args.interpolation}{', flip TTA' if args.val_tta == 'flip' else ''}")
    in_workers = f", colour jitter {args.color_jitter:g}" if jitter == "workers" else ""
    d.say(f"augmentation: crop {args.train_interpolation}{', ' + args.aa if args.aa else ''}{in_workers}"
          f"{'; on the device: ' + augment.describe() if augment else ''}")
    return Data(train, val, num_classes, feed, val_feed, augment, workers, info.identity(), val_samples,
                tuple(info.classes), jitter)


class Chain:
    """Worker augmentations applied in order (timm: the --aa policy, then colour jitter with 3a)."""

    def __init__(self, *ops):
        self.ops = ops

    def __call__(self, out, rng) -> None:
        for op in self.ops:
            op(out, rng)

    def __repr__(self) -> str:
        return " + ".join(map(repr, self.ops))


def worker_augment(args, jitter: str | None):
    """The per-image augmentation of the workers: the --aa policy (pipeline.autoaugment.create_augment,
    filling with the --mean colour), colour jitter, both (3a policies, as timm), or None."""
    ops = []
    if args.aa:
        ops.append(create_augment(args.aa, args.max_res or args.img_size, resolve_mean_std(args.mean, args.std)[0],
                                  args.train_interpolation))
    if jitter == "workers":
        ops.append(WorkerColorJitter(*[args.color_jitter] * 3))
    return None if not ops else ops[0] if len(ops) == 1 else Chain(*ops)


def _val_size(args) -> int:
    return args.val_res or args.img_size  # FFCV's validation.resolution


def _val_crop(args) -> float:
    return args.val_crop_pct or args.crop_pct


def _our_maker(args, d: Dist, workers: int, num_classes: int, remote, resolution: ResolutionSchedule,
               jitter: str | None):
    """make(split, train, batch_size) -> our StreamLoader (pipeline/loader.py); training starts at
    --min-res with buffers for the largest size, validation at --val-res."""
    common = dict(num_workers=workers, seed=args.seed, world_size=d.world,
                  rank=d.rank, decoder=args.decode, pin_memory=d.device.pin_memory(),
                  prefetch_factor=args.prefetch_factor, persistent=args.use_multi_epochs_loader,
                  reuse_buffers=True,  # DevicePrefetcher copies each batch before the next
                  num_classes=num_classes, remote=remote, max_sample_bytes=args.max_sample_bytes)

    def make(split, train: bool, batch_size: int):
        check_local_shards(split)
        if train:
            return create_loader(split, train=True, batch_size=batch_size, shuffle_buffer=args.shuffle_buffer,
                                 shuffle_bytes=args.shuffle_buffer_bytes,
                                 train_interpolation=args.train_interpolation,
                                 augment=worker_augment(args, jitter), img_size=resolution.min_res,
                                 scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip,
                                 largest_img_size=resolution.largest, crop_pct=args.crop_pct, **common)
        return create_loader(split, train=False, batch_size=batch_size, eval_interpolation=args.interpolation,
                             img_size=_val_size(args), crop_pct=_val_crop(args), **common)
    return make


def _dali_maker(args, d: Dist, workers: int, num_classes: int):
    """make(split, train, batch_size) -> a DaliLoader (pipeline/dali.py), fed from the same plan."""
    from pipeline.dali import DaliLoader, dali_missing
    missing = dali_missing()
    if missing:
        raise ConfigError(missing)
    common = dict(seed=args.seed, world_size=d.world, rank=d.rank, num_threads=workers,
                  decode=args.decode, num_classes=num_classes,
                  device_id=d.device.index if args.decode == "gpu" else None, pin_memory=d.device.pin_memory())

    def make(split, train: bool, batch_size: int):  # no progressive resizing (refused in engine.config)
        return DaliLoader(split, train=train, batch_size=batch_size,
                          interpolation=args.train_interpolation if train else args.interpolation,
                          img_size=args.img_size if train else _val_size(args),
                          crop_pct=args.crop_pct if train else _val_crop(args), **common)
    return make
