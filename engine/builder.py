"""From a configuration to the ready parts of a run: `build(config)` makes the data, model,
optimizer, precision, LR schedule, EMA, resume state, saver, metrics, monitor and controller,
in the order that keeps runs bit-identical (seeds, then weights, then the resumed state), and
says what it made. `engine.trainer.Trainer(parts)` then runs the loops.

    from engine import Config, build, Trainer
    parts = build(Config.create(data_path="/data/wds", model="resnet10t", epochs=2, output="runs"))
    summary = Trainer(parts).fit()
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from model.checkpoint import CheckpointSaver, resume
from model.factory import compile_model, create_model
from model.loss import create_loss
from model.optim import build_optimizer, default_lr_base_scale
from model.precision import Precision
from model.schedule import LRSchedule, ScheduleConfig, scale_lr
from pipeline.resolution import ResolutionSchedule

from . import data as engine_data
from . import rankstate
from .config import Config, parse_interval
from .control import Control
from .data import Data
from .dist import Dist, setup_distributed, sync_batchnorm
from .guards import sample_order
from .inference import with_model_eval_defaults
from .metrics import Metrics
from .monitor import Monitor
from .resolved import Resolved, plain_config, resolve
from .resume import start_position
from .rundir import keep_config
from .runtime import configure_torch, precision_for, resolve_threads


@dataclass(frozen=True)
class Start:
    """Where this run begins: epoch, step in it, this rank's loader progress (mid-epoch), the
    checkpoint it resumes (None: a fresh run) and the best metric recorded so far."""
    epoch: int = 0
    step: int = 0
    progress: list | None = None
    path: str | None = None
    best: float | None = None
    elastic: dict | None = None  # engine.resume.start_position: what the resumed epoch consumed / has left
    rank_state: dict | None = None  # this rank's saved state (engine.rankstate), same world size only
    epoch_losses: tuple = ()  # train losses logged before a mid-epoch checkpoint in its epoch


@dataclass
class Parts:
    """Everything a Trainer needs, made by `build`."""
    config: Resolved
    dist: Dist
    data: Data
    model: torch.nn.Module  # for training: DDP- and compile-wrapped as configured
    plain: torch.nn.Module  # the bare module: evaluation and checkpoints
    optimizer: torch.optim.Optimizer
    precision: Precision
    schedule: LRSchedule
    ema: object | None
    criterion: torch.nn.Module
    clip_params: list | None  # parameters to clip (None: no clipping)
    resolution: ResolutionSchedule
    lr: float  # the peak LR (--lr, or --lr-base scaled to the global batch)
    start: Start
    saver: CheckpointSaver | None  # None: this rank saves nothing
    metrics: Metrics
    monitor: Monitor
    control: Control
    dist_bn: str  # the BN statistics sync after each epoch ('' when synchronised BN makes it moot)

    @property
    def run_dir(self) -> str | None:
        return self.config.run_dir if self.dist.main else None  # rank 0 writes


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (all devices), as timm's random_seed(seed, rank) with seed + rank."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build(config: Config | Resolved, d: Dist | None = None, data: Data | None = None) -> Parts:
    """The parts of a run of `config` on this process (distributed set-up from the environment
    unless `d` is given; its data unless `data` is given)."""
    run = config if isinstance(config, Resolved) else resolve(config)
    run = with_model_eval_defaults(run)  # --crop-pct, --interpolation: the model's where not given
    if d is None:
        c = run.config.dist
        d = setup_distributed(c.device, c.device_id, c.local_rank)
        for note in run.notes:  # where the run goes, auto-resume, warnings about the flags
            d.say(note)
        configure_torch(resolve_threads(c.threads, run.config.data.workers, d.local_world,
                                        loader_workers=not run.config.data.synthetic))
    data = data if data is not None else engine_data.make_data(run, d)
    return build_parts(run, d, data)


def build_parts(run: Resolved, d: Dist, data: Data) -> Parts:
    """The model side of a run whose data is made."""
    run = with_model_eval_defaults(run)
    cfg, dev = run.config, d.device
    m, o, s = cfg.network, cfg.optim, cfg.schedule
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    extra = {} if m.drop_path is None else {"drop_path_rate": m.drop_path}
    if m.drop:  # timm's --drop; left out at 0 so models without the argument still build
        extra["drop_rate"] = m.drop
    model = create_model(m.model, num_classes=data.num_classes, zero_init_last=m.zero_init_last,
                         channels_last=m.channels_last, device=dev, pretrained=m.pretrained,
                         pretrained_path=m.pretrained_path, checkpoint_path=m.initial_checkpoint or None,
                         blurpool=m.blurpool, **extra)
    seed_everything(cfg.run.seed + d.rank)  # as timm's random_seed(seed, rank): drop path differs per rank
    dist_bn = cfg.dist.dist_bn
    if cfg.dist.sync_bn:
        model = sync_batchnorm(model, d)
        dist_bn = ""  # as timm: synchronised BN needs no statistics averaging
    global_batch = o.batch_size * d.world * o.grad_accum_steps  # as timm: the batch of one update
    scaling = o.lr_base_scale or default_lr_base_scale(o.opt)  # timm: sqrt for Ada*/LAMB, else linear
    lr = o.lr if o.lr is not None else scale_lr(o.lr_base, global_batch, o.lr_base_size, scaling)
    optimizer, opt_desc = build_optimizer(o.opt, model, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                          eps=o.opt_eps, betas=o.opt_betas, device=dev, apex=cfg.precision.apex_amp)
    precision = precision_for(cfg, dev, say=d.say)
    model, optimizer = precision.prepare(model, optimizer)
    steps_per_epoch = updates_per_epoch(len(data.train), o.grad_accum_steps)
    schedule = LRSchedule(optimizer, ScheduleConfig(
        lr, s.epochs, steps_per_epoch, sched=s.sched, warmup_epochs=s.warmup_epochs, warmup_lr=s.warmup_lr,
        min_lr=s.min_lr, decay_epochs=s.decay_epochs, decay_rate=s.decay_rate, cooldown_epochs=s.cooldown_epochs,
        on_updates=s.sched_on_updates and s.sched != "plateau",  # plateau: once per epoch, after evaluation
        peak_epoch=s.lr_peak_epoch, decay_milestones=s.decay_milestones, patience_epochs=s.patience_epochs,
        plateau_mode="min" if cfg.outputs.eval_metric == "loss" else "max"))
    ema = None
    if m.model_ema:
        from timm.utils import ModelEmaV3
        # float32 EMA even when Apex O2 made the model float16 (a 2e-4 step vanishes in fp16)
        ema = ModelEmaV3(model, decay=m.model_ema_decay, use_warmup=m.model_ema_warmup,
                         dtype=torch.float32 if precision.mode == "apex" else None)
    start, resume_at = Start(), None
    if run.resume:
        # The schedule is not restored: the LR is a pure function of (step, schedule), and this
        # run's flags and world size decide it, so a resume on another number of devices keeps
        # the right curve.
        # (the plateau schedule's state, which metrics decide, is restored)
        keep_opt = not cfg.run.no_resume_opt  # timm's --no-resume-opt: weights (and EMA) only
        state = resume(run.resume, model, optimizer if keep_opt else None, precision if keep_opt else None, dev,
                       restore_rng=d.main, model_name=m.model, ema=ema)
        schedule.load_state_dict(state.get("schedule") or {})
        pos = state["position"]
        epoch, step, progress, elastic = start_position(pos, run.resume, data, d, o.batch_size,
                                                        cfg.run.allow_other_data, order=sample_order(cfg))
        if step % o.grad_accum_steps and step < len(data.train) and elastic is None:  # another --grad-accum-steps
            d.say(f"resume: {run.resume} stopped inside an update of {o.grad_accum_steps} batches; continuing at "
                  f"the start of epoch {epoch + 1}")
            epoch, step, progress = epoch + 1, 0, None
        mine = rankstate.restore(state.get("ranks"), model, ema, precision, d, run.resume)
        mid = step > 0 and step == pos.get("step")  # continuing inside the saved epoch, on its plan
        start = Start(epoch, step, progress, run.resume, state["best_metric"], elastic, mine if mid else None,
                      tuple(rankstate.epoch_losses(pos)) if mid else ())
        d.say(f"resume: {run.resume}: resuming at epoch {epoch} step {step}/{steps_per_epoch}")
        resume_at = (epoch, pos.get("global_step", epoch * steps_per_epoch))
    if cfg.run.start_epoch is not None:  # timm's --start-epoch: wins over the checkpoint's epoch
        start = Start(cfg.run.start_epoch, 0, None, start.path, start.best)
        resume_at = (cfg.run.start_epoch, cfg.run.start_epoch * steps_per_epoch) if start.path else None
    run_dir = run.run_dir if d.main else None
    saver = CheckpointSaver(run_dir, dev, start.best, hist=cfg.outputs.checkpoint_hist,
                            extra={"num_classes": data.num_classes, "classes": list(data.classes)}) if run_dir else None
    if saver and saver.removed:
        d.say(f"checkpoint: removed {saver.removed} temporary file(s) of interrupted checkpoint writes")
    plain = model  # for eval and checkpoints: no DDP, no compile
    if d.world > 1:
        model = wrap_ddp(model, [dev.index] if dev.is_accelerator else None, cfg.dist.ddp_broadcast_buffers)
    resolution = ResolutionSchedule.from_args(cfg)
    if m.torchcompile:  # static shapes: one graph per training size (model.factory.compile_model)
        model = compile_model(model, m.torchcompile, m.compile_mode, sizes=len(resolution.sizes(s.epochs)))
    criterion, loss_desc = create_loss(mixup=cfg.augment.mixup_active, smoothing=o.smoothing, bce=o.bce_loss,
                                       bce_target_thresh=o.bce_target_thresh, bce_sum=o.bce_sum,
                                       bce_pos_weight=o.bce_pos_weight, device=dev.torch)
    clip_params = None
    if o.clip_grad is not None:
        from timm.models import model_parameters
        params = model_parameters(plain, exclude_head=o.clip_mode == "agc")  # timm's head rule
        clip_params = precision.master_params(optimizer, plain) if precision.mode == "apex" else list(params)
    metrics = Metrics(run_dir, d.main, append=bool(start.path), resume_at=resume_at)
    record_config(run, run_dir, metrics)
    monitor = Monitor(run_dir, d.main, plain_config(run), tensorboard=cfg.outputs.tensorboard,
                      wandb=cfg.outputs.log_wandb, project=cfg.outputs.wandb_project, resume=bool(start.path))
    control = Control(d, parse_interval(cfg.run.checkpoint_interval))
    parts = Parts(run, d, data, model, plain, optimizer, precision, schedule, ema, criterion, clip_params,
                  resolution, lr, start, saver, metrics, monitor, control, dist_bn)
    describe(parts, opt_desc, global_batch)
    if o.bce_loss or o.grad_accum_steps > 1:
        d.say(f"loss: {loss_desc}" + (f"; gradients of {o.grad_accum_steps} batches per update, {steps_per_epoch} "
                                      "updates/epoch" if o.grad_accum_steps > 1 else ""))
    return parts


def wrap_ddp(model: torch.nn.Module, device_ids, broadcast_buffers: bool) -> torch.nn.Module:
    """DDP around `model`. torch 2.13+ deprecates `broadcast_buffers` for `forward_sync_buffers`,
    but only `broadcast_buffers=False` keeps each rank's own buffers at the start too (what the
    port does), so it is passed only when off, with that one FutureWarning silenced."""
    import warnings

    from torch.nn.parallel import DistributedDataParallel as DDP
    kw = {} if broadcast_buffers else {"broadcast_buffers": False}  # on: DDP's default
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`broadcast_buffers` is deprecated", category=FutureWarning)
        return DDP(model, device_ids=device_ids, gradient_as_bucket_view=True, **kw)


def updates_per_epoch(batches: int, accum: int) -> int:
    """Optimizer updates in an epoch of `batches` loader batches, `accum` per update: timm 1.0's
    (batches + accum - 1) // accum (the last update takes the remainder)."""
    return (batches + accum - 1) // accum


