"""A run's configuration: typed, frozen sections, each checking itself once, and the command line,
`-c CONFIG.yaml` and Python construction all derived from them.

    Config
      data: DataConfig            --data_path, -j, --img-size, --decode, --loader, progressive resizing...
      augment: AugmentConfig      --color-jitter, --jitter-in, --aa, --reprob, --mixup, --cutmix...
      network: ModelConfig        --model, --pretrained, --drop-path, --model-ema, --torchcompile...
      dist: DistConfig            --device, --device_id, --local_rank, --sync-bn, --dist-bn...
      optim: OptimConfig          -b, --lr, --lr-base, --opt, --momentum, --weight-decay, --smoothing...
      schedule: SchedConfig       --sched, --epochs, --warmup-epochs, --min-lr, --lr-peak-epoch...
      precision: PrecisionConfig  --amp, --amp-dtype, --apex-amp
      outputs: OutputConfig       --output, --experiment, --checkpoint-hist, --log-interval...
      run: RunConfig              --seed, --resume, --checkpoint-interval, --performance, --stop-after...

Each field is declared once with `option(default, help, ...)`: its default, its help text, its
flag names (default: `--` + the name with dashes) and its `--help` group (default: the section's).
engine/flags.py makes the argparse parser from them (`build_parser()`, `parse_args()`) and reads
our YAML and timm's args.yaml into the same names (`load_config()`); in Python,
`Config.create(model="resnet10t", epochs=2)` (flat names) or `Config(data=DataConfig(...))`.
Constructing a section validates it (`check()`, from `__post_init__`); `Config` then checks the
rules that join two sections. Nothing changes a Config afterwards: what is decided when a run
starts (run folder, the checkpoint --auto-resume found, the demo's data folder, notes) is a
`Resolved` beside it (engine/resolved.py: `resolve(config)`); the world size, the LR from
--lr-base and where colour jitter runs are decided in `engine.builder`, where the device is known.

Adding a flag: one field in the section it belongs to, e.g. in DataConfig

    prefetch_to_device: int = option(2, "batches copied ahead to the device")

gives `--prefetch-to-device` (default 2, in --help's "data" group; `prefetch_to_device` in YAML,
config.json and args.yaml; `Config.create(prefetch_to_device=3)` in Python). Its range check
goes into DataConfig.check(); read it as `config.data.prefetch_to_device` where it is used.

Every check needs no data, device or model, and torch is not imported: a wrong flag is refused at
once, before anything slow starts.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields

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
    peak_epoch_ok,
)
from model.registry import unknown_model_message
from pipeline.geometry import DEFAULT_HFLIP, DEFAULT_RATIO, DEFAULT_SCALE, DEFAULT_VFLIP, check_train_crop
from pipeline.shards import MAX_SAMPLE_BYTES, SHUFFLE_BYTES

# timm 1.0 train.py defaults of the options it has and the reference run does not set
# (--decay-milestones, --patience-epochs; model.schedule has the same values)
TIMM_DECAY_MILESTONES = (90, 180, 270)
TIMM_PATIENCE_EPOCHS = 10
EVAL_METRICS = ("top1", "top5", "loss")  # timm's --eval-metric values here; loss: lower is better

# The demo: the real model on a small learnable dataset at 64 px, short enough for a 2-core CPU
# (README: time and accuracy). Its schedule steps per update: with the reference's per-epoch
# steps its first epoch (of 6) would run at warmup_lr 1e-4 and teach the model nothing. On the
# command line these are the defaults of the flags not given when there is no --data_path.
DEMO = dict(img_size=64, batch_size=32, epochs=6, warmup_epochs=1, lr=0.2, log_interval=10,
            sched_on_updates=True)

FAST = "fast recipes (ffcv-imagenet's flags and meanings; configs/fast_*.yaml)"
SAFETY = "data safety (memory bounded by these, not by what a shard claims)"
CLOUD = "object stores and cache (docs/cloud.md)"


def size_type(minimum: int):
    """argparse type of a SIZE flag: 64M, 1.5G, 4096 (bytes; K/M/G/T are powers of 1024)."""
    def parse(text):
        import argparse

        from pipeline.shards import byte_size
        try:
            return byte_size(text, minimum)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "size"
    return parse


def option(default, help: str, *flags: str, group: str | None = None, type=None, choices=None,
           metavar=None, nargs=None, const=None, negatable: bool = False):
    """A configuration field and its flag: `flags` default to --the-name; a bool is a switch
    (`negatable`: --x/--no-x); `group` overrides the section's --help group."""
    meta = dict(help=help, flags=flags, group=group, type=type, choices=choices, metavar=metavar, nargs=nargs,
                const=const, negatable=negatable)
    return field(default=default, metadata={"flag": meta})


