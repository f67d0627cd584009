"""The Trainer: the loops of a run, `fit()` (train + validate every epoch) and `benchmark()`
(--performance), over the parts `engine.builder` made (model, optimizer, precision, schedule,
checkpoints, metrics).

Fault tolerance: a checkpoint records the position (epoch, step, each rank's loader progress),
so a resume continues at that step with the identical remaining samples; `engine.control`
stops every rank at the same step on a preemption signal, after one checkpoint."""
from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.distributed as dist

from common.errors import DataLoadingError
from model.schedule import total_epochs
from pipeline.stream import STATS

from . import rankstate
from .builder import Parts, build_parts, updates_per_epoch
from .control import Control, Preempted, reason
from .data import Data
from .dist import Dist, distribute_bn
from .guards import LossGuard, NonFiniteLoss, sample_order, weights_finite
from .inference import as_percent, evaluate
from .metrics import read_history
from .resolved import plain_config
from .resume import elastic_record
from .runtime import compute_settings


def _first_apart(it):
    """`it`, its first item fetched with the CPU generator forked: a DataLoader's first iteration
    draws a seed from it, which a resumed process would draw again at another point of the run."""
    with torch.random.fork_rng(devices=[]):
        first = next(it, None)
    if first is not None:
        yield first
        yield from it


