"""The command line: flags with timm's names and meanings, `-c CONFIG.yaml` defaults, checks.

Every check that needs no data, device or model runs here, before anything slow starts.
"""
from __future__ import annotations

import argparse
import os

from common.errors import ConfigError
from model.recipe import (
    DEFAULT_BASE_LR_PER_256,
    DEFAULT_BASE_SIZE,
    DEFAULT_COOLDOWN_EPOCHS,
    DEFAULT_DECAY_EPOCHS,
    DEFAULT_DECAY_RATE,
    DEFAULT_LR_PEAK_EPOCH,
    DEFAULT_MIN_LR,
    DEFAULT_MODEL,
    DEFAULT_WARMUP_EPOCHS,
    DEFAULT_WARMUP_LR,
    OPTIMIZERS,
    SCHEDULES,
)
from model.registry import unknown_model_message

DESCRIPTION = ("Train a timm model (default resnet50.gluon_in1k, ResNet-50 v1b) on ImageNet streamed from "
               "tar shards, fast. Without --data_path it trains on a built-in demo dataset.")

# The demo: the real model on a small learnable dataset at 64 px, short enough for a 2-core CPU
# (README: time and accuracy). Its schedule steps per update: with the reference's per-epoch
# steps its first epoch (of 6) would run at warmup_lr 1e-4 and teach the model nothing.
DEMO = dict(img_size=64, batch_size=32, epochs=6, warmup_epochs=1, lr=0.2, log_interval=10,
            sched_on_updates=True)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not the whole usage text."""
        self.exit(2, f"train_stream: error: {message} (see --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, once: added unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or quiet or action.default == "" or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="train_stream.py", description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("-c", "--config", default=None, metavar="FILE",
                   help="YAML file of flag defaults (our flag names, or a timm args.yaml); flags given win")
    g = p.add_argument_group("data")
    g.add_argument("--data_path", "--data-path", dest="data_path", default=None, metavar="PATH",
                   help="shard folder with _info.json, an http(s):// root, or a 'pipe:...{}...' "
                        "command template (default: the built-in demo dataset)")
    g.add_argument("-j", "--workers", type=int, default=None,
                   help="loader workers per process (default: cores per process - 1, at most 12)")
    g.add_argument("--img-size", type=int, default=224, help="train and validation image size in pixels")
    g.add_argument("--crop-pct", type=float, default=0.875,
                   help="eval: resize the shorter side to img-size / crop-pct, then centre-crop img-size")
    g.add_argument("--train-interpolation", default="random", choices=("random", "bilinear", "bicubic"),
                   help="train crop resize; random: bilinear or bicubic per image, as timm")
    g.add_argument("--interpolation", default="bicubic", choices=("bilinear", "bicubic"),
                   help="eval resize interpolation")
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None,
                   help="validation batch per device (default: -b)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="classes of the model's head (default: from _info.json; must match it)")
    g.add_argument("--decode", default="cpu", choices=("cpu", "pil", "gpu"),
                   help="cpu: torchvision in workers; pil: PIL in workers; gpu: nvJPEG on the device "
                        "(with --loader dali: DALI's cpu or mixed decoder)")
    g.add_argument("--loader", default="ours", choices=("ours", "dali"),
                   help="ours: pipeline/ in DataLoader workers; dali: NVIDIA DALI fed from the same epoch plan "
                        "(optional: pip install -r requirements-dali.txt)")
    g.add_argument("--shuffle-buffer", type=int, default=2048, help="samples in each worker's shuffle buffer")
    g.add_argument("--prefetch-factor", type=int, default=4, help="batches queued per worker")
    g.add_argument("--use-multi-epochs-loader", action=argparse.BooleanOptionalAction, default=True,
                   help="persistent loader workers across epochs (default: on)")
    g.add_argument("--synthetic", action="store_true",
                   help="device-resident random batches instead of data (compute-only speed)")
    g.add_argument("--demo-dir", default=".demo", help="where the demo data is made and cached")
    g = p.add_argument_group("augmentation (timm's flags)")
    g.add_argument("--color-jitter", type=float, default=0.4,
                   help="brightness/contrast/saturation factor range 1 +- this, per image; 0: off")
    g.add_argument("--jitter-in", default="auto", choices=("auto", "device", "workers"),
                   help="where colour jitter runs: batched on the device, or per image in the loader workers; "
                        "auto: the workers when training on the CPU (cheaper there), else the device")
    g.add_argument("--aa", default=None, metavar="POLICY",
                   help="RandAugment policy, e.g. rand-m9-mstd0.5, in the workers (turns colour jitter off; "
                        "default: none)")
    g.add_argument("--reprob", type=float, default=0.0, help="random erasing probability per image")
    g.add_argument("--remode", default="const", choices=("pixel", "rand", "const"),
                   help="random erasing fill (default: const, the port's train.py l.210; timm 1.0: pixel)")
    g.add_argument("--recount", type=int, default=1, help="random erasing: at most this many boxes")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha; > 0 turns mixup on")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha; > 0 turns cutmix on")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="cutmix box size range as a fraction of the image (turns cutmix on; default: none)")
    g.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5,
                   help="probability of cutmix instead of mixup when both are on")
    g.add_argument("--mixup-off-epoch", type=int, default=0,
                   help="turn mixup/cutmix off from this epoch (default: 0, never)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="timm model name; gluon_resnet50_v1b (the reference port's name) is accepted for it")
    g.add_argument("--pretrained", action="store_true",
                   help="start from timm's pretrained weights (hub or its cache; head adapted to --num-classes)")
    g.add_argument("--pretrained-path", default=None, metavar="FILE",
                   help="local weights file to use as the pretrained weights (implies --pretrained)")
    g.add_argument("--initial-checkpoint", default=None, metavar="PATH",
                   help="load these weights after initialisation (weights only; --resume continues a run)")
    g.add_argument("--drop-path", type=float, default=None,
                   help="drop path (stochastic depth) rate (default: the model's, none for ResNets)")
    g.add_argument("--sync-bn", action="store_true", help="synchronised BatchNorm across processes")
    g.add_argument("--dist-bn", default="", choices=("reduce", "broadcast", ""),
                   help="after each epoch, average (reduce) or copy rank 0's (broadcast) BN statistics (default: "
                        "'', per-rank statistics as the port's train.py l.252; timm 1.0: reduce)")
    g.add_argument("--ddp-broadcast-buffers", action=argparse.BooleanOptionalAction, default=False,
                   help="DDP copies rank 0's buffers (BN statistics) before every forward "
                        "(default: off, as the port; timm 1.0: on)")
    g.add_argument("--model-ema", action="store_true", help="keep, validate and save an EMA of the weights")
    g.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay per optimizer update")
    g.add_argument("--model-ema-warmup", action="store_true", help="timm's EMA decay warmup")
    g.add_argument("--zero-init-last", action=argparse.BooleanOptionalAction, default=True,
                   help="zero the last BN of each residual block (default: on)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory layout for the model and batches (default: on)")
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model with BACKEND (inductor when none is named; default: eager)")
    g.add_argument("--compile-mode", default=None,
                   help="torch.compile mode, e.g. max-autotune-no-cudagraphs or reduce-overhead (CUDA graphs; "
                        "default: torch's)")
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("-b", "--batch-size", type=int, default=256, help="batch per device")
    g.add_argument("--lr", type=float, default=None, help="peak LR (default: from --lr-base and the global batch)")
    g.add_argument("--lr-base", type=float, default=DEFAULT_BASE_LR_PER_256,
                   help="LR per --lr-base-size images of global batch, used when --lr is not given")
    g.add_argument("--lr-base-size", type=int, default=DEFAULT_BASE_SIZE, help="the batch size --lr-base is for")
    g.add_argument("--lr-base-scale", default="", choices=("", "linear", "sqrt"),
                   help="LR vs global batch: linear or sqrt (default: '', linear, as timm for SGD)")
    g.add_argument("--opt", default="sgd", choices=tuple(OPTIMIZERS),
                   help="sgd/nesterov: SGD with Nesterov momentum; momentum: classical momentum")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (none on BN weights and biases)")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--clip-grad", type=float, default=None,
                   help="clip gradients at this norm (or value; default: no clipping)")
    g.add_argument("--clip-mode", default="norm", choices=("norm", "value", "agc"), help="gradient clipping mode")
    g.add_argument("--sched", default="cosine", choices=SCHEDULES,
                   help="LR schedule: cosine or step after the warmup; linear-step: FFCV's triangle")
    g.add_argument("--sched-on-updates", action="store_true",
                   help="change the LR every optimizer update (default: once per epoch)")
    g.add_argument("--epochs", type=int, default=90, help="epochs of the schedule (cooldown comes on top)")
    g.add_argument("--warmup-epochs", type=int, default=DEFAULT_WARMUP_EPOCHS,
                   help="epochs of linear warmup from --warmup-lr, inside --epochs")
    g.add_argument("--warmup-lr", type=float, default=DEFAULT_WARMUP_LR, help="LR at the start of the warmup")
    g.add_argument("--min-lr", type=float, default=DEFAULT_MIN_LR, help="LR at the end of the cosine")
    g.add_argument("--decay-epochs", type=float, default=DEFAULT_DECAY_EPOCHS,
                   help="step schedule period in epochs")
    g.add_argument("--decay-rate", type=float, default=DEFAULT_DECAY_RATE, help="step schedule LR factor")
    g.add_argument("--cooldown-epochs", type=int, default=DEFAULT_COOLDOWN_EPOCHS,
                   help="epochs at the minimum LR after the cosine")
    g = p.add_argument_group("device and precision")
    g.add_argument("--device", default="auto", choices=("auto", "cuda", "npu", "cpu"),
                   help="auto: CUDA, else an Ascend NPU, else the CPU")
    g.add_argument("--device_id", "--device-id", dest="device_id", type=int, default=0,
                   help="device index for a single process (torchrun sets it from LOCAL_RANK)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                   help="set by torch.distributed.launch (torchrun uses LOCAL_RANK instead)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="mixed precision: bfloat16 where fast, else float16 + GradScaler on accelerators and "
                        "float32 on a CPU without fast bfloat16 (default: on)")
    g.add_argument("--amp-dtype", default=None, choices=("bfloat16", "float16"),
                   help="force the autocast dtype (default: chosen as --amp says)")
    g.add_argument("--apex-amp", action=argparse.BooleanOptionalAction, default=False,
                   help="NVIDIA Apex AMP O2 + FusedSGD (needs Apex built from source)")
    g = p.add_argument_group("output and monitoring")
    g.add_argument("--output", default=None, metavar="DIR",
                   help="runs go to DIR/<date-time>-<model>-<img-size>/ (default: output; a --performance run "
                        "saves nothing unless given)")
    g.add_argument("--experiment", default=None, metavar="NAME",
                   help="name the run folder DIR/NAME instead (default: date-time-model-size)")
    g.add_argument("--no-output", action="store_true", help="save nothing: no metrics, checkpoints or logs")
    g.add_argument("--checkpoint-hist", type=int, default=10, metavar="N",
                   help="keep the N best epochs as checkpoint-EPOCH.pth.tar (timm's; the port's train.py l.272; "
                        "0: none)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=None,
                   help="TensorBoard event files in RUN/tensorboard (default: on when tensorboard is installed)")
    g.add_argument("--log-wandb", action="store_true", help="log to Weights & Biases (needs wandb)")
    g.add_argument("--wandb-project", default=None, help="W&B project (default: stream-imagenet)")
    g.add_argument("--log-interval", type=int, default=50, help="steps between log lines (the loop's host syncs)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=42, help="seeds weights, shard order and augmentation")
    g.add_argument("--resume", default=None, metavar="PATH",
                   help="checkpoint to continue from, at the step it was written (mid-epoch included); "
                        "the run continues in its folder")
    g.add_argument("--auto-resume", action="store_true",
                   help="continue the newest run under --output (or --experiment's) that has a last.pth, "
                        "else start afresh: rerun the same command after a preemption")
    g.add_argument("--checkpoint-interval", default=None, metavar="N|Nm",
                   help="also write last.pth every N optimizer steps (500), or every N minutes with an "
                        "m suffix (10m; s and h work too), resumable at that step (default: epoch ends only)")
    g.add_argument("--allow-other-data", action="store_true",
                   help="resume even when the checkpoint was trained on another data set (its _info.json "
                        "name, fingerprint or sample count differ); it continues at the next epoch")
    g.add_argument("--max-missing", type=float, default=0.02, metavar="FRACTION",
                   help="stop the run when more than this fraction of an epoch's training samples is "
                        "missing (damaged or unreadable data, replaced by repeats)")
    g.add_argument("--io-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="remote shards (http, pipe:): time allowed to connect, and the longest stall in the data")
    g.add_argument("--io-retries", type=int, default=3,
                   help="remote shards: retries after a failed read (waits 2, 4, 8 s...) before the run "
                        "stops naming the shard")
    g.add_argument("--no-val", action="store_true", help="skip validation")
    g.add_argument("--val-interval", type=int, default=1,
                   help="validate and checkpoint every N epochs (and after the last)")
    g.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                   help="end this run after EPOCHS epochs (continue later with --resume; default: all)")
    g.add_argument("--performance", action="store_true",
                   help="measure FPS: warm-up steps, then --perf-steps timed steps; print JSON")
    g.add_argument("--perf-steps", type=int, default=100, help="timed steps of --performance")
    g.add_argument("--perf-warmup", type=int, default=20, help="untimed steps before measuring")
    g = p.add_argument_group("fast recipes (ffcv-imagenet's flags and meanings; configs/fast_*.yaml)")
    g.add_argument("--lr-peak-epoch", type=int, default=DEFAULT_LR_PEAK_EPOCH,
                   help="linear-step: the LR rises from 1e-4 x lr at epoch 0 to lr here, then falls to 0 at --epochs")
    g.add_argument("--min-res", type=int, default=None,
                   help="progressive resizing: train at this size up to --start-ramp (with --max-res; "
                        "default: --img-size throughout)")
    g.add_argument("--max-res", type=int, default=None, help="progressive resizing: the size from --end-ramp on")
    g.add_argument("--start-ramp", type=int, default=0, help="last epoch at --min-res")
    g.add_argument("--end-ramp", type=int, default=0,
                   help="first epoch at --max-res; in between, linear in the epoch, rounded to a multiple of 32")
    g.add_argument("--val-res", type=int, default=None, help="validation image size (default: --img-size)")
    g.add_argument("--val-crop-pct", type=float, default=None,
                   help="validation centre-crop fraction (default: --crop-pct)")
    g.add_argument("--val-tta", default="none", choices=("none", "flip"),
                   help="flip: validate on the sum of the logits of each image and its mirror image")
    g.add_argument("--blurpool", action=argparse.BooleanOptionalAction, default=False,
                   help="blur (3x3 binomial, depthwise) before every strided conv with 16+ input channels")
    from pipeline.shards import MAX_SAMPLE_BYTES, SHUFFLE_BYTES, byte_size
    g = p.add_argument_group("data safety (memory bounded by these, not by what a shard claims)")
    g.add_argument("--max-sample-bytes", type=byte_size, default=MAX_SAMPLE_BYTES, metavar="SIZE",
                   help="a sample whose members add up to more is skipped unread and counted "
                        "(K/M/G suffixes; default: 64M; an ImageNet JPEG is under 20 MB)")
    g.add_argument("--shuffle-buffer-bytes", type=byte_size, default=SHUFFLE_BYTES, metavar="SIZE",
                   help="the most bytes of samples each worker's shuffle buffer holds, besides --shuffle-buffer "
                        "samples (default: 256M; 2048 ImageNet samples take ~220 MB)")
    g = p.add_argument_group("object stores and cache (docs/cloud.md)")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="node-local cache of remote shards (http(s), s3://, gs://...), shared by every rank and "
                        "worker of the node and kept for later epochs and runs (default: none, every read streams)")
    g.add_argument("--cache-limit", type=_size, default=None, metavar="SIZE",
                   help="bytes the cache may hold, e.g. 500G or 800M; least recently read shards are evicted "
                        "(needed with --cache-dir)")
    g.add_argument("--io-min-rate", type=_size, default="1M", metavar="BYTES_PER_S",
                   help="remote shards: a read that has waited longer than --io-timeout in all at below this "
                        "average rate fails like a stall (a trickling server); 0: off")
    return p


def _size(text):
    """argparse type of --cache-limit and --io-min-rate: 500G, 800M, 4096 (bytes; powers of 1024)."""
    from pipeline.cache import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, checked, with the run folder resolved (args.run_dir) and the lines to tell the
    user in args.notes; nothing slow is imported and nothing is written."""
    from .rundir import resolve
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    notes, values = [], {}
    if first.config:
        values, ignored = load_config(first.config, parser)
        parser.set_defaults(**values)
        if ignored:
            notes.append(f"warning: {first.config}: ignoring timm settings this trainer does not have: "
                         f"{', '.join(ignored)}")
    args = parser.parse_args(argv)
    if args.data_path is None and not args.synthetic:
        apply_demo(args, given=given_flags(argv) | set(values))
    check_args(args)
    args.notes = notes + resolve(args) + advice(args)  # the run folder's name has the demo's size
    return args


