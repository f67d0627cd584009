"""Like with like: a benchmark ratio is printed only when both sides ran the same settings.

Each side of a ratio is described by a flat dict of settings (device, precision, threads, image
size, ...) that the side itself resolved; `mismatch` names the keys on which they differ, and the
tools print that one line instead of a ratio.
"""
from __future__ import annotations


def mismatch(sides: dict[str, dict], keys) -> str | None:
    """None when every side has the same value for each of `keys`; else one line saying where
    they differ, e.g. "bare and train_stream differ in amp_dtype (bfloat16 vs float32)"."""
    names = list(sides)
    diffs = []
    for key in keys:
        values = [sides[n].get(key, "<unset>") for n in names]
        if any(v != values[0] for v in values[1:]):
            diffs.append(f"{key} ({' vs '.join(map(str, values))})")
    if not diffs:
        return None
    return f"{' and '.join(names)} differ in {', '.join(diffs)}"


def ratio(numerator: float, denominator: float, sides: dict[str, dict], keys, digits: int = 3):
    """(numerator / denominator rounded, None) when the sides match, else (None, the reason)."""
    reason = mismatch(sides, keys)
    if reason is not None:
        return None, reason
    return round(numerator / denominator, digits), None
