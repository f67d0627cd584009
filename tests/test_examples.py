"""The launch recipes under examples/ pass only flags that exist: train_stream.py's (from its
--help) and torchrun's (from torch.distributed.run's own parser)."""
import os
import re
import shlex
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def help_flags() -> set[str]:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train_stream.py"), "--help"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", out))


def torchrun_flags() -> set[str]:
    from torch.distributed.run import get_args_parser
    return {s for a in get_args_parser()._actions for s in a.option_strings}


def split_command(words: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's arguments, train_stream.py's arguments) of a torchrun command line."""
    at = next(i for i, w in enumerate(words) if w.endswith("train_stream.py"))
    start = next(i for i, w in enumerate(words) if w.endswith("torchrun")) + 1
    return words[start:at], words[at + 1:]


def flags_in(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("-") and not re.fullmatch(r"-?\d+(\.\d+)?", a)]


def slurm_command() -> list[str]:
    text = open(os.path.join(EXAMPLES, "slurm_multinode.sbatch")).read().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "torchrun" in ln and not ln.lstrip().startswith("#"))
    return shlex.split(line)


def k8s_command() -> tuple[dict, list[str]]:
    job = yaml.safe_load(open(os.path.join(EXAMPLES, "k8s_pytorchjob.yaml")))
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    return job, container["command"]


def test_examples_pass_only_existing_flags():
    ours, theirs = help_flags(), torchrun_flags()
    assert "--data_path" in ours and "--nnodes" in theirs  # the parsers were read
    for name, words in (("slurm", slurm_command()), ("k8s", k8s_command()[1])):
        run_args, train_args = split_command(words)
        unknown = [f for f in flags_in(train_args) if f not in ours]
        assert not unknown, f"{name}: train_stream.py has no {unknown}"
        unknown = [f for f in flags_in(run_args) if f not in theirs]
        assert not unknown, f"{name}: torchrun has no {unknown}"
        assert "--auto-resume" in train_args, f"{name}: a restarted worker must find the newest checkpoint"


def test_slurm_recipe_is_elastic():
    run_args, _ = split_command(slurm_command())
    joined = " ".join(run_args)
    assert re.search(r"--nnodes=1:\S+", joined) and "--rdzv-backend=c10d" in joined
    assert re.search(r"--max-restarts=\d+", joined) and "--rdzv-endpoint=" in joined


def test_k8s_recipe_is_elastic():
    job, _ = k8s_command()
    policy = job["spec"]["elasticPolicy"]
    assert policy["rdzvBackend"] == "c10d" and policy["minReplicas"] < policy["maxReplicas"]
    volumes = {v["name"]: v for v in job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"  # a container's default /dev/shm is 64 MB