def given_flags(argv) -> set[str]:
    """The dests of the flags on the command line (not those left at their defaults)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def apply_demo(args, given: set[str]) -> None:
    """No --data_path: the demo's settings for what neither the command line nor -c set."""
    for key, value in DEMO.items():
        if key not in given:
            setattr(args, key, value)


def advice(args) -> list[str]:
    """Warnings about flags that are allowed but probably not meant."""
    notes = []
    if args.warmup_epochs >= args.epochs and not args.performance:
        notes.append(f"warning: --warmup-epochs {args.warmup_epochs} >= --epochs {args.epochs}: the LR never "
                     "leaves its warmup ramp and the peak LR is never reached; lower --warmup-epochs")
    return notes


# Keys of a timm train.py args.yaml (timm 0.4-1.0) that name our flags differently, and those of
# its settings this trainer does not have: a timm config loads with the latter ignored (listed).
TIMM_RENAMED = {"data_dir": "data_path", "data": "data_path", "dr": "decay_rate"}
TIMM_ONLY = {
    "dataset", "train_split", "val_split", "dataset_download", "class_map", "input_img_mode", "input_key",
    "target_key", "dataset_trust_remote_code", "train_num_samples", "val_num_samples", "model_kwargs",
    "resume_opt", "no_resume_opt", "gp", "input_size", "mean", "std", "torchscript", "fuser",
    "grad_accum_steps", "grad_checkpointing", "fast_norm", "head_init_scale", "head_init_bias", "torchcompile_mode",
    "opt_eps", "opt_betas", "opt_kwargs", "layer_decay", "layer_decay_min_scale", "layer_decay_no_opt_scale",
    "lr_noise", "lr_noise_pct", "lr_noise_std", "lr_cycle_mul", "lr_cycle_decay",
    "lr_cycle_limit", "lr_k_decay", "epoch_repeats", "start_epoch", "decay_milestones", "warmup_prefix",
    "patience_epochs", "no_aug", "train_crop_mode", "scale", "ratio", "hflip", "vflip", "aug_repeats",
    "aug_splits", "jsd_loss", "bce_loss", "bce_sum", "bce_target_thresh", "bce_pos_weight", "resplit",
    "mixup_mode", "drop", "drop_connect", "drop_block", "bn_momentum", "bn_eps", "split_bn",
    "model_ema_force_cpu", "worker_seeding", "recovery_interval", "eval_metric", "tta", "wandb_tags",
    "wandb_resume_id", "pin_mem", "no_prefetcher", "no_ddp_bb", "synchronize_step", "device_modules", "rank",
    "world_size", "distributed", "save_images", "amp_impl",
}