class Trainer:
    """The loops of a run over parts that `engine.builder.build` made: `fit()` (train, validate,
    checkpoint every epoch), `train_epoch()`, `validate()`, `save()` and `benchmark()`."""

    def __init__(self, parts: Parts, d: Dist | None = None, data: Data | None = None):
        if d is not None:  # the older call Trainer(parse_args(argv), dist, make_data(...)) of tools
            parts = build_parts(parts, d, data)
        self.parts = parts
        self.config, self.d, self.data = parts.config, parts.dist, parts.data
        self.dev, self.steps_per_epoch = self.d.device, len(self.data.train)  # loader batches
        self.accum = self.config.grad_accum_steps  # batches per optimizer update
        self.updates_per_epoch = updates_per_epoch(self.steps_per_epoch, self.accum)
        self.model, self.plain, self.optimizer = parts.model, parts.plain, parts.optimizer
        self.precision, self.schedule, self.ema = parts.precision, parts.schedule, parts.ema
        self.criterion, self.clip_params, self.resolution = parts.criterion, parts.clip_params, parts.resolution
        self.saver, self.metrics, self.monitor = parts.saver, parts.metrics, parts.monitor
        self.start = parts.start
        self.totals = {"images": 0, "seconds": 0.0, "wait": 0.0, "loss": []}  # for the run summary
        # (epoch, kind, result) of every complete validation of this run, the starts before a resume too
        self.history = read_history(self.metrics.path) if self.start.path else []
        self.control = None  # installed by fit()
        self.loss_guard = LossGuard(getattr(self.config, "nonfinite_loss", "stop"))
        self._where = (0, 0)  # (epoch, step) of the update being made, for the non-finite loss line

    @property
    def sched_cfg(self):
        return self.schedule.cfg

    @property
    def start_epoch(self) -> int:
        return self.start.epoch

    @property
    def resume_path(self) -> str | None:
        return self.start.path

    @property
    def run_dir(self) -> str | None:
        return self.parts.run_dir

    # ------------------------------------------------------------------ one step
    def step(self, images, labels, global_step: int, accum: int = 1, first: bool = True,
             update: bool = True) -> torch.Tensor | None:
        """One optimizer update, or with gradient accumulation one of its `accum` batches (`first`
        sets the LR and clears the gradients, `update` applies them), as timm 1.0's train_one_epoch:
        the loss is divided by `accum` and DDP does not all-reduce before the last batch. Returns
        the batch's (undivided) loss as a device tensor (no host sync); None when --nonfinite-loss
        skip dropped the update."""
        if first:
            self.schedule.step(global_step)
            if self.loss_guard.skip:  # a dropped update must not leave a bad batch in the BN statistics
                self._kept_buffers, self._bad = [b.detach().clone() for b in self.plain.buffers()], 0.0
        with self.precision.autocast():
            loss = self.criterion(self.model(images), labels)
        if first:
            self.optimizer.zero_grad(set_to_none=True)
        no_sync = getattr(self.model, "no_sync", None) if not update else None
        with no_sync() if no_sync is not None else contextlib.nullcontext():
            self.precision.backward(loss / accum if accum > 1 else loss, self.optimizer)
        if self.loss_guard.skip:
            self._bad += float(not torch.isfinite(loss.detach()).item())
        if not update:
            return loss.detach()
        if self.loss_guard.skip:  # --nonfinite-loss skip: every rank drops the update if any rank's loss is bad
            bad = self.d.all_reduce([self._bad])[0]
            if not self.loss_guard.keep(not bad, *self._where):
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for b, kept in zip(self.plain.buffers(), self._kept_buffers):
                        b.copy_(kept)
                return None
        if self.clip_params is not None:
            from timm.utils import dispatch_clip_grad
            self.precision.unscale_(self.optimizer)
            dispatch_clip_grad(self.clip_params, self.config.clip_grad, mode=self.config.clip_mode)
        self.precision.step(self.optimizer)
        if self.ema is not None:
            self.ema.update(self.plain, step=global_step + 1)  # timm: step = updates done
        return loss.detach()

    # ------------------------------------------------------------------ fit
    def fit(self) -> dict:
        """Train from the start position to the end (or --stop-after epochs); returns a short
        summary. Raises Preempted after a stop signal, once the checkpoint is written."""
        args, d = self.config, self.d
        epochs = total_epochs(self.sched_cfg)
        if self.start_epoch >= epochs:
            d.say(f"train_stream: {self.resume_path} has already finished all {epochs} epochs; nothing to do")
            return {"epochs_done": 0, "last": None, "best_top1": self.saver.best_metric if self.saver else None,
                    "finished_before": True}
        stop = epochs if args.stop_after is None else min(epochs, self.start_epoch + args.stop_after)
        result, fit_start = None, time.perf_counter()
        self.control = self.parts.control
        self.control.install()
        self.totals["loss"] = list(self.start.epoch_losses)  # logged before a mid-epoch checkpoint
        try:
            for epoch in range(self.start_epoch, stop):
                start = self.start.step if epoch == self.start_epoch else 0
                done = self.train_epoch(epoch, epochs, start=start)
                fewest, most = (d.all_reduce([done], op)[0] for op in (dist.ReduceOp.MIN, dist.ReduceOp.MAX))
                distribute_bn(self.plain, d, self.parts.dist_bn)
                # timm's --val-interval: validate and checkpoint every N epochs and at the end (here:
                # also the last epoch of a --stop-after run, so that it can be resumed)
                validated = (epoch + 1) % args.val_interval == 0 or epoch + 1 == stop
                if validated:
                    result = self.validate(epoch)
                    if self.ema is not None:
                        distribute_bn(self.ema.module, d, self.parts.dist_bn)
                        result = self.validate(epoch, self.ema.module, kind="val_ema") or result  # ranks best, as timm
                stats = self.data_stats()
                self.metrics.write(kind="epoch", epoch=epoch, steps_min=int(fewest), steps_max=int(most), **stats)
                if validated:
                    self.schedule.metric(epoch, self.eval_value(result))  # plateau: before the checkpoint
                    self.save(epoch, result)
                losses = self.totals["loss"]
                self.monitor.epoch(epoch, sum(losses) / len(losses) if losses else None,
                                   result if validated else None, self.schedule.last_lr)
                self.totals["loss"] = []
                code = self.control.sync()  # a signal during validation or the save
                if code:
                    self._stop(code, epoch + 1, 0)
        finally:
            self.control.uninstall()
            self.monitor.close()
        return self.summary(stop, time.perf_counter() - fit_start)

    def _count(self, steps: int, seconds: float, wait: float, loss: float) -> None:
        t = self.totals
        t["images"] += steps * self.config.batch_size * self.d.world
        t["seconds"] += seconds
        t["wait"] += wait
        t["loss"].append(loss)

    def summary(self, stop: int, seconds: float) -> dict:
        """The end of a run in a few lines (rank 0) and a `summary` row in metrics.jsonl; returned."""
        best = max((h for h in self.history), key=lambda h: h[2]["top1"], default=None)
        t = self.totals
        out = {"epochs_done": stop - self.start_epoch, "epochs": stop, "seconds": round(seconds, 1),
               "img_per_s": round(t["images"] / t["seconds"], 1) if t["seconds"] else None,
               "data_wait": round(t["wait"] / t["seconds"], 4) if t["seconds"] else None,
               "best_epoch": best[0] if best else None, "best_top1": best[2]["top1"] if best else None,
               "best_top5": best[2]["top5"] if best else None, "best_is_ema": bool(best and best[1] == "val_ema"),
               "run_dir": self.config.run_dir}
        self.metrics.write(kind="summary", **out)
        d = self.d
        d.say(f"done: {out['epochs_done']} epochs in {seconds / 60:.1f} min, "
              f"{out['img_per_s'] or 0:,.0f} img/s, data wait {out['data_wait'] or 0:.1%}")
        if best:
            d.say(f"best: top-1 {best[2]['top1']:.2f}%  top-5 {best[2]['top5']:.2f}% at epoch {best[0]}"
                  f"{' (EMA weights)' if out['best_is_ema'] else ''}")
        if self.config.run_dir:
            run = self.config.run_dir
            files = [f for f in ("best.pth", "last.pth", "metrics.jsonl", "summary.csv", "tensorboard")
                     if os.path.exists(os.path.join(run, f))]
            d.say(f"files: {run}/ ({', '.join(files)})")
            d.say(f"plot: python tools/plot_metrics.py {run}"
                  + (f"   live: tensorboard --logdir {os.path.join(run, 'tensorboard')}"
                     if "tensorboard" in files else ""))
        return out

    def _stop(self, code: int, epoch: int, step: int) -> None:
        where = f"epoch {epoch} step {step}/{self.steps_per_epoch}" if step else f"the start of epoch {epoch}"
        if self.saver:
            tail = (f"checkpoint {self.saver.last_path} resumes at {where}; rerun the same command with "
                    f"--auto-resume (or --resume {self.saver.last_path})")
        else:
            tail = "no --output, so no checkpoint was written"
        raise Preempted(f"stopped ({reason(code)}): {tail}")

    def check_finite(self, loss_sum, epoch: int, step: int) -> None:
        """Before a checkpoint: the unlogged losses and the weights are finite on every rank (one
        sync per checkpoint); never save non-finite weights over the last good checkpoint."""
        ok = bool(torch.isfinite(loss_sum).item()) and weights_finite(
            self.plain, self.ema.module if self.ema is not None else None)
        if self.d.all_reduce([float(not ok)])[0]:
            where = f"epoch {epoch} step {step}" if step else f"the end of epoch {epoch}"
            raise NonFiniteLoss(f"{where}: the weights or the training loss are not finite "
                                "(diverged); stopped without saving: lower --lr or check the data. The last "
                                "checkpoint written is the last good one")

    def save_position(self, epoch: int, step: int, consumed: int, window=None) -> None:
        """A checkpoint at `step` of `epoch` (every rank calls it at the same step): each rank's
        loader progress is gathered, rank 0 writes last.pth, and all wait for the write."""
        progress = getattr(self.data.train, "progress", None)
        bitmap = getattr(self.data.train, "consumed_bitmap", None)
        # one gather of everything a rank adds: loader progress, consumed samples, its own state
        gathered = self.control.gather((progress(consumed) if progress else None,
                                        bitmap(consumed) if bitmap else None, rankstate.mine(self, window)))
        everyone, bitmaps, ranks = (list(column) for column in zip(*gathered))
        elastic = self._elastic(epoch, bitmaps)
        if self.saver:
            position = self._position(epoch, step, everyone)
            position["epoch_losses"] = [float(x) for x in self.totals["loss"]]
            if elastic:
                position["elastic"] = elastic
            self.saver.save(epoch - 1, self.plain, self.optimizer, self.precision, self.schedule,
                            plain_config(self.config), metric=None, position=position,
                            ema=self.ema.module if self.ema is not None else None, ranks=ranks)
            self.d.say(f"checkpoint: {self.saver.last_path} (epoch {epoch} step {step}/{self.steps_per_epoch})")
        self.control.barrier()
        self.control.saved()

    def _position(self, epoch: int, step: int, progress) -> dict:
        # step: loader batches done in the epoch (an update boundary); global_step: optimizer updates
        done = self.updates_per_epoch if step >= self.steps_per_epoch else step // self.accum
        return {"epoch": epoch, "step": step, "global_step": epoch * self.updates_per_epoch + done,
                "steps_per_epoch": self.steps_per_epoch, "world": self.d.world,
                "workers": getattr(self.data.train, "num_workers", 0),
                "batch_size": self.config.batch_size, "progress": progress, "data": self.data.identity,
                **sample_order(self.config)}

    def _elastic(self, epoch: int, bitmaps) -> dict | None:
        """The position's record of the samples every rank consumed in `epoch` (engine/resume.py):
        with the epoch's plan, which a remainder epoch (an elastic resume) carries over."""
        ds, el = getattr(self.data.train, "dataset", None), self.start.elastic
        if ds is None:
            return None
        if el and epoch == self.start_epoch and el["remainder"] is not None:
            planned, seed, remainder = el["planned"], el["seed"], True
        else:
            planned, seed, remainder = self.steps_per_epoch * self.d.world * self.config.batch_size, ds.seed, False
        return elastic_record(bitmaps, total=int(ds.offsets[-1]), planned=planned, seed=seed, remainder=remainder)

    def set_img_size(self, loader, epoch: int) -> None:
        """Progressive resizing: the epoch's training size, a function of the epoch only (FFCV's
        get_resolution), so a resumed run trains each epoch at the uninterrupted run's size."""
        if self.resolution.progressive:
            loader.set_img_size(self.resolution.at(epoch))

    def train_epoch(self, epoch: int, epochs: int, start: int = 0) -> int:
        """One epoch of exactly steps_per_epoch steps, from step `start` (a resumed epoch); returns
        the steps done, counting those before `start`."""
        args, d, steps = self.config, self.d, self.steps_per_epoch
        if start >= steps:
            return steps  # trained, not yet validated when the checkpoint was written
        loader = self.data.train
        el = self.start.elastic if epoch == self.start_epoch else None
        if el:  # a resumed epoch: what it consumed before, and on another plan what it has left
            loader.set_epoch(epoch, self.start.progress, remainder=el["remainder"], consumed=el["consumed"])
        elif start:
            loader.set_epoch(epoch, self.start.progress)
        else:
            loader.set_epoch(epoch)
        self.set_img_size(loader, epoch)
        if self.data.augment is not None:
            self.data.augment.set_epoch(epoch, start)  # draws keyed by the batch's place in the run
        padded_before = loader.stats()["padded"]
        limit = args.max_missing * steps * args.batch_size * d.world
        if self.control is None:  # train_epoch() called without fit()
            self.control = Control(d)
        control = self.control
        it = _first_apart(iter(self.data.feed(loader)))
        loss_sum = torch.zeros((), device=self.dev.torch)
        window_start, wait, n_window, n_losses = time.perf_counter(), 0.0, 0, 0
        accum, tail = self.accum, steps % self.accum  # tail: batches of a shorter last update (timm's)
        saved = rankstate.window(self.start.rank_state, self.dev.torch) if start and epoch == self.start_epoch else None
        if saved is not None:  # the log window the checkpoint cut, so the next row averages the same steps
            loss_sum, n_window = saved
            n_losses = n_window
        for i in range(start, steps):
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                raise DataLoadingError(f"rank {d.rank}: the loader ended after {i} of {steps} steps")
            images, labels = batch
            wait += time.perf_counter() - t0
            update = i + 1 == steps or (i + 1) % accum == 0
            global_step = epoch * self.updates_per_epoch + i // accum  # optimizer updates done before this one
            self._where = (epoch, i + 1)
            loss = self.step(images, labels, global_step, accum=tail if tail and i >= steps - tail else accum,
                             first=i % accum == 0, update=update)
            if loss is not None:  # None: a non-finite update dropped (--nonfinite-loss skip)
                loss_sum += loss
                n_losses += 1
            n_window += 1
            if not update:
                continue
            halt, save_now = control.poll()  # agreed one update ago on every rank; no device sync
            if (i // accum + 1) % args.log_interval == 0 or i + 1 == steps:
                padded = loader.stats()["padded"] - padded_before
                loss, padded = d.all_reduce([loss_sum.item() / max(n_losses, 1), padded])  # the only host sync
                loss /= d.world
                LossGuard.check(loss, epoch, i + 1)  # a NaN/inf loss: stop before anything is saved
                if padded > limit:
                    raise DataLoadingError(
                        f"more than {args.max_missing:.0%} of epoch {epoch} is missing ({int(padded):,} of "
                        f"{steps * args.batch_size * d.world:,} samples repeated in place of damaged or "
                        "unreadable data; see the warnings): fix the data, or raise --max-missing")
                elapsed = time.perf_counter() - window_start
                img_s = n_window * args.batch_size * d.world / elapsed
                eta = ((epochs - epoch) * steps - i - 1) * elapsed / n_window  # in batches
                size = images.shape[-1]  # the batch's own (metadata, no sync)
                d.say(f"epoch {epoch} step {i + 1}/{steps}  loss {loss:.4f}  lr {self.schedule.last_lr:.4g}  "
                      f"{img_s:,.0f} img/s  data wait {wait / elapsed:.1%}  eta {eta / 60:.1f} min"
                      f"{f'  {size} px' if self.resolution.progressive else ''}")
                self.metrics.write(kind="train", epoch=epoch, step=global_step + 1, loss=loss,
                                   lr=self.schedule.last_lr, img_per_s=img_s, data_wait=wait / elapsed,
                                   time=time.time(), img_size=int(size))
                self.monitor.train(global_step + 1, loss=loss, lr=self.schedule.last_lr, img_per_s=img_s,
                                   data_wait=wait / elapsed)
                self._count(n_window, elapsed, wait, loss)
                loss_sum.zero_()
                window_start, wait, n_window, n_losses = time.perf_counter(), 0.0, 0, 0
            if halt or save_now or (control.steps_due(global_step + 1) and i + 1 < steps):  # update boundaries
                self.check_finite(loss_sum, epoch, i + 1)
                self.save_position(epoch, i + 1, i + 1 - start, window=(loss_sum, n_losses))
                if halt:
                    self._stop(halt, epoch, i + 1)
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
        # this rank's share
        with torch.random.fork_rng(devices=[]):  # validation leaves the training draws as they were
            sums = evaluate(model, self.data.val_feed(self.data.val), self.precision, self.config.val_tta)
        model.train(was_training)
        totals = dict(zip(("n", "loss", "top1", "top5"),
                          self.d.all_reduce([sums[k] for k in ("n", "loss", "top1", "top5")])))
        result = as_percent(totals)
        expected = self.data.val_samples
        # 0 images validated is no result: never complete, never best.pth
        result["complete"] = result["n"] > 0 and (not expected or result["n"] >= expected)
        n = result["n"]
        note = "" if result["complete"] else (f"; INCOMPLETE: {expected - int(n)} of {expected} images "
                                              "missing (see the data problems line), not used for best.pth"
                                              if n else "; no image was validated: no result, not used for "
                                              "best.pth")
        self.d.say(f"epoch {epoch} validation{' (EMA)' if kind == 'val_ema' else ''}: "
                   f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
                   f"loss {result['loss']:.4f}  ({result['n']} images{note})")
        step = (epoch + 1) * self.updates_per_epoch
        self.metrics.write(kind=kind, epoch=epoch, step=step,
                           top1=result["top1"], top5=result["top5"], loss=result["loss"], n=result["n"],
                           complete=result["complete"], time=time.time())
        self.monitor.val(step, prefix=kind, top1=result["top1"], top5=result["top5"], loss=result["loss"])
        if result["complete"]:
            self.history.append((epoch, kind, result))
        return result

    def data_stats(self) -> dict:
        """The loaders' counters summed over ranks (validation's as val_*); data problems of both
        are reported once per epoch."""
        val = self.data.val.stats() if self.data.val is not None else dict.fromkeys(STATS, 0)
        train = self.data.train.stats()
        values = [train.get(k, 0) for k in STATS] + [val.get(k, 0) for k in STATS]
        values = list(map(int, self.d.all_reduce(values)))
        stats = dict(zip(STATS, values))
        stats.update({f"val_{k}": v for k, v in zip(STATS, values[len(STATS):])})
        skipped = stats["skipped"] + stats["val_skipped"]
        shard_errors = stats["shard_errors"] + stats["val_shard_errors"]
        if skipped or shard_errors:
            self.d.say(f"data problems so far (all ranks): {skipped} samples skipped ({stats['val_skipped']} in "
                       f"validation), {shard_errors} damaged/unreadable shard reads ({stats['val_shard_errors']} in "
                       f"validation), {stats['padded']} padded")
        return stats

    def eval_value(self, result: dict | None) -> float | None:
        """The --eval-metric value of a complete validation (None otherwise)."""
        return result[self.config.eval_metric] if result and result.get("complete", True) else None

    def save(self, epoch: int, result: dict | None) -> None:
        if self.saver is not None or self.d.world > 1:  # every rank joins the check's all-reduce
            self.check_finite(torch.zeros(()), epoch, 0)
        ranks = rankstate.gather(self) if self.control is not None else None  # every rank, then rank 0 saves
        if not self.saver:
            return
        best = self.saver.save(epoch, self.plain, self.optimizer, self.precision, self.schedule,
                               plain_config(self.config), metric=self.eval_value(result),
                               higher_is_better=self.config.eval_metric != "loss",
                               position=self._position(epoch + 1, 0, None),
                               ema=self.ema.module if self.ema is not None else None, ranks=ranks)
        self.d.say(f"checkpoint: {self.saver.last_path}{' (new best)' if best else ''}")
        if self.control:
            self.control.saved()

    # ------------------------------------------------------------------ benchmark
    def benchmark(self) -> dict:
        """--performance: warm-up steps untimed, then --perf-steps steps timed between two device
        synchronisations; returns the JSON-ready result."""
        args, d, loader = self.config, self.d, self.data.train

        def batches():
            epoch = 0
            while True:
                loader.set_epoch(epoch)
                self.set_img_size(loader, epoch)
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
            "model": args.model, "img_size": int(images.shape[-1]), "channels_last": args.channels_last,
            "compile": args.torchcompile, "compile_mode": args.compile_mode, "seconds": round(elapsed, 3),
            "final_loss": round(float(last), 4) if last is not None else None,
            "peak_mem_gb": round(self.dev.max_memory_allocated() / 2**30, 3),
            "torch": torch.__version__, "num_classes": self.data.num_classes, "workers": self.data.workers,
            "settings": compute_settings(self.dev, self.precision, args.channels_last),
        }
