"""Our LR must equal timm's scheduler at every step of the run, stepped per epoch as the reference
port's train.py drives it, and per update as timm's --sched-on-updates does."""
import math

import pytest
import torch
from timm.scheduler import create_scheduler_v2

from common.errors import CheckpointError, ConfigError
from model.schedule import LRSchedule, ScheduleConfig, lr_at, scale_lr, total_epochs, total_steps

CASES = [
    # sched, epochs, steps_per_epoch, warmup_epochs, cooldown_epochs, extra
    ("cosine", 3, 1, 0, 0, {}),
    ("cosine", 5, 7, 1, 0, {}),
    ("cosine", 6, 7, 2, 3, {"min_lr": 1e-5}),
    ("cosine", 4, 1, 1, 2, {"warmup_lr": 1e-4, "min_lr": 1e-6}),
    ("cosine", 10, 7, 3, 2, {"warmup_prefix": True, "min_lr": 1e-3}),
    ("step", 10, 7, 0, 0, {"decay_epochs": 3, "decay_rate": 0.5}),
    ("step", 8, 1, 2, 2, {"decay_epochs": 2}),
    ("step", 9, 7, 2, 0, {"decay_epochs": 2.5, "warmup_prefix": True}),
    ("multistep", 10, 7, 0, 0, {"decay_milestones": (3, 7), "decay_rate": 0.5}),
    ("multistep", 9, 3, 2, 2, {"decay_milestones": (2, 5, 6)}),
    ("multistep", 9, 7, 2, 0, {"decay_milestones": (1, 4), "warmup_prefix": True, "decay_rate": 0.3}),
    ("poly", 6, 7, 0, 0, {"decay_rate": 2.0}),
    ("poly", 6, 7, 2, 3, {"decay_rate": 0.5, "min_lr": 1e-3}),
    ("poly", 7, 5, 2, 1, {"decay_rate": 0.9, "warmup_prefix": True, "min_lr": 1e-5}),
    ("poly", 5, 1, 1, 0, {}),  # timm's default power: decay_rate 0.1
]