def load_config(path: str, parser: argparse.ArgumentParser) -> tuple[dict, list[str]]:
    """(flag defaults from a YAML file, the timm-only keys it held and that are ignored). Keys may
    be ours (with - or _) or timm's train.py names; empty values mean "not set"."""
    import yaml
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        parser.error(f"cannot read config {path}: {str(e).splitlines()[0]}")
    if not isinstance(values, dict):
        parser.error(f"config {path} must be a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions}
    out, ignored, unknown = {}, [], []
    for key, value in values.items():
        key = TIMM_RENAMED.get(str(key).replace("-", "_"), str(key).replace("-", "_"))
        if key not in actions:
            (ignored if key in TIMM_ONLY else unknown).append(key)
            continue
        choices = actions[key].choices
        if value is None or (value == "" and not (choices and "" in choices)):
            continue  # timm writes unset settings as '' or null: keep our default
        if choices and value not in choices:
            parser.error(f"config {path}: {key} {value!r} is not one of {', '.join(map(repr, choices))}")
        out[key] = value
    if unknown:
        parser.error(f"config {path}: unknown keys {', '.join(sorted(unknown))} (neither flags of ours nor of "
                     "timm's train.py)")
    return out, sorted(ignored)


def parse_interval(text: str | None):
    """'500' -> ('steps', 500); '10m' / '90s' / '2h' -> ('seconds', ...); None -> None."""
    if text is None:
        return None
    text = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1:] in units:
            value = float(text[:-1]) * units[text[-1]]
            if value > 0:
                return "seconds", value
        elif int(text) > 0:
            return "steps", int(text)
    except ValueError:
        pass
    raise ValueError(f"--checkpoint-interval {text!r}: give steps (500) or a time (10m, 90s, 2h)")


