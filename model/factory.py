"""The model: any timm architecture, randomly initialised, on its device in channels-last layout.

The default `resnet50.gluon_in1k` is ResNet-50 v1b (the stride-2 downsampling sits in the 3x3
conv), 25,557,032 parameters. The reference port calls it `gluon_resnet50_v1b`, timm's old name:
it is accepted as an alias, without timm's "deprecated model name" warning.
"""
from __future__ import annotations

import timm
import torch
from torch import nn

from common.errors import ConfigError

DEFAULT_MODEL = "resnet50.gluon_in1k"
ALIASES = {"gluon_resnet50_v1b": DEFAULT_MODEL}  # the reference port's --model value


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def _to_torch_device(device) -> torch.device | None:
    if device is None:
        return None
    return getattr(device, "torch", None) or torch.device(device)  # model.device.Device or str/torch.device


def create_model(name: str = DEFAULT_MODEL, num_classes: int = 1000, zero_init_last: bool = True,
                 channels_last: bool = True, device=None, **kwargs) -> nn.Module:
    """Build `name` from timm (never pretrained: we train from scratch).

    zero_init_last zeroes the last BN gamma of every residual block (timm ResNets accept it;
    "Bag of Tricks", Goyal et al.). Architectures whose constructor has no such argument are built
    without it, silently: the flag is a ResNet recipe detail, not a reason to refuse a model.
    Unknown names raise ConfigError.
    """
    name = canonical_name(name)
    build = dict(pretrained=False, num_classes=num_classes, **kwargs)
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
        raise
    dev = _to_torch_device(device)
    if dev is not None or channels_last:
        model = model.to(device=dev, memory_format=torch.channels_last if channels_last else None)
    return model