def _timm_lrs(cfg: ScheduleConfig, n_steps_extra: int = 3):
    """The LR of every optimizer update when timm's scheduler is driven as train.py drives it:
    `step_update(num_updates)` after each update, `step(epoch + 1)` after each epoch (one of
    the two is a no-op, depending on step_on_epochs)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.base_lr)
    sched, num_epochs = create_scheduler_v2(
        opt, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
        decay_milestones=list(cfg.decay_milestones), decay_rate=cfg.decay_rate, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs, warmup_prefix=cfg.warmup_prefix,
        cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=not cfg.on_updates,
        updates_per_epoch=cfg.steps_per_epoch)
    lrs, n = [], 0  # the LR in the group when an update runs (epoch 0: the value set at construction)
    for epoch in range(num_epochs + 1):  # one epoch past the end: the LR stays put
        for _ in range(cfg.steps_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            n += 1
            sched.step_update(num_updates=n)
        sched.step(epoch + 1)
    return num_epochs, lrs[:num_epochs * cfg.steps_per_epoch + n_steps_extra]


@pytest.mark.parametrize("on_updates", [False, True], ids=["per-epoch", "per-update"])
@pytest.mark.parametrize("sched,epochs,spe,warmup,cooldown,extra", CASES)
def test_lr_matches_timm_every_step(sched, epochs, spe, warmup, cooldown, extra, on_updates):
    cfg = ScheduleConfig(base_lr=0.4, epochs=epochs, steps_per_epoch=spe, sched=sched,
                         warmup_epochs=warmup, cooldown_epochs=cooldown, on_updates=on_updates, **extra)
    num_epochs, expected = _timm_lrs(cfg)
    assert total_epochs(cfg) == num_epochs
    assert total_steps(cfg) == num_epochs * spe
    ours = [lr_at(n, cfg) for n in range(len(expected))]
    for n, (a, b) in enumerate(zip(ours, expected)):
        assert a == pytest.approx(b, rel=1e-12, abs=0), f"step {n}: ours {a} timm {b}"
    # the curve really has the expected shape (guards against comparing two constants)
    if sched in ("multistep", "poly"):  # written after timm 1.0's expressions: bit-identical
        assert ours == expected
    fewest = 3 if on_updates and sched != "multistep" else 2  # per epoch (or multistep): as few as 3 values
    assert max(ours) <= 0.4 and len(set(ours)) > fewest
    if warmup:
        assert ours[0] == cfg.warmup_lr
    if sched in ("cosine", "poly") and cooldown:
        assert ours[total_steps(cfg) - 1] == cfg.min_lr  # cooldown holds min_lr
    if not on_updates:  # one value per epoch
        assert all(len(set(ours[e * spe:(e + 1) * spe])) == 1 for e in range(num_epochs))


def test_reference_run_lr_per_epoch():
    """The port's 8-device run: --lr 1.6, 90 epochs, warmup 3 from 1e-4, min 1e-5, per epoch
    (recipe: epochs 0-2 at 1e-4, 0.5334, 1.0667; epoch 3 at 1.59562; epoch 89 at 4.973e-4)."""
    cfg = ScheduleConfig(base_lr=1.6, epochs=90, steps_per_epoch=7)  # per epoch: any step count
    assert total_epochs(cfg) == 90
    per_epoch = [lr_at(e * 7 + 3, cfg) for e in range(90)]
    assert per_epoch[:3] == pytest.approx([1e-4, 0.53340, 1.06670], abs=1e-4)
    assert per_epoch[3] == pytest.approx(1.59562, abs=1e-5)
    assert per_epoch[89] == pytest.approx(4.973e-4, rel=1e-3)
    num_epochs, expected = _timm_lrs(cfg, n_steps_extra=0)
    assert [lr_at(n, cfg) for n in range(len(expected))] == expected  # bit-exact


def test_cooldown_extends_cosine_only():
    cos = ScheduleConfig(base_lr=0.1, epochs=10, steps_per_epoch=5, cooldown_epochs=3)
    step = ScheduleConfig(base_lr=0.1, epochs=10, steps_per_epoch=5, cooldown_epochs=3, sched="step")
    assert total_epochs(cos) == 13
    assert total_epochs(step) == 10  # timm ignores cooldown for the step schedule


def test_schedule_writes_float_and_tensor_lr_in_place():
    cfg = ScheduleConfig(base_lr=0.2, epochs=4, steps_per_epoch=3, warmup_epochs=1, on_updates=True)
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    lr_tensor = torch.tensor(0.123)
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2], "lr": 0.5}], lr=lr_tensor, fused=True)
    assert opt.param_groups[0]["lr"] is lr_tensor and not torch.is_tensor(opt.param_groups[1]["lr"])
    schedule = LRSchedule(opt, cfg)
    assert opt.param_groups[0]["lr"].item() == pytest.approx(cfg.warmup_lr)
    for n in (1, 5, 11):
        lr = schedule.step(n)
        assert lr == lr_at(n, cfg)
        assert opt.param_groups[0]["lr"] is lr_tensor  # same object: compiled steps see new value
        assert lr_tensor.item() == pytest.approx(lr_at(n, cfg), rel=1e-6)  # float32 tensor
        assert opt.param_groups[1]["lr"] == lr_at(n, cfg)


def test_state_dict_records_the_schedule_and_a_fresh_one_resumes_at_the_same_lr():
    """Resume rebuilds the schedule from the run's flags; the LR is a pure function of the step."""
    cfg = ScheduleConfig(base_lr=0.3, epochs=5, steps_per_epoch=4, sched="step", decay_epochs=2,
                         warmup_epochs=0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    a = LRSchedule(opt, cfg)
    a.step(13)
    state = a.state_dict()
    assert ScheduleConfig(**state["cfg"]) == cfg and state["last_step"] == 13  # recorded in checkpoints
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    b = LRSchedule(opt2, cfg)  # same flags, fresh object
    b.step(state["last_step"])
    assert b.cfg == cfg and b.last_step == 13
    assert opt2.param_groups[0]["lr"] == lr_at(13, cfg) == 0.3 * 0.1


def test_scale_lr_and_config_errors():
    assert scale_lr(0.1, 256) == pytest.approx(0.1)
    assert scale_lr(0.1, 8 * 256) == pytest.approx(0.8)
    assert math.isclose(scale_lr(0.1, 64), 0.025)
    assert scale_lr(0.2, 8 * 256) == pytest.approx(1.6)  # the reference run: 0.2 per 256
    assert scale_lr(0.2, 1024, base_size=512) == pytest.approx(0.4)
    assert scale_lr(0.1, 1024, scale="sqrt") == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="lr-base-scale"):
        scale_lr(0.1, 256, scale="cubic")
    with pytest.raises(ConfigError, match="unknown LR schedule"):
        ScheduleConfig(base_lr=0.1, epochs=1, steps_per_epoch=1, sched="wsd")
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        ScheduleConfig(base_lr=0.1, epochs=1, steps_per_epoch=0)


# ---- plateau: the LR follows the eval metric ----

# an accuracy that improves, stalls, improves a little (below the 1e-4 relative threshold), then stalls
METRICS = [10.0, 20.0, 30.0, 30.0, 29.0, 30.001, 28.0, 35.0, 35.0, 35.0, 34.0, 33.0, 36.0, 36.0, 36.0,
           36.0, 36.0, 36.0, 36.0, 36.0]


