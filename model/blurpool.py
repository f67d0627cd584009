"""BlurPool (Zhang 2019, "Making convolutional networks shift-invariant again") as ffcv-imagenet
applies it: a model transform that blurs the input of every strided convolution.

Source: libffcv/ffcv-imagenet train_imagenet.py @ 606c584, `BlurPoolConv2d` l.115-126 and
`apply_blurpool` l.335-340: every `nn.Conv2d` with a stride above 1 and at least 16 input channels
is wrapped so that a depthwise 3x3 binomial filter ([1, 2, 1] x [1, 2, 1] / 16, stride 1, zero
padding 1) runs before it. On a ResNet-50 (timm's or torchvision's) that is six convs:
layer{2,3,4}.0.conv2 and layer{2,3,4}.0.downsample.0; the stem (3 input channels) is left alone.

The filter is a buffer, not a parameter: the parameter count and the output shape do not change.
The state dict does: a wrapped conv's weight is `<name>.conv.weight`, beside `<name>.blur_filter`,
as in FFCV's checkpoints. Load such weights into a model transformed the same way:
    model = timm.create_model("resnet50.gluon_in1k"); apply_blurpool(model); model.load_state_dict(sd)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BlurPoolConv2d(nn.Module):
    """`conv(blur(x))`: a fixed depthwise binomial blur, then the wrapped strided conv."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        default_filter = torch.tensor([[[[1, 2, 1], [2, 4, 2], [1, 2, 1]]]]) / 16.0
        filt = default_filter.repeat(conv.in_channels, 1, 1, 1)
        self.conv = conv
        self.register_buffer("blur_filter", filt.to(conv.weight.device, conv.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur_filter.to(x.dtype), stride=1, padding=(1, 1),
                           groups=self.conv.in_channels, bias=None)
        return self.conv(blurred)


def apply_blurpool(model: nn.Module) -> list[str]:
    """Wrap, in place, every Conv2d with stride > 1 and >= 16 input channels; returns their names."""
    wrapped = []

    def visit(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
                setattr(mod, name, BlurPoolConv2d(child))
                wrapped.append(prefix + name)
            else:
                visit(child, prefix + name + ".")

    visit(model, "")
    return wrapped

