"""The training engine: configuration, distributed set-up, data wiring, the builder, the Trainer
and its loops. The public API, from Python without argv:

    from engine import Config, Trainer, build
    config = Config.create(data_path="/data/imagenet-wds", model="resnet10t", epochs=2, output="runs")
    summary = Trainer(build(config)).fit()       # or engine.train(config)

`Config` (engine.config) is the typed, frozen configuration; `build` (engine.builder) makes a run's
parts; `Trainer` (engine.trainer) runs the loops. Importing `engine` loads no torch: the builder
and the Trainer load on first use, so that a bad flag is refused at once.
"""
from .config import Config  # noqa: F401
from .flags import parse_args, parse_config  # noqa: F401
from .resolved import Resolved, resolve  # noqa: F401

_LAZY = {"build": "builder", "Parts": "builder", "Trainer": "trainer", "train": "cli"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, "run" if name == "train" else name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
