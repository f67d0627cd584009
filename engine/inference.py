"""Using a trained model: load it from a checkpoint or timm, feed it images, score it.

Shared by tools/validate.py, tools/predict.py and tools/export.py, and by the Trainer's own
validation (`evaluate`), so that a checkpoint scored afterwards gets the number training printed.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from common.errors import CheckpointError, ConfigError, DataError
from dataprep.listing import IMG_EXTENSIONS
from model.checkpoint import load_checkpoint, unwrap_model
from model.factory import DEFAULT_MODEL, canonical_name, create_model
from pipeline.transforms import DecodeError, EvalTransform

# checkpoint keys that hold weights, in the order tried: ours, timm's train.py, a plain file
WEIGHT_KEYS = ("model", "state_dict", "model_state_dict")


@dataclass
class Loaded:
    model: torch.nn.Module
    name: str  # timm model name
    num_classes: int
    classes: list = field(default_factory=list)  # class names in index order, when known
    config: dict = field(default_factory=dict)  # the training run's flags, when known
    source: str = ""


def _state_dict(ckpt: dict, path: str, ema: bool) -> dict:
    if ema:
        for key in ("state_dict_ema", "model_ema"):
            if isinstance(ckpt.get(key), dict):
                return ckpt[key]
        raise CheckpointError(f"checkpoint {path} holds no EMA weights (state_dict_ema)")
    for key in WEIGHT_KEYS:
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    if ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return ckpt  # a bare state_dict
    raise CheckpointError(f"checkpoint {path} holds no model weights (looked for {', '.join(WEIGHT_KEYS)})")


def _num_classes(name: str, state: dict) -> int:
    """The class count the weights were trained for, read off the classifier's weight."""
    probe = create_model(name, num_classes=1000, channels_last=False)
    classifier = probe.pretrained_cfg.get("classifier") or "fc"
    weight = state.get(f"{classifier}.weight")
    if weight is None:
        raise CheckpointError(f"cannot find the classifier weight {classifier}.weight in the checkpoint "
                              f"for model {name}; pass --num-classes")
    return int(weight.shape[0])


def load_model(source: str, *, model_name: str | None = None, num_classes: int | None = None,
               pretrained: bool = False, ema: bool = False, device=None) -> Loaded:
    """A model in eval mode from a checkpoint file (ours, timm's, or a bare state_dict) or, when
    `source` is not a file, a timm model name (`pretrained` loads timm's weights for it)."""
    if not os.path.isfile(source):
        if os.path.sep in source or source.endswith((".pth", ".pt", ".tar", ".bin")):
            raise CheckpointError(f"checkpoint {source} does not exist")
        name = canonical_name(source)
        try:
            model = create_model(name, num_classes=num_classes or 1000, channels_last=False,
                                 pretrained=pretrained)
        except (RuntimeError, OSError) as e:  # no network, no cached weights
            raise ConfigError(f"cannot get timm's pretrained weights for {name}: "
                              f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
        return _finish(Loaded(model, name, num_classes or 1000, source=f"timm:{name}"), device)
    ckpt = load_checkpoint(source)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    name = canonical_name(model_name or config.get("model") or DEFAULT_MODEL)
    state = _state_dict(ckpt, source, ema)
    n = num_classes or ckpt.get("num_classes") or _num_classes(name, state)
    model = create_model(name, num_classes=int(n), channels_last=False, blurpool=bool(config.get("blurpool")))
    try:
        unwrap_model(model).load_state_dict(state)
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or ["?"])
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"checkpoint {source} does not fit model {name} with {n} classes "
                              f"(pass --model; the checkpoint says {config.get('model', 'nothing')!r}): "
                              f"{detail[:300]}") from None
    classes = list(ckpt.get("classes") or [])
    return _finish(Loaded(model, name, int(n), classes, config, source), device)


def _finish(loaded: Loaded, device) -> Loaded:
    loaded.model.eval()
    if device is not None:  # channels-last, as in training: the feeders hand over NHWC-strided batches
        loaded.model.to(device.torch if hasattr(device, "torch") else device, memory_format=torch.channels_last)
    return loaded


