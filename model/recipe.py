"""The recipe's defaults and names, with their sources: importable without torch or timm, so that
the command line is parsed and checked before anything slow loads."""
from __future__ import annotations

# The default model: ResNet-50 v1b. The reference port calls it gluon_resnet50_v1b, timm's old
# name for resnet50.gluon_in1k (accepted as an alias without timm's deprecation warning).
DEFAULT_MODEL = "resnet50.gluon_in1k"
ALIASES = {"gluon_resnet50_v1b": DEFAULT_MODEL}  # the reference port's --model value


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


OPTIMIZERS = {"sgd": True, "nesterov": True, "momentum": False}  # timm's --opt name -> Nesterov

SCHEDULES = ("cosine", "step", "linear-step", "multistep", "poly", "plateau")  # the last three: timm's

# The reference run's values: the Ascend port (ModelZoo-PyTorch @ 6a2804a3,
# PyTorch/built-in/cv/classification/Gluon_ResNet50_v1b_for_PyTorch), train.py @ 86c6aebb defaults
# (line) and its test/train_full_{1p,8p}.sh flags. timm 1.0's train.py defaults differ (warmup 5
# epochs from 1e-5, min_lr 0, --lr-base 0.1).
DEFAULT_BASE_LR_PER_256 = 0.2  # train_full_1p.sh --lr 0.2 at batch 256; train_full_8p.sh --lr 1.6 at 8 x 256
DEFAULT_BASE_SIZE = 256  # timm's --lr-base-size
DEFAULT_WARMUP_EPOCHS = 3  # train.py l.180
DEFAULT_WARMUP_LR = 1e-4  # train.py l.168
DEFAULT_MIN_LR = 1e-5  # train.py l.170
DEFAULT_DECAY_EPOCHS = 30  # train.py l.178 (step schedule only)
DEFAULT_DECAY_RATE = 0.1  # train.py l.186
DEFAULT_COOLDOWN_EPOCHS = 0  # train_full_{1p,8p}.sh --cooldown-epochs 0 (train.py l.182 default: 10)
# linear-step only: ffcv-imagenet train_imagenet.py @ 606c584 l.60, lr.lr_peak_epoch default (its
# rn50 configs do not set it); the triangle starts at 1e-4 x lr (l.112).
DEFAULT_LR_PEAK_EPOCH = 2
LINEAR_STEP_START = 1e-4


def peak_epoch_ok(sched: str, peak_epoch: int, epochs: int) -> bool:
    """linear-step's triangle needs its peak inside the run: 0 <= peak_epoch < epochs."""
    return sched != "linear-step" or 0 <= peak_epoch < epochs