def at_least(section, low: int, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value < low:
            kind = "at least 1" if low == 1 else f"{low} or more" if low else "0 or more"
            raise ConfigError(f"--{name.replace('_', '-')} must be {kind}")


def at_most(section, high, *names: str, why: str = "") -> None:
    for name in names:
        value = getattr(section, name)
        if value is not None and value > high:
            raise ConfigError(f"--{name.replace('_', '-')} must be at most {high:,}{why}")


# Upper bounds where a larger value is a typo that would cost memory or hours before failing
MAX_IMG_SIZE = 4096  # a batch of 4096 px images already needs GBs of /dev/shm per loader worker
MAX_CLASSES = 1_000_000  # the head alone is then 2048 x 1M floats (8 GB)
MAX_IO_RETRIES = 10  # the waits double from 2 s: 10 retries already wait over half an hour
MAX_WORKERS = 256
MAX_BATCH = 65536  # per device; a 224 px float batch of this size is already 39 GB


def finite(section) -> None:
    """No NaN or infinity in any number of a section (YAML and argparse both accept 'nan')."""
    for f in fields(section):
        value = getattr(section, f.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"--{f.name.replace('_', '-')} must be a finite number (got {value!r})")


def fraction(section, *names: str) -> None:
    for name in names:
        if not 0 <= getattr(section, name) <= 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1]")


class Section:
    """A frozen group of fields; subclasses check their own values in `check()`."""
    GROUP = ""

    def __post_init__(self):
        finite(self)
        self.check()

    def check(self) -> None:
        pass