def timm_eval_geometry(model, img_size=None, crop_pct=None, interpolation=None,
                       use_test_size: bool = False) -> tuple[int, float, str]:
    """(size, crop_pct, interpolation) as timm resolves them (resolve_data_config): the values
    given, else the model's pretrained config, else timm's defaults. `model` is a module or a
    model name (its pretrained config, no weights needed)."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg
    flags = {"img_size": img_size, "crop_pct": crop_pct, "interpolation": interpolation}
    if isinstance(model, str):
        pretrained = get_pretrained_cfg(canonical_name(model), allow_unregistered=True)
        cfg = resolve_data_config(flags, pretrained_cfg=pretrained.to_dict() if pretrained else {},
                                  use_test_size=use_test_size)
    else:
        cfg = resolve_data_config(flags, model=model, use_test_size=use_test_size)
    interp = cfg["interpolation"] if cfg["interpolation"] in ("bilinear", "bicubic") else "bicubic"
    return int(cfg["input_size"][-1]), float(cfg["crop_pct"]), interp


def eval_geometry(loaded: Loaded, img_size=None, crop_pct=None, interpolation=None,
                  use_train_size: bool = False) -> tuple[int, float, str]:
    """(size, crop_pct, interpolation) to evaluate `loaded` with. The flags win. A checkpoint of
    our trainer then gives its run's validation settings (--val-res/--val-crop-pct, else
    --img-size/--crop-pct, and --interpolation), so it scores what the run printed. Anything else
    (a timm model name, timm's or a bare checkpoint) gets the model's pretrained config through
    timm's resolve_data_config, with its test-time size and crop when it has them, as timm's
    validate.py does."""
    if loaded.config.get("img_size"):  # recorded by every run of train_stream.py
        return eval_settings(loaded, img_size, crop_pct, interpolation)
    return timm_eval_geometry(loaded.model, img_size, crop_pct, interpolation, use_test_size=not use_train_size)


def with_model_eval_defaults(run):
    """`run` (a Config or Resolved) with --crop-pct and --interpolation, where not given, from the
    model's pretrained config as timm's train.py resolves them (resnet50.gluon_in1k: 0.875,
    bicubic, the reference run's values). The evaluation size stays --val-res, else --img-size."""
    import dataclasses

    from .resolved import Resolved
    config = run.config if isinstance(run, Resolved) else run
    d = config.data
    if d.crop_pct is not None and d.interpolation is not None:
        return run
    _, pct, interp = timm_eval_geometry(config.network.model, d.img_size, d.crop_pct, d.interpolation)
    config = config.replace(crop_pct=pct, interpolation=interp)
    return dataclasses.replace(run, config=config) if isinstance(run, Resolved) else config


def eval_settings(loaded: Loaded, img_size=None, crop_pct=None, interpolation=None) -> tuple[int, float, str]:
    """(size, crop_pct, interpolation): the flags, else the training run's validation settings
    (--val-res/--val-crop-pct, else its training ones), else timm's defaults for the model."""
    cfg, timm_cfg = loaded.config, getattr(loaded.model, "pretrained_cfg", {}) or {}
    size = img_size or cfg.get("val_res") or cfg.get("img_size") or (timm_cfg.get("input_size") or (3, 224, 224))[-1]
    pct = crop_pct or cfg.get("val_crop_pct") or cfg.get("crop_pct") or timm_cfg.get("crop_pct") or 0.875
    interp = interpolation or cfg.get("interpolation") or timm_cfg.get("interpolation") or "bicubic"
    if interp not in ("bilinear", "bicubic"):
        interp = "bicubic"
    return int(size), float(pct), interp


# ---------------------------------------------------------------- images from files
def eval_mean_std(loaded: Loaded) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation a model was trained with: the run's --mean/--std when its checkpoint
    records them, else the model's pretrained config (timm's resolve_data_config), else ImageNet's."""
    from pipeline.autoaugment import resolve_mean_std
    cfg = loaded.config
    if cfg.get("mean") is not None or cfg.get("std") is not None:
        return resolve_mean_std(cfg.get("mean"), cfg.get("std"))
    pretrained = getattr(loaded.model, "pretrained_cfg", None) or {}
    return resolve_mean_std(pretrained.get("mean"), pretrained.get("std"))


def class_folders(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


class ImageFiles(Dataset):
    """(uint8 HWC image, label, index) per file, with the eval transform; an unreadable image
    gives label -1 and is dropped by `collate_skipping_bad`."""

    def __init__(self, items, transform: EvalTransform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        s = self.transform.size
        out = torch.zeros((s, s, 3), dtype=torch.uint8)
        try:
            with open(path, "rb") as f:
                self.transform(bytearray(f.read()), out)
        except (OSError, DecodeError):
            return out, -1, i
        return out, label, i


def collate_skipping_bad(batch):
    """(images, labels, indices) of the readable items, and the indices of the unreadable ones."""
    good = [b for b in batch if b[1] >= 0]
    images = torch.stack([b[0] for b in good]) if good else torch.zeros((0, 1, 1, 3), dtype=torch.uint8)
    return (images, torch.tensor([b[1] for b in good], dtype=torch.int64), [b[2] for b in good],
            [b[2] for b in batch if b[1] < 0])


def image_folder_items(root: str, classes: list[str] | None = None) -> tuple[list, list[str]]:
    """[(path, label)] of an ImageFolder split (ROOT/<class>/<image>), or of ROOT/val when ROOT has
    one. Labels follow `classes` when given (the training run's list), else the sorted train/
    class folders beside a val/ folder (make_shards' rule), else the sorted folders themselves."""
    root = os.path.abspath(root)
    split = os.path.join(root, "val") if os.path.isdir(os.path.join(root, "val")) else root
    if not os.path.isdir(split):
        raise DataError(f"{root} is not a folder")
    names = class_folders(split)
    if not names:
        raise DataError(f"{split} has no class folders (expected ROOT/<class>/<image>)")
    if not classes:
        train = os.path.join(os.path.dirname(split), "train")
        classes = class_folders(train) if split.endswith(os.sep + "val") and os.path.isdir(train) else names
    index = {c: i for i, c in enumerate(classes)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise DataError(f"class folder {unknown[0]!r} in {split} is not one of the model's "
                        f"{len(classes)} classes ({len(unknown)} such)")
    items = []
    for name in names:
        for dirpath, _, files in os.walk(os.path.join(split, name)):
            items += [(os.path.join(dirpath, f), index[name]) for f in sorted(files)
                      if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
    if not items:
        raise DataError(f"no image files in {split}")
    return items, list(classes)


def expand_images(patterns: list[str]) -> list[str]:
    """Image paths from files, folders (their images, recursively) and glob patterns."""
    paths = []
    for p in patterns:
        if os.path.isdir(p):
            for dirpath, _, files in os.walk(p):
                paths += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
        elif os.path.exists(p):
            paths.append(p)
        else:
            matched = sorted(glob.glob(p))
            if not matched:
                raise DataError(f"no such image file: {p}")
            paths += matched
    return paths


def file_loader(items, transform: EvalTransform, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(ImageFiles(items, transform), batch_size=batch_size, num_workers=workers,
                      collate_fn=collate_skipping_bad, persistent_workers=False)


# ---------------------------------------------------------------- scoring
@torch.no_grad()
def evaluate(model, batches, precision=None, tta: str = "none") -> dict:
    """Sums over (images, labels) device batches: {'n', 'loss', 'top1', 'top5'} as device-free
    floats (loss summed, hits counted); divide by n for means. One host sync at the end.
    tta='flip': FFCV's lr_tta, the logits of each image and its mirror image summed; the loss is
    on their mean (FFCV's is on the sum), so it stays comparable with no TTA."""
    device, sums, n = None, None, 0
    for images, labels in batches:
        if sums is None:
            device = images.device
            sums = torch.zeros(3, dtype=torch.float64, device=device)
        if not len(labels):
            continue
        with (precision.autocast() if precision is not None else torch.autocast(device.type, enabled=False)):
            logits = model(images)
            if tta == "flip":
                logits = logits + model(images.flip(3))
        scale = 2 if tta == "flip" else 1
        loss = torch.nn.functional.cross_entropy(logits.float() / scale, labels, reduction="sum")
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        sums += torch.stack([loss, hit[:, 0].sum(), hit.any(1).sum()]).double()
        n += len(labels)
    loss, top1, top5 = sums.tolist() if sums is not None else (0.0, 0.0, 0.0)
    return {"n": n, "loss": loss, "top1": top1, "top5": top5}


def as_percent(sums: dict) -> dict:
    n = max(sums["n"], 1)
    return {"n": int(sums["n"]), "loss": sums["loss"] / n, "top1": 100 * sums["top1"] / n,
            "top5": 100 * sums["top5"] / n}
