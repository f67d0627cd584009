"""The command line: flags with timm's names and meanings, `-c CONFIG.yaml` defaults, checks.

Every check that needs no data, device or model runs here, before anything slow starts.
"""
from __future__ import annotations

import argparse

from common.errors import ConfigError
from model.factory import DEFAULT_MODEL
from model.schedule import (
    DEFAULT_BASE_LR_PER_256,
    DEFAULT_COOLDOWN_EPOCHS,
    DEFAULT_DECAY_EPOCHS,
    DEFAULT_DECAY_RATE,
    DEFAULT_MIN_LR,
    DEFAULT_WARMUP_EPOCHS,
    DEFAULT_WARMUP_LR,
)

DESCRIPTION = ("Train a timm model (default resnet50.gluon_in1k, ResNet-50 v1b) on ImageNet streamed from "
               "tar shards, fast. Without --data_path it trains on a built-in demo dataset.")

# The demo: the real model on a small learnable dataset at 64 px, short enough for a 2-core CPU
# (README: time and accuracy).
DEMO = dict(img_size=64, batch_size=32, epochs=6, warmup_epochs=1, lr=0.2, log_interval=10)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not the whole usage text."""
        self.exit(2, f"train_stream: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="train_stream.py", description=DESCRIPTION,
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-c", "--config", default=None, help="YAML file of flag defaults")
    g = p.add_argument_group("data")
    g.add_argument("--data_path", "--data-path", dest="data_path", default=None,
                   help="shard folder with _info.json, an http(s):// root, or a 'pipe:...{}...' "
                        "command template; none: the built-in demo dataset")
    g.add_argument("-j", "--workers", type=int, default=None,
                   help="loader workers per process (default: cores per process - 1, at most 12)")
    g.add_argument("--img-size", type=int, default=224)
    g.add_argument("--crop-pct", type=float, default=0.875, help="eval centre-crop fraction")
    g.add_argument("--train-interpolation", default="bilinear", choices=("bilinear", "bicubic"))
    g.add_argument("--interpolation", default="bicubic", choices=("bilinear", "bicubic"),
                   help="eval resize interpolation")
    g.add_argument("--decode", default="cpu", choices=("cpu", "pil", "gpu"),
                   help="cpu: torchvision in workers; pil: PIL in workers; gpu: nvJPEG on the device")
    g.add_argument("--shuffle-buffer", type=int, default=2048, help="samples per worker")
    g.add_argument("--prefetch-factor", type=int, default=4, help="batches queued per worker")
    g.add_argument("--use-multi-epochs-loader", action=argparse.BooleanOptionalAction, default=True,
                   help="persistent loader workers across epochs")
    g.add_argument("--synthetic", action="store_true", help="device-resident random batches")
    g.add_argument("--demo-dir", default=".demo", help="where the demo data is cached")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="timm model name; gluon_resnet50_v1b (the reference port's name) is an alias of the default")
    g.add_argument("--zero-init-last", action=argparse.BooleanOptionalAction, default=True,
                   help="zero the last BN of each residual block")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (backend, default inductor)")
    g.add_argument("--compile-mode", default=None,
                   help="torch.compile mode, e.g. max-autotune-no-cudagraphs or reduce-overhead (CUDA graphs)")
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("-b", "--batch-size", type=int, default=256, help="batch per device")
    g.add_argument("--lr", type=float, default=None, help=f"default: {DEFAULT_BASE_LR_PER_256} x global batch / 256")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--sched", default="cosine", choices=("cosine", "step"))
    g.add_argument("--epochs", type=int, default=90)
    g.add_argument("--warmup-epochs", type=int, default=DEFAULT_WARMUP_EPOCHS)
    g.add_argument("--warmup-lr", type=float, default=DEFAULT_WARMUP_LR)
    g.add_argument("--min-lr", type=float, default=DEFAULT_MIN_LR)
    g.add_argument("--decay-epochs", type=float, default=DEFAULT_DECAY_EPOCHS,
                   help="step schedule period (timm's default; 30 gives the classic 90-epoch steps)")
    g.add_argument("--decay-rate", type=float, default=DEFAULT_DECAY_RATE)
    g.add_argument("--cooldown-epochs", type=int, default=DEFAULT_COOLDOWN_EPOCHS,
                   help="epochs at the minimum LR after the cosine")
    g = p.add_argument_group("device and precision")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "npu", "cpu"))
    g.add_argument("--device_id", "--device-id", dest="device_id", type=int, default=0,
                   help="device index for a single process (torchrun sets it from LOCAL_RANK)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by the launcher (torch.distributed.launch); torchrun uses LOCAL_RANK")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision (bfloat16 where supported, else float16 + GradScaler)")
    g.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16"))
    g.add_argument("--apex-amp", action="store_true", help="NVIDIA Apex AMP O2 + FusedSGD (needs Apex)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output", default=None, help="folder for metrics.jsonl, config.json, checkpoints")
    g.add_argument("--resume", default=None, help="checkpoint to continue from (next epoch)")
    g.add_argument("--log-interval", type=int, default=50, help="steps between log lines (host syncs)")
    g.add_argument("--no-val", action="store_true", help="skip validation after each epoch")
    g.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="end this run after EPOCHS epochs (continue later with --resume)")
    g.add_argument("--performance", action="store_true",
                   help="measure FPS: warm-up steps, then --perf-steps timed steps; print JSON")
    g.add_argument("--perf-steps", type=int, default=100)
    g.add_argument("--perf-warmup", type=int, default=20, help="untimed steps before measuring")
    for action in p._actions:  # every flag shows its default in --help
        if action.help is None:
            action.help = "(default: %(default)s)"
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**load_config(first.config, parser))
    args = parser.parse_args(argv)
    check_args(args)
    return args


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    import yaml
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"cannot read config {path}: {str(e).splitlines()[0]}")
    if not isinstance(values, dict):
        parser.error(f"config {path} must be a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        parser.error(f"config {path}: unknown keys {', '.join(unknown)}")
    return values


def check_args(args) -> None:
    for name in ("batch_size", "epochs", "perf_steps", "log_interval", "img_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise ConfigError("--workers must be 0 or more")
    if args.perf_warmup < 0 or args.warmup_epochs < 0 or args.cooldown_epochs < 0:
        raise ConfigError("--perf-warmup, --warmup-epochs and --cooldown-epochs must be 0 or more")
    if args.apex_amp and args.amp_dtype == "bfloat16":
        raise ConfigError("--apex-amp runs float16 (O2); it cannot be combined with --amp-dtype bfloat16")
    if args.synthetic and args.decode != "cpu":
        raise ConfigError("--synthetic reads no data, so --decode does not apply")
    if not 0 < args.crop_pct <= 1:
        raise ConfigError("--crop-pct must be in (0, 1]")