@dataclass(frozen=True)
class DataConfig(Section):
    GROUP = "data"
    data_path: str | None = option(None, "shard folder with _info.json, an http(s):// root, a 'pipe:...{}...' "
                                   "command template, or an ImageFolder (train/ and val/ class folders, or one "
                                   "folder of class folders: sharded once into --demo-dir, for a quick try) "
                                   "(default: the built-in demo dataset)",
                                   "--data_path", "--data-path", "--data-dir", metavar="PATH")
    workers: int | None = option(None, "loader workers per process (default: cores per process - 1, at most 12)",
                                 "-j", "--workers", type=int)
    img_size: int = option(224, "train and validation image size in pixels")
    crop_pct: float | None = option(None, "eval: resize the shorter side to img-size / crop-pct, then centre-crop "
                                    "img-size (default: the model's pretrained config, as timm; 0.875 for "
                                    "resnet50.gluon_in1k)", type=float)
    train_interpolation: str = option("random", "train crop resize; random: bilinear or bicubic per image, as timm",
                                      choices=("random", "bilinear", "bicubic"))
    interpolation: str | None = option(None, "eval resize interpolation (default: the model's pretrained config, as "
                                       "timm; bicubic for resnet50.gluon_in1k)", choices=("bilinear", "bicubic"))
    validation_batch_size: int | None = option(None, "validation batch per device (default: -b)",
                                               "-vb", "--validation-batch-size", type=int)
    num_classes: int | None = option(None, "classes of the model's head (default: from _info.json; must match it)",
                                     type=int)
    decode: str = option("cpu", "cpu: torchvision in workers; pil: PIL in workers; gpu: nvJPEG on the device "
                         "(with --loader dali: DALI's cpu or mixed decoder)", choices=("cpu", "pil", "gpu"))
    loader: str = option("ours", "ours: pipeline/ in DataLoader workers; dali: NVIDIA DALI fed from the same epoch "
                         "plan (optional: pip install -r requirements-dali.txt)", choices=("ours", "dali"))
    shuffle_buffer: int = option(2048, "samples in each worker's shuffle buffer")
    prefetch_factor: int = option(4, "batches queued per worker")
    use_multi_epochs_loader: bool = option(True, "persistent loader workers across epochs (default: on)",
                                           negatable=True)
    synthetic: bool = option(False, "device-resident random batches instead of data (compute-only speed)")
    demo_dir: str = option(".demo", "where the demo data, and the shards of an ImageFolder --data_path, are made "
                           "and cached")
    max_missing: float = option(0.02, "stop the run when more than this fraction of an epoch's training samples "
                                "is missing (damaged or unreadable data, replaced by repeats)",
                                group="run", metavar="FRACTION")
    io_timeout: float = option(60.0, "remote shards (http, pipe:): time allowed to connect, and the longest stall "
                               "in the data", group="run", metavar="SECONDS")
    io_retries: int = option(3, "remote shards: retries after a failed read (waits 2, 4, 8 s...) before the run "
                             "stops naming the shard", group="run")
    min_res: int | None = option(None, "progressive resizing: train at this size up to --start-ramp (with "
                                 "--max-res; default: --img-size throughout)", group=FAST, type=int)
    max_res: int | None = option(None, "progressive resizing: the size from --end-ramp on", group=FAST, type=int)
    start_ramp: int = option(0, "last epoch at --min-res", group=FAST)
    end_ramp: int = option(0, "first epoch at --max-res; in between, linear in the epoch, rounded to a multiple "
                           "of 32", group=FAST)
    val_res: int | None = option(None, "validation image size (default: --img-size)", group=FAST, type=int)
    val_crop_pct: float | None = option(None, "validation centre-crop fraction (default: --crop-pct)", group=FAST,
                                        type=float)
    val_tta: str = option("none", "flip: validate on the sum of the logits of each image and its mirror image",
                          group=FAST, choices=("none", "flip"))
    max_sample_bytes: int = option(MAX_SAMPLE_BYTES, "a sample whose members add up to more is skipped unread and "
                                   "counted (K/M/G suffixes; default: 64M; an ImageNet JPEG is under 20 MB)",
                                   group=SAFETY, type=size_type(1), metavar="SIZE")
    shuffle_buffer_bytes: int = option(SHUFFLE_BYTES, "the most bytes of samples each worker's shuffle buffer holds, "
                                       "besides --shuffle-buffer samples (default: 256M; BENCHMARKS.md, section "
                                       "\"Memory bounded by the data\")", group=SAFETY, type=size_type(1),
                                       metavar="SIZE")
    cache_dir: str | None = option(None, "node-local cache of remote shards (http(s), s3://, gs://...), shared by "
                                   "every rank and worker of the node and kept for later epochs and runs (default: "
                                   "none, every read streams)", group=CLOUD, metavar="DIR")
    cache_limit: int | None = option(None, "bytes the cache may hold, e.g. 500G or 800M; least recently read shards "
                                     "are evicted (needed with --cache-dir)", group=CLOUD, type=size_type(1),
                                     metavar="SIZE")
    io_min_rate: int = option(1 << 20, "remote shards: a read that has waited longer than --io-timeout in all at "
                              "below this average rate fails like a stall (a trickling server); 0: off (default: "
                              "1M)", group=CLOUD, type=size_type(0), metavar="BYTES_PER_S")

    def check(self):
        at_least(self, 1, "img_size", "validation_batch_size", "num_classes", "val_res")
        at_least(self, 0, "workers")
        at_least(self, 1, "shuffle_buffer", "prefetch_factor")
        at_most(self, MAX_IMG_SIZE, "img_size", "val_res", "min_res", "max_res",
                why=" pixels (each loader worker's batch in /dev/shm grows with its square)")
        at_most(self, MAX_CLASSES, "num_classes")
        at_most(self, MAX_WORKERS, "workers")
        at_most(self, MAX_IO_RETRIES, "io_retries", why=" (the waits between retries double from 2 s)")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ConfigError("--crop-pct must be in (0, 1]")
        if self.val_crop_pct is not None and not 0 < self.val_crop_pct <= 1:
            raise ConfigError("--val-crop-pct must be in (0, 1]")
        if self.loader == "dali" and self.decode == "pil":
            raise ConfigError("--loader dali decodes with DALI: choose --decode cpu or gpu")
        if not 0 <= self.max_missing <= 1:
            raise ConfigError("--max-missing must be a fraction between 0 and 1")
        if not self.io_timeout > 0 or self.io_retries < 0:
            raise ConfigError("--io-timeout must be positive and --io-retries 0 or more")
        if self.cache_dir is not None and not self.cache_limit:
            raise ConfigError("--cache-dir needs --cache-limit SIZE (e.g. 500G): the most the cache may hold")
        if (self.min_res is None) != (self.max_res is None):
            raise ConfigError("--min-res and --max-res go together (progressive resizing)")
        if self.min_res is not None and not 1 <= self.min_res <= self.max_res:
            raise ConfigError(f"progressive resizing needs 1 <= --min-res <= --max-res (got {self.min_res} "
                              f"and {self.max_res})")
        if not 0 <= self.start_ramp <= self.end_ramp:
            raise ConfigError(f"--start-ramp and --end-ramp need 0 <= start <= end (got {self.start_ramp} "
                              f"and {self.end_ramp})")
        if self.min_res is not None and self.loader == "dali":
            raise ConfigError("progressive resizing (--min-res/--max-res) needs --loader ours: "
                              "a DALI pipeline is built for one image size")


