"""Optimizer: no weight decay on BN/bias, fused SGD on the CPU where torch has it, real steps."""
import copy
import importlib.util

import pytest
import timm
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from model.device import Device
from model.optim import (
    OPTIMIZERS,
    OptimizerError,
    build_optimizer,
    create_optimizer,
    default_lr_base_scale,
    optimizer_names,
    param_groups,
)
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


# ---- the registry: timm's factory for every non-reference name ----

def _tiny_bn_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    for m in model.modules():  # non-trivial BN affine values so that a wrong decay would show
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


def _run_steps(model, opt, steps=4, lrs=None):
    g = torch.Generator().manual_seed(123)
    for i in range(steps):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[i]
        x, y = torch.randn(6, 3, 9, 9, generator=g), torch.randint(0, 5, (6,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name,kwargs", [
    ("adamw", {"lr": 1e-3, "weight_decay": 0.05}),
    ("adamw", {"lr": 2e-3, "weight_decay": 0.02, "eps": 1e-6, "betas": (0.8, 0.95)}),
    ("lamb", {"lr": 5e-3, "weight_decay": 0.02}),
    ("lars", {"lr": 0.1, "weight_decay": 1e-4, "momentum": 0.8}),
    ("lion", {"lr": 1e-4, "weight_decay": 0.1, "betas": (0.9, 0.98)}),
    ("rmsproptf", {"lr": 1e-2, "weight_decay": 1e-5, "eps": 1e-3}),
    ("lookahead_adamw", {"lr": 1e-3, "weight_decay": 0.05}),
])
def test_timm_optimizers_equal_create_optimizer_v2(name, kwargs):
    """Same groups (params, order, every hyperparameter) and bit-identical weights after steps."""
    from timm.optim import create_optimizer_v2
    kwargs = {"momentum": 0.9, **kwargs}
    model, ref_model = _tiny_bn_model(), _tiny_bn_model()
    ours, desc = build_optimizer(name, model, device=CPU, **kwargs)
    ref = create_optimizer_v2(ref_model, name, **kwargs)
    assert type(ours) is type(ref) and not isinstance(ours, torch.optim.SGD)
    assert len(ours.param_groups) == len(ref.param_groups) == 2
    names = {id(p): n for n, p in model.named_parameters()}
    ref_names = {id(p): n for n, p in ref_model.named_parameters()}
    for g, r in zip(ours.param_groups, ref.param_groups):
        assert [names[id(p)] for p in g["params"]] == [ref_names[id(p)] for p in r["params"]]
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in r.items() if k != "params"}
    # no decay on BN and biases; decay on conv/linear weights
    no_decay = {names[id(p)] for g in ours.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert no_decay == {n for n, p in model.named_parameters() if p.ndim <= 1}
    if "eps" in kwargs:
        assert ours.param_groups[0]["eps"] == kwargs["eps"]
    if "betas" in kwargs:
        assert tuple(ours.param_groups[0]["betas"]) == kwargs["betas"]
    start = [p.detach().clone() for p in model.parameters()]
    _run_steps(model, ours, lrs=[kwargs["lr"] * f for f in (0.5, 1.0, 0.7, 0.3)])
    _run_steps(ref_model, ref, lrs=[kwargs["lr"] * f for f in (0.5, 1.0, 0.7, 0.3)])
    for (n, p), q, s in zip(model.named_parameters(), ref_model.parameters(), start):
        assert torch.equal(p, q), n
        assert not torch.equal(p, s), n  # every tensor was really updated
    assert f"'{name}' via create_optimizer_v2" in desc and "on 3 tensors, none on 4 (BN/bias)" in desc


def test_reference_names_keep_our_sgd_path(resnet):
    for name in ("sgd", "nesterov", "momentum", "SGD"):
        opt, desc = build_optimizer(name, resnet, lr=0.1, weight_decay=1e-4, momentum=0.9, device=CPU,
                                    eps=1e-3, betas=(0.5, 0.5))  # eps/betas do not apply to SGD
        ref, ref_desc = create_optimizer(resnet, 0.1, 0.9, 1e-4, OPTIMIZERS[name.lower()], CPU)
        assert type(opt) is torch.optim.SGD and desc == ref_desc
        for g, r in zip(opt.param_groups, ref.param_groups):
            assert {k: v for k, v in g.items() if k not in ("params", "lr")} == \
                {k: v for k, v in r.items() if k not in ("params", "lr")}
            assert float(g["lr"]) == float(r["lr"])
    assert optimizer_names()[:3] == ("sgd", "nesterov", "momentum")


def test_optimizer_names_and_errors(resnet):
    names = optimizer_names()
    for n in ("adamw", "lamb", "lars", "lion", "rmsproptf", "adam", "sgdw", "nadamw"):
        assert n in names
    assert "adahessian" not in names  # second order: needs create_graph in backward
    assert len(set(names)) == len(names)
    with pytest.raises(OptimizerError, match="unknown optimizer 'adamx'") as e:
        build_optimizer("adamx", resnet, lr=0.1, weight_decay=0.0)
    assert "\n" not in str(e.value) and "adamw" in str(e.value)
    with pytest.raises(OptimizerError, match="unknown optimizer 'adahessian'"):
        build_optimizer("adahessian", resnet, lr=0.1, weight_decay=0.0)
    with pytest.raises(OptimizerError, match="takes 2 betas, got 3"):
        build_optimizer("adamw", resnet, lr=0.1, weight_decay=0.0, betas=(0.9, 0.9, 0.9))
    with pytest.raises(OptimizerError, match="refused its settings"):
        build_optimizer("adamw", resnet, lr=0.1, weight_decay=0.0, betas=(1.5, 0.9))
    assert default_lr_base_scale("adamw") == default_lr_base_scale("lamb") == "sqrt"
    assert default_lr_base_scale("sgd") == default_lr_base_scale("lars") == "linear"


@pytest.mark.parametrize("name", ["adamw", "lamb", "lars", "lookahead_adamw"])
def test_timm_optimizer_resumes_bit_identically_through_our_checkpoint(tmp_path, name):
    """optimizer.state_dict() goes through CheckpointSaver/resume (weights_only load) and the two
    runs continue with bit-identical weights and optimizer state."""
    from model.checkpoint import CheckpointSaver, resume

    def setup(seed):
        model = _tiny_bn_model(seed)
        opt, _ = build_optimizer(name, model, lr=2e-3, weight_decay=0.01, momentum=0.9, device=CPU)
        sched = LRSchedule(opt, ScheduleConfig(base_lr=2e-3, epochs=4, steps_per_epoch=3, warmup_epochs=1,
                                               on_updates=True))
        return model, opt, sched

    def train(model, opt, sched, start, steps):
        g = torch.Generator().manual_seed(start)
        for step in range(start, start + steps):
            sched.step(step)
            x, y = torch.randn(6, 3, 9, 9, generator=g), torch.randint(0, 5, (6,), generator=g)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    model, opt, sched = setup(0)
    train(model, opt, sched, 0, 4)
    CheckpointSaver(str(tmp_path), device=CPU).save(1, model, opt, None, sched, {})
    model2, opt2, sched2 = setup(1)
    resume(str(tmp_path / "last.pth"), model2, opt2, None, CPU, restore_rng=False)
    train(model, opt, sched, 4, 3)
    train(model2, opt2, sched2, 4, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    flat, flat2 = opt.state_dict(), opt2.state_dict()
    assert flat["param_groups"] == flat2["param_groups"]
    for k, st in flat["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(flat2["state"][k][key])), (k, key)