def record_config(run: Resolved, run_dir: str | None, metrics: Metrics) -> None:
    """config.json and timm's args.yaml (loadable with -c) in the run folder, and a config row."""
    config = plain_config(run)
    if run_dir:  # a resume keeps the first start's files and records itself in resumes.jsonl
        keep_config(run_dir, config, resumed=bool(run.resume))
    metrics.write(kind="config", time=time.time(), **config)  # the start, for time_to_accuracy


def describe(p: Parts, opt_desc: str, global_batch: int) -> None:
    m, s, say = p.config.config.network, p.config.config.schedule, p.dist.say
    say(f"model {m.model} ({sum(t.numel() for t in p.plain.parameters()):,} params), "
        f"{'channels-last' if m.channels_last else 'NCHW'}, "
        f"{'compiled (' + m.torchcompile + ')' if m.torchcompile else 'eager'}"
        f"{', pretrained' if m.pretrained or m.pretrained_path else ''}"
        f"{', BlurPool' if m.blurpool else ''}"
        f"{', EMA %g' % m.model_ema_decay if p.ema else ''}")
    say(f"optimizer: {opt_desc}; LR {p.lr:g} for global batch {global_batch}, "
        f"{s.sched} schedule stepped per {'update' if p.schedule.cfg.on_updates else 'epoch'}")
    say(f"precision: {p.precision.describe()}")
    r = p.resolution
    if r.progressive:
        say(f"progressive resizing: {r.min_res} px to epoch {r.start_ramp}, {r.max_res} px from epoch "
            f"{r.end_ramp} (sizes {', '.join(map(str, r.sizes(s.epochs)))})")