@dataclass(frozen=True)
class AugmentConfig(Section):
    GROUP = "augmentation (timm's flags)"
    color_jitter: float = option(0.4, "brightness/contrast/saturation factor range 1 +- this, per image; 0: off")
    jitter_in: str = option("auto", "where colour jitter runs: batched on the device, or per image in the loader "
                            "workers; auto: the workers when training on the CPU (cheaper there), else the device",
                            choices=("auto", "device", "workers"))
    aa: str | None = option(None, "augmentation policy in the workers: RandAugment rand-m9-mstd0.5, AutoAugment "
                            "original, originalr, v0, v0r or 3a (each optionally -mstd<x>), augmix-m3-w3-d-1, or "
                            "trivial (turns colour jitter off, except with 3a, as timm; default: none)",
                            metavar="POLICY")
    scale: tuple[float, float] = option(DEFAULT_SCALE, "random resized crop: area fraction range", type=float,
                                        nargs=2, metavar=("MIN", "MAX"))
    ratio: tuple[float, float] = option(DEFAULT_RATIO, "random resized crop: aspect ratio range", type=float,
                                        nargs=2, metavar=("MIN", "MAX"))
    hflip: float = option(DEFAULT_HFLIP, "horizontal flip probability")
    vflip: float = option(DEFAULT_VFLIP, "vertical flip probability")
    mean: tuple[float, ...] | None = option(None, "normalisation mean, 1 or 3 values (default: ImageNet's)",
                                            type=float, nargs="+", metavar="MEAN")
    std: tuple[float, ...] | None = option(None, "normalisation std, 1 or 3 values (default: ImageNet's)",
                                           type=float, nargs="+", metavar="STD")
    reprob: float = option(0.0, "random erasing probability per image")
    remode: str = option("const", "random erasing fill (default: const, the port's train.py l.210; timm 1.0: pixel)",
                         choices=("pixel", "rand", "const"))
    recount: int = option(1, "random erasing: at most this many boxes")
    mixup: float = option(0.0, "mixup alpha; > 0 turns mixup on")
    cutmix: float = option(0.0, "cutmix alpha; > 0 turns cutmix on")
    cutmix_minmax: tuple[float, float] | None = option(
        None, "cutmix box size range as a fraction of the image (turns cutmix on; default: none)",
        type=float, nargs=2, metavar=("MIN", "MAX"))
    mixup_prob: float = option(1.0, "probability of mixing a batch")
    mixup_switch_prob: float = option(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_off_epoch: int = option(0, "turn mixup/cutmix off from this epoch (default: 0, never)")

    def check(self):
        if self.cutmix_minmax is not None:
            object.__setattr__(self, "cutmix_minmax", tuple(self.cutmix_minmax))  # a YAML/argparse list
        try:
            crop = check_train_crop(self.scale, self.ratio, self.hflip, self.vflip)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"--scale/--ratio/--hflip/--vflip: {e}") from None
        for name, value in zip(("scale", "ratio"), crop):
            object.__setattr__(self, name, value)
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None:
                values = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
                object.__setattr__(self, name, values)
                if len(values) not in (1, 3) or (name == "std" and min(values) <= 0):
                    raise ConfigError(f"--{name} needs 1 or 3 values{' > 0' if name == 'std' else ''} (got "
                                      f"{' '.join(map(str, values))})")
        at_least(self, 1, "recount")
        fraction(self, "reprob", "mixup_prob", "mixup_switch_prob")
        at_least(self, 0, "color_jitter", "mixup", "cutmix", "mixup_off_epoch")
        at_most(self, 1, "color_jitter")
        if self.cutmix_minmax is not None and not 0 <= self.cutmix_minmax[0] < self.cutmix_minmax[1] <= 1:
            raise ConfigError("--cutmix-minmax needs 0 <= MIN < MAX <= 1")
        if self.aa is not None:
            try:
                if self.aa.split("-")[0] == "rand":
                    from pipeline.randaugment import RandAugment
                    RandAugment(self.aa)
                else:  # timm's policies (imports torch, only when one is asked for)
                    from pipeline.autoaugment import create_augment
                    create_augment(self.aa, 224)
            except (ValueError, KeyError, AssertionError) as e:
                raise ConfigError(f"--aa {self.aa}: {str(e).strip() or type(e).__name__}") from None

    @property
    def crop_changed(self) -> bool:
        """Whether the crop or flips differ from timm's defaults (our loader's workers only)."""
        return (self.scale, self.ratio, self.hflip, self.vflip) != check_train_crop()

    @property
    def mixup_active(self) -> bool:
        """timm's train.py: mixup_active = mixup > 0 or cutmix > 0 or cutmix_minmax is not None."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


def check_file(flag: str, path: str | None) -> None:
    if path and not os.path.isfile(path):
        what = "does not exist" if not os.path.exists(path) else "is not a file"
        raise ConfigError(f"{flag} {path} {what}")


@dataclass(frozen=True)
class ModelConfig(Section):
    GROUP = "model"
    model: str = option(DEFAULT_MODEL, "timm model name; gluon_resnet50_v1b (the reference port's name) is accepted "
                        "for it")
    pretrained: bool = option(False, "start from timm's pretrained weights (hub or its cache; head adapted to "
                              "--num-classes)")
    pretrained_path: str | None = option(None, "local weights file to use as the pretrained weights (implies "
                                         "--pretrained)", metavar="FILE")
    initial_checkpoint: str | None = option(None, "load these weights after initialisation (weights only; "
                                            "--resume continues a run)", metavar="PATH")
    drop: float = option(0.0, "dropout rate before the classifier (timm's drop_rate)")
    drop_path: float | None = option(None, "drop path (stochastic depth) rate (default: the model's, none for "
                                     "ResNets)", type=float)
    model_ema: bool = option(False, "keep, validate and save an EMA of the weights")
    model_ema_decay: float = option(0.9998, "EMA decay per optimizer update")
    model_ema_warmup: bool = option(False, "timm's EMA decay warmup")
    zero_init_last: bool = option(True, "zero the last BN of each residual block (default: on)", negatable=True)
    channels_last: bool = option(True, "channels-last memory layout for the model and batches (default: on)",
                                 negatable=True)
    torchcompile: str | None = option(None, "torch.compile the model with BACKEND (inductor when none is named; "
                                      "default: eager)", nargs="?", const="inductor", metavar="BACKEND")
    compile_mode: str | None = option(None, "torch.compile mode, e.g. max-autotune-no-cudagraphs or reduce-overhead "
                                      "(CUDA graphs; default: torch's)")
    blurpool: bool = option(False, "blur (3x3 binomial, depthwise) before every strided conv with 16+ input "
                            "channels", group=FAST, negatable=True)

    def check(self):
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            raise ConfigError("--drop-path must be in [0, 1)")
        if not 0 <= self.drop < 1:
            raise ConfigError("--drop must be in [0, 1)")
        if not 0 <= self.model_ema_decay < 1:
            raise ConfigError("--model-ema-decay must be in [0, 1)")
        check_file("--initial-checkpoint", self.initial_checkpoint)
        check_file("--pretrained-path", self.pretrained_path)
        unknown = unknown_model_message(self.model)
        if unknown:
            raise ConfigError(unknown)


@dataclass(frozen=True)
class DistConfig(Section):
    GROUP = "device and precision"
    device: str = option("auto", "auto: CUDA, else an Ascend NPU, else the CPU", choices=("auto", "cuda", "npu", "cpu"))
    device_id: int = option(0, "device index for a single process (torchrun sets it from LOCAL_RANK)",
                            "--device_id", "--device-id")
    local_rank: int | None = option(None, "set by torch.distributed.launch (torchrun uses LOCAL_RANK instead)",
                                    "--local_rank", "--local-rank", type=int)
    sync_bn: bool = option(False, "synchronised BatchNorm across processes", group="model")
    dist_bn: str = option("", "after each epoch, average (reduce) or copy rank 0's (broadcast) BN statistics "
                          "(default: '', per-rank statistics as the port's train.py l.252; timm 1.0: reduce)",
                          group="model", choices=("reduce", "broadcast", ""))
    threads: int | None = option(None, "torch intra-op threads per process (default: OMP_NUM_THREADS where set, "
                                 "else the cores per process less its loader workers, at least 1)", type=int,
                                 metavar="N")
    ddp_broadcast_buffers: bool = option(False, "DDP copies rank 0's buffers (BN statistics) before every forward "
                                         "(default: off, as the port; timm 1.0: on)", group="model", negatable=True)

    def check(self):
        at_least(self, 1, "threads")
        at_least(self, 0, "device_id", "local_rank")


@dataclass(frozen=True)
class OptimConfig(Section):
    GROUP = "optimizer and schedule"
    batch_size: int = option(256, "batch per device", "-b", "--batch-size")
    lr: float | None = option(None, "peak LR (default: from --lr-base and the global batch)", type=float)
    lr_base: float = option(DEFAULT_BASE_LR_PER_256, "LR per --lr-base-size images of global batch, used when --lr "
                            "is not given")
    lr_base_size: int = option(DEFAULT_BASE_SIZE, "the batch size --lr-base is for")
    lr_base_scale: str = option("", "LR vs global batch: linear or sqrt (default: '', linear, as timm for SGD)",
                                choices=("", "linear", "sqrt"))
    opt: str = option("sgd", "optimizer: sgd/nesterov: SGD with Nesterov momentum (ours); momentum: classical "
                      "momentum; or any of timm's names (adamw, lamb, lars, lion, rmsproptf, lookahead_<name>...: "
                      "timm's create_optimizer_v2)", metavar="NAME")
    opt_eps: float | None = option(None, "optimizer epsilon (timm's optimizers; default: the optimizer's)",
                                   type=float, metavar="EPSILON")
    opt_betas: tuple[float, ...] | None = option(None, "optimizer betas (timm's optimizers; default: the "
                                                 "optimizer's)", type=float, nargs="+", metavar="BETA")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(1e-4, "weight decay (none on BN weights and biases)")
    smoothing: float = option(0.1, "label smoothing")
    bce_loss: bool = option(False, "binary cross-entropy loss (timm's BinaryCrossEntropy) instead of cross-entropy")
    bce_target_thresh: float | None = option(None, "BCE: targets above this become 1 (default: none)", type=float)
    bce_sum: bool = option(False, "BCE: sum over classes instead of the mean")
    bce_pos_weight: float | None = option(None, "BCE: positive class weight (default: none)", type=float)
    grad_accum_steps: int = option(1, "accumulate the gradients of N batches per optimizer update (the loss is "
                                   "divided by N; the LR schedule counts updates)", metavar="N")
    clip_grad: float | None = option(None, "clip gradients at this norm (or value; default: no clipping)", type=float)
    clip_mode: str = option("norm", "gradient clipping mode", choices=("norm", "value", "agc"))

    def check(self):
        at_least(self, 1, "batch_size", "lr_base_size", "grad_accum_steps")
        at_most(self, MAX_BATCH, "batch_size", why=" per device")
        at_least(self, 0, "clip_grad", "lr", "lr_base", "weight_decay")
        if not 0 <= self.momentum <= 1:
            raise ConfigError("--momentum must be in [0, 1]")
        if not 0 <= self.smoothing < 1:
            raise ConfigError("--smoothing must be in [0, 1) (the share of the target moved to the other classes)")
        if self.opt_betas is not None:
            object.__setattr__(self, "opt_betas", tuple(float(b) for b in self.opt_betas))
        if self.opt_eps is not None and not self.opt_eps > 0:
            raise ConfigError("--opt-eps must be > 0")
        if not self.bce_loss and (self.bce_target_thresh is not None or self.bce_sum
                                  or self.bce_pos_weight is not None):
            raise ConfigError("--bce-target-thresh, --bce-sum and --bce-pos-weight need --bce-loss")
        if self.bce_pos_weight is not None and not self.bce_pos_weight > 0:
            raise ConfigError("--bce-pos-weight must be > 0")
        if self.opt.lower() not in OPTIMIZERS:  # timm's names: imports timm, only when one is asked for
            from model.optim import optimizer_names
            if self.opt.lower() not in optimizer_names() and not (
                    self.opt.lower().startswith("lookahead_") and self.opt.lower()[10:] in optimizer_names()):
                raise ConfigError(f"--opt {self.opt}: unknown optimizer; choose sgd, momentum or one of timm's "
                                  f"({', '.join(optimizer_names()[3:])})")


@dataclass(frozen=True)
class SchedConfig(Section):
    """The schedule's flags; engine.builder turns them into model.schedule.ScheduleConfig."""
    GROUP = "optimizer and schedule"
    sched: str = option("cosine", "LR schedule: cosine, step, multistep, poly or plateau after the warmup (timm's); "
                        "linear-step: FFCV's triangle", choices=SCHEDULES)
    sched_on_updates: bool = option(False, "change the LR every optimizer update (default: once per epoch)")
    epochs: int = option(90, "epochs of the schedule (cooldown comes on top)")
    warmup_epochs: int = option(DEFAULT_WARMUP_EPOCHS, "epochs of linear warmup from --warmup-lr, inside --epochs")
    warmup_lr: float = option(DEFAULT_WARMUP_LR, "LR at the start of the warmup")
    min_lr: float = option(DEFAULT_MIN_LR, "LR at the end of the cosine")
    decay_epochs: float = option(DEFAULT_DECAY_EPOCHS, "step schedule period in epochs", type=float)
    decay_rate: float = option(DEFAULT_DECAY_RATE, "LR factor of step, multistep and plateau; the power of poly",
                               "--decay-rate", "--dr")
    decay_milestones: tuple[int, ...] = option(TIMM_DECAY_MILESTONES, "multistep: epochs at which the LR is "
                                               "multiplied by --decay-rate", type=int, nargs="+", metavar="EPOCH")
    patience_epochs: int = option(TIMM_PATIENCE_EPOCHS, "plateau: epochs without improvement of --eval-metric "
                                  "before the LR is cut")
    cooldown_epochs: int = option(DEFAULT_COOLDOWN_EPOCHS, "epochs at the minimum LR after the cosine")
    lr_peak_epoch: int = option(DEFAULT_LR_PEAK_EPOCH, "linear-step: the LR rises from 1e-4 x lr at epoch 0 to lr "
                                "here, then falls to 0 at --epochs", group=FAST)

    def check(self):
        at_least(self, 1, "epochs")
        at_least(self, 0, "patience_epochs")
        object.__setattr__(self, "decay_milestones", tuple(int(m) for m in self.decay_milestones))
        if list(self.decay_milestones) != sorted(self.decay_milestones) or min(self.decay_milestones, default=0) < 0:
            raise ConfigError("--decay-milestones must be epochs >= 0 in increasing order")
        if not self.decay_rate > 0:
            raise ConfigError("--decay-rate must be > 0")
        if self.warmup_epochs < 0 or self.cooldown_epochs < 0:
            raise ConfigError("--warmup-epochs and --cooldown-epochs must be 0 or more")
        at_least(self, 0, "warmup_lr", "min_lr")
        if not self.decay_rate > 0 or not self.decay_epochs > 0:
            raise ConfigError("--decay-rate and --decay-epochs must be positive")
        if not peak_epoch_ok(self.sched, self.lr_peak_epoch, self.epochs):
            raise ConfigError(f"--lr-peak-epoch must be in [0, --epochs) for linear-step "
                              f"(got {self.lr_peak_epoch} with {self.epochs} epochs)")


