"""Checkpoints: timm-loadable weights, weights_only-safe files, atomic writes, exact resume.
Also the model factory (it feeds the timm-loadability test)."""
import os
import random

import numpy as np
import pytest
import timm
import torch
from torch import nn

import model.checkpoint as ckpt_mod
from common.errors import CheckpointError, ConfigError
from model.checkpoint import (
    CheckpointSaver,
    load_checkpoint,
    resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unwrap_model,
)
from model.device import Device
from model.factory import DEFAULT_MODEL, create_model
from model.optim import create_optimizer
from model.precision import Precision
from model.schedule import LRSchedule, ScheduleConfig

CPU = Device("cpu")


class FakeDDP(nn.Module):
    """Wraps like DistributedDataParallel: the real model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


@pytest.mark.filterwarnings("error:Mapping deprecated model name")  # the alias must not warn
def test_factory_gluon_resnet50_v1b():
    assert DEFAULT_MODEL == "resnet50.gluon_in1k"
    alias = create_model("gluon_resnet50_v1b")  # the reference port's name
    model = create_model()
    assert [(k, v.shape) for k, v in alias.state_dict().items()] == [
        (k, v.shape) for k, v in model.state_dict().items()]
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    # v1b: the stride-2 downsampling sits in the 3x3 conv of the bottleneck
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)
    # zero_init_last: every block's last BN starts at gamma 0
    assert all(blk.bn3.weight.abs().sum() == 0 for layer in (model.layer1, model.layer4) for blk in layer)


def test_factory_options_and_errors():
    plain = create_model("resnet10t", num_classes=7, zero_init_last=False, channels_last=False, device="cpu")
    assert plain.fc.out_features == 7 and plain.conv1[0].weight.is_contiguous()
    assert any(blk.bn2.weight.abs().sum() > 0 for blk in plain.layer1)
    vit = create_model("vit_tiny_patch16_224", num_classes=3, img_size=32)  # no zero_init_last arg
    assert vit.head.out_features == 3
    with pytest.raises(ConfigError, match="unknown model 'no_such_net'"):
        create_model("no_such_net")


def test_wrapped_checkpoint_loads_into_timm(tmp_path):
    model = create_model("gluon_resnet50_v1b")
    compiled = torch.compile(model)  # lazy: nothing is compiled until it runs
    for wrapped in (FakeDDP(compiled), torch.compile(FakeDDP(model))):
        assert any(k.startswith(("module.", "_orig_mod.")) for k in wrapped.state_dict())
        assert unwrap_model(wrapped) is model
    wrapped = FakeDDP(compiled)
    opt, _ = create_optimizer(wrapped, lr=0.1, device=CPU)
    saver = CheckpointSaver(str(tmp_path))
    saver.save(0, wrapped, opt, Precision(CPU, enabled=False), None, {"model": "gluon_resnet50_v1b"})
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    target = timm.create_model("resnet50.gluon_in1k", pretrained=False)
    target.load_state_dict(state["model"], strict=True)
    for (k, a), b in zip(model.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k


def _tiny():
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 4))


def _setup(seed, dtype="float16"):
    torch.manual_seed(seed)
    model = _tiny()
    opt, _ = create_optimizer(model, lr=0.1, device=CPU)
    precision = Precision(CPU, enabled=True, dtype=dtype)
    schedule = LRSchedule(opt, ScheduleConfig(base_lr=0.1, epochs=4, steps_per_epoch=3, warmup_epochs=1))
    return model, opt, precision, schedule


def _train(model, opt, precision, schedule, steps, start=0):
    for step in range(start, start + steps):
        schedule.step(step)
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
        opt.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        precision.backward(loss, opt)
        precision.step(opt)


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3)


@pytest.mark.usefixtures("cpu_bf16")  # bf16 and fp16 precisions, on CPUs with and without fast bf16
def test_resume_restores_everything(tmp_path):
    model, opt, precision, schedule = _setup(0)
    _train(model, opt, precision, schedule, steps=4)
    precision.scaler.update(1024.0)  # a distinctive loss scale to find again
    saver = CheckpointSaver(str(tmp_path), device=CPU)
    saver.save(1, FakeDDP(model), opt, precision, schedule, {"lr": 0.1, "out": tmp_path}, metric=12.5)
    after_save = _draws()
    saved_buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    model2, opt2, precision2, schedule2 = _setup(1)
    lr_obj = opt2.param_groups[0]["lr"]
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    info = resume(str(tmp_path / "last.pth"), torch.compile(model2), opt2, precision2, CPU)

    saved = torch.load(tmp_path / "last.pth", weights_only=True)["schedule"]
    assert info == {"epoch": 2, "step": 0, "position": {"epoch": 2, "step": 0}, "best_metric": 12.5,
                    "config": {"lr": 0.1, "out": str(tmp_path)}, "metric": 12.5, "schedule": saved}
    got = _draws()  # the generators continue exactly where they were at save time
    assert got[:2] == after_save[:2] and torch.equal(got[2], after_save[2])
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for p, buf in zip(model2.parameters(), saved_buffers):
        assert torch.equal(opt2.state[p]["momentum_buffer"], buf)
    assert precision2.scaler.get_scale() == 1024.0
    saved = torch.load(tmp_path / "last.pth", weights_only=True)["schedule"]
    assert saved["last_step"] == 3 and ScheduleConfig(**saved["cfg"]) == schedule.cfg  # for the record
    assert opt2.param_groups[0]["lr"] is lr_obj  # tensor LR object kept, value restored
    assert lr_obj.item() == pytest.approx(schedule.last_lr)
    assert schedule2.step(3) == schedule.last_lr  # the LR is a pure function of the step
    assert all(g["fused"] == g0["fused"] for g, g0 in zip(opt2.param_groups, opt.param_groups))
    # both runs continue identically from here
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    _train(model, opt, precision, schedule, steps=2, start=6)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    _train(model2, opt2, precision2, schedule2, steps=2, start=6)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_rng_round_trip_is_weights_only_safe(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(str(tmp_path / "rng.pth"), {"rng": rng_state(CPU)})
    expected = [random.random(), float(np.random.randn()), torch.randn(4)]
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"], CPU)
    got = [random.random(), float(np.random.randn()), torch.randn(4)]
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


@pytest.mark.usefixtures("cpu_bf16")  # bf16 and fp16 precisions, on CPUs with and without fast bf16
def test_best_only_on_improvement_and_files_are_weights_only(tmp_path):
    model, opt, precision, schedule = _setup(0, dtype="bfloat16")
    saver = CheckpointSaver(str(tmp_path))
    results = [saver.save(e, model, opt, precision, schedule, {}, metric=m)
               for e, m in enumerate([50.0, 40.0, 60.0, None, float("nan")])]
    assert results == [True, False, True, False, False]
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "last.pth", "last.pth.tar", "model_best.pth.tar"]  # no temp
    best, last = (torch.load(tmp_path / n, weights_only=True) for n in ("best.pth", "last.pth"))
    assert best["epoch"] == 2 and best["metric"] == 60.0 and best["best_metric"] == 60.0
    assert last["epoch"] == 4 and last["best_metric"] == 60.0 and last["scaler"] == {}
    assert set(last) == {"model", "state_dict", "arch", "version", "optimizer", "scaler", "schedule", "epoch",
                         "config", "rng", "metric", "best_metric"}
    # lower is better (e.g. a loss), and a resumed saver remembers the best so far
    saver = CheckpointSaver(str(tmp_path / "loss"), best_metric=2.0)
    assert [saver.save(e, model, opt, None, None, {}, metric=m, higher_is_better=False)
            for e, m in enumerate([2.5, 1.5])] == [False, True]


@pytest.mark.usefixtures("cpu_bf16")  # bf16 and fp16 precisions, on CPUs with and without fast bf16
def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch):
    model, opt, precision, schedule = _setup(0, dtype="bfloat16")
    saver = CheckpointSaver(str(tmp_path))
    saver.save(0, model, opt, precision, schedule, {}, metric=1.0)
    good = (tmp_path / "last.pth").read_bytes()

    def broken_save(obj, f):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # e.g. Ctrl-C or a kill in the middle of the write

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        saver.save(1, model, opt, precision, schedule, {}, metric=2.0)
    monkeypatch.undo()
    assert (tmp_path / "last.pth").read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["best.pth", "last.pth", "last.pth.tar", "model_best.pth.tar"]
    assert load_checkpoint(str(tmp_path / "last.pth"))["epoch"] == 0


@pytest.mark.usefixtures("cpu_bf16")  # bf16 and fp16 precisions, on CPUs with and without fast bf16
def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pth"))
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as e:
        load_checkpoint(str(bad))
    assert "\n" not in str(e.value)
    save_checkpoint(str(tmp_path / "foreign.pth"), {"state_dict": {}})
    model, opt, precision, schedule = _setup(0)
    with pytest.raises(CheckpointError, match="lacks model, optimizer, epoch"):
        resume(str(tmp_path / "foreign.pth"), model, opt, precision)
