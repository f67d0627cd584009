#!/usr/bin/env python3
"""Per-step overhead of train_stream.py against a bare training loop, measured in one run.

    python tools/bench_overhead.py [--model resnet50.gluon_in1k] [--img-size 64] [-b 32]
                                   [--steps 20] [--warmup 5] [--rounds 3] [--device cpu]
                                   [--amp-dtype bfloat16|float16] [--no-amp]

Both sides train the same model on the same device-resident batch with the same label-smoothing
loss and fused SGD. Device, precision, channels-last and torch's switches come from the same
code as train_stream.py's (the bare side parses train_stream's own flags and resolves them with
engine.runtime), so on a CPU without fast bfloat16 both run float32 and on one with it both run
bf16 autocast. The bare loop is only forward / backward / step / zero_grad; ours is
`train_stream.py --synthetic --performance --color-jitter 0` (run in this process), which adds
the per-step LR update, on-device normalisation and the loop's bookkeeping (colour jitter is
augmentation work, measured by tools/bench_jitter.py). Rounds alternate (bare, ours, ...)
so drift hits both; the medians are compared. Last stdout line: JSON with `overhead` = ours/bare
time - 1, the settings of each side under `sides`, and the machine under `host`; when the sides'
settings differ, `overhead` is null and `refused` says why.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a script: the repository's packages are importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common.compare import mismatch  # noqa: E402
from engine.cli import main as train_stream_main  # noqa: E402
from engine.config import parse_args  # noqa: E402
from engine.dist import setup_distributed  # noqa: E402
from engine.runtime import compute_settings, configure_torch, precision_for  # noqa: E402
from model.factory import create_model  # noqa: E402
from tools import benchlib  # noqa: E402

benchlib.register(benchlib.Spec("overhead", __file__, "per-step overhead of train_stream.py against a bare loop",
                                argv=lambda ctx: [], order=30))

NUM_CLASSES = 1000  # train_stream --synthetic without --data_path


def train_stream_argv(args) -> list[str]:
    argv = ["--synthetic", "--performance", "--model", args.model, "--img-size", str(args.img_size),
            "-b", str(args.batch_size), "--perf-steps", str(args.steps), "--perf-warmup", str(args.warmup),
            "--device", args.device, "--color-jitter", "0"]
    if args.amp_dtype:
        argv += ["--amp-dtype", args.amp_dtype]
    return argv + ([] if args.amp else ["--no-amp"])


def bare_loop(args) -> tuple[float, dict]:
    """Images/s of the plainest loop that does the same training work, and its settings."""
    ts = parse_args(train_stream_argv(args))  # train_stream's flags, resolved as it resolves them
    device = setup_distributed(ts.device, ts.device_id).device
    configure_torch()
    torch.manual_seed(0)
    model = create_model(ts.model, num_classes=NUM_CLASSES, channels_last=ts.channels_last, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4,
                          nesterov=ts.opt in ("sgd", "nesterov"), fused=True)
    precision = precision_for(ts, device)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=ts.smoothing)
    x = torch.randn(ts.batch_size, 3, ts.img_size, ts.img_size, device=device.torch)
    if ts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (ts.batch_size,), device=device.torch)

    def step():
        with precision.autocast():
            loss = crit(model(x), y)
        opt.zero_grad(set_to_none=True)
        precision.backward(loss, opt)
        precision.step(opt)
    for _ in range(ts.perf_warmup):
        step()
    device.synchronize()
    t0 = time.perf_counter()
    for _ in range(ts.perf_steps):
        step()
    device.synchronize()
    settings = dict(compute_settings(device, precision, ts.channels_last), model=ts.model,
                    img_size=ts.img_size, batch_size=ts.batch_size, num_classes=NUM_CLASSES, compile=None)
    return ts.perf_steps * ts.batch_size / (time.perf_counter() - t0), settings


def ours(args) -> tuple[float, dict]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = train_stream_main(train_stream_argv(args))
    if code != 0:
        raise SystemExit(f"train_stream.py failed with exit code {code}")
    r = json.loads(out.getvalue().strip().splitlines()[-1])
    settings = dict(r["settings"], model=r["model"], img_size=r["img_size"], batch_size=r["batch_size"],
                    num_classes=r["num_classes"], compile=r["compile"])
    return r["fps"], settings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50.gluon_in1k")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("auto", "cuda", "npu", "cpu"))
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="as train_stream.py's --amp (both sides)")
    p.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16"),
                   help="as train_stream.py's --amp-dtype (both sides); default: its own choice")
    args = p.parse_args(argv)
    host = benchlib.host()
    print(f"host: {benchlib.describe(host)}", flush=True)
    settings = {}

    def measure(name, side):
        def run() -> float:
            rate, settings[name] = side(args)
            return rate
        return run
    rounds = benchlib.alternate({"bare": measure("bare", bare_loop), "train_stream": measure("train_stream", ours)},
                                args.rounds, " img/s")
    bare, mine = rounds["bare"], rounds["train_stream"]
    bare_settings, our_settings = settings["bare"], settings["train_stream"]
    sides = {"bare": bare_settings, "train_stream": our_settings}
    refused = mismatch(sides, sorted(set(bare_settings) | set(our_settings)))
    b, m = benchlib.median(bare), benchlib.median(mine)
    result = {"bare_img_per_s": round(b, 2), "train_stream_img_per_s": round(m, 2),
              "overhead": None if refused else round(b / m - 1, 4), "model": args.model,
              "img_size": args.img_size, "batch_size": args.batch_size, "steps": args.steps,
              "rounds": args.rounds, "rounds_bare": [round(x, 2) for x in bare],
              "rounds_train_stream": [round(x, 2) for x in mine], "device": our_settings["device"],
              "amp_dtype": our_settings["amp_dtype"], "sides": sides, "host": host}
    print(f"median: bare {b:.1f} img/s, train_stream {m:.1f} img/s "
          f"({our_settings['device']}, {our_settings['amp_dtype']}, {our_settings['threads']} threads)")
    if refused:
        result["refused"] = refused
        print(f"no overhead ratio: {refused}")
    else:
        print(f"per-step overhead {b / m - 1:+.1%}")
    s = our_settings
    result["report"] = [benchlib.row(
        "training step overhead", "bare / train_stream time - 1", result["overhead"], args.rounds,
        f"{result['bare_img_per_s']} vs {result['train_stream_img_per_s']} img/s",
        f"{s['model']}, {s['img_size']} px, batch {s['batch_size']}, {s['amp_dtype']}, "
        f"{'channels-last' if s['channels_last'] else 'NCHW'}, {s['threads']} threads, both sides",
        fmt="+.1%", refused=refused)]
    benchlib.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
