"""Optimizer: no weight decay on BN/bias, fused SGD on the CPU where torch has it, real steps."""
import copy
import importlib.util

import pytest
import timm
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from model.device import Device
from model.optim import OPTIMIZERS, OptimizerError, create_optimizer, param_groups
from model.schedule import LRSchedule, ScheduleConfig

CPU = Device("cpu")
TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


@pytest.fixture(scope="module")
def resnet():
    return timm.create_model("resnet18", pretrained=False, num_classes=10)


def _ids(params):
    return {id(p) for p in params}


def test_no_weight_decay_on_bn_and_bias(resnet):
    groups = param_groups(resnet, 1e-4)
    by_wd = {g["weight_decay"]: _ids(g["params"]) for g in groups}
    bn = [p for m in resnet.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    weights = [m.weight for m in resnet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert by_wd[0.0] == _ids(bn + [resnet.fc.bias])  # 20 BN layers x 2 + fc bias
    assert by_wd[1e-4] == _ids(weights)
    assert len(by_wd[0.0]) == 41 and len(by_wd[1e-4]) == 21
    # same split as timm's helper
    timm_groups = {g["weight_decay"]: _ids(g["params"]) for g in param_groups_weight_decay(resnet, 1e-4)}
    assert timm_groups == by_wd
    # weight decay 0: one group, nothing decayed
    assert [g["weight_decay"] for g in param_groups(resnet, 0.0)] == [0.0]


@pytest.mark.parametrize("name", ["sgd", "momentum"])
def test_groups_and_nesterov_equal_timm_create_optimizer_v2(resnet, name):
    """--opt sgd is timm's Nesterov SGD, --opt momentum its classical one; same groups, same order."""
    from timm.optim import create_optimizer_v2
    ref = create_optimizer_v2(resnet, name, lr=1.6, weight_decay=1e-4, momentum=0.9)
    ours, desc = create_optimizer(resnet, lr=1.6, momentum=0.9, weight_decay=1e-4,
                                  nesterov=OPTIMIZERS[name], device=CPU)
    assert type(ours) is type(ref) is torch.optim.SGD
    assert len(ours.param_groups) == len(ref.param_groups) == 2
    for g, r in zip(ours.param_groups, ref.param_groups):
        assert [id(p) for p in g["params"]] == [id(p) for p in r["params"]]
        for key in ("weight_decay", "nesterov", "momentum", "dampening"):
            assert g[key] == r[key], key
        assert float(g["lr"]) == pytest.approx(r["lr"], rel=1e-7)  # ours: a float32 device tensor
    assert ours.param_groups[0]["nesterov"] is (name == "sgd")
    assert ("nesterov" in desc) is (name == "sgd")


def test_fused_sgd_with_tensor_lr_on_cpu(resnet):
    opt, desc = create_optimizer(resnet, lr=0.1, device=CPU)
    if TORCH >= (2, 4):  # fused SGD has a CPU kernel (with tensor LR) since torch 2.4
        assert all(g["fused"] for g in opt.param_groups)
        assert all(torch.is_tensor(g["lr"]) and g["lr"].dim() == 0 for g in opt.param_groups)
        assert "fused=True" in desc and "tensor LR" in desc
    assert "weight decay 0.0001 on 21 tensors, none on 41" in desc
    # low-precision params on the CPU avoid the fused kernel (pytorch#191763 skipped their updates)
    half, _ = create_optimizer(nn.Linear(32, 32).bfloat16(), lr=0.1, device=CPU)
    assert not any(g["fused"] for g in half.param_groups)


def test_only_decayed_params_move_with_zero_grads():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=4)
    for m in model.modules():  # non-trivial BN affine values so that decay would show
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, _ = create_optimizer(model, lr=0.5, momentum=0.0, weight_decay=0.1, device=CPU)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        if p.ndim <= 1:
            assert torch.equal(p, before[n]), n
        else:  # p - lr * wd * p
            torch.testing.assert_close(p.detach(), before[n] * (1 - 0.5 * 0.1), msg=n)


def test_steps_match_reference_sgd_and_follow_schedule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    ref_model = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    opt, _ = create_optimizer(model, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True, device=CPU)
    ref = torch.optim.SGD(param_groups(ref_model, 1e-3), lr=0.05, momentum=0.9, nesterov=True,
                          foreach=False)
    cfg = ScheduleConfig(base_lr=0.05, epochs=3, steps_per_epoch=2, warmup_epochs=1, warmup_lr=0.01)
    sched, ref_sched = LRSchedule(opt, cfg), LRSchedule(ref, cfg)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))
    for step in range(5):
        for m, o, s in ((model, opt, sched), (ref_model, ref, ref_sched)):
            s.step(step)
            o.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(p, s) for p, s in zip(model.parameters(), start))  # every tensor trained
    for g in opt.param_groups:
        state = [opt.state[p]["momentum_buffer"] for p in g["params"]]
        assert all(b is not None and b.abs().sum() > 0 for b in state)


@pytest.mark.skipif(importlib.util.find_spec("apex") is not None, reason="an apex package is installed")
def test_apex_without_apex_is_a_clear_error(resnet):
    with pytest.raises(OptimizerError, match="needs NVIDIA Apex") as e:
        create_optimizer(resnet, lr=0.1, device=Device("cuda"), apex=True)
    assert "\n" not in str(e.value)
    with pytest.raises(OptimizerError, match="needs a CUDA device"):
        create_optimizer(resnet, lr=0.1, device=CPU, apex=True)
