#!/usr/bin/env python3
"""Top-5 classes for image files, from a trained checkpoint or a timm model.

    python tools/predict.py output/demo/best.pth photo.jpg more/*.jpg
    python tools/predict.py runs/r50/best.pth photos/ --top 3 --json
    python tools/predict.py resnet50.gluon_in1k --pretrained cat.jpg      # timm's ImageNet weights

A model name needs --pretrained (or --random-weights, for a smoke test): alone it would predict
with random weights.

Images go through the run's eval transform (resize, centre crop, normalise). Class names come from
the checkpoint (runs record them), else `--classes-from` a shard folder or ImageFolder, else
ImageNet's names for a 1000-class model, else class indices. An unreadable image is reported and
skipped. With --json, one JSON object per image.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from common.errors import ConfigError, DataError, UserError, user_message  # noqa: E402

# torch, timm and the pipeline are imported after the arguments are parsed (inside predict()):
# --help and a usage error answer at once instead of after seconds of imports.

def class_names(loaded, classes_from: str | None) -> list[str]:
    if loaded.classes:
        return list(loaded.classes)
    if classes_from:
        if os.path.isfile(os.path.join(classes_from, "_info.json")):
            from pipeline.info import load_info
            names = list(load_info(classes_from).classes)
        else:
            train = os.path.join(classes_from, "train")
            from engine.inference import class_folders
            names = class_folders(train if os.path.isdir(train) else classes_from)
        if len(names) != loaded.num_classes:
            raise DataError(f"{classes_from} names {len(names)} classes but the model has {loaded.num_classes}")
        return names
    if loaded.num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return [f"class {i}" for i in range(loaded.num_classes)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT|MODEL", help="checkpoint file, or a timm model name")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--top", type=int, default=5, help="classes shown per image (default: 5)")
    p.add_argument("--classes-from", metavar="DATA", help="shard folder or ImageFolder that names the classes")
    p.add_argument("--model", help="timm model name (default: the one the checkpoint records)")
    p.add_argument("--pretrained", action="store_true", help="with a model name: timm's pretrained weights")
    p.add_argument("--random-weights", action="store_true",
                   help="with a model name: predict with randomly initialised weights (a smoke test)")
    p.add_argument("--use-ema", action="store_true", help="the checkpoint's EMA weights")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "npu", "cpu"), help="default: auto")
    p.add_argument("-b", "--batch-size", type=int, default=32, help="default: 32")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    return p


def check_weights(args) -> None:
    """A model name alone means random weights: refuse it unless asked for (--random-weights)."""
    if os.path.isfile(args.checkpoint) or args.pretrained or args.random_weights:
        return
    if os.path.sep in args.checkpoint or args.checkpoint.endswith((".pth", ".pt", ".tar", ".bin")):
        return  # a missing file: load_model says so
    raise ConfigError(f"{args.checkpoint} is a model name without weights: pass --pretrained for timm's "
                      "weights or a checkpoint file (--random-weights to predict with random weights)")


def predict(args) -> None:
    import torch

    from engine.inference import eval_mean_std, eval_settings, expand_images, file_loader, load_model
    from model.checkpoint import timm_model_name
    from model.device import resolve_device
    from pipeline.prefetch import Normalize
    from pipeline.transforms import EvalTransform

    dev = resolve_device(args.device)
    loaded = load_model(args.checkpoint, model_name=args.model or timm_model_name(args.checkpoint),
                        pretrained=args.pretrained, ema=args.use_ema, device=dev)
    names = class_names(loaded, args.classes_from)
    paths = expand_images(args.images)
    if not paths:
        raise DataError("no image files found in " + ", ".join(args.images))
    transform = EvalTransform(*eval_settings(loaded))
    normalize = Normalize(dev.torch, *eval_mean_std(loaded))
    k = min(args.top, loaded.num_classes)
    with torch.no_grad():
        for images, _, good, bad in file_loader([(q, 0) for q in paths], transform, args.batch_size, 0):
            for i in bad:
                print(f"predict: {paths[i]}: not a readable image, skipped", file=sys.stderr)
            if not good:
                continue
            probs = loaded.model(normalize(images.to(dev.torch))).float().softmax(1)
            top_p, top_i = probs.topk(k, dim=1)
            for i, ps, ids in zip(good, top_p.tolist(), top_i.tolist()):
                show(paths[i], [(names[c], pr) for c, pr in zip(ids, ps)], args.json)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.top < 1:
            raise DataError("--top must be at least 1")
        check_weights(args)
        predict(args)
    except UserError as e:
        print(f"predict: error: {user_message(e)}", file=sys.stderr)
        return e.exit_code
    return 0


def show(path: str, top: list, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"image": path, "top": [{"class": c, "probability": round(p, 6)} for c, p in top]}))
    else:
        print(f"{path}: " + ", ".join(f"{c} ({100 * p:.1f}%)" for c, p in top))


if __name__ == "__main__":
    sys.exit(main())
