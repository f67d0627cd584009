"""Shared fixtures: a small generated ImageFolder and its shards (built once per session), and
the torchrun helper with the reference 2-process run that test_train and test_faults compare to."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dataprep import make_shards
from dataprep.demo import make_demo_data


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "demo"
    make_demo_data(root, num_classes=6, train_per_class=20, val_per_class=5, seed=0,
                   image_size=(96, 72))
    return root


@pytest.fixture(scope="session")
def demo_shards(demo_folder, tmp_path_factory):
    """Shards of 13 samples (the last one shorter), read-only for the tests that share them."""
    out = tmp_path_factory.mktemp("shards") / "demo-wds"
    make_shards(demo_folder, out, max_count=13, workers=2, seed=0, progress=False)
    return out


@pytest.fixture(params=[False, True], ids=["cpu-bf16-off", "cpu-bf16-on"])
def cpu_bf16(request, monkeypatch):
    """Run a test twice: as on a CPU without fast bf16 (e.g. AMD EPYC before Zen 4) and with it.

    The capability is forced through the same switch a user has (model.device.CPU_BF16_ENV), so
    the outcome never depends on this machine's CPU. The value is whether bf16 is fast.
    """
    from model.device import CPU_BF16_ENV
    monkeypatch.setenv(CPU_BF16_ENV, "1" if request.param else "0")
    return request.param


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small, fast training: resnet10t at 32 px, batch 8, one loader worker, a log row every step.
SMALL = ["--model", "resnet10t", "--img-size", "32", "-b", "8", "-j", "1", "--log-interval", "1",
         "--warmup-epochs", "1", "--lr", "0.05", "--shuffle-buffer", "16"]


def make_trainer(argv):
    """A Trainer built from train_stream's flags on this process, as train_stream builds it."""
    from engine.builder import build
    from engine.config import parse_args
    from engine.trainer import Trainer
    return Trainer(build(parse_args(argv)))


def torchrun_cmd(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), os.path.join(ROOT, "train_stream.py"), *args]


def child_env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def torchrun(args, nproc=2, timeout=240):
    cmd = torchrun_cmd(args, nproc)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too, never leave them behind
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s (a hang?)\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_folder(folder) -> list[str]:
    """train_stream flags that make FOLDER the run folder itself (its parent as --output, its name
    as --experiment), so that a test knows where the files are."""
    folder = Path(folder)
    return ["--output", str(folder.parent), "--experiment", folder.name]


@pytest.fixture(autouse=True)
def _default_runs_stay_out_of_the_clone(tmp_path, monkeypatch):
    """A training run without --output writes to ./output: each test runs in its own folder."""
    monkeypatch.chdir(tmp_path)


def read_metrics(folder):
    """The rows of a run folder's metrics.jsonl."""
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_main(args, capsys):
    """train_stream.py's main in this process: (exit status, stdout, stderr)."""
    import train_stream
    code = train_stream.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def copy_shards(src, dst):
    """A private copy of a shard folder, for a test that damages it (demo_shards is shared)."""
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def ddp_reference(demo_shards, tmp_path_factory):
    """Two epochs on 2 gloo processes, uninterrupted: (args without --output, output folder, result)."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    args = ["--data_path", str(demo_shards), *SMALL, "--epochs", "2"]
    return args, out, torchrun([*args, *run_folder(out)])


def rewrite_shard(path, change):
    """Rewrite a tar with `change(name, data) -> data` applied to every member."""
    import io
    import tarfile
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            data = change(m.name, data)
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


def replace_first_image(path, data: bytes):
    """Give the first image of a shard these bytes instead (a damaged or an unusual image)."""
    first = [True]

    def change(name, old):
        if name.endswith(".jpg") and first[0]:
            first[0] = False
            return data
        return old
    rewrite_shard(path, change)


def garble_first_image(path):
    """Make the first image of a shard undecodable (the sample is skipped and counted)."""
    replace_first_image(path, b"\xff\xd8" + b"\x00" * 500)
