"""Facts about the machine that more than one layer needs."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(processes_per_node: int = 1, cap: int = 12) -> int:
    """Loader workers per process: the cores left per process after its main thread, 1 to cap."""
    return max(1, min(cap, usable_cores() // max(1, processes_per_node) - 1))


def default_threads(processes_per_node: int = 1, workers: int = 0) -> int:
    """torch intra-op threads per process: its share of the cores less its loader workers, at
    least 1. torch's own default (every core in every process) oversubscribes the cores the
    workers decode on (BENCHMARKS.md, section "Threads per process")."""
    return max(1, usable_cores() // max(1, processes_per_node) - max(0, workers))


# CPU flags that decide how fast a training step or a decode runs (reported, never acted on here)
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "neon", "asimd")


def cpu_model() -> str:
    """The CPU's model name ('unknown' where /proc/cpuinfo has none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """The speed-relevant flags (SPEED_FLAGS) this CPU reports, in that order."""
    try:
        with open("/proc/cpuinfo") as f:
            have = next((set(line.split(":", 1)[1].split()) for line in f
                         if line.split(":")[0].strip() in ("flags", "Features")), set())
    except OSError:
        have = set()
    return [flag for flag in SPEED_FLAGS if flag in have]
