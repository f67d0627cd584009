"""Our per-step LR must equal timm's scheduler (stepped per update) at every step of the run."""
import math

import pytest
import torch
from timm.scheduler import create_scheduler_v2

from common.errors import ConfigError
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
]


def _timm_lrs(cfg: ScheduleConfig, n_steps_extra: int = 3):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.base_lr)
    sched, num_epochs = create_scheduler_v2(
        opt, sched=cfg.sched, num_epochs=cfg.epochs, decay_epochs=cfg.decay_epochs,
        decay_rate=cfg.decay_rate, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
        warmup_epochs=cfg.warmup_epochs, warmup_prefix=cfg.warmup_prefix,
        cooldown_epochs=cfg.cooldown_epochs, step_on_epochs=False,
        updates_per_epoch=cfg.steps_per_epoch)
    lrs = [opt.param_groups[0]["lr"]]  # value set at construction = LR of update 0
    for n in range(1, num_epochs * cfg.steps_per_epoch + n_steps_extra):
        sched.step_update(num_updates=n)
        lrs.append(opt.param_groups[0]["lr"])
    return num_epochs, lrs


@pytest.mark.parametrize("sched,epochs,spe,warmup,cooldown,extra", CASES)
def test_lr_matches_timm_every_step(sched, epochs, spe, warmup, cooldown, extra):
    cfg = ScheduleConfig(base_lr=0.4, epochs=epochs, steps_per_epoch=spe, sched=sched,
                         warmup_epochs=warmup, cooldown_epochs=cooldown, **extra)
    num_epochs, expected = _timm_lrs(cfg)
    assert total_epochs(cfg) == num_epochs
    assert total_steps(cfg) == num_epochs * spe
    ours = [lr_at(n, cfg) for n in range(len(expected))]
    for n, (a, b) in enumerate(zip(ours, expected)):
        assert a == pytest.approx(b, rel=1e-12, abs=0), f"step {n}: ours {a} timm {b}"
    # the curve really has the expected shape (guards against comparing two constants)
    assert max(ours) <= 0.4 and len(set(ours)) > 3
    if warmup:
        assert ours[0] == cfg.warmup_lr
    if sched == "cosine" and cooldown:
        assert ours[total_steps(cfg) - 1] == cfg.min_lr  # cooldown holds min_lr


def test_cooldown_extends_cosine_only():
    cos = ScheduleConfig(base_lr=0.1, epochs=10, steps_per_epoch=5, cooldown_epochs=3)
    step = ScheduleConfig(base_lr=0.1, epochs=10, steps_per_epoch=5, cooldown_epochs=3, sched="step")
    assert total_epochs(cos) == 13
    assert total_epochs(step) == 10  # timm ignores cooldown for the step schedule


def test_schedule_writes_float_and_tensor_lr_in_place():
    cfg = ScheduleConfig(base_lr=0.2, epochs=4, steps_per_epoch=3, warmup_epochs=1)
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
    with pytest.raises(ConfigError, match="unknown LR schedule"):
        ScheduleConfig(base_lr=0.1, epochs=1, steps_per_epoch=1, sched="poly")
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        ScheduleConfig(base_lr=0.1, epochs=1, steps_per_epoch=0)
