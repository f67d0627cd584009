"""Mixed precision, decided once: the loop only calls autocast(), backward() and step().

- native bf16: `torch.autocast` in bfloat16 where the device has it; no loss scaling needed;
- native fp16: autocast in float16 plus `torch.amp.GradScaler(device)`. With a fused optimizer
  the scaler hands found_inf/scale to the kernel, so a step has no host sync; a non-fused
  optimizer makes GradScaler.step read found_inf on the host (GradScaler's own behaviour);
- Apex O2 (`--apex-amp`): `apex.amp.initialize(model, optimizer, opt_level="O2")` casts the model
  to fp16 with fp32 master weights and dynamic loss scaling. On NPU this is Ascend's Apex fork,
  given `combine_grad=True` as its fused optimizers require (untested: no Ascend hardware here);
- disabled: float32, every method a no-op pass-through.

`resolve_precision` is the one place that turns the command line's AMP flags into a Precision;
train_stream.py and every benchmark tool call it, so both sides of a comparison compute alike.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from common.errors import PrecisionError
from model.device import Device

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", None: "float32"}
log = logging.getLogger("model")


def _import_apex_amp():
    try:
        from apex import amp
    except ImportError:
        raise PrecisionError("Apex AMP needs NVIDIA Apex (built from github.com/NVIDIA/apex; "
                             "PyPI's 'apex' is an unrelated package); use native AMP") from None
    return amp


def _grad_scaler(device: Device):
    try:
        return torch.amp.GradScaler(device.type)
    except (RuntimeError, TypeError, AttributeError, ValueError) as e:
        legacy = getattr(getattr(device.module, "amp", None), "GradScaler", None)  # torch.npu.amp
        if legacy is not None:
            return legacy()
        raise PrecisionError(f"float16 AMP needs a GradScaler, which this torch lacks on {device.type} "
                             f"({e}); use bfloat16 autocast or turn AMP off") from None


class Precision:
    def __init__(self, device: Device, enabled: bool = True, dtype: str | None = None, apex: bool = False):
        self.device = device
        self.scaler = None
        self._amp = None  # apex.amp when Apex drives precision
        if apex:
            if not device.is_accelerator:
                raise PrecisionError("Apex AMP needs a CUDA or NPU device")
            if dtype == "bfloat16":
                raise PrecisionError("Apex AMP (O2) runs in float16, not bfloat16")
            self._amp = _import_apex_amp()
            self.mode, self.dtype = "apex", torch.float16
        elif not enabled:
            self.mode, self.dtype = "fp32", None
        else:
            if dtype not in (None, "bfloat16", "float16"):
                raise PrecisionError(f"unknown AMP dtype {dtype!r}: choose bfloat16 or float16")
            if dtype == "bfloat16" and not device.supports_bf16():
                if device.type != "cpu":
                    raise PrecisionError(f"this {device.type} device does not support bfloat16; "
                                         f"use float16 autocast")
                # torch's CPU autocast runs bf16 anywhere, only slower without AVX512-BF16/AMX
                log.warning("this CPU has no fast bfloat16 (AVX512-BF16/AMX): bfloat16 autocast "
                            "runs, but slower than float32")
            self.mode, self.dtype = "native", device.amp_dtype(dtype)
            if self.dtype == torch.float16:
                self.scaler = _grad_scaler(device)

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    def describe(self) -> str:
        if self.mode == "apex":
            return "Apex AMP O2 (float16 model, float32 master weights, dynamic loss scale)"
        if self.mode == "fp32":
            return "float32 (AMP off)"
        scaler = f"GradScaler({self.device.type})" if self.scaler is not None else "no loss scaling"
        return f"native AMP: {self.dtype_name} autocast on {self.device.type}, {scaler}"

    def prepare(self, model, optimizer):
        """Call once, after building the optimizer and before DDP/compile; returns (model, optimizer)."""
        if self.mode != "apex":
            return model, optimizer
        extra = {"combine_grad": True} if self.device.type == "npu" else {}
        return self._amp.initialize(model, optimizer, opt_level="O2", **extra)

    def autocast(self):
        if self.mode != "native":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, optimizer) -> None:
        if self.mode == "apex":
            with self._amp.scale_loss(loss, optimizer) as scaled:
                scaled.backward()
        elif self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def unscale_(self, optimizer) -> None:
        """Make the gradients true-scale before clipping (GradScaler; Apex O2 unscales into its
        master gradients in backward already). No host sync: found_inf stays on the device."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def master_params(self, optimizer, model):
        """The parameters whose gradients the optimizer applies (Apex O2: fp32 master copies)."""
        if self.mode == "apex":
            return list(self._amp.master_params(optimizer))
        return [p for p in model.parameters() if p.requires_grad]

    def step(self, optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)  # unscales, skips the step on inf/nan
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict:
        if self.mode == "apex":
            return dict(self._amp.state_dict())
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restores the loss scale; an empty state (bf16/fp32 checkpoint) leaves the defaults."""
        if not state:
            return
        if self.mode == "apex":
            self._amp.load_state_dict(state)
        elif self.scaler is not None:
            self.scaler.load_state_dict(state)


def resolve_precision(device: Device, amp: bool = True, amp_dtype: str | None = None,
                      apex: bool = False) -> Precision:
    """The Precision a run gets from its flags (--amp/--no-amp, --amp-dtype, --apex-amp).

    With --amp and no --amp-dtype: bfloat16 where the device has fast bf16, else float16 with
    a GradScaler on accelerators, and float32 on a CPU without fast bf16 (its float16 autocast
    is slower than float32). An explicit --amp-dtype is always honoured (see Precision).
    """
    if amp and not apex and device.type == "cpu" and not amp_dtype and not device.supports_bf16():
        amp = False
    return Precision(device, enabled=amp or apex, dtype=amp_dtype, apex=apex)
