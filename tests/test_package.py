"""The project installs as a package with console entry points, and its layers import one way."""
import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("common", "dataprep", "engine", "model", "pipeline")
# who may import whom: each layer only from the layers below it
ALLOWED = {
    "common": set(),
    "model": {"common"},
    "pipeline": {"common"},
    "dataprep": {"common", "pipeline"},
    "engine": {"common", "model", "pipeline", "dataprep"},
}


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def _full_imports(path):
    """Dotted names imported, `from tools import benchlib` as tools.benchlib."""
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield from ((f"{node.module}.{a.name}" if node.module == "tools" else node.module) for a in node.names)


def test_layers_import_one_way():
    bad = []
    for package, allowed in ALLOWED.items():
        for name in os.listdir(os.path.join(ROOT, package)):
            if name.endswith(".py"):
                for mod in _imports(os.path.join(ROOT, package, name)):
                    if mod in ALLOWED and mod != package and mod not in allowed:
                        bad.append(f"{package}/{name} imports {mod}")
    shared = ("tools.benchlib", "tools.chaos")  # the benchmark harness and the misbehaving servers
    for folder in ("tools",):  # tools and the entry script use packages, never each other: only shared pieces
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith(".py"):
                bad += [f"{folder}/{name} imports {m}" for m in _full_imports(os.path.join(ROOT, folder, name))
                        if m.split(".")[0] in ("tools", "train_stream") and m not in shared]
    bad += [f"train_stream.py imports {m}" for m in _imports(os.path.join(ROOT, "train_stream.py")) if m == "tools"]
    assert not bad, bad


@pytest.mark.slow
def test_wheel_has_the_packages_and_entry_points(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    for name in PACKAGES:
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(tmp_path),
                    *isolation], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("stream_imagenet-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        z.extractall(tmp_path / "site")
    assert {n.split("/")[0] for n in names if not n.startswith("stream_imagenet")} == set(PACKAGES)
    for script in ("train_stream = engine.cli:main", "make_shards = dataprep.cli:make_shards_main"):
        assert script in entry
    # the installed copy works from elsewhere, without the clone on the path
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    r = subprocess.run([sys.executable, "-c", "import sys; from engine.cli import main; sys.exit(main(['--help']))"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--data_path" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", "import engine, sys; print(engine.__file__)"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert str(tmp_path / "site") in r.stdout