def _timm_plateau_lrs(cfg: ScheduleConfig, metrics):
    """timm's plateau scheduler as train.py drives it: `step(epoch + 1, eval_metric)` after each epoch."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.base_lr)
    with pytest.warns(FutureWarning, match="deprecated"):
        sched, num_epochs = create_scheduler_v2(
            opt, sched="plateau", num_epochs=cfg.epochs, decay_rate=cfg.decay_rate, min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, patience_epochs=cfg.patience_epochs,
            plateau_mode=cfg.plateau_mode, warmup_prefix=cfg.warmup_prefix, step_on_epochs=True,
            updates_per_epoch=cfg.steps_per_epoch)
    lrs = []
    for epoch, value in enumerate(metrics):
        lrs += [opt.param_groups[0]["lr"]] * cfg.steps_per_epoch
        sched.step_update(num_updates=(epoch + 1) * cfg.steps_per_epoch)  # a no-op, as in train.py
        sched.step(epoch + 1, value)
    return num_epochs, lrs


def _our_plateau_lrs(schedule: LRSchedule, metrics, start_epoch=0):
    lrs, spe = [], schedule.cfg.steps_per_epoch
    for epoch in range(start_epoch, len(metrics)):
        lrs += [schedule.step(epoch * spe + i) for i in range(spe)]
        schedule.metric(epoch, metrics[epoch])
    return lrs


@pytest.mark.parametrize("extra", [
    {"patience_epochs": 2},
    {"patience_epochs": 1, "warmup_epochs": 3, "decay_rate": 0.5, "min_lr": 0.04},
    {"patience_epochs": 0, "warmup_epochs": 2, "warmup_prefix": True},
    {"patience_epochs": 2, "plateau_mode": "min", "warmup_epochs": 1},
])
def test_plateau_matches_timm_every_step(extra):
    cfg = ScheduleConfig(base_lr=0.4, epochs=len(METRICS), steps_per_epoch=3, sched="plateau",
                         **{"warmup_epochs": 0, **extra})
    metrics = METRICS if cfg.plateau_mode == "max" else [10 / m for m in METRICS]  # min: a loss going down
    num_epochs, expected = _timm_plateau_lrs(cfg, metrics)
    assert total_epochs(cfg) == num_epochs
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ours = _our_plateau_lrs(LRSchedule(opt, cfg), metrics)
    assert ours == expected  # bit-identical
    cuts = sum(b < a for a, b in zip(ours, ours[1:]))
    assert cuts >= 2, ours  # the metric sequence really drives it
    if "min_lr" in extra:
        assert min(ours[cfg.warmup_epochs * 3:]) == cfg.min_lr  # cut down to min_lr, never below
    # the same sequence without metrics: the LR never drops after warmup
    plain = _our_plateau_lrs(LRSchedule(opt, cfg), [None] * len(metrics))
    assert len(set(plain[cfg.warmup_epochs * 3:])) == 1


def test_plateau_resumes_exactly_from_its_state_dict(tmp_path):
    """Interrupted after any epoch, a fresh schedule with the saved state (through a weights_only
    checkpoint file) gives the uninterrupted LRs; without the state the patience counter is lost."""
    cfg = ScheduleConfig(base_lr=0.4, epochs=len(METRICS), steps_per_epoch=2, sched="plateau",
                         patience_epochs=2, warmup_epochs=1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    full = _our_plateau_lrs(LRSchedule(opt, cfg), METRICS)
    differs = 0
    for stop in range(1, len(METRICS)):
        first = LRSchedule(opt, cfg)
        _our_plateau_lrs(first, METRICS[:stop])
        torch.save({"schedule": first.state_dict()}, tmp_path / "s.pth")
        state = torch.load(tmp_path / "s.pth", weights_only=True)["schedule"]
        resumed = LRSchedule(opt, ScheduleConfig(**state["cfg"]))
        resumed.load_state_dict(state)
        assert _our_plateau_lrs(resumed, METRICS, start_epoch=stop) == full[stop * 2:], stop
        fresh = LRSchedule(opt, cfg)  # what timm's resume amounts to: the plateau logic restarts
        differs += _our_plateau_lrs(fresh, METRICS, start_epoch=stop) != full[stop * 2:]
    assert differs > 0  # the state really matters
    # fixed schedules ignore metrics and plateau state
    cos = LRSchedule(opt, ScheduleConfig(base_lr=0.4, epochs=5, steps_per_epoch=2))
    cos.metric(3, 1.0)
    cos.load_state_dict(state)
    assert cos.step(7) == lr_at(7, cos.cfg)


def test_new_schedule_config_errors():
    with pytest.raises(ConfigError, match="once per epoch"):
        ScheduleConfig(base_lr=0.1, epochs=3, steps_per_epoch=2, sched="plateau", on_updates=True)
    with pytest.raises(ConfigError, match="mode max or min"):
        ScheduleConfig(base_lr=0.1, epochs=3, steps_per_epoch=2, sched="plateau", plateau_mode="up")
    with pytest.raises(ConfigError, match="increasing order"):
        ScheduleConfig(base_lr=0.1, epochs=3, steps_per_epoch=2, sched="multistep", decay_milestones=(5, 2))
    cfg = ScheduleConfig(base_lr=0.1, epochs=3, steps_per_epoch=2, sched="multistep", decay_milestones=[1, 2])
    assert cfg.decay_milestones == (1, 2)  # hashable, and equal after a checkpoint round trip
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(CheckpointError, match="plateau schedule state is unusable"):
        LRSchedule(opt, ScheduleConfig(base_lr=0.1, epochs=3, steps_per_epoch=2, sched="plateau")) \
            .load_state_dict({"plateau": {"lr": "x", "state": {}}})
