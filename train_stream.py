#!/usr/bin/env python3
"""Train a timm model (default gluon_resnet50_v1b) on ImageNet streamed from tar shards, fast.

Runbook:
  python train_stream.py                                  # demo: makes demo data once, trains on it
  python tools/make_shards.py /data/imagenet             # ImageFolder -> /data/imagenet-wds
  torchrun --nproc_per_node=8 train_stream.py --data_path /data/imagenet-wds --output runs/r50
  torchrun --nproc_per_node=8 train_stream.py --data_path /data/imagenet-wds --performance
  python train_stream.py --device_id 0 --data_path /data/imagenet-wds --performance   # 1 device
  python train_stream.py --synthetic --performance        # compute only: no data loading
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
      train_stream.py --data_path /data/imagenet-wds    # several nodes
  python train_stream.py --resume runs/r50/last.pth ... # continue at the next epoch

Flags keep the meaning they have in timm's train.py (the reference port): -b is the batch per
device, the LR scales with the global batch. `-c CONFIG.yaml` sets defaults for any flag.
With --performance the last stdout line is one JSON object (fps, fps_per_device, ...).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.checkpoint import CheckpointError, CheckpointSaver, resume
from model.device import Device, DeviceError, resolve_device
from model.factory import DEFAULT_MODEL, create_model
from model.optim import OptimizerError, create_optimizer
from model.precision import Precision, PrecisionError
from model.schedule import (DEFAULT_BASE_LR_PER_256, DEFAULT_COOLDOWN_EPOCHS, DEFAULT_DECAY_EPOCHS,
                            DEFAULT_DECAY_RATE, DEFAULT_MIN_LR, DEFAULT_WARMUP_EPOCHS,
                            DEFAULT_WARMUP_LR, LRSchedule, ScheduleConfig, scale_lr, total_epochs)
from pipeline.info import DataError, check_local_shards, load_info
from pipeline.loader import create_loader
from pipeline.prefetch import IMAGENET_MEAN, IMAGENET_STD, DevicePrefetcher, Normalize, SyntheticBatches
from pipeline.stream import STATS

HERE = os.path.dirname(os.path.abspath(__file__))
# The demo: the real model on a small learnable dataset at 64 px, so that the README's command
# ends in about 1.5 minutes on a 2-core CPU (92% validation top-1 there, chance is 10%).
DEMO = dict(img_size=64, batch_size=32, epochs=6, warmup_epochs=1, lr=0.2, log_interval=10)


class UsageError(Exception):
    """A wrong flag or a contradiction; the message is one line for the user."""


# ---------------------------------------------------------------------------------------------
# Command line


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not the whole usage text."""
        self.exit(2, f"train_stream: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default=None, help="YAML file of flag defaults")
    g = p.add_argument_group("data")
    g.add_argument("--data_path", "--data-path", dest="data_path", default=None,
                   help="shard folder with _info.json, an http(s):// root, or a 'pipe:...{}...' "
                        "command template; none: the built-in demo dataset")
    g.add_argument("-j", "--workers", type=int, default=None,
                   help="loader workers per process (default: cores per process - 1, at most 12)")
    g.add_argument("--img-size", type=int, default=224)
    g.add_argument("--crop-pct", type=float, default=0.875, help="eval centre-crop fraction")
    g.add_argument("--train-interpolation", default="bilinear", choices=("bilinear", "bicubic"))
    g.add_argument("--interpolation", default="bicubic", choices=("bilinear", "bicubic"),
                   help="eval resize interpolation")
    g.add_argument("--decode", default="cpu", choices=("cpu", "pil", "gpu"),
                   help="cpu: torchvision in workers; pil: PIL in workers; gpu: nvJPEG on the device")
    g.add_argument("--shuffle-buffer", type=int, default=2048, help="samples per worker")
    g.add_argument("--prefetch-factor", type=int, default=4, help="batches queued per worker")
    g.add_argument("--use-multi-epochs-loader", action=argparse.BooleanOptionalAction, default=True,
                   help="persistent loader workers across epochs")
    g.add_argument("--synthetic", action="store_true", help="device-resident random batches")
    g.add_argument("--demo-dir", default=os.path.join(HERE, ".demo"), help="where the demo data is cached")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="timm model name")
    g.add_argument("--zero-init-last", action=argparse.BooleanOptionalAction, default=True,
                   help="zero the last BN of each residual block")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (backend, default inductor)")
    g.add_argument("--compile-mode", default=None,
                   help="torch.compile mode, e.g. max-autotune-no-cudagraphs or reduce-overhead (CUDA graphs)")
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("-b", "--batch-size", type=int, default=256, help="batch per device")
    g.add_argument("--lr", type=float, default=None, help=f"default: {DEFAULT_BASE_LR_PER_256} x global batch / 256")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--sched", default="cosine", choices=("cosine", "step"))
    g.add_argument("--epochs", type=int, default=90)
    g.add_argument("--warmup-epochs", type=int, default=DEFAULT_WARMUP_EPOCHS)
    g.add_argument("--warmup-lr", type=float, default=DEFAULT_WARMUP_LR)
    g.add_argument("--min-lr", type=float, default=DEFAULT_MIN_LR)
    g.add_argument("--decay-epochs", type=float, default=DEFAULT_DECAY_EPOCHS,
                   help="step schedule period (timm's default; 30 gives the classic 90-epoch steps)")
    g.add_argument("--decay-rate", type=float, default=DEFAULT_DECAY_RATE)
    g.add_argument("--cooldown-epochs", type=int, default=DEFAULT_COOLDOWN_EPOCHS,
                   help="epochs at the minimum LR after the cosine")
    g = p.add_argument_group("device and precision")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "npu", "cpu"))
    g.add_argument("--device_id", "--device-id", dest="device_id", type=int, default=0,
                   help="device index for a single process (torchrun sets it from LOCAL_RANK)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by the launcher (torch.distributed.launch); torchrun uses LOCAL_RANK")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision (bfloat16 where supported, else float16 + GradScaler)")
    g.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16"))
    g.add_argument("--apex-amp", action="store_true", help="NVIDIA Apex AMP O2 + FusedSGD (needs Apex)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output", default=None, help="folder for metrics.jsonl, config.json, checkpoints")
    g.add_argument("--resume", default=None, help="checkpoint to continue from (next epoch)")
    g.add_argument("--log-interval", type=int, default=50, help="steps between log lines (host syncs)")
    g.add_argument("--no-val", action="store_true", help="skip validation after each epoch")
    g.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="end this run after EPOCHS epochs (continue later with --resume)")
    g.add_argument("--performance", action="store_true",
                   help="measure FPS: warm-up steps, then --perf-steps timed steps; print JSON")
    g.add_argument("--perf-steps", type=int, default=100)
    g.add_argument("--perf-warmup", type=int, default=20, help="untimed steps before measuring")
    for action in p._actions:  # every flag shows its default in --help
        if action.help is None:
            action.help = "(default: %(default)s)"
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**load_config(first.config, parser))
    args = parser.parse_args(argv)
    check_args(args)
    return args


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    import yaml
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"cannot read config {path}: {str(e).splitlines()[0]}")
    if not isinstance(values, dict):
        parser.error(f"config {path} must be a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"config {path}: unknown keys {', '.join(unknown)}")
    return values


def check_args(args) -> None:
    for name in ("batch_size", "epochs", "perf_steps", "log_interval", "img_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise UsageError("--workers must be 0 or more")
    if args.perf_warmup < 0 or args.warmup_epochs < 0 or args.cooldown_epochs < 0:
        raise UsageError("--perf-warmup, --warmup-epochs and --cooldown-epochs must be 0 or more")
    if args.apex_amp and args.amp_dtype == "bfloat16":
        raise UsageError("--apex-amp runs float16 (O2); it cannot be combined with --amp-dtype bfloat16")
    if args.synthetic and args.decode != "cpu":
        raise UsageError("--synthetic reads no data, so --decode does not apply")
    if not 0 < args.crop_pct <= 1:
        raise UsageError("--crop-pct must be in (0, 1]")


# ---------------------------------------------------------------------------------------------
# Set-up


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: Device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(args) -> Dist:
    """torchrun's environment (any number of nodes) or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank if args.local_rank is not None else 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    device = resolve_device(args.device, local_rank if world > 1 else args.device_id)
    device.set_current()
    if world > 1:
        kwargs = {"device_id": device.torch} if device.type == "cuda" else {}
        dist.init_process_group(device.dist_backend, **kwargs)
    return Dist(rank, world, local_rank, local_world, device)


def default_workers(d: Dist) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(12, cores // d.local_world - 1))


def prepare_demo(args, d: Dist) -> None:
    """No --data_path: make the demo ImageFolder + shards once (local rank 0), then use them."""
    shards = os.path.join(args.demo_dir, "demo-wds")
    defaults = build_parser()
    for key, value in DEMO.items():  # only what the user left at its default
        if getattr(args, key) == defaults.get_default(key):
            setattr(args, key, value)
    if d.local_rank == 0 and not os.path.isfile(os.path.join(shards, "_info.json")):
        from tools.make_demo_data import make_demo_data
        from tools.make_shards import make_shards
        say(d, f"demo: writing a 10-class demo dataset to {args.demo_dir} (once)")
        make_demo_data(os.path.join(args.demo_dir, "demo"), num_classes=10, seed=0)
        make_shards(os.path.join(args.demo_dir, "demo"), shards, max_count=100, progress=False)
    if d.world > 1:
        dist.barrier()
    args.data_path = shards
    say(d, f"demo: {args.img_size} px, batch {args.batch_size}, {args.epochs} epochs, LR {args.lr} "
           f"(pass --data_path for real data)")


def say(d: Dist, msg: str) -> None:
    if d.main:
        print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# Training


class Metrics:
    """metrics.jsonl in the output folder (rank 0), one JSON object per line; a new run starts
    it afresh, a resumed one appends."""

    def __init__(self, output: str | None, main: bool, append: bool):
        self.path = os.path.join(output, "metrics.jsonl") if output and main else None
        if self.path and not append and os.path.exists(self.path):
            os.remove(self.path)

    def write(self, **row) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def all_reduce(values: list[float], d: Dist, op=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=d.device.torch)
    if d.world > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


class Trainer:
    def __init__(self, args, d: Dist, num_classes: int, steps_per_epoch: int):
        self.args, self.d, self.dev = args, d, d.device
        torch.manual_seed(args.seed)
        self.model = create_model(args.model, num_classes=num_classes, zero_init_last=args.zero_init_last,
                                  channels_last=args.channels_last, device=self.dev)
        lr = args.lr if args.lr is not None else scale_lr(DEFAULT_BASE_LR_PER_256, args.batch_size * d.world)
        self.optimizer, opt_desc = create_optimizer(self.model, lr, args.momentum, args.weight_decay,
                                                    args.nesterov, self.dev, apex=args.apex_amp)
        amp = args.amp or args.apex_amp
        if amp and self.dev.type == "cpu" and not args.amp_dtype and not self.dev.supports_bf16():
            amp = False  # float16 autocast on a CPU is slower than float32
        self.precision = Precision(self.dev, enabled=amp, dtype=args.amp_dtype, apex=args.apex_amp)
        self.model, self.optimizer = self.precision.prepare(self.model, self.optimizer)
        self.sched_cfg = ScheduleConfig(lr, args.epochs, steps_per_epoch, sched=args.sched,
                                        warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                        min_lr=args.min_lr, decay_epochs=args.decay_epochs,
                                        decay_rate=args.decay_rate, cooldown_epochs=args.cooldown_epochs)
        self.schedule = LRSchedule(self.optimizer, self.sched_cfg)
        self.start_epoch, best = 0, None
        if args.resume:
            # The schedule is not restored: the LR is a pure function of (step, schedule), and
            # this run's flags and world size decide it, so a resume on another number of
            # devices keeps the right curve.
            state = resume(args.resume, self.model, self.optimizer, self.precision, None,
                           self.dev, restore_rng=d.main)
            self.start_epoch, best = state["epoch"], state["best_metric"]
        self.saver = CheckpointSaver(args.output, self.dev, best) if args.output and d.main else None
        self.plain = self.model  # for eval and checkpoints: no DDP, no compile
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.dev.index] if self.dev.is_accelerator else None
            self.model = DDP(self.model, device_ids=ids, gradient_as_bucket_view=True)
        if args.torchcompile:
            self.model = torch.compile(self.model, backend=args.torchcompile, mode=args.compile_mode)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)
        say(d, f"model {args.model} ({sum(p.numel() for p in self.plain.parameters()):,} params), "
               f"{'channels-last' if args.channels_last else 'NCHW'}, "
               f"{'compiled (' + args.torchcompile + ')' if args.torchcompile else 'eager'}")
        say(d, f"optimizer: {opt_desc}; LR {lr:g} for global batch {args.batch_size * d.world}")
        say(d, f"precision: {self.precision.describe()}")

    def step(self, images, labels, global_step: int):
        self.schedule.step(global_step)
        with self.precision.autocast():
            loss = self.criterion(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss, self.optimizer)
        self.precision.step(self.optimizer)
        return loss.detach()

    @torch.no_grad()
    def validate(self, batches) -> dict:
        """Top-1/top-5 over every validation sample exactly once, summed across ranks."""
        self.plain.eval()
        n, sums = 0, torch.zeros(3, dtype=torch.float64, device=self.dev.torch)  # loss, top1, top5
        for images, labels in batches:
            with self.precision.autocast():
                logits = self.plain(images)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            sums += torch.stack([loss, hit[:, 0].sum(), hit.any(1).sum()]).double()
            n += len(labels)
        self.plain.train()
        n, loss, top1, top5 = all_reduce([n] + sums.tolist(), self.d)
        return {"n": int(n), "loss": loss / max(n, 1), "top1": 100 * top1 / max(n, 1),
                "top5": 100 * top5 / max(n, 1)}


def make_loaders(args, d: Dist):
    """(train batches, validation batches or None, number of classes) for this rank."""
    info = load_info(args.data_path) if args.data_path else None
    num_classes = info.num_classes if info else 1000
    if args.synthetic:
        steps = args.perf_steps + args.perf_warmup if args.performance else 100
        return SyntheticBatches(d.device.torch, batch_size=args.batch_size, img_size=args.img_size,
                                num_classes=num_classes, steps=steps, seed=args.seed), None, num_classes
    if num_classes < 1:
        raise DataError(f"{args.data_path}: _info.json has no class list or num_classes")
    split = info.split("train")
    check_local_shards(split)
    workers = args.workers if args.workers is not None else default_workers(d)
    common = dict(batch_size=args.batch_size, img_size=args.img_size, num_workers=workers,
                  seed=args.seed, world_size=d.world, rank=d.rank, decoder=args.decode,
                  crop_pct=args.crop_pct, pin_memory=d.device.pin_memory(),
                  prefetch_factor=args.prefetch_factor, persistent=args.use_multi_epochs_loader,
                  reuse_buffers=True)  # DevicePrefetcher copies each batch before the next
    train_loader = create_loader(split, train=True, shuffle_buffer=args.shuffle_buffer,
                                 train_interpolation=args.train_interpolation, **common)
    if len(train_loader) < 1:
        raise DataError(f"{split.num_samples} training samples are fewer than one global batch "
                        f"({args.batch_size} x {d.world} processes); lower -b")
    val_loader = None
    has_val = any(name in info.splits for name in ("validation", "val", "valid"))
    if has_val and not (args.no_val or args.performance):
        vsplit = info.split("validation")
        check_local_shards(vsplit)
        val_loader = create_loader(vsplit, train=False, eval_interpolation=args.interpolation, **common)
    say(d, f"data: {args.data_path}: {split.num_samples:,} train samples, {num_classes} classes, "
           f"{len(train_loader)} steps/epoch/rank, {workers} workers/rank, decode {args.decode}")
    return train_loader, val_loader, num_classes


def train(args, d: Dist) -> dict | None:
    dev = d.device
    if args.decode == "gpu" and dev.type != "cuda":
        raise UsageError(f"--decode gpu needs a CUDA device (nvJPEG); this run is on {dev.type}")
    if args.data_path is None and not args.synthetic:
        prepare_demo(args, d)
    train_loader, val_loader, num_classes = make_loaders(args, d)
    normalize = Normalize(dev.torch, IMAGENET_MEAN, IMAGENET_STD, channels_last=args.channels_last)
    feeder = val_feeder = DevicePrefetcher(dev, normalize)
    if args.decode == "gpu":
        from pipeline.gpu_decode import make_to_device
        feeder = DevicePrefetcher(dev, normalize, make_to_device(args.train_interpolation))
        val_feeder = DevicePrefetcher(dev, normalize, make_to_device(args.interpolation))

    trainer = Trainer(args, d, num_classes, len(train_loader))
    if args.output and d.main:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "config.json"), "w") as f:
            json.dump(vars(args), f, indent=2, default=str)
    metrics = Metrics(args.output, d.main, append=bool(args.resume))
    metrics.write(kind="config", **{k: v for k, v in vars(args).items()
                                    if isinstance(v, (int, float, str, bool, type(None)))})
    if args.performance:
        return performance(args, d, trainer, train_loader, feeder)

    epochs = total_epochs(trainer.sched_cfg)
    steps = len(train_loader)
    stop = epochs if args.stop_after is None else min(epochs, trainer.start_epoch + args.stop_after)
    for epoch in range(trainer.start_epoch, stop):
        train_loader.set_epoch(epoch)
        done = train_epoch(args, d, trainer, feeder(train_loader), epoch, steps, epochs, metrics)
        fewest, most = (all_reduce([done], d, op)[0] for op in (dist.ReduceOp.MIN, dist.ReduceOp.MAX))
        result = None
        if val_loader is not None:
            val_loader.set_epoch(epoch)
            result = trainer.validate(val_feeder(val_loader))
            say(d, f"epoch {epoch} validation: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
                   f"loss {result['loss']:.4f}  ({result['n']} images)")
            metrics.write(kind="val", epoch=epoch, step=(epoch + 1) * steps, top1=result["top1"],
                          top5=result["top5"], loss=result["loss"], time=time.time())
        stats = dict(zip(STATS, map(int, all_reduce([train_loader.stats()[k] for k in STATS], d))))
        if stats["skipped"] or stats["shard_errors"]:
            say(d, f"data problems so far (all ranks): {stats['skipped']} samples skipped, "
                   f"{stats['shard_errors']} damaged/unreadable shard reads, {stats['padded']} padded")
        metrics.write(kind="epoch", epoch=epoch, steps_min=int(fewest), steps_max=int(most), **stats)
        if trainer.saver:
            best = trainer.saver.save(epoch, trainer.plain, trainer.optimizer, trainer.precision,
                                      trainer.schedule, vars(args), metric=result and result["top1"])
            say(d, f"checkpoint: {trainer.saver.last_path}{' (new best)' if best else ''}")
    return None


def train_epoch(args, d: Dist, trainer: Trainer, batches, epoch: int, steps: int, epochs: int,
                metrics: Metrics) -> int:
    it = iter(batches)
    loss_sum = torch.zeros((), device=d.device.torch)
    window_start, wait, n_window = time.perf_counter(), 0.0, 0
    for i in range(steps):
        t0 = time.perf_counter()
        batch = next(it, None)
        if batch is None:
            raise DataError(f"rank {d.rank}: the loader ended after {i} of {steps} steps")
        images, labels = batch
        wait += time.perf_counter() - t0
        global_step = epoch * steps + i
        loss_sum += trainer.step(images, labels, global_step)
        n_window += 1
        if (i + 1) % args.log_interval == 0 or i + 1 == steps:
            loss = all_reduce([loss_sum.item() / n_window], d)[0] / d.world  # the only host sync
            elapsed = time.perf_counter() - window_start
            img_s = n_window * args.batch_size * d.world / elapsed
            remaining = (epochs - epoch) * steps - i - 1
            eta = remaining * elapsed / n_window
            say(d, f"epoch {epoch} step {i + 1}/{steps}  loss {loss:.4f}  lr {trainer.schedule.last_lr:.4g}  "
                   f"{img_s:,.0f} img/s  data wait {wait / elapsed:.1%}  eta {eta / 60:.1f} min")
            metrics.write(kind="train", epoch=epoch, step=global_step + 1, loss=loss,
                          lr=trainer.schedule.last_lr, img_per_s=img_s, data_wait=wait / elapsed,
                          time=time.time())
            loss_sum.zero_()
            window_start, wait, n_window = time.perf_counter(), 0.0, 0
    extra = sum(1 for _ in it)  # 0 by construction; drains the prefetcher cleanly
    return steps + extra


def performance(args, d: Dist, trainer: Trainer, loader, feeder) -> dict:
    """Warm-up steps untimed, then --perf-steps steps timed between two device synchronisations."""
    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from feeder(loader)
            epoch += 1

    it, step, wait = batches(), 0, 0.0
    for _ in range(args.perf_warmup):
        images, labels = next(it)
        trainer.step(images, labels, step)
        step += 1
    d.device.synchronize()
    if d.world > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(args.perf_steps):
        t0 = time.perf_counter()
        images, labels = next(it)
        wait += time.perf_counter() - t0
        last = trainer.step(images, labels, step)
        step += 1
    d.device.synchronize()
    elapsed = time.perf_counter() - start
    elapsed, wait = all_reduce([elapsed, wait], d, dist.ReduceOp.MAX)
    images_done = args.perf_steps * args.batch_size * d.world
    result = {
        "fps": round(images_done / elapsed, 2),
        "fps_per_device": round(images_done / elapsed / d.world, 2),
        "steps": args.perf_steps, "warmup_steps": args.perf_warmup, "batch_size": args.batch_size,
        "world_size": d.world, "device": device_name(d.device), "amp_dtype": trainer.precision.dtype_name,
        "data_wait_fraction": round(wait / elapsed, 4), "synthetic": bool(args.synthetic),
        "data": "synthetic" if args.synthetic else f"shards, decode {args.decode}",
        "model": args.model, "img_size": args.img_size, "channels_last": args.channels_last,
        "compile": args.torchcompile, "compile_mode": args.compile_mode, "seconds": round(elapsed, 3),
        "final_loss": round(float(last), 4), "peak_mem_gb": round(d.device.max_memory_allocated() / 2**30, 3),
        "torch": torch.__version__,
    }
    return result


def device_name(dev: Device) -> str:
    if dev.is_accelerator:
        return f"{dev.type}:{dev.module.get_device_name(dev.index)}"
    return "cpu"


# ---------------------------------------------------------------------------------------------


ERRORS = (UsageError, DataError, DeviceError, PrecisionError, OptimizerError, CheckpointError)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    d = None
    try:
        args = parse_args(argv)
        d = setup_distributed(args)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        result = train(args, d)
        if result is not None and d.main:
            print(json.dumps(result), flush=True)
        return 0
    except ERRORS as e:
        print(f"train_stream: error: {e}", file=sys.stderr, flush=True)
        return 2
    except ValueError as e:  # e.g. an unknown --model from the factory
        print(f"train_stream: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("train_stream: interrupted", file=sys.stderr, flush=True)
        return 130
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        reason = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1].strip()}"
        print(f"train_stream: error: data loading failed: {reason}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