@dataclass(frozen=True)
class PrecisionConfig(Section):
    GROUP = "device and precision"
    amp: bool = option(True, "mixed precision: bfloat16 where fast, else float16 + GradScaler on accelerators and "
                       "float32 on a CPU without fast bfloat16 (default: on)", negatable=True)
    amp_dtype: str | None = option(None, "force the autocast dtype (default: chosen as --amp says)",
                                   choices=("bfloat16", "float16"))
    apex_amp: bool = option(False, "NVIDIA Apex AMP O2 + FusedSGD (needs Apex built from source)", negatable=True)

    def check(self):
        if self.apex_amp and self.amp_dtype == "bfloat16":
            raise ConfigError("--apex-amp runs float16 (O2); it cannot be combined with --amp-dtype bfloat16")


@dataclass(frozen=True)
class OutputConfig(Section):
    GROUP = "output and monitoring"
    output: str | None = option(None, "runs go to DIR/<date-time>-<model>-<img-size>/ (default: output; a "
                                "--performance run saves nothing unless given)", metavar="DIR")
    experiment: str | None = option(None, "name the run folder DIR/NAME instead (default: date-time-model-size)",
                                    metavar="NAME")
    no_output: bool = option(False, "save nothing: no metrics, checkpoints or logs")
    checkpoint_hist: int = option(10, "keep the N best epochs as checkpoint-EPOCH.pth.tar (timm's; the port's "
                                  "train.py l.272; 0: none)", metavar="N")
    tensorboard: bool | None = option(None, "TensorBoard event files in RUN/tensorboard (default: on when "
                                      "tensorboard is installed)", negatable=True)
    log_wandb: bool = option(False, "log to Weights & Biases (needs wandb)")
    wandb_project: str | None = option(None, "W&B project (default: stream-imagenet)")
    log_interval: int = option(50, "steps between log lines (the loop's host syncs)")
    eval_metric: str = option("top1", "validation metric for best.pth, --checkpoint-hist and --sched plateau "
                              "(loss: lower is better)", choices=EVAL_METRICS)

    def check(self):
        at_least(self, 1, "log_interval")
        at_least(self, 0, "checkpoint_hist")
        name = self.experiment
        if name is not None and (not name or os.sep in name or name in (".", "..")):
            raise ConfigError(f"--experiment {name!r} must be a plain folder name")


