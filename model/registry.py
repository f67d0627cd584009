"""Is a model name one timm knows? Answered without importing timm, from a cached list.

Importing timm takes seconds, and a misspelt --model should be refused before that. The first
run that imports timm (any training run) writes the list of its model names (architectures,
tagged pretrained names, deprecated aliases) to a cache file per timm version; later runs check
names against that file in milliseconds. Without the file the check is left to timm itself.
"""
from __future__ import annotations

import difflib
import os
from importlib import metadata

from model.recipe import ALIASES


def _timm_version() -> str | None:
    try:
        return metadata.version("timm")
    except metadata.PackageNotFoundError:
        return None


def cache_path() -> str | None:
    version = _timm_version()
    if version is None:
        return None
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "stream-imagenet", f"timm-{version}-models.txt")


def _cached_names() -> set[str] | None:
    path = cache_path()
    try:
        with open(path, encoding="utf-8") as f:
            names = {line.strip() for line in f if line.strip()}
    except (OSError, TypeError):
        return None
    return names or None


def write_cache() -> None:
    """Record timm's model names (call where timm is already imported); best effort."""
    path = cache_path()
    if path is None or os.path.isfile(path):
        return
    import timm
    from timm.models import get_deprecated_models
    names = set(timm.list_models()) | set(timm.list_models(pretrained=True)) | set(get_deprecated_models())
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(sorted(names)) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the check is simply left to timm


def unknown_model_message(name: str) -> str | None:
    """A one-line refusal for a name timm does not know, None when it knows it (or cannot tell)."""
    names = _cached_names()
    if names is None or name in names or name in ALIASES:
        return None
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.75)
    hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"
    return f"unknown model {name!r}: use a timm model name, e.g. resnet50.gluon_in1k or resnet50{hint}"
