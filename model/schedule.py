"""Learning-rate schedule: linear warmup, then cosine (or step) decay, then cooldown at min_lr;
or FFCV's triangle (`linear-step`).

`lr_at(step, cfg)` is a pure function of the global optimizer-update count, in two modes:
- per epoch (the default, `on_updates=False`): the LR changes once per epoch, as in the
  reference port's train.py and timm's default: epoch 0 runs at `warmup_lr`, and after each
  epoch train.py calls `lr_scheduler.step(epoch + 1)`, so every update of epoch e uses timm's
  `_get_lr(e)` (recipe: timm `create_scheduler_v2(..., step_on_epochs=True)`);
- per update (`on_updates=True`, timm's `--sched-on-updates`): update u uses `_get_lr(u)` with
  every length multiplied by `steps_per_epoch` (`step_on_epochs=False` + `step_update(u)`).
tests/test_schedule.py drives timm's scheduler both ways and compares every step.
Being pure makes resume trivial: the LR of step N depends on N and the config only.

timm semantics kept on purpose (see timm/scheduler/{cosine_lr,step_lr,scheduler_factory}.py):
- warmup is linear from `warmup_lr` towards `base_lr` over `warmup_epochs` and, with
  `warmup_prefix=False` (timm's default), lies *inside* `epochs`: after warmup the cosine
  continues at its value for that step (a small jump down, not a restart from base_lr);
- cosine reaches `min_lr` at step `epochs * steps_per_epoch` and stays there: cooldown epochs
  extend the run at `min_lr` (timm adds them to the total epoch count for cosine only);
- step decays by `decay_rate` every `decay_epochs`; timm does *not* add cooldown epochs to a
  step schedule's length, so `total_epochs()` ignores `cooldown_epochs` for `sched="step"`.

`linear-step` is ffcv-imagenet's `lr_schedule_type: cyclic` (train_imagenet.py @ 606c584,
`get_cyclic_lr` l.107-113, used by every rn50 config): one triangle through (0, 1e-4 x lr),
(`peak_epoch`, lr), (`epochs`, 0), evaluated with numpy.interp as FFCV does. FFCV changes the LR
every iteration (`train_loop` l.356-364: np.interp(ix, [0, iters], [lr(e), lr(e + 1)])): that is
the per-update mode here, bit for bit; per epoch, every update of epoch e uses lr(e). It ignores
warmup_epochs/warmup_lr/min_lr/cooldown_epochs (FFCV has none of them).

timm's other schedules, same warmup, same two modes, same expressions as timm 1.0's
(timm/scheduler/{multistep_lr,poly_lr,plateau_lr}.py, built by create_scheduler_v2):
- `multistep`: base_lr x decay_rate ** (number of `decay_milestones` <= t + 1), t in epochs or
  updates (milestones times steps_per_epoch per update, as timm); timm's t + 1 convention kept;
- `poly`: min_lr + (base_lr - min_lr) * (1 - t / t_initial) ** decay_rate (timm overloads
  decay_rate as the power), then min_lr (cooldown extends it as for cosine);
- `plateau`: per epoch only (as timm). After warmup the LR is cut by decay_rate (not below
  min_lr) when the eval metric has not improved for `patience_epochs` epochs, by torch's
  ReduceLROnPlateau as timm's PlateauLRScheduler uses it (threshold 1e-4 relative, cooldown 0).
  The LR then depends on the metrics seen: `LRSchedule.metric(epoch, value)` feeds it after the
  evaluation of `epoch`, and its state is in state_dict()/load_state_dict(), so resume is exact
  (timm's own plateau state loses the patience counter on resume).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from common.errors import CheckpointError, ConfigError
from model.recipe import (  # the schedule's defaults live with the recipe (importable without torch)
    DEFAULT_BASE_SIZE,
    DEFAULT_COOLDOWN_EPOCHS,
    DEFAULT_DECAY_EPOCHS,
    DEFAULT_DECAY_RATE,
    DEFAULT_LR_PEAK_EPOCH,
    DEFAULT_MIN_LR,
    DEFAULT_WARMUP_EPOCHS,
    DEFAULT_WARMUP_LR,
    LINEAR_STEP_START,
    SCHEDULES,
    peak_epoch_ok,
)

# The names ScheduleConfig takes.
SCHEDULE_NAMES = SCHEDULES  # model.recipe lists timm's multistep, poly and plateau too
# timm 1.0 train.py defaults for the schedules added here (--decay-milestones, --patience-epochs)
DEFAULT_DECAY_MILESTONES = (90, 180, 270)
DEFAULT_PATIENCE_EPOCHS = 10
PLATEAU_MODES = ("max", "min")  # timm: 'min' when the eval metric is a loss, else 'max'


@dataclass(frozen=True)
class ScheduleConfig:
    base_lr: float
    epochs: int
    steps_per_epoch: int  # optimizer updates per epoch on each rank
    sched: str = "cosine"
    warmup_epochs: int = DEFAULT_WARMUP_EPOCHS
    warmup_lr: float = DEFAULT_WARMUP_LR
    min_lr: float = DEFAULT_MIN_LR
    decay_epochs: float = DEFAULT_DECAY_EPOCHS
    decay_rate: float = DEFAULT_DECAY_RATE
    cooldown_epochs: int = DEFAULT_COOLDOWN_EPOCHS
    warmup_prefix: bool = False  # True: warmup comes before `epochs` of decay instead of inside them
    on_updates: bool = False  # True: a new LR every update (--sched-on-updates); False: once per epoch
    peak_epoch: int = DEFAULT_LR_PEAK_EPOCH  # linear-step: the epoch at which the LR peaks
    decay_milestones: tuple[int, ...] = DEFAULT_DECAY_MILESTONES  # multistep: epochs that decay the LR
    patience_epochs: int = DEFAULT_PATIENCE_EPOCHS  # plateau: epochs without improvement before a cut
    plateau_mode: str = "max"  # plateau: "max" (accuracy) or "min" (loss)

    def __post_init__(self):
        if self.sched not in SCHEDULE_NAMES:
            raise ConfigError(f"unknown LR schedule {self.sched!r}: choose {' or '.join(SCHEDULE_NAMES)}")
        object.__setattr__(self, "decay_milestones", tuple(int(m) for m in self.decay_milestones))
        if self.sched == "multistep" and list(self.decay_milestones) != sorted(self.decay_milestones):
            raise ConfigError(f"the multistep decay milestones must be in increasing order "
                             f"(got {', '.join(map(str, self.decay_milestones))})")
        if self.sched == "plateau":
            if self.on_updates:
                raise ConfigError("the plateau schedule changes the LR once per epoch, after the evaluation; "
                                 "it cannot change it every update")
            if self.plateau_mode not in PLATEAU_MODES or self.patience_epochs < 0:
                raise ConfigError(f"the plateau schedule needs mode max or min and patience >= 0 "
                                 f"(got {self.plateau_mode!r} and {self.patience_epochs})")
        if self.steps_per_epoch < 1 or self.epochs < 1:
            raise ConfigError(f"the LR schedule needs epochs >= 1 and steps_per_epoch >= 1 "
                             f"(got {self.epochs} and {self.steps_per_epoch})")
        if not peak_epoch_ok(self.sched, self.peak_epoch, self.epochs):  # the rule: model/recipe.py
            raise ConfigError(f"linear-step's lr-peak-epoch must be in [0, epochs) "
                             f"(got {self.peak_epoch} with {self.epochs} epochs)")


def scale_lr(lr_base: float, global_batch: int, base_size: int = DEFAULT_BASE_SIZE,
             scale: str = "linear") -> float:
    """timm train.py's rule when --lr is not given: lr = lr_base * (global_batch / base_size),
    or its square root with `scale="sqrt"` (timm's choice for Ada*/LAMB; "linear" for SGD)."""
    ratio = global_batch / base_size
    if scale == "sqrt":
        ratio = ratio ** 0.5
    elif scale != "linear":
        raise ConfigError(f"unknown lr-base-scale {scale!r}: choose linear or sqrt")
    return lr_base * ratio


def triangle_lr(epoch: float, cfg: ScheduleConfig) -> float:
    """ffcv-imagenet's get_cyclic_lr: np.interp([epoch], [0, peak, epochs], [1e-4 lr, lr, 0])[0]
    (0 from `epochs` on: np.interp clamps)."""
    if cfg.peak_epoch == 0:  # FFCV's xs would repeat 0; the triangle is then a line down from lr
        return float(np.interp([epoch], [0, cfg.epochs], [cfg.base_lr, 0])[0])
    xs, ys = [0, cfg.peak_epoch, cfg.epochs], [LINEAR_STEP_START * cfg.base_lr, cfg.base_lr, 0]
    return float(np.interp([epoch], xs, ys)[0])


def lr_at(step: int, cfg: ScheduleConfig) -> float:
    """LR for the optimizer update number `step` (0-based; counted over the whole run)."""
    if cfg.sched == "linear-step":
        epoch, ix = divmod(step, cfg.steps_per_epoch)
        if not cfg.on_updates:
            return triangle_lr(epoch, cfg)
        # FFCV's train_loop: lrs = np.interp(np.arange(iters), [0, iters], [lr(e), lr(e + 1)])
        ends = [triangle_lr(epoch, cfg), triangle_lr(epoch + 1, cfg)]
        return float(np.interp([ix], [0, cfg.steps_per_epoch], ends)[0])
    spe = 1 if not cfg.on_updates else cfg.steps_per_epoch  # timm's unit t: epochs or updates
    t = step if cfg.on_updates else step // cfg.steps_per_epoch
    warmup_t = cfg.warmup_epochs * spe
    if t < warmup_t:
        # same expression order as timm so the floats are bit-identical
        return cfg.warmup_lr + t * ((cfg.base_lr - cfg.warmup_lr) / warmup_t)
    if cfg.warmup_prefix:
        t -= warmup_t
    if cfg.sched == "step":
        return cfg.base_lr * (cfg.decay_rate ** (t // (cfg.decay_epochs * spe)))
    if cfg.sched == "multistep":  # timm's get_curr_decay_steps: bisect_right(milestones, t + 1)
        return cfg.base_lr * (cfg.decay_rate ** bisect.bisect_right([m * spe for m in cfg.decay_milestones], t + 1))
    if cfg.sched == "plateau":  # before any metric: the LR warmup ended at (lr_at's caller adds the cuts)
        return plateau_start_lr(cfg)
    t_initial = cfg.epochs * spe
    if t >= t_initial:  # one cosine (or poly) cycle, then min_lr for the cooldown (and beyond)
        return cfg.min_lr
    if cfg.sched == "poly":  # timm's PolyLRScheduler, k_decay 1.0, one cycle (cycle_decay ** 0 = 1)
        return cfg.min_lr + (cfg.base_lr * 1.0 - cfg.min_lr) * (1 - t ** 1.0 / t_initial ** 1.0) ** cfg.decay_rate
    cosine = 1 + math.cos(math.pi * float(t) / float(t_initial))
    return cfg.min_lr + 0.5 * (cfg.base_lr - cfg.min_lr) * cosine


def plateau_start_lr(cfg: ScheduleConfig) -> float:
    """The plateau schedule's LR after warmup, before any cut: timm keeps the last warmup value
    (warmup_lr + warmup_epochs * step, which may differ from base_lr in the last bit)."""
    if not cfg.warmup_epochs:
        return cfg.base_lr
    return cfg.warmup_lr + cfg.warmup_epochs * ((cfg.base_lr - cfg.warmup_lr) / cfg.warmup_epochs)


def total_epochs(cfg: ScheduleConfig) -> int:
    """Epochs to train, as timm's create_scheduler_v2 returns them (includes prefix warmup/cooldown)."""
    if cfg.sched in ("cosine", "poly"):  # the cycle schedules; linear-step has no cooldown and no prefix
        steps = cfg.epochs * cfg.steps_per_epoch
        steps += cfg.warmup_epochs * cfg.steps_per_epoch if cfg.warmup_prefix else 0
        return (steps + cfg.cooldown_epochs * cfg.steps_per_epoch) // cfg.steps_per_epoch
    prefix = cfg.warmup_prefix and cfg.sched in ("step", "multistep", "plateau")
    return cfg.epochs + (cfg.warmup_epochs if prefix else 0)


def total_steps(cfg: ScheduleConfig) -> int:
    return total_epochs(cfg) * cfg.steps_per_epoch


class LRSchedule:
    """Writes the LR of `global_step` into every param group; call `.step(global_step)` before each
    optimizer update, with global_step = updates done so far (epoch * steps_per_epoch + i), and
    `.metric(epoch, value)` after each evaluation (it matters only to `plateau`).

    A tensor 'lr' (fused SGD) is filled in place: the optimizer keeps the same tensor object, so
    a compiled step never recompiles and no host-device sync is needed.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig):
        self.optimizer = optimizer
        self.cfg = cfg
        self.last_step, self.last_lr = 0, None
        self._plateau = None
        if cfg.sched == "plateau":
            # torch's ReduceLROnPlateau with timm's PlateauLRScheduler settings, on a one-group stand-in
            # optimizer that holds only the plateau LR (the real groups get it from step()).
            holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=plateau_start_lr(cfg))
            self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                holder, mode=cfg.plateau_mode, factor=cfg.decay_rate, patience=cfg.patience_epochs,
                threshold=1e-4, cooldown=0, min_lr=cfg.min_lr)
        self.step(0)

    def lr(self, global_step: int) -> float:
        """The LR of update `global_step`: lr_at(), or for plateau after warmup the LR the metrics
        fed so far have left."""
        if self._plateau is not None and global_step // self.cfg.steps_per_epoch >= self.cfg.warmup_epochs:
            return float(self._plateau.optimizer.param_groups[0]["lr"])
        return lr_at(global_step, self.cfg)

    def step(self, global_step: int) -> float:
        lr = self.lr(global_step)
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self.last_step, self.last_lr = global_step, lr
        return lr

    def metric(self, epoch: int, value: float | None) -> None:
        """The eval metric of `epoch` (0-based, just finished), as timm's train.py passes it to
        `lr_scheduler.step(epoch + 1, metric)`; call it before saving that epoch's checkpoint.
        A no-op for every schedule but plateau, and (as timm) inside the warmup."""
        if self._plateau is None or value is None or epoch + 1 <= self.cfg.warmup_epochs:
            return
        self._plateau.step(float(value))

    def state_dict(self) -> dict:
        """The config and step for the record (the LR of the fixed schedules is a pure function of
        the step and of the resuming run's flags, docs/training_core.md); for plateau also the LR
        and ReduceLROnPlateau's state (best, bad-epoch and cooldown counters), which resume needs."""
        state = {"cfg": asdict(self.cfg), "last_step": self.last_step}
        if self._plateau is not None:
            state["plateau"] = {"lr": float(self._plateau.optimizer.param_groups[0]["lr"]),
                                "state": self._plateau.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what resume needs (the plateau state); a no-op for the fixed schedules and for a
        checkpoint without plateau state (the plateau then starts afresh, as in timm)."""
        saved = state.get("plateau") if isinstance(state, dict) else None
        if self._plateau is None or not saved:
            return
        try:
            lr, inner = float(saved["lr"]), dict(saved["state"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("the checkpoint's plateau schedule state is unusable") from None
        if inner.get("mode") == self.cfg.plateau_mode:  # the best value means nothing in the other mode
            progress = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch", "_last_lr")
            self._plateau.load_state_dict({**self._plateau.state_dict(),
                                           **{k: inner[k] for k in progress if k in inner}})
        self._plateau.optimizer.param_groups[0]["lr"] = lr
