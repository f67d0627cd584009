"""The Trainer: owns the model, optimizer, precision, schedule, checkpoints and metrics of a run,
and its loops: `fit()` (train + validate every epoch) and `benchmark()` (--performance)."""
from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from common.errors import DataLoadingError
from model.checkpoint import CheckpointSaver, resume
from model.factory import create_model
from model.optim import OPTIMIZERS, create_optimizer
from model.schedule import LRSchedule, ScheduleConfig, scale_lr, total_epochs
from pipeline.stream import STATS

from .config import mixup_active
from .data import Data
from .dist import Dist, distribute_bn, sync_batchnorm
from .metrics import Metrics
from .runtime import compute_settings, precision_for


class Trainer:
    def __init__(self, args, d: Dist, data: Data):
        self.args, self.d, self.dev, self.data = args, d, d.device, data
        self.steps_per_epoch = len(data.train)
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        extra = {} if args.drop_path is None else {"drop_path_rate": args.drop_path}
        self.model = create_model(args.model, num_classes=data.num_classes, zero_init_last=args.zero_init_last,
                                  channels_last=args.channels_last, device=self.dev, pretrained=args.pretrained,
                                  pretrained_path=args.pretrained_path,
                                  checkpoint_path=args.initial_checkpoint or None, **extra)
        seed_everything(args.seed + d.rank)  # as timm's random_seed(seed, rank): drop path differs per rank
        self.dist_bn = args.dist_bn
        if args.sync_bn:
            self.model = sync_batchnorm(self.model, d)
            self.dist_bn = ""  # as timm: synchronised BN needs no statistics averaging
        global_batch = args.batch_size * d.world
        self.lr = args.lr if args.lr is not None else \
            scale_lr(args.lr_base, global_batch, args.lr_base_size, args.lr_base_scale or "linear")
        self.optimizer, opt_desc = create_optimizer(self.model, self.lr, args.momentum, args.weight_decay,
                                                    OPTIMIZERS[args.opt], self.dev, apex=args.apex_amp)
        self.precision = precision_for(args, self.dev)
        self.model, self.optimizer = self.precision.prepare(self.model, self.optimizer)
        self.sched_cfg = ScheduleConfig(self.lr, args.epochs, self.steps_per_epoch, sched=args.sched,
                                        warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                        min_lr=args.min_lr, decay_epochs=args.decay_epochs,
                                        decay_rate=args.decay_rate, cooldown_epochs=args.cooldown_epochs,
                                        on_updates=args.sched_on_updates)
        self.schedule = LRSchedule(self.optimizer, self.sched_cfg)
        self.ema = None
        if args.model_ema:
            from timm.utils import ModelEmaV3
            # float32 EMA even when Apex O2 made the model float16 (a 2e-4 step vanishes in fp16)
            self.ema = ModelEmaV3(self.model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup,
                                  dtype=torch.float32 if self.precision.mode == "apex" else None)
        self.start_epoch, best = 0, None
        if args.resume:
            # The schedule is not restored: the LR is a pure function of (step, schedule), and
            # this run's flags and world size decide it, so a resume on another number of
            # devices keeps the right curve.
            state = resume(args.resume, self.model, self.optimizer, self.precision, self.dev,
                           restore_rng=d.main, ema=self.ema)
            self.start_epoch, best = state["epoch"], state["best_metric"]
        self.saver = CheckpointSaver(args.output, self.dev, best) if args.output and d.main else None
        self.plain = self.model  # for eval and checkpoints: no DDP, no compile
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.dev.index] if self.dev.is_accelerator else None
            self.model = DDP(self.model, device_ids=ids, gradient_as_bucket_view=True,
                             broadcast_buffers=args.ddp_broadcast_buffers)
        if args.torchcompile:
            self.model = torch.compile(self.model, backend=args.torchcompile, mode=args.compile_mode)
        if mixup_active(args):  # as timm: smoothing is inside the mixed targets
            from timm.loss import SoftTargetCrossEntropy
            self.criterion = SoftTargetCrossEntropy()
        else:
            self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=args.smoothing)
        self.clip_params = None
        if args.clip_grad is not None:
            from timm.models import model_parameters
            params = model_parameters(self.plain, exclude_head=args.clip_mode == "agc")  # timm's head rule
            self.clip_params = self.precision.master_params(self.optimizer, self.plain) \
                if self.precision.mode == "apex" else list(params)
        self.metrics = Metrics(args.output, d.main, append=bool(args.resume))
        self._record_config()
        d.say(f"model {args.model} ({sum(p.numel() for p in self.plain.parameters()):,} params), "
              f"{'channels-last' if args.channels_last else 'NCHW'}, "
              f"{'compiled (' + args.torchcompile + ')' if args.torchcompile else 'eager'}"
              f"{', pretrained' if args.pretrained or args.pretrained_path else ''}"
              f"{', EMA %g' % args.model_ema_decay if self.ema else ''}")
        d.say(f"optimizer: {opt_desc}; LR {self.lr:g} for global batch {global_batch}, "
              f"{args.sched} schedule stepped per {'update' if args.sched_on_updates else 'epoch'}")
        d.say(f"precision: {self.precision.describe()}")

    def _record_config(self) -> None:
        args = self.args
        if args.output and self.d.main:
            os.makedirs(args.output, exist_ok=True)
            with open(os.path.join(args.output, "config.json"), "w") as f:
                json.dump(vars(args), f, indent=2, default=str)
        self.metrics.write(kind="config", **{k: v for k, v in vars(args).items()
                                             if isinstance(v, (int, float, str, bool, type(None)))})

    # ------------------------------------------------------------------ one step
    def step(self, images, labels, global_step: int) -> torch.Tensor:
        """One optimizer update; returns the loss as a device tensor (no host sync)."""
        self.schedule.step(global_step)
        with self.precision.autocast():
            loss = self.criterion(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss, self.optimizer)
        if self.clip_params is not None:
            from timm.utils import dispatch_clip_grad
            self.precision.unscale_(self.optimizer)
            dispatch_clip_grad(self.clip_params, self.args.clip_grad, mode=self.args.clip_mode)
        self.precision.step(self.optimizer)
        if self.ema is not None:
            self.ema.update(self.plain, step=global_step + 1)  # timm: step = updates done
        return loss.detach()

    # ------------------------------------------------------------------ fit
    def fit(self) -> dict:
        """Train from start_epoch to the end (or --stop-after epochs); returns a short summary."""
        args, d = self.args, self.d
        epochs = total_epochs(self.sched_cfg)
        stop = epochs if args.stop_after is None else min(epochs, self.start_epoch + args.stop_after)
        result = None
        for epoch in range(self.start_epoch, stop):
            done = self.train_epoch(epoch, epochs)
            fewest, most = (d.all_reduce([done], op)[0] for op in (dist.ReduceOp.MIN, dist.ReduceOp.MAX))
            distribute_bn(self.plain, d, self.dist_bn)
            # timm's --val-interval: validate and checkpoint every N epochs and at the end (here:
            # also the last epoch of a --stop-after run, so that it can be resumed)
            if (epoch + 1) % args.val_interval == 0 or epoch + 1 == stop:
                result = self.validate(epoch)
                if self.ema is not None:
                    distribute_bn(self.ema.module, d, self.dist_bn)
                    result = self.validate(epoch, self.ema.module, kind="val_ema") or result  # ranks best, as timm
                self.save(epoch, result)
            stats = self.data_stats()
            self.metrics.write(kind="epoch", epoch=epoch, steps_min=int(fewest), steps_max=int(most), **stats)
        best = self.saver.best_metric if self.saver else None
        return {"epochs_done": stop - self.start_epoch, "last": result, "best_top1": best}

    def train_epoch(self, epoch: int, epochs: int) -> int:
        """One epoch of exactly steps_per_epoch steps; returns the steps the loader gave."""
        args, d, steps = self.args, self.d, self.steps_per_epoch
        self.data.train.set_epoch(epoch)
        if self.data.augment is not None:
            self.data.augment.set_epoch(epoch)
        it = iter(self.data.feed(self.data.train))
        loss_sum = torch.zeros((), device=self.dev.torch)
        window_start, wait, n_window = time.perf_counter(), 0.0, 0
        for i in range(steps):
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                raise DataLoadingError(f"rank {d.rank}: the loader ended after {i} of {steps} steps")
            images, labels = batch
            wait += time.perf_counter() - t0
            global_step = epoch * steps + i
            loss_sum += self.step(images, labels, global_step)
            n_window += 1
            if (i + 1) % args.log_interval == 0 or i + 1 == steps:
                loss = d.all_reduce([loss_sum.item() / n_window])[0] / d.world  # the only host sync
                elapsed = time.perf_counter() - window_start
                img_s = n_window * args.batch_size * d.world / elapsed
                eta = ((epochs - epoch) * steps - i - 1) * elapsed / n_window
                d.say(f"epoch {epoch} step {i + 1}/{steps}  loss {loss:.4f}  lr {self.schedule.last_lr:.4g}  "
                      f"{img_s:,.0f} img/s  data wait {wait / elapsed:.1%}  eta {eta / 60:.1f} min")
                self.metrics.write(kind="train", epoch=epoch, step=global_step + 1, loss=loss,
                                   lr=self.schedule.last_lr, img_per_s=img_s, data_wait=wait / elapsed,
                                   time=time.time())
                loss_sum.zero_()
                window_start, wait, n_window = time.perf_counter(), 0.0, 0
        extra = sum(1 for _ in it)  # 0 by construction; drains the prefetcher cleanly
        return steps + extra

    @torch.no_grad()
    def validate(self, epoch: int, model=None, kind: str = "val") -> dict | None:
        """Top-1/top-5 over every validation sample exactly once, summed across ranks."""
        if self.data.val is None:
            return None
        model = model if model is not None else self.plain
        self.data.val.set_epoch(epoch)
        was_training = model.training
        model.eval()
        n, sums = 0, torch.zeros(3, dtype=torch.float64, device=self.dev.torch)  # loss, top1, top5
        for images, labels in self.data.val_feed(self.data.val):
            with self.precision.autocast():
                logits = model(images)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
            hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            sums += torch.stack([loss, hit[:, 0].sum(), hit.any(1).sum()]).double()
            n += len(labels)
        model.train(was_training)
        n, loss, top1, top5 = self.d.all_reduce([n] + sums.tolist())
        result = {"n": int(n), "loss": loss / max(n, 1), "top1": 100 * top1 / max(n, 1),
                  "top5": 100 * top5 / max(n, 1)}
        self.d.say(f"epoch {epoch} validation{' (EMA)' if kind == 'val_ema' else ''}: top-1 "
                   f"{result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
                   f"({result['n']} images)")
        self.metrics.write(kind=kind, epoch=epoch, step=(epoch + 1) * self.steps_per_epoch,
                           top1=result["top1"], top5=result["top5"], loss=result["loss"], time=time.time())
        return result

    def data_stats(self) -> dict:
        """The loader's counters summed over ranks; data problems are reported once per epoch."""
        stats = dict(zip(STATS, map(int, self.d.all_reduce([self.data.train.stats()[k] for k in STATS]))))
        if stats["skipped"] or stats["shard_errors"]:
            self.d.say(f"data problems so far (all ranks): {stats['skipped']} samples skipped, "
                       f"{stats['shard_errors']} damaged/unreadable shard reads, {stats['padded']} padded")
        return stats

    def save(self, epoch: int, result: dict | None) -> None:
        if not self.saver:
            return
        best = self.saver.save(epoch, self.plain, self.optimizer, self.precision, self.schedule,
                               vars(self.args), metric=result and result["top1"],
                               ema=self.ema.module if self.ema is not None else None)
        self.d.say(f"checkpoint: {self.saver.last_path}{' (new best)' if best else ''}")

    # ------------------------------------------------------------------ benchmark
    def benchmark(self) -> dict:
        """--performance: warm-up steps untimed, then --perf-steps steps timed between two device
        synchronisations; returns the JSON-ready result."""
        args, d, loader = self.args, self.d, self.data.train

        def batches():
            epoch = 0
            while True:
                loader.set_epoch(epoch)
                yield from self.data.feed(loader)
                epoch += 1

        if self.data.augment is not None:
            self.data.augment.set_epoch(0)
        it, step, wait = batches(), 0, 0.0
        for _ in range(args.perf_warmup):
            images, labels = next(it)
            self.step(images, labels, step)
            step += 1
        self.dev.synchronize()
        d.barrier()
        start = time.perf_counter()
        for _ in range(args.perf_steps):
            t0 = time.perf_counter()
            images, labels = next(it)
            wait += time.perf_counter() - t0
            last = self.step(images, labels, step)
            step += 1
        self.dev.synchronize()
        elapsed = time.perf_counter() - start
        elapsed, wait = d.all_reduce([elapsed, wait], dist.ReduceOp.MAX)
        images_done = args.perf_steps * args.batch_size * d.world
        return {
            "fps": round(images_done / elapsed, 2),
            "fps_per_device": round(images_done / elapsed / d.world, 2),
            "steps": args.perf_steps, "warmup_steps": args.perf_warmup, "batch_size": args.batch_size,
            "world_size": d.world, "device": self.dev.name(), "amp_dtype": self.precision.dtype_name,
            "data_wait_fraction": round(wait / elapsed, 4), "synthetic": bool(args.synthetic),
            "data": "synthetic" if args.synthetic else f"shards, decode {args.decode}",
            "loader": None if args.synthetic else args.loader,
            "model": args.model, "img_size": args.img_size, "channels_last": args.channels_last,
            "compile": args.torchcompile, "compile_mode": args.compile_mode, "seconds": round(elapsed, 3),
            "final_loss": round(float(last), 4),
            "peak_mem_gb": round(self.dev.max_memory_allocated() / 2**30, 3),
            "torch": torch.__version__, "num_classes": self.data.num_classes, "workers": self.data.workers,
            "settings": compute_settings(self.dev, self.precision, args.channels_last),
        }


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (all devices), as timm's random_seed(seed, rank) with seed + rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
