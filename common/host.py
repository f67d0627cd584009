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
