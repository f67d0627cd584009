"""Shared fixtures: a small generated ImageFolder and its shards (built once per session)."""
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
