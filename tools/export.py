#!/usr/bin/env python3
"""Export a trained model to ONNX and check it with onnxruntime against PyTorch.

    python tools/export.py output/demo/best.pth -o demo.onnx
    python tools/export.py runs/r50/best.pth -o r50.onnx --img-size 224 --opset 18
    python tools/export.py resnet50.gluon_in1k --pretrained -o r50_timm.onnx

The graph takes `images`: float32 NCHW, already normalised with the mean/std the model was trained
with (the run's --mean/--std, else the model's pretrained config, else ImageNet's), any batch
size; it returns `logits`. The file's metadata records the mean, std, input size, crop fraction,
interpolation and class names, so a serving stack can rebuild the eval transform. Unless
--no-check, onnxruntime (installable from PyPI) runs the exported graph on random batches of two
sizes and the tool fails if its logits differ from PyTorch's by more than --tolerance. Needs the
`onnx` and `onnxscript` packages (torch's exporter).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone

from common.errors import ConfigError, UserError, user_message  # noqa: E402

# torch, timm and the exporter are imported after the arguments are parsed (inside the functions):
# --help and a usage error (no -o) answer at once instead of after seconds of imports.

def export(loaded, path: str, size: int, opset: int) -> None:
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            raise ConfigError(f"ONNX export needs the {name} package: pip install onnx onnxscript") from None
    import torch
    model = loaded.model.float().to(memory_format=torch.contiguous_format).eval()
    example = (torch.randn(2, 3, size, size),)
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(model, example, dynamo=True, opset_version=opset, verbose=False,
                                    input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},))
        program.save(path)
    except Exception as e:  # the exporter raises many types for unsupported models
        raise ConfigError(f"ONNX export of {loaded.name} failed: "
                          f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def add_metadata(path: str, meta: dict) -> None:
    import onnx
    proto = onnx.load(path)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, path)


def check(model, path: str, size: int, tolerance: float) -> float:
    """Largest |logit difference| between onnxruntime and PyTorch over batches of 1 and 3."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("--check needs onnxruntime (pip install onnxruntime), or pass --no-check") from None
    import torch
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for n in (1, 3):
        x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run(["logits"], {"images": x.numpy()})[0]
        worst = max(worst, float(abs(got - ref).max()))
    if worst > tolerance:
        raise ConfigError(f"onnxruntime's logits differ from PyTorch's by {worst:.2e} (> --tolerance {tolerance})")
    return worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT|MODEL", help="checkpoint file, or a timm model name")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--model", help="timm model name (default: the one the checkpoint records)")
    p.add_argument("--pretrained", action="store_true", help="with a model name: timm's pretrained weights")
    p.add_argument("--use-ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument("--img-size", type=int, help="example input size (default: the run's, else timm's)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the onnxruntime comparison")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed logit difference (default: 1e-3)")
    args = p.parse_args(argv)
    try:
        from engine.inference import eval_mean_std, eval_settings, load_model
        from model.checkpoint import timm_model_name
        loaded = load_model(args.checkpoint, model_name=args.model or timm_model_name(args.checkpoint),
                            pretrained=args.pretrained, ema=args.use_ema)
        size, crop_pct, interp = eval_settings(loaded, args.img_size)
        mean, std = eval_mean_std(loaded)
        export(loaded, args.output, size, args.opset)
        add_metadata(args.output, {"model": loaded.name, "source": loaded.source, "input_size": [3, size, size],
                                   "mean": list(mean), "std": list(std),
                                   "crop_pct": crop_pct, "interpolation": interp,
                                   "classes": loaded.classes or list(range(loaded.num_classes))})
        note = ""
        if args.check:
            note = f", onnxruntime agrees (max |diff| {check(loaded.model, args.output, size, args.tolerance):.1e})"
    except UserError as e:
        print(f"export: error: {user_message(e)}", file=sys.stderr)
        return e.exit_code
    print(f"export: {loaded.name} ({loaded.num_classes} classes, {size} px) -> {args.output}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
