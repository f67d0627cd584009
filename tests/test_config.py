"""The configuration: one declaration per setting gives its default, help, flag and YAML key;
sections are frozen and check themselves once; parsing resolves without changing the config."""
import argparse
import dataclasses

import pytest
import yaml

from common.errors import ConfigError
from engine import config as C
from engine.config import Config, DataConfig, OptimConfig, SchedConfig
from engine.flags import add_flag, build_parser, parse_args, parse_config
from model import recipe


def field_of(name):
    return next(f for f in C.all_fields() if f.name == name)


def test_every_flag_comes_from_one_field_with_its_default_and_help():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    assert set(actions) == set(C.FLAT)  # nothing declared twice, nothing only in argparse
    for name, action in actions.items():
        f = field_of(name)
        assert action.default == f.default and action.help == f.metadata["flag"]["help"], name
    # the reference port's spellings and the short forms
    for flag, dest in (("--data_path", "data_path"), ("--data-path", "data_path"), ("-b", "batch_size"),
                       ("-j", "workers"), ("-vb", "validation_batch_size"), ("--device_id", "device_id"),
                       ("--local_rank", "local_rank"), ("--no-amp", "amp")):
        assert parser._option_string_actions[flag].dest == dest, flag


def test_help_keeps_its_groups():
    titles = [g.title for g in build_parser()._action_groups]
    for group in C.GROUPS:
        assert group in titles
    fast = next(g for g in build_parser()._action_groups if g.title == C.FAST)
    assert {a.dest for a in fast._group_actions} == {"lr_peak_epoch", "min_res", "max_res", "start_ramp",
                                                     "end_ramp", "val_res", "val_crop_pct", "val_tta", "blurpool"}


def test_schedule_defaults_are_the_recipes():
    s = SchedConfig()
    assert (s.warmup_epochs, s.warmup_lr, s.min_lr, s.decay_epochs, s.decay_rate, s.cooldown_epochs,
            s.lr_peak_epoch) == (recipe.DEFAULT_WARMUP_EPOCHS, recipe.DEFAULT_WARMUP_LR, recipe.DEFAULT_MIN_LR,
                                 recipe.DEFAULT_DECAY_EPOCHS, recipe.DEFAULT_DECAY_RATE,
                                 recipe.DEFAULT_COOLDOWN_EPOCHS, recipe.DEFAULT_LR_PEAK_EPOCH)
    assert OptimConfig().lr_base == recipe.DEFAULT_BASE_LR_PER_256 and C.ModelConfig().model == recipe.DEFAULT_MODEL


def test_sections_are_frozen_and_check_themselves():
    config = Config.create(model="resnet10t", batch_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.batch_size = 16
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim = OptimConfig()
    with pytest.raises(ConfigError, match="--batch-size must be at least 1"):
        OptimConfig(batch_size=0)
    with pytest.raises(ConfigError, match="--crop-pct must be in"):
        DataConfig(crop_pct=0)
    with pytest.raises(ConfigError, match="--lr-peak-epoch must be in"):
        SchedConfig(sched="linear-step", epochs=2, lr_peak_epoch=2)
    with pytest.raises(ConfigError, match="-b must be even"):  # a rule across two sections
        Config.create(mixup=0.2, batch_size=7)
    with pytest.raises(ConfigError, match="unknown settings: no_such"):
        Config.create(no_such=1)
    changed = config.replace(epochs=3)
    assert (changed.epochs, config.epochs, changed.network.model, changed.model) == (3, 90, "resnet10t", "resnet10t")


def test_python_and_command_line_give_the_same_config(tmp_path):
    argv = ["--model", "resnet10t", "--img-size", "32", "-b", "8", "--epochs", "2", "--data_path", "/d",
            "--no-amp", "--cutmix-minmax", "0.2", "0.8", "--sched", "step"]
    config, _ = parse_config(argv)
    assert config == Config.create(model="resnet10t", img_size=32, batch_size=8, epochs=2, data_path="/d",
                                   amp=False, cutmix_minmax=(0.2, 0.8), sched="step")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": "resnet10t", "img-size": 32, "batch_size": 8,
                                                     "epochs": 2, "data_dir": "/d", "amp": False,
                                                     "cutmix_minmax": [0.2, 0.8], "sched": "step"}))
    assert parse_config(["-c", str(tmp_path / "c.yaml")])[0] == config


def test_parsing_resolves_beside_the_config_without_changing_it(tmp_path):
    argv = ["--output", str(tmp_path), "--epochs", "2", "--warmup-epochs", "3"]
    config, _ = parse_config(argv)
    run = parse_args(argv)
    assert run.config == config and run.run_dir.startswith(str(tmp_path))  # the demo: 64 px in its name
    assert run.img_size == 64 and run.epochs == 2 and run.warmup_epochs == 3  # given flags win over the demo's
    assert run.data_path is None and run.data_root.endswith("demo-wds") and run.demo
    assert any("never leaves its warmup" in n for n in run.notes)
    last = tmp_path / "exp" / "last.pth"
    last.parent.mkdir()
    last.write_bytes(b"x")
    auto = parse_args(["--output", str(tmp_path), "--experiment", "exp", "--auto-resume", "--data_path", "/d"])
    assert auto.resume == str(last) and auto.config.run.resume is None  # found, not written into the config


def test_a_new_flag_is_one_field():
    """What the module docstring promises: a field with option(...) is a flag, in --help, and in YAML."""
    @dataclasses.dataclass(frozen=True)
    class Extra(C.Section):
        GROUP = "data"
        prefetch_to_device: int = C.option(2, "batches copied ahead to the device")

    group = argparse.ArgumentParser().add_argument_group("data")
    add_flag(group, dataclasses.fields(Extra)[0])
    action = group._group_actions[0]
    assert action.option_strings == ["--prefetch-to-device"] and action.default == 2 and action.type is int
