"""Optimizers by name: the reference SGD path (our code), everything else through timm's factory.

`build_optimizer(name, model, ...)` is the registry's entry point; `optimizer_names()` lists the
names it takes (for the CLI's choices).
- `sgd`/`nesterov`/`momentum` (REFERENCE_OPTIMIZERS): SGD with momentum, no weight decay on
  BN/bias, and the fastest fused kernel the device offers (`create_optimizer`, below);
- every other name timm's `create_optimizer_v2` knows (adamw, lamb, lars, lion, rmsproptf, adam,
  `lookahead_<name>`, ...) is built by `timm.optim.create_optimizer_v2` itself, with timm's
  meaning of lr, weight_decay, momentum (for the optimizers that take one), eps and betas, and
  its `filter_bias_and_bn` rule (no weight decay on 1-d parameters and on the model's
  `no_weight_decay()` names). timm's LR is a float in every group; the schedule writes it.
  Not offered: `adahessian` (second order: its backward needs create_graph=True, which the
  trainer does not do), `fused*` without NVIDIA Apex and `bnb*` without bitsandbytes installed.

`--opt` names as in timm (`optim/_optim_factory.py`): `sgd` (alias `nesterov`) is SGD with
Nesterov momentum, as in the reference port (its optim_factory.py builds NpuFusedSGD with
nesterov=True for 'sgd'); `momentum` is classical momentum. tests/test_optim.py compares the
groups with `timm.optim.create_optimizer_v2`.

The SGD kernel, in order (the description string says which was taken, for the log):
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

REFERENCE_OPTIMIZERS = tuple(OPTIMIZERS)  # our SGD path: name -> Nesterov in OPTIMIZERS
# timm train.py (`--lr-base-scale ''`): sqrt LR scaling for Ada*/LAMB optimizers, linear otherwise
_SQRT_SCALED = ("ada", "lamb")


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


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def optimizer_names() -> tuple[str, ...]:
    """Every name `build_optimizer` takes: ours first, then timm's (sorted)."""
    from timm.optim import get_optimizer_info, list_optimizers
    excluded = [] if _has_module("apex") else ["fused*"]
    excluded += [] if _has_module("bitsandbytes") else ["bnb*"]
    timm_names = [n for n in list_optimizers(exclude_filters=excluded)
                  if n not in REFERENCE_OPTIMIZERS and not get_optimizer_info(n).second_order]
    return REFERENCE_OPTIMIZERS + tuple(timm_names)


def default_lr_base_scale(name: str) -> str:
    """timm train.py's choice when `lr_base_scale` is '': 'sqrt' for Ada*/LAMB names, else 'linear'."""
    return "sqrt" if any(k in name.lower() for k in _SQRT_SCALED) else "linear"


def _timm_info(name: str):
    """timm's OptimInfo for `name` (`lookahead_` prefix allowed), or an OptimizerError."""
    from timm.optim import get_optimizer_info
    base = name.lower().split("_")[-1]
    try:
        info = get_optimizer_info(base)
    except ValueError:
        info = None
    if info is None or info.second_order or base not in optimizer_names():
        raise OptimizerError(f"unknown optimizer {name!r}: choose one of {', '.join(optimizer_names())} "
                             f"(timm's names; lookahead_<name> wraps one in Lookahead)")
    return info


def build_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float, momentum: float = 0.9,
                    eps: float | None = None, betas: tuple[float, ...] | None = None,
                    device: Device | None = None, apex: bool = False) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer called `name` for `model` (already on its device); returns (optimizer, description).

    The reference names keep our SGD path exactly (`create_optimizer`; `eps`/`betas` do not apply,
    `apex` picks Apex FusedSGD). Any other name is `timm.optim.create_optimizer_v2(model, name, lr=lr,
    weight_decay=weight_decay, momentum=momentum, [eps=eps], [betas=betas])`, as timm's train.py calls
    it through `optimizer_kwargs`; `apex` does not change it (Apex AMP wraps any optimizer)."""
    key = name.lower()
    if key in OPTIMIZERS:
        return create_optimizer(model, lr, momentum, weight_decay, OPTIMIZERS[key], device, apex=apex)
    info = _timm_info(key)
    from timm.optim import create_optimizer_v2
    kwargs = {}
    if eps is not None:
        kwargs["eps"] = eps
    if betas is not None:
        if info.has_betas and len(betas) != info.num_betas:
            raise OptimizerError(f"optimizer {name!r} takes {info.num_betas} betas, got {len(betas)}: "
                                 f"{', '.join(map(str, betas))}")
        kwargs["betas"] = tuple(float(b) for b in betas)
    try:
        opt = create_optimizer_v2(model, key, lr=float(lr), weight_decay=weight_decay, momentum=momentum,
                                  **kwargs)
    except (ValueError, TypeError) as e:  # e.g. an eps or beta out of range
        detail = (str(e).strip().splitlines() or [""])[0][:160]
        raise OptimizerError(f"optimizer {name!r} refused its settings: {detail}") from None
    groups = opt.param_groups
    n_decay = sum(len(g["params"]) for g in groups if g.get("weight_decay"))
    n_plain = sum(len(g["params"]) for g in groups if not g.get("weight_decay"))
    g0 = groups[0]
    extra = [f"{k} {g0[k]}" for k in ("momentum", "betas", "eps") if k in g0 and
             (k != "momentum" or info.has_momentum)]
    inner = getattr(opt, "_base_optimizer", None)  # lookahead_<name>
    kind = type(opt).__name__ + (f"({type(inner).__name__})" if inner is not None else "")
    return opt, (f"timm {kind} ('{key}' via create_optimizer_v2), float LR, {', '.join(extra + [''])}"
                 f"weight decay {weight_decay} on {n_decay} tensors, none on {n_plain} (BN/bias)")
