"""Everything that differs between CUDA, Ascend NPU (torch_npu) and the CPU, in one place.

The loop and the loader ask a `Device` for streams, synchronisation, the autocast dtype and the
distributed backend; nothing else in the project checks the device type. The NPU path follows
torch_npu's documented API (`torch.npu.*` mirrors `torch.cuda.*`) and is untested here: no Ascend
hardware was available.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from common.errors import DeviceError

# Set to 1 or 0 to override the CPU's detected bf16 capability (tests run both ways; a user
# can force either on a CPU whose detection is wrong).
CPU_BF16_ENV = "STREAM_CPU_BF16"


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ImportError:
        return False
    return torch.npu.is_available()


@dataclass(frozen=True)
class Device:
    type: str  # 'cuda' | 'npu' | 'cpu'
    index: int = 0

    @property
    def torch(self) -> torch.device:
        return torch.device(self.type, self.index) if self.type != "cpu" else torch.device("cpu")

    @property
    def module(self):
        """torch.cuda or torch.npu; None on the CPU."""
        return {"cuda": torch.cuda, "npu": getattr(torch, "npu", None)}.get(self.type)

    @property
    def is_accelerator(self) -> bool:
        return self.type != "cpu"

    @property
    def dist_backend(self) -> str:
        return {"cuda": "nccl", "npu": "hccl"}.get(self.type, "gloo")

    def name(self) -> str:
        """'cpu' or 'cuda:<card name>' (for reports)."""
        if self.is_accelerator:
            return f"{self.type}:{self.module.get_device_name(self.index)}"
        return "cpu"

    def set_current(self) -> None:
        if self.is_accelerator:
            self.module.set_device(self.index)

    def supports_bf16(self) -> bool:
        """Whether bf16 is fast here (not merely emulated)."""
        if self.type == "cpu":  # oneDNN's bf16 kernels need AVX512-BF16/AMX-class CPUs to be fast
            forced = os.environ.get(CPU_BF16_ENV, "").strip()
            if forced in ("0", "1"):
                return forced == "1"
            try:
                return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
            except (AttributeError, RuntimeError):
                return False
        check = getattr(self.module, "is_bf16_supported", None)
        if check is None:
            return False
        try:  # emulated bf16 (V100, T4) is slower than fp16 with a scaler
            return bool(check(including_emulation=False))
        except TypeError:
            return bool(check())

    def amp_dtype(self, requested: str | None = None) -> torch.dtype:
        """bfloat16 where the device has it, float16 (with a GradScaler) otherwise."""
        if requested:
            return {"bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
        return torch.bfloat16 if self.supports_bf16() else torch.float16

    def new_stream(self):
        """A side stream for host-to-device copies; None on the CPU. Create it once."""
        return self.module.Stream(device=self.torch) if self.is_accelerator else None

    def current_stream(self):
        return self.module.current_stream(self.torch) if self.is_accelerator else None

    def stream(self, stream):
        """Context that makes `stream` current (a no-op without one)."""
        return self.module.stream(stream) if stream is not None else contextlib.nullcontext()

    @staticmethod
    def record_stream(tensor: torch.Tensor, stream) -> None:
        """Keep `tensor`'s memory from reuse until `stream`'s queued work is done."""
        if stream is not None:
            tensor.record_stream(stream)

    def synchronize(self) -> None:
        if self.is_accelerator:
            self.module.synchronize(self.torch)

    def pin_memory(self) -> bool:
        return self.is_accelerator

    def max_memory_allocated(self) -> int:
        return int(self.module.max_memory_allocated(self.torch)) if self.is_accelerator else 0


def resolve_device(name: str = "auto", index: int = 0) -> Device:
    """Pick the device: 'auto' prefers CUDA, then NPU, then the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "npu" if _npu_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' was requested but CUDA is not available on this machine")
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device index {index} does not exist (this node has "
                              f"{torch.cuda.device_count()} CUDA devices)")
    elif name == "npu":
        if not _npu_available():
            raise DeviceError("device 'npu' was requested but torch_npu is not installed or "
                              "no Ascend NPU is visible")
    elif name != "cpu":
        raise DeviceError(f"unknown device {name!r}: choose auto, cuda, npu or cpu")
    return Device(name, index if name != "cpu" else 0)
