"""Shared fixtures: a small generated ImageFolder and its shards (built once per session)."""
import pytest

from tools.make_demo_data import make_demo_data
from tools.make_shards import make_shards


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