@dataclass(frozen=True)
class RunConfig(Section):
    GROUP = "run"
    seed: int = option(42, "seeds weights, shard order and augmentation")
    resume: str | None = option(None, "checkpoint to continue from, at the step it was written (mid-epoch included); "
                                "the run continues in its folder", metavar="PATH")
    auto_resume: bool = option(False, "continue the newest run under --output (or --experiment's) that has a "
                               "last.pth, else start afresh: rerun the same command after a preemption")
    checkpoint_interval: str | None = option(None, "also write last.pth every N optimizer steps (500), or every N "
                                             "minutes with an m suffix (10m; s and h work too), resumable at that "
                                             "step (default: epoch ends only)", metavar="N|Nm")
    allow_other_data: bool = option(False, "resume even when the checkpoint was trained on another data set (its "
                                    "_info.json name, fingerprint or sample count differ); it continues at the "
                                    "next epoch")
    start_epoch: int | None = option(None, "start at this epoch (with --resume: instead of the checkpoint's; the "
                                     "LR schedule follows it)", type=int, metavar="EPOCH")
    no_resume_opt: bool = option(False, "with --resume: restore the weights but not the optimizer and loss-scaler "
                                 "state")
    no_val: bool = option(False, "skip validation")
    val_interval: int = option(1, "validate and checkpoint every N epochs (and after the last)")
    stop_after: int | None = option(None, "end this run after EPOCHS epochs (continue later with --resume; "
                                    "default: all)", type=int, metavar="EPOCHS")
    performance: bool = option(False, "measure FPS: warm-up steps, then --perf-steps timed steps; print JSON")
    perf_steps: int = option(100, "timed steps of --performance")
    perf_warmup: int = option(20, "untimed steps before measuring")
    nonfinite_loss: str = option("stop", "a NaN or infinite training loss (checked at each --log-interval and "
                                 "before every checkpoint): stop the run, keeping the last good checkpoint; skip: "
                                 "drop such updates and count them (the run stops after 25 consecutive ones)",
                                 choices=("stop", "skip"))

    def check(self):
        at_least(self, 1, "val_interval", "perf_steps")
        at_least(self, 0, "perf_warmup", "seed")
        at_most(self, 2 ** 63 - 1, "seed")
        at_least(self, 0, "start_epoch")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError("--stop-after must be at least 1 (epochs to train in this run)")
        try:
            parse_interval(self.checkpoint_interval)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_file("--resume", self.resume)


