"""SGD with momentum, no weight decay on BN/bias, and the fastest fused kernel the device offers.

`--opt` names as in timm (`optim/_optim_factory.py`): `sgd` (alias `nesterov`) is SGD with
Nesterov momentum, as in the reference port (its optim_factory.py builds NpuFusedSGD with
nesterov=True for 'sgd'); `momentum` is classical momentum. tests/test_optim.py compares the
groups with `timm.optim.create_optimizer_v2`.

Choice, in order (the description string says which was taken, for the log):
- `apex=True` on CUDA: NVIDIA Apex `apex.optimizers.FusedSGD` (float LR), for `--apex-amp` O2;
- NPU: `torch_npu.optim.NpuFusedSGD` when torch_npu provides it (float LR), else torch's SGD.
  Untested here: no Ascend hardware was available;
- otherwise torch's `SGD(fused=True)` when a one-element probe step on this device works (CUDA
  in every torch >= 2.4; the CPU kernel arrived in 2.4, pytorch#123629), with the LR as a 0-dim
  tensor on the device if the fused kernel accepts one: the schedule then fills it in place,
  without a host sync or recompile. Not for low-precision params on the CPU, whose fused kernel
  skipped updates in some releases (pytorch#191763);
- else torch's `SGD(foreach=...)` default with a float LR (foreach would `.item()` a tensor LR).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from common.errors import OptimizerError
from model.device import Device
from model.recipe import OPTIMIZERS  # noqa: F401  (re-exported)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[no-decay group, decay group], as timm's param_groups_weight_decay: every parameter with
    ndim <= 1 (BN/LayerNorm weights and all biases) or named `*.bias` gets no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or not weight_decay else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


@functools.lru_cache(maxsize=None)
def _fused_sgd_support(device: torch.device) -> tuple[bool, bool]:
    """(fused SGD works, fused SGD takes a tensor LR) on this device, found by one tiny step."""
    def works(lr) -> bool:
        p = torch.zeros(1, device=device, requires_grad=True)
        p.grad = torch.ones(1, device=device)
        try:
            torch.optim.SGD([p], lr=lr, momentum=0.9, weight_decay=1e-4, fused=True).step()
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            return False
        return bool(p.detach().ne(0).all())  # the step really ran (one sync, once per process)

    if works(torch.tensor(0.1, device=device)):
        return True, True
    return works(0.1), False


def _device_of(model: nn.Module, device: Device | None) -> Device:
    if device is not None:
        return device
    d = next(model.parameters()).device
    return Device(d.type, d.index or 0)


def create_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                     nesterov: bool = True, device: Device | None = None,
                     apex: bool = False) -> tuple[torch.optim.Optimizer, str]:
    """Build the optimizer for `model` (already on its device); returns (optimizer, description)."""
    device = _device_of(model, device)
    groups = param_groups(model, weight_decay)
    n_decay = sum(len(g["params"]) for g in groups if g["weight_decay"])
    n_plain = sum(len(g["params"]) for g in groups if not g["weight_decay"])
    nesterov = nesterov and momentum > 0  # without momentum Nesterov is plain SGD (torch refuses the flag)
    sgd = dict(lr=float(lr), momentum=momentum, nesterov=nesterov)
    tail = (f"momentum {momentum}{', nesterov' if nesterov else ''}, weight decay {weight_decay} "
            f"on {n_decay} tensors, none on {n_plain} (BN/bias)")

    if apex and device.type != "npu":
        if device.type != "cuda":
            raise OptimizerError("Apex FusedSGD (Apex AMP) needs a CUDA device")
        try:
            from apex.optimizers import FusedSGD
        except ImportError:
            raise OptimizerError("Apex AMP needs NVIDIA Apex (built from github.com/NVIDIA/apex; "
                                 "PyPI's 'apex' is an unrelated package)") from None
        return FusedSGD(groups, **sgd), f"apex.optimizers.FusedSGD, float LR, {tail}"

    if device.type == "npu":  # untested: follows torch_npu's documented API
        try:
            from torch_npu.optim import NpuFusedSGD
        except ImportError:
            NpuFusedSGD = None
        if NpuFusedSGD is not None:
            return NpuFusedSGD(groups, **sgd), f"torch_npu.optim.NpuFusedSGD, float LR, {tail}"
        return torch.optim.SGD(groups, **sgd), f"torch.optim.SGD (no NPU fused SGD found), float LR, {tail}"

    fused, tensor_lr = _fused_sgd_support(device.torch)
    low_precision = any(p.dtype not in (torch.float32, torch.float64) for p in model.parameters())
    if device.type == "cpu" and low_precision:
        fused = False  # pytorch#191763: CPU fused SGD skipped fp16/bf16 updates
    if fused:
        if tensor_lr:
            sgd["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device.torch)
        opt = torch.optim.SGD(groups, fused=True, **sgd)
        kind = "0-dim tensor LR on the device" if tensor_lr else "float LR"
        return opt, f"torch.optim.SGD(fused=True) on {device.type}, {kind}, {tail}"
    opt = torch.optim.SGD(groups, **sgd)  # torch picks foreach on accelerators
    return opt, f"torch.optim.SGD (fused not used on {device.type}), float LR, {tail}"
