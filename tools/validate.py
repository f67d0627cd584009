#!/usr/bin/env python3
"""Score a model on a validation set: top-1, top-5, loss and images/s (timm's validate.py, for
our shards or an ImageFolder).

    python tools/validate.py output/demo/last.pth                      # the run's own data and settings
    python tools/validate.py runs/r50/best.pth --data /data/imagenet-wds
    python tools/validate.py runs/r50/best.pth --data /data/imagenet/val  # an ImageFolder
    python tools/validate.py resnet50.gluon_in1k --pretrained --data /data/imagenet  # timm's weights

A checkpoint may be ours (`last.pth`, `best.pth`), timm's (`model_best.pth.tar`, read with an
allow-list, never a full unpickle) or a bare state_dict. The flags win; else the model name,
class count, eval geometry and data path come from the checkpoint's run when it recorded them;
else the eval geometry is the model's pretrained config (timm's resolve_data_config, test-time
size and crop when the model has them, as timm's validate.py). A `pipe:` data path recorded in a
checkpoint is never run: type it with --data. Validation uses the training run's precision and
batch size, so a checkpoint scores what its run printed for that epoch. The last stdout line is
a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from common.errors import DataError, UserError, user_message  # noqa: E402

# torch, timm and the pipeline are imported after the arguments are parsed (inside run()):
# --help and a usage error answer at once instead of after seconds of imports.

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="validate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT|MODEL", help="checkpoint file, or a timm model name")
    p.add_argument("--data", help="shard folder (_info.json) or ImageFolder; default: the run's --data_path")
    p.add_argument("--model", help="timm model name (default: the one the checkpoint records)")
    p.add_argument("--pretrained", action="store_true", help="with a model name: timm's pretrained weights")
    p.add_argument("--use-ema", action="store_true", help="score the checkpoint's EMA weights")
    p.add_argument("--num-classes", type=int, help="default: read off the checkpoint's classifier")
    p.add_argument("--img-size", type=int, help="default: the run's, else timm's for the model")
    p.add_argument("--crop-pct", type=float, help="default: the run's, else timm's for the model")
    p.add_argument("--interpolation", choices=("bilinear", "bicubic"), help="default: the run's, else timm's")
    p.add_argument("--use-train-size", action="store_true",
                   help="for a model without our run's settings: timm's training size and crop_pct, not its "
                   "test-time ones (timm's validate.py flag)")
    p.add_argument("--tta", choices=("none", "flip"), help="flip: sum the logits of each image and its mirror "
                   "image (default: the run's --val-tta)")
    p.add_argument("-b", "--batch-size", type=int, help="default: the run's -b, else 256")
    p.add_argument("-j", "--workers", type=int, help="default: cores - 1, at most 12")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "npu", "cpu"), help="default: auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (default: as the run trained)")
    p.add_argument("--amp-dtype", choices=("bfloat16", "float16"), help="default: as the run trained")
    return p


def batches_for(data: str, classes, transform, batch_size: int, workers: int, pin: bool):
    """(iterable of uint8 NHWC batches, number of images expected, class names)."""
    from engine.inference import file_loader, image_folder_items
    from pipeline.info import INFO_NAMES, check_local_shards, is_remote, load_info
    from pipeline.loader import create_loader

    if is_remote(data) or any(os.path.isfile(os.path.join(data, n)) for n in INFO_NAMES):
        info = load_info(data)
        split = info.split("validation")
        check_local_shards(split)
        loader = create_loader(split, train=False, batch_size=batch_size, img_size=transform.size,
                               num_workers=workers, crop_pct=transform.crop_pct,
                               eval_interpolation=transform.interpolation, pin_memory=pin, persistent=False)
        return loader, split.num_samples, list(info.classes)
    items, names = image_folder_items(data, classes)
    loader = file_loader(items, transform, batch_size, workers)
    return ((x, y) for x, y, _, _ in loader), len(items), names


def data_source(typed: str | None, config: dict) -> str:
    """--data, else the data path the checkpoint's run recorded. A `pipe:` path runs a shell
    command, so it is used only when typed on this command line, never from a file."""
    if typed:
        return typed
    data = config.get("data_path")
    if not data or not isinstance(data, str):
        raise DataError("no --data given and the checkpoint records no data path")
    if data.startswith("pipe:"):
        raise DataError(f"the checkpoint records the data path {data!r}, a shell command, which runs only when "
                        "typed on the command line: pass --data explicitly")
    return data


def eval_geometry(loaded, img_size=None, crop_pct=None, interpolation=None,
                  use_train_size: bool = False) -> tuple[int, float, str]:
    """engine.inference.eval_geometry (imported here only when called: --help stays fast)."""
    from engine.inference import eval_geometry as geometry
    return geometry(loaded, img_size, crop_pct, interpolation, use_train_size)


def run(args) -> dict:
    from common.host import default_workers
    from engine.inference import as_percent, eval_mean_std, evaluate, load_model
    from model.checkpoint import timm_model_name
    from model.device import resolve_device
    from model.precision import resolve_precision
    from pipeline.prefetch import DevicePrefetcher, Normalize
    from pipeline.transforms import EvalTransform

    dev = resolve_device(args.device)
    loaded = load_model(args.checkpoint, model_name=args.model or timm_model_name(args.checkpoint),
                        num_classes=args.num_classes, pretrained=args.pretrained, ema=args.use_ema, device=dev)
    cfg = loaded.config
    data = data_source(args.data, cfg)
    size, crop_pct, interp = eval_geometry(loaded, args.img_size, args.crop_pct, args.interpolation,
                                           args.use_train_size)
    amp = args.amp if args.amp is not None else cfg.get("amp", True)
    precision = resolve_precision(dev, amp=amp, amp_dtype=args.amp_dtype or cfg.get("amp_dtype"))
    batch = args.batch_size or cfg.get("batch_size") or 256
    workers = args.workers if args.workers is not None else default_workers()
    transform = EvalTransform(size, crop_pct, interp)
    batches, expected, classes = batches_for(data, loaded.classes, transform, batch, workers, dev.pin_memory())
    if classes and len(classes) != loaded.num_classes:
        raise DataError(f"{data} has {len(classes)} classes but the model has {loaded.num_classes}")
    feed = DevicePrefetcher(dev, Normalize(dev.torch, *eval_mean_std(loaded)))
    t0 = time.perf_counter()
    tta = args.tta or cfg.get("val_tta") or "none"
    sums = evaluate(loaded.model, feed(batches), precision, tta)
    dev.synchronize()
    seconds = time.perf_counter() - t0
    result = as_percent(sums)
    result.update(images_expected=expected, skipped=expected - result["n"],
                  img_per_s=round(result["n"] / seconds, 1), model=loaded.name, source=loaded.source,
                  data=data, img_size=size, crop_pct=crop_pct, interpolation=interp, tta=tta,
                  amp_dtype=precision.dtype_name, device=dev.name())
    return result


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except UserError as e:
        print(f"validate: error: {user_message(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("validate: interrupted", file=sys.stderr)
        return 130
    print(f"validate: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
          f"({result['n']} of {result['images_expected']} images, {result['img_per_s']:,.0f} img/s, "
          f"{result['amp_dtype']})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