SECTIONS = {"data": DataConfig, "augment": AugmentConfig, "network": ModelConfig, "dist": DistConfig,
            "optim": OptimConfig, "schedule": SchedConfig, "precision": PrecisionConfig, "outputs": OutputConfig,
            "run": RunConfig}
# --help's groups, in this order (a field's group is its section's unless it names another)
GROUPS = ("data", AugmentConfig.GROUP, "model", OptimConfig.GROUP, DistConfig.GROUP, OutputConfig.GROUP, "run", FAST,
          SAFETY, CLOUD)


@dataclass(frozen=True)
class Config:
    """The whole configuration. Read a value by section (`config.optim.batch_size`) or, for
    brevity, by its flat name (`config.batch_size`); every flat name is unique."""
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    network: ModelConfig = field(default_factory=ModelConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: SchedConfig = field(default_factory=SchedConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    outputs: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        """The rules that join two sections."""
        data, aug = self.data, self.augment
        if aug.mixup_active and self.optim.batch_size % 2:
            raise ConfigError(f"mixup/cutmix pairs image i with image B-1-i: -b must be even "
                              f"(got {self.optim.batch_size})")
        if aug.aa is not None and data.loader == "dali":
            raise ConfigError("--aa runs in our loader's workers: it does not combine with --loader dali")
        if aug.aa is not None and data.decode == "gpu":
            raise ConfigError("--aa runs on decoded pixels in the loader workers: it does not combine with "
                              "--decode gpu")
        if data.synthetic and data.decode != "cpu":  # after the --aa rules, which name the conflict better
            raise ConfigError("--synthetic reads no data, so --decode does not apply")
        if aug.jitter_in == "workers" and (data.loader == "dali" or data.decode == "gpu" or data.synthetic):
            raise ConfigError("--jitter-in workers runs in our loader's workers on decoded pixels: it does not "
                              "combine with --loader dali, --decode gpu or --synthetic (use --jitter-in device)")
        if aug.crop_changed and (data.loader == "dali" or data.decode == "gpu"):
            raise ConfigError("--scale, --ratio, --hflip and --vflip apply to our loader's crops: they do not "
                              "combine with --loader dali or --decode gpu")
        if self.optim.grad_accum_steps > 1 and self.precision.apex_amp:
            raise ConfigError("--grad-accum-steps does not combine with --apex-amp (its loss scaling unscales "
                              "into the master gradients at every backward)")
        if self.run.no_resume_opt and not (self.run.resume or self.run.auto_resume):
            raise ConfigError("--no-resume-opt applies to --resume (or --auto-resume)")
        if self.outputs.no_output and (self.outputs.output or self.outputs.experiment or self.run.auto_resume):
            raise ConfigError("--no-output saves nothing: it cannot be combined with --output, --experiment "
                              "or --auto-resume")

    def __getattr__(self, name):  # only called for names that are not sections
        section = FLAT.get(name)
        if section is None:
            raise AttributeError(f"Config has no section or field {name!r}")
        return getattr(getattr(self, section), name)

    @classmethod
    def create(cls, **values) -> "Config":
        """A Config from flat field names (`Config.create(model="resnet10t", epochs=2)`); the
        others keep their defaults."""
        unknown = set(values) - set(FLAT)
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**{name: kind(**{k: v for k, v in values.items() if FLAT[k] == name})
                      for name, kind in SECTIONS.items()})

    def replace(self, **values) -> "Config":
        """A new Config with these flat fields changed (checked again)."""
        return Config.create(**{**self.flat(), **values})

    def flat(self) -> dict:
        """{field name: value} over every section."""
        return {f.name: getattr(getattr(self, FLAT[f.name]), f.name) for f in all_fields()}


def all_fields():
    for kind in SECTIONS.values():
        yield from fields(kind)


FLAT = {f.name: name for name, kind in SECTIONS.items() for f in fields(kind)}  # field -> its section
assert len(FLAT) == sum(len(fields(k)) for k in SECTIONS.values()), "a field name is in two sections"
assert not set(FLAT) & set(SECTIONS), "a field is named as a section"


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


# Moved to engine.flags (the command line) and engine.resolved (what a run decides at its start);
# still importable from here, as tools and tests do.
_MOVED = {"build_parser": "flags", "parse_args": "flags", "parse_config": "flags", "load_config": "flags",
          "add_flag": "flags", "Resolved": "resolved", "resolve": "resolved", "plain_config": "resolved",
          "jitter_place": "resolved", "mixup_active": "resolved", "NOT_FLAGS": "resolved", "advice": "resolved"}


def __getattr__(name):
    if name in _MOVED:
        import importlib
        return getattr(importlib.import_module(f"engine.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'engine.config' has no attribute {name!r}")
