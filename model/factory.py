"""The model: any timm architecture, on its device in channels-last layout.

The default `resnet50.gluon_in1k` is ResNet-50 v1b (the stride-2 downsampling sits in the 3x3
conv), 25,557,032 parameters. The reference port calls it `gluon_resnet50_v1b`, timm's old name:
it is accepted as an alias, without timm's "deprecated model name" warning.

Randomly initialised by default. For fine-tuning, with timm's flags and meanings:
`pretrained` loads timm's weights for the name (downloaded from the Hugging Face hub or found in
its cache; `pretrained_path` names a local file instead, through timm's `pretrained_cfg_overlay`),
adapting the classifier when `num_classes` differs; `checkpoint_path` (--initial-checkpoint)
loads a checkpoint's weights strictly after initialisation (timm's `load_checkpoint`: a plain
state dict, or a dict with `state_dict_ema`, `state_dict` or `model`; ours have `model`).

`blurpool` applies model.blurpool.apply_blurpool after the pretrained weights are in (they keep
their values inside the wrappers) and before `checkpoint_path` is loaded (whose keys must then
have the wrappers' names, as checkpoints of a --blurpool run do).
"""
from __future__ import annotations

import os

import timm
import torch
from torch import nn

from common.errors import CheckpointError, ConfigError
from model.blurpool import apply_blurpool
from model.recipe import ALIASES, DEFAULT_MODEL, canonical_name  # noqa: F401  (re-exported)
from model.registry import write_cache


def _to_torch_device(device) -> torch.device | None:
    if device is None:
        return None
    return getattr(device, "torch", None) or torch.device(device)  # model.device.Device or str/torch.device


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # "Error(s) in loading...:" + the first


def create_model(name: str = DEFAULT_MODEL, num_classes: int = 1000, zero_init_last: bool = True,
                 channels_last: bool = True, device=None, pretrained: bool = False,
                 pretrained_path: str | None = None, checkpoint_path: str | None = None,
                 blurpool: bool = False, **kwargs) -> nn.Module:
    """Build `name` from timm; `**kwargs` go to timm.create_model (e.g. drop_path_rate).

    zero_init_last zeroes the last BN gamma of every residual block (timm ResNets accept it;
    "Bag of Tricks", Goyal et al.). Architectures whose constructor has no such argument are built
    without it, silently: the flag is a ResNet recipe detail, not a reason to refuse a model.
    Unknown names, weights that cannot be obtained and checkpoints that do not fit raise a
    one-line UserError.
    """
    name = canonical_name(name)
    write_cache()  # timm is imported anyway: let later runs check --model without importing it
    build = dict(pretrained=bool(pretrained or pretrained_path), num_classes=num_classes, **kwargs)
    if pretrained_path:
        build["pretrained_cfg_overlay"] = dict(file=os.path.abspath(pretrained_path))
    try:
        try:
            model = timm.create_model(name, zero_init_last=zero_init_last, **build)
        except TypeError as e:
            if "zero_init_last" not in str(e):
                raise
            model = timm.create_model(name, **build)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"unknown model {name!r}: use a timm model name, e.g. {DEFAULT_MODEL} "
                             f"or resnet50 (timm.list_models() lists them)") from None
        if not build["pretrained"]:
            raise
        raise _weights_error(name, pretrained_path, e) from None
    except Exception as e:  # hub, network and file errors come in many types
        if not build["pretrained"]:
            raise
        raise _weights_error(name, pretrained_path, e) from None
    if blurpool:
        apply_blurpool(model)
    if checkpoint_path:
        try:
            timm.models.load_checkpoint(model, checkpoint_path, strict=True)
        except Exception as e:  # torch.load's and load_state_dict's many error types
            hint = "; the checkpoint and the model differ in BlurPool layers" if "blur_filter" in str(e) else ""
            raise CheckpointError(f"the initial checkpoint {checkpoint_path} does not fit {name} with "
                                  f"{num_classes} classes: {_first_line(e)}{hint}") from None
    dev = _to_torch_device(device)
    if dev is not None or channels_last:
        model = model.to(device=dev, memory_format=torch.channels_last if channels_last else None)
    return model


def _weights_error(name: str, path: str | None, e: Exception) -> ConfigError:
    if path:
        return ConfigError(f"cannot load the pretrained weights file {path} into {name}: {_first_line(e)}")
    return ConfigError(f"cannot obtain pretrained weights for {name} (no network or hub cache?): "
                       f"{type(e).__name__}; pass the path of a local weights file")


def compile_model(model: nn.Module, backend: str = "inductor", mode: str | None = None, sizes: int = 1) -> nn.Module:
    """torch.compile with static shapes: one graph per input size, each compiled once.

    A run with progressive resizing trains at a few sizes (`sizes`, 2 for FFCV's recipes), each
    for whole epochs. Static graphs keep inductor's kernels specialised and are what CUDA graphs
    (mode="reduce-overhead") need; torch's default would compile a static graph at the first
    size and a dynamic-shape graph at the second, used for the rest of the run. The recompile
    limit is raised to fit every size (tools/bench_resolution.py compile counts the graphs).
    """
    import torch._dynamo
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), sizes + 1))
    return torch.compile(model, backend=backend, mode=mode, dynamic=False)