def mixup_active(args) -> bool:
    """timm's train.py: mixup_active = mixup > 0 or cutmix > 0 or cutmix_minmax is not None."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def jitter_place(args, device_type: str) -> str | None:
    """Where colour jitter runs: 'device', 'workers', or None when it is off (0, or --aa as in timm).
    auto: the workers on a CPU-only run, where the batched version costs the training process
    ~2.7x more per image (BENCHMARKS.md, issue 9), else the device."""
    if args.color_jitter <= 0 or args.aa:
        return None
    if args.jitter_in != "auto":
        return args.jitter_in
    ours = args.loader == "ours" and args.decode != "gpu" and not args.synthetic
    return "workers" if ours and device_type == "cpu" else "device"


def check_args(args) -> None:
    for name in ("batch_size", "epochs", "perf_steps", "log_interval", "img_size", "val_interval",
                 "lr_base_size", "recount"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("validation_batch_size", "num_classes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("reprob", "mixup_prob", "mixup_switch_prob"):
        if not 0 <= getattr(args, name) <= 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1]")
    for name in ("color_jitter", "mixup", "cutmix", "drop_path", "clip_grad", "mixup_off_epoch"):
        if (getattr(args, name) or 0) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be 0 or more")
    if not 0 <= args.model_ema_decay < 1:
        raise ConfigError("--model-ema-decay must be in [0, 1)")
    if mixup_active(args) and args.batch_size % 2:
        raise ConfigError(f"mixup/cutmix pairs image i with image B-1-i: -b must be even (got {args.batch_size})")
    if args.cutmix_minmax is not None and not 0 <= args.cutmix_minmax[0] < args.cutmix_minmax[1] <= 1:
        raise ConfigError("--cutmix-minmax needs 0 <= MIN < MAX <= 1")
    if args.aa is not None and args.loader == "dali":
        raise ConfigError("--aa runs in our loader's workers: it does not combine with --loader dali")
    if args.aa is not None and args.decode == "gpu":
        raise ConfigError("--aa runs on decoded pixels in the loader workers: it does not combine with --decode gpu")
    if args.jitter_in == "workers" and (args.loader == "dali" or args.decode == "gpu" or args.synthetic):
        raise ConfigError("--jitter-in workers runs in our loader's workers on decoded pixels: it does not combine "
                          "with --loader dali, --decode gpu or --synthetic (use --jitter-in device)")
    if args.aa is not None:
        from pipeline.randaugment import RandAugment
        try:
            RandAugment(args.aa)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if args.workers is not None and args.workers < 0:
        raise ConfigError("--workers must be 0 or more")
    if args.perf_warmup < 0 or args.warmup_epochs < 0 or args.cooldown_epochs < 0:
        raise ConfigError("--perf-warmup, --warmup-epochs and --cooldown-epochs must be 0 or more")
    if args.apex_amp and args.amp_dtype == "bfloat16":
        raise ConfigError("--apex-amp runs float16 (O2); it cannot be combined with --amp-dtype bfloat16")
    if args.synthetic and args.decode != "cpu":
        raise ConfigError("--synthetic reads no data, so --decode does not apply")
    if args.loader == "dali" and args.decode == "pil":
        raise ConfigError("--loader dali decodes with DALI: choose --decode cpu or gpu")
    if not 0 < args.crop_pct <= 1:
        raise ConfigError("--crop-pct must be in (0, 1]")
    try:
        parse_interval(args.checkpoint_interval)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.stop_after is not None and args.stop_after < 1:
        raise ConfigError("--stop-after must be at least 1 (epochs to train in this run)")
    if args.checkpoint_hist < 0:
        raise ConfigError("--checkpoint-hist must be 0 or more")
    for flag, path in (("--resume", args.resume), ("--initial-checkpoint", args.initial_checkpoint),
                       ("--pretrained-path", args.pretrained_path)):
        if path and not os.path.isfile(path):
            raise ConfigError(f"{flag} {path} does not exist" if not os.path.exists(path)
                              else f"{flag} {path} is not a file")
    unknown = unknown_model_message(args.model)
    if unknown:
        raise ConfigError(unknown)
    if not 0 <= args.max_missing <= 1:
        raise ConfigError("--max-missing must be a fraction between 0 and 1")
    if not args.io_timeout > 0 or args.io_retries < 0:
        raise ConfigError("--io-timeout must be positive and --io-retries 0 or more")
    check_fast_args(args)


def check_fast_args(args) -> None:
    """The fast-recipe flags (progressive resizing, validation size, linear-step)."""
    if (args.min_res is None) != (args.max_res is None):
        raise ConfigError("--min-res and --max-res go together (progressive resizing)")
    if args.min_res is not None and not 1 <= args.min_res <= args.max_res:
        raise ConfigError(f"progressive resizing needs 1 <= --min-res <= --max-res (got {args.min_res} "
                          f"and {args.max_res})")
    if not 0 <= args.start_ramp <= args.end_ramp:
        raise ConfigError(f"--start-ramp and --end-ramp need 0 <= start <= end (got {args.start_ramp} "
                          f"and {args.end_ramp})")
    if args.val_res is not None and args.val_res < 1:
        raise ConfigError("--val-res must be at least 1")
    if args.val_crop_pct is not None and not 0 < args.val_crop_pct <= 1:
        raise ConfigError("--val-crop-pct must be in (0, 1]")
    if args.min_res is not None and args.loader == "dali":
        raise ConfigError("progressive resizing (--min-res/--max-res) needs --loader ours: "
                          "a DALI pipeline is built for one image size")
    if args.sched == "linear-step" and not 0 <= args.lr_peak_epoch < args.epochs:
        raise ConfigError(f"--lr-peak-epoch must be in [0, --epochs) for linear-step "
                          f"(got {args.lr_peak_epoch} with {args.epochs} epochs)")
