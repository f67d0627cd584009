"""The command line of train_stream.py, made from the configuration's fields (engine/config.py):
argparse with timm's flag names and --help groups, `-c CONFIG.yaml` (ours or timm's args.yaml),
the demo's defaults without --data_path, and parse_args() -> a checked, resolved run."""
from __future__ import annotations

import argparse
from dataclasses import fields

from .config import DEMO, GROUPS, SECTIONS, Config
from .resolved import Resolved, resolve

DESCRIPTION = ("Train a timm model (default resnet50.gluon_in1k, ResNet-50 v1b) on ImageNet streamed from "
               "tar shards, fast. Without --data_path it trains on a built-in demo dataset.")


class Parser(argparse.ArgumentParser):
    """No prefix matching (timm's `--drop` must not become our `--drop-path`), one-line errors,
    and "did you mean" for a mistyped flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        """One line, not the whole usage text."""
        self.exit(2, f"train_stream: error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(unknown_message(unknown, [s for a in self._actions for s in a.option_strings]))
        return parsed


def unknown_message(unknown: list[str], known: list[str]) -> str:
    """'unrecognized arguments: ...' with the nearest flag for each mistyped one, and the way to
    pass a data folder for a positional one (timm's train.py takes its data folder positionally)."""
    import difflib
    hints, previous = [], None
    for token in unknown:
        name = token.split("=", 1)[0]
        if name.startswith("-"):
            longer = sorted((k for k in known if k.startswith(name)), key=len)  # what prefix matching took
            near = longer[:1] or difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            if near:
                hints.append(f"{name}: did you mean {near[0]}?")
        elif previous is None or not previous.startswith("-") or "=" in previous:
            hints.append(f"{token}: this trainer takes no positional arguments; pass a data folder as "
                         f"--data_path {token}")
        previous = token
    return f"unrecognized arguments: {' '.join(unknown)}" + ("; " + "; ".join(hints) if hints else "")


def choices_metavar(choices) -> str:
    """argparse shows '' as an empty slot ({reduce,broadcast,}); name it ''."""
    return "{" + ",".join(c if c != "" else "''" for c in map(str, choices)) + "}"


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, once: added unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or quiet or action.default == "" or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_flag(group, f) -> None:
    """One argparse option from a field declared with `option(...)`."""
    m = f.metadata["flag"]
    names = m["flags"] or (f"--{f.name.replace('_', '-')}",)
    kw = dict(dest=f.name, default=f.default, help=m["help"])
    if isinstance(f.default, bool) or m["negatable"]:
        kw["action"] = argparse.BooleanOptionalAction if m["negatable"] else "store_true"
    else:
        kw["type"] = m["type"] or (str if f.default is None else type(f.default))
        kw.update({k: m[k] for k in ("choices", "metavar", "nargs", "const") if m[k] is not None})
        if m["choices"] and "" in m["choices"] and not m["metavar"]:
            kw["metavar"] = choices_metavar(m["choices"])
    group.add_argument(*names, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="train_stream.py", description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("-c", "--config", default=None, metavar="FILE",
                   help="YAML file of flag defaults (our flag names, or a timm args.yaml); flags given win")
    groups = {title: p.add_argument_group(title) for title in GROUPS}
    for kind in SECTIONS.values():
        for f in fields(kind):
            add_flag(groups[f.metadata["flag"]["group"] or kind.GROUP], f)
    return p


def parse_config(argv=None) -> tuple[Config, list[str]]:
    """(the Config of a command line, notes about its -c file). Defaults come from the fields,
    then -c, then the demo's (without --data_path, for what neither the command line nor -c set),
    then the flags given."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    notes, values = [], {}
    if first.config:
        values, ignored = load_config(first.config, parser)
        parser.set_defaults(**values)
        if ignored:
            notes.append(f"warning: {first.config}: ignoring timm settings this trainer does not have: "
                         f"{', '.join(ignored)}")
    given = parser.parse_args(argv)
    if given.data_path is None and not given.synthetic and given.resume:
        from .precheck import recorded_data_path
        recorded, note = recorded_data_path(given.resume)  # not the demo's data: the run's own
        if recorded:
            parser.set_defaults(data_path=recorded)
            given = parser.parse_args(argv)
            notes.append(note)
    if given.data_path is None and not given.synthetic:
        parser.set_defaults(**{k: v for k, v in DEMO.items() if k not in values})
    flat = vars(parser.parse_args(argv))
    flat.pop("config")
    return Config.create(**flat), notes


def parse_args(argv=None) -> Resolved:
    """The flags, checked, with the run folder resolved (`.run_dir`) and the lines to tell the user
    in `.notes`; nothing slow is imported and nothing is written."""
    config, notes = parse_config(argv)
    return resolve(config, notes)


# Keys of a timm train.py args.yaml (timm 0.4-1.0) that name our flags differently, and those of
# its settings this trainer does not have: a timm config loads with the latter ignored (listed).
TIMM_RENAMED = {"data_dir": "data_path", "data": "data_path", "dr": "decay_rate"}
TIMM_ONLY = {
    "dataset", "train_split", "val_split", "dataset_download", "class_map", "input_img_mode", "input_key",
    "target_key", "dataset_trust_remote_code", "train_num_samples", "val_num_samples", "model_kwargs",
    "resume_opt", "gp", "input_size", "torchscript", "fuser",
    "grad_checkpointing", "fast_norm", "head_init_scale", "head_init_bias", "torchcompile_mode",
    "opt_kwargs", "layer_decay", "layer_decay_min_scale", "layer_decay_no_opt_scale",
    "lr_noise", "lr_noise_pct", "lr_noise_std", "lr_cycle_mul", "lr_cycle_decay",
    "lr_cycle_limit", "lr_k_decay", "epoch_repeats", "warmup_prefix",
    "no_aug", "train_crop_mode", "aug_repeats",
    "aug_splits", "jsd_loss", "resplit",
    "mixup_mode", "drop_connect", "drop_block", "bn_momentum", "bn_eps", "split_bn",
    "model_ema_force_cpu", "worker_seeding", "recovery_interval", "tta", "wandb_tags",
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
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        parser.error(f"cannot read config {path}{where}: {problem}")
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
        if any(isinstance(v, str) and v.strip().startswith("pipe:") for v in (value if isinstance(value, list)
                                                                            else [value])):
            # a pipe: source runs a shell command: only one typed on this command line may run
            parser.error(f"config {path}: {key} {value!r} is a shell command (pipe:), which runs only when typed "
                         f"on the command line: pass --{key.replace('_', '-')} explicitly")
        if choices and value not in choices:
            parser.error(f"config {path}: {key} {value!r} is not one of {', '.join(map(repr, choices))}")
        out[key] = value
    if unknown:
        parser.error(f"config {path}: unknown keys {', '.join(sorted(unknown))} (neither flags of ours nor of "
                     "timm's train.py)")
    return out, sorted(ignored)
