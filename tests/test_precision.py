"""Precision: bf16 autocast, fp32 when off, fp16 + GradScaler (real on the CPU since torch 2.3).

Every test runs twice, with the CPU's fast-bf16 capability forced off and on (conftest.cpu_bf16),
so the suite passes the same way on any CPU.
"""
import copy
import importlib.util

import pytest
import torch
from torch import nn

from model.device import Device
from model.optim import create_optimizer
from model.precision import Precision, PrecisionError, resolve_precision

CPU = Device("cpu")
pytestmark = pytest.mark.usefixtures("cpu_bf16")


def _has_cpu_grad_scaler() -> bool:
    try:
        torch.amp.GradScaler("cpu")
    except Exception:
        return False
    return True


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_bf16_autocast_on_cpu(cpu_bf16, caplog):
    default = Precision(CPU, enabled=True)  # bf16 is the default choice only where it is fast
    assert default.dtype is (torch.bfloat16 if cpu_bf16 else torch.float16)
    p = Precision(CPU, enabled=True, dtype="bfloat16")  # asked for: runs on any CPU
    slow = [r for r in caplog.records if "no fast bfloat16" in r.getMessage()]
    assert len(slow) == (0 if cpu_bf16 else 1)  # one warning line where it is emulated
    assert p.dtype is torch.bfloat16 and p.dtype_name == "bfloat16" and p.scaler is None
    net, x = _net(), torch.randn(2, 3, 8, 8)
    with p.autocast():
        conv_out = net[0](x)
        out = net(x)
    assert conv_out.dtype is torch.bfloat16 and out.dtype is torch.bfloat16
    assert net(x).dtype is torch.float32  # only inside the context
    assert "bfloat16" in p.describe() and p.state_dict() == {}


def test_disabled_is_float32():
    p = Precision(CPU, enabled=False, dtype="bfloat16")
    assert p.dtype is None and p.dtype_name == "float32" and p.scaler is None
    net = _net()
    with p.autocast():
        assert net(torch.randn(2, 3, 8, 8)).dtype is torch.float32
    model, opt = object(), object()
    assert p.prepare(model, opt) == (model, opt)
    assert p.describe() == "float32 (AMP off)"


@pytest.mark.skipif(not _has_cpu_grad_scaler(), reason="this torch has no CPU GradScaler")
def test_fp16_scales_loss_and_unscales_step():
    p = Precision(CPU, enabled=True, dtype="float16")
    assert p.dtype is torch.float16 and p.scaler is not None and "GradScaler(cpu)" in p.describe()
    net = _net()
    ref = copy.deepcopy(net)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    opt, _ = create_optimizer(net, lr=0.1, momentum=0.0, weight_decay=0.0, device=CPU)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)

    with p.autocast():
        out = net(x)
    assert out.dtype is torch.float16
    loss = nn.functional.cross_entropy(out.float(), y)
    p.backward(loss, opt)
    ref_loss = nn.functional.cross_entropy(ref(x), y)
    ref_loss.backward()
    scale = p.scaler.get_scale()
    assert scale == 2.0 ** 16
    # grads are scaled by the loss scale (fp16 forward: compare loosely)
    torch.testing.assert_close(net[3].bias.grad / scale, ref[3].bias.grad, rtol=2e-2, atol=2e-3)
    p.step(opt)
    ref_opt.step()
    # the step used unscaled grads: parameters moved like plain fp32 SGD, not 65536x further
    torch.testing.assert_close(net[3].bias, ref[3].bias, rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(not _has_cpu_grad_scaler(), reason="this torch has no CPU GradScaler")
def test_scaler_state_round_trip_and_inf_skip():
    p = Precision(CPU, enabled=True, dtype="float16")
    net = _net()
    opt, _ = create_optimizer(net, lr=0.1, device=CPU)
    before = [q.detach().clone() for q in net.parameters()]
    loss = net(torch.randn(2, 3, 8, 8)).sum() * float("inf")
    p.backward(loss, opt)
    p.step(opt)  # inf grads: step skipped, scale halved
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    state = p.state_dict()
    assert state["scale"] == 2.0 ** 15
    q = Precision(CPU, enabled=True, dtype="float16")
    q.load_state_dict(state)
    assert q.scaler.get_scale() == 2.0 ** 15 and q.state_dict() == state
    q.load_state_dict({})  # a bf16/fp32 checkpoint has no scaler state: keep defaults
    assert q.scaler.get_scale() == 2.0 ** 15


def test_bf16_fallback_and_errors(monkeypatch):
    monkeypatch.setattr(Device, "supports_bf16", lambda self: False)
    if _has_cpu_grad_scaler():
        p = Precision(CPU, enabled=True)  # no bf16: float16 with a scaler
        assert p.dtype is torch.float16 and p.scaler is not None
    with pytest.raises(PrecisionError, match="does not support bfloat16"):
        Precision(Device("cuda"), enabled=True, dtype="bfloat16")  # refused before touching CUDA
    with pytest.raises(PrecisionError, match="unknown AMP dtype"):
        Precision(CPU, enabled=True, dtype="float8")


@pytest.mark.skipif(importlib.util.find_spec("apex") is not None, reason="an apex package is installed")
def test_apex_without_apex_is_a_clear_error():
    with pytest.raises(PrecisionError, match="needs NVIDIA Apex") as e:
        Precision(Device("cuda"), enabled=True, apex=True)
    assert "\n" not in str(e.value)
    with pytest.raises(PrecisionError, match="needs a CUDA or NPU device"):
        Precision(CPU, enabled=True, apex=True)


def test_resolve_precision_picks_by_capability(cpu_bf16):
    """The one resolution train_stream.py and the benchmark tools share."""
    auto = resolve_precision(CPU)
    assert auto.dtype_name == ("bfloat16" if cpu_bf16 else "float32")  # CPU fp16 is slower than fp32
    assert resolve_precision(CPU, amp=False).dtype_name == "float32"
    assert resolve_precision(CPU, amp_dtype="bfloat16").dtype_name == "bfloat16"
    if _has_cpu_grad_scaler():
        assert resolve_precision(CPU, amp_dtype="float16").dtype_name == "float16"
