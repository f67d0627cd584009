"""What a run resolves about its machine before it starts: torch's global switches, precision,
loader workers, and the settings record that names them.

train_stream.py and every benchmark tool resolve these here, so both sides of a benchmark ratio
run the same computation, and each side's JSON says what it ran (`settings`). On a CPU, fast
bfloat16 decides the default precision (model.precision.resolve_precision), so it is recorded too;
`STREAM_CPU_BF16=0/1` forces it (model.device.CPU_BF16_ENV).
"""
from __future__ import annotations

import logging
import os
import platform
import time

import torch

from common.host import cpu_flags, cpu_model, default_threads, default_workers, usable_cores
from model.device import CPU_BF16_ENV, Device
from model.precision import Precision, resolve_precision


def configure_torch(threads: int | None = None) -> int:
    """torch's process-wide switches for a training run; returns the intra-op thread count.

    `threads` (train_stream: resolve_threads) sets it; None keeps torch's own default
    (OMP_NUM_THREADS where set): what matters for a comparison is that both sides run under
    the same value, which `compute_settings` records.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.get_num_threads()


def precision_for(args, device: Device, say=None) -> Precision:
    """The Precision of a run with train_stream's flags (--amp, --amp-dtype, --apex-amp).

    --amp-dtype float16 on a CPU (e.g. from a GPU run's timm args.yaml) falls back to what --amp
    picks there, with one line to `say` (default: a logged warning): torch's CPU float16 autocast
    has few fast kernels and runs far slower than float32."""
    amp_dtype = args.amp_dtype
    if amp_dtype == "float16" and device.type == "cpu" and args.amp and not args.apex_amp:
        amp_dtype = None
        choice = resolve_precision(device, True, None, False)
        line = (f"warning: --amp-dtype float16 on a CPU is very slow (no float16 kernels); running "
                f"{choice.dtype_name} instead (--amp-dtype bfloat16 or --no-amp choose)")
        (say or logging.getLogger("engine").warning)(line)
        return choice
    return resolve_precision(device, args.amp, amp_dtype, args.apex_amp)


def resolve_workers(requested: int | None, processes_per_node: int = 1) -> int:
    """-j as given, else train_stream's default: the cores left per process after its main thread."""
    return requested if requested is not None else default_workers(processes_per_node)


def resolve_threads(requested: int | None, workers: int | None, processes_per_node: int = 1,
                    loader_workers: bool = True) -> int | None:
    """--threads as given; else None (torch's) where OMP_NUM_THREADS is set; else the cores per
    process less its loader workers (-j, or its default), at least 1."""
    if requested is not None:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    busy = resolve_workers(workers, processes_per_node) if loader_workers else 0
    return default_threads(processes_per_node, busy)


def compute_settings(device: Device, precision: Precision, channels_last: bool) -> dict:
    """What decides the speed of a training step, as both sides of a ratio must report it."""
    return {"device": device.name(), "amp_dtype": precision.dtype_name, "amp_mode": precision.mode,
            "channels_last": bool(channels_last), "threads": torch.get_num_threads(),
            "fast_bf16": device.supports_bf16(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "tf32": torch.backends.cuda.matmul.allow_tf32}


def host_facts() -> dict:
    """The machine a benchmark ran on: CPU model and flags, fast bf16 (and whether it was forced),
    cores, GPU, torch and Python versions, date."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": platform.node(), "date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_model(),
            "cpu_flags": cpu_flags(), "fast_bf16": Device("cpu").supports_bf16(),
            "fast_bf16_forced": forced in ("0", "1"), "cores": usable_cores(), "cpus": os.cpu_count(),
            "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def describe_host(h: dict) -> str:
    """One line: 'AMD EPYC (avx2 avx512f avx512_bf16), fast bf16 yes, 2 cores, torch 2.14.1'."""
    bf16 = ("yes" if h["fast_bf16"] else "no") + (f" (forced by {CPU_BF16_ENV})" if h["fast_bf16_forced"] else "")
    gpu = f", GPU {h['gpu']}" if h.get("gpu") else ""
    return (f"{h['cpu']} ({' '.join(h['cpu_flags']) or 'no listed flags'}), fast bf16 {bf16}, "
            f"{h['cores']} cores{gpu}, torch {h['torch']}")
