"""The command line's words for the library's. pipeline/ and model/ describe a problem in their
own terms (tests/test_layering.py keeps flags out of them); train_stream's one-line messages name
the flag that changes it. Each pair is (the library's phrase, the command line's); a phrase that
no longer appears in the library fails tests/test_layering.py."""
from __future__ import annotations

FLAG_WORDS = (
    ("the DALI loader", "--loader dali"),
    ("the shard root ", "--data_path "),
    ("the initial checkpoint ", "--initial-checkpoint "),
    ("the pretrained weights file ", "--pretrained-path "),
    ("pass the path of a local weights file", "pass a local file with --pretrained-path FILE"),
    ("differ in BlurPool layers", "differ in --blurpool"),
    ("device 'cuda' was requested", "--device cuda was requested"),
    ("device 'npu' was requested", "--device npu was requested"),
    ("Apex AMP", "--apex-amp"),
    ("use native AMP", "use --amp for native AMP"),
    ("use bfloat16 autocast", "use --amp-dtype bfloat16"),
    ("use float16 autocast", "use --amp-dtype float16"),
    ("linear-step's lr-peak-epoch must be in [0, epochs)", "--lr-peak-epoch must be in [0, --epochs) for linear-step"),
    ("unknown lr-base-scale", "unknown --lr-base-scale"),
    ("then resume from the last checkpoint", "then rerun the same command with --auto-resume"),
    ("docker's shm-size setting ", "docker run --shm-size="),
    ("use fewer loader workers, smaller batches or fewer batches in flight",
     "lower --workers, -b or --prefetch-factor"),
    ("over the per-sample byte limit", "over --max-sample-bytes"),
    ("KiB/s set for remote reads", "KiB/s (--io-min-rate)"),
    ("resume from the last checkpoint to continue",
     "rerun the same command with --auto-resume to continue from the last checkpoint"),
)


def flag_wording(message: str) -> str:
    """A library message in the command line's words."""
    for library, cli in FLAG_WORDS:
        message = message.replace(library, cli)
    return message
