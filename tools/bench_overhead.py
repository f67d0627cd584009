#!/usr/bin/env python3
"""Per-step overhead of train_stream.py against a bare training loop, measured in one run.

    python tools/bench_overhead.py [--model resnet50.gluon_in1k] [--img-size 64] [-b 32]
                                   [--steps 20] [--warmup 5] [--rounds 3] [--device cpu]

Both sides train the same model on the same device-resident batch with the same precision,
channels-last layout, label-smoothing loss and fused SGD. The bare loop is only
forward / backward / step / zero_grad; ours is `train_stream.py --synthetic --performance`
(run in this process), which adds the per-step LR update, on-device normalisation and the
loop's bookkeeping. Rounds alternate (bare, ours, bare, ours, ...) so drift hits both; the
median of each side is compared. Last stdout line: JSON with `overhead` = ours/bare time - 1.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.cli import main as train_stream_main  # noqa: E402
from model.device import resolve_device  # noqa: E402
from model.factory import create_model  # noqa: E402
from model.precision import resolve_precision  # noqa: E402


def bare_loop(args, device) -> float:
    """Images/s of the plainest loop that does the same training work."""
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000, channels_last=True, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, fused=True)
    precision = resolve_precision(device)  # train_stream's own choice for this device
    crit = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device.torch)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch_size,), device=device.torch)

    def step():
        with precision.autocast():
            loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        precision.backward(loss, opt)
        precision.step(opt)
    for _ in range(args.warmup):
        step()
    device.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    device.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - t0)


def ours(args) -> float:
    out = io.StringIO()
    argv = ["--synthetic", "--performance", "--model", args.model, "--img-size", str(args.img_size),
            "-b", str(args.batch_size), "--perf-steps", str(args.steps), "--perf-warmup", str(args.warmup),
            "--device", args.device]
    with contextlib.redirect_stdout(out):
        code = train_stream_main(argv)
    if code != 0:
        raise SystemExit(f"train_stream.py failed with exit code {code}")
    return json.loads(out.getvalue().strip().splitlines()[-1])["fps"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50.gluon_in1k")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("auto", "cuda", "npu", "cpu"))
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    args.device = device.type
    bare, mine = [], []
    for r in range(args.rounds):
        bare.append(bare_loop(args, device))
        mine.append(ours(args))
        print(f"round {r}: bare {bare[-1]:.1f} img/s, train_stream {mine[-1]:.1f} img/s", flush=True)
    b, m = statistics.median(bare), statistics.median(mine)
    result = {"bare_img_per_s": round(b, 2), "train_stream_img_per_s": round(m, 2),
              "overhead": round(b / m - 1, 4), "model": args.model, "img_size": args.img_size,
              "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
              "device": device.type, "torch": torch.__version__}
    print(f"median: bare {b:.1f} img/s, train_stream {m:.1f} img/s, per-step overhead {b / m - 1:+.1%}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
