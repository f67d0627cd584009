#!/usr/bin/env python3
"""Hostile probes: small runs of train_stream.py, validate.py and make_shards.py on generated data,
as an attacker or a long ImageNet run would meet them, each with its expected outcome (exit
status, one line and no traceback, the files left). Prints a table "probe / expected / got /
held" and a summary "N probes, H held, F failed"; exits 1 when a probe failed.

    python tools/hostile_probes.py            # all (a few minutes on 2 cores)
    python tools/hostile_probes.py --fast     # only the refusals (no training run)
    python tools/hostile_probes.py --only lock --only pipe

Probes that need several processes per run or a long run are covered by tests and listed as such.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SMALL = ["--model", "resnet10t", "--img-size", "32", "-b", "8", "-j", "1", "--log-interval", "1",
         "--warmup-epochs", "0", "--lr", "0.05", "--shuffle-buffer", "16", "--epochs", "1"]
COVERED = [  # (probe, the tests that run it)
    ("a 1000 MB tar member / 150 MB members in the shuffle buffer", "tests/test_hostile_data.py"),
    ("a container-sized /dev/shm", "tests/test_loader.py (check_shared_memory)"),
    ("resume on 2 processes is exact (torchrun)", "tests/test_faults.py, tests/test_train.py (torchrun)"),
    ("a trickling or stalled HTTP server", "tests/test_cloud.py (--io-min-rate, --io-timeout)"),
    ("the record of a resumed run (best, losses, args.yaml)", "tests of the run history"),
    ("kill -9 anywhere, then --auto-resume", "tests/test_faults.py"),
]
PROBES = []


def probe(name: str, expected: str, fast: bool = False):
    def add(fn):
        PROBES.append((name, expected, fast, fn))
        return fn
    return add


class Ctx:
    """The generated data (made once) and how to run the tools."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        self._data = None

    def path(self, *parts) -> str:
        return os.path.join(self.tmp, *parts)

    @property
    def data(self) -> str:
        if self._data is None:
            from dataprep import make_shards
            from dataprep.demo import make_demo_data
            make_demo_data(self.path("src"), num_classes=4, train_per_class=8, val_per_class=2, seed=0,
                           image_size=(48, 40))
            make_shards(self.path("src"), self.path("wds"), max_count=8, workers=1, seed=0, progress=False)
            self._data = self.path("wds")
        return self._data

    def copy(self, name: str) -> str:
        out = self.path(name)
        shutil.copytree(self.data, out)
        return out

    def run(self, tool: str, *args, timeout: int = 240, wrap: str | None = None, **kw):
        """(exit status, stdout, stderr) of a tool; `wrap`: Python run before train_stream's main."""
        cmd = [sys.executable, os.path.join(ROOT, tool), *args] if wrap is None else \
            [sys.executable, "-c", f"{wrap}\nimport sys, train_stream\nsys.exit(train_stream.main({list(args)!r}))"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=self.tmp, timeout=timeout, **kw)
        return p.returncode, p.stdout, p.stderr

    def train(self, *args, **kw):
        return self.run("train_stream.py", *args, **kw)


def messages(err: str) -> list[str]:
    """stderr without logging warnings and Python warnings (a "file:line: XWarning: ..." line and
    the source line printed under it)."""
    out, skip = [], False
    for line in err.strip().splitlines():
        if skip or not line.strip():
            skip = False
            continue
        if "Warning: " in line and not line.startswith(("train_stream", "validate")):
            skip = True
            continue
        if not line.startswith("WARNING "):
            out.append(line)
    return out


def one_line(err: str) -> bool:
    """One error line of ours, no traceback (library warnings may come before it)."""
    lines = messages(err)
    return "Traceback" not in err and len(lines) == 1 and ": error:" in lines[0]


def said(code: int, err: str) -> str:
    shape = "one line" if one_line(err) else ("traceback" if "Traceback" in err else "no error line")
    return f"exit {code}, {shape}"


def refusal(code, err, *files_absent) -> tuple[str, bool]:
    left = [f for f in files_absent if os.path.exists(f)]
    got = said(code, err) + (f", left {', '.join(map(os.path.basename, left))}" if left else "")
    return got, code == 2 and one_line(err) and not left


def info_of(folder: str) -> dict:
    with open(os.path.join(folder, "_info.json")) as f:
        return json.load(f)


def write_info(folder: str, info: dict) -> None:
    with open(os.path.join(folder, "_info.json"), "w") as f:
        json.dump(info, f)


# ---------------------------------------------------------------- the refusals (no training run)
@probe("pipe: data path from -c args.yaml", "exit 2, one line, the command never runs", fast=True)
def pipe_from_config(c):
    marker = c.path("pipe-ran")
    with open(c.path("args.yaml"), "w") as f:
        f.write(f"data_path: 'pipe:touch {marker}; cat {c.path('wds')}/{{}}'\n")
    return refusal(*c.train("-c", c.path("args.yaml"), *SMALL, "--output", c.path("runs"))[::2], marker)


NUMBERS = [["--momentum", "-5"], ["--smoothing", "2"], ["--prefetch-factor", "0"], ["--drop-path", "5"],
           ["--img-size", "100000"], ["--weight-decay", "-1"], ["--lr", "nan"], ["--io-retries", "1000"],
           ["--shuffle-buffer", "0"], ["--seed", "-1"]]
for _flags in NUMBERS:
    @probe(f"{' '.join(_flags)}", "exit 2, one line, before set-up", fast=True)
    def number(c, flags=_flags):
        code, out, err = c.train(*flags, "--epochs", "1", "--output", c.path("runs-numbers"))
        got, held = refusal(code, err, c.path("runs-numbers"))
        return got, held and "model " not in out


@probe("--output under a file (not writable)", "exit 2, one line, before set-up", fast=True)
def unwritable_output(c):
    with open(c.path("a-file"), "w") as f:
        f.write("x")
    code, out, err = c.train("--epochs", "1", "--output", c.path("a-file", "runs"))
    got, held = refusal(code, err)
    return got, held and "model " not in out


@probe("--resume a pickle that runs a command", "exit 2, one line, the command never runs", fast=True)
def pickle_checkpoint(c):
    marker = c.path("pickle-ran")

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    path = c.path("evil.pth")
    import torch
    torch.save({"model": Evil(), "epoch": 0}, path)
    with open(c.path("evil-plain.pkl"), "wb") as f:
        pickle.dump({"model": Evil()}, f)
    a = c.train("--data_path", c.data, *SMALL, "--resume", path, "--output", c.path("runs-pickle"))
    b = c.train("--data_path", c.data, *SMALL, "--resume", c.path("evil-plain.pkl"), "--output",
                c.path("runs-pickle2"))
    got_a, held_a = refusal(a[0], a[2], marker)
    got_b, held_b = refusal(b[0], b[2], marker)
    return f"{got_a}; plain pickle: {got_b}", held_a and held_b


@probe("crafted _info.json: '../' file names, huge class count", "exit 2, one line", fast=True)
def crafted_info(c):
    results = []
    for name, change in [
        ("traversal", lambda i: i["splits"]["train"].update(filenames=["../../etc/passwd"] * 1,
                                                            shard_lengths=[8], num_samples=8)),
        ("num_classes", lambda i: (i.pop("classes", None), i.update(num_classes=1_000_000_000))),
    ]:
        folder = c.copy(f"wds-{name}")
        info = info_of(folder)
        change(info)
        write_info(folder, info)
        code, _, err = c.train("--data_path", folder, *SMALL, "--output", c.path(f"runs-{name}"))
        results.append(refusal(code, err))
    return "; ".join(g for g, _ in results), all(h for _, h in results)


@probe("HTTP _info.json claiming a shard of 10^12 samples", "exit 2, one line", fast=True)
def remote_length(c):
    from tools.chaos import ShardServer
    folder = c.copy("wds-remote")
    info = info_of(folder)
    train = info["splits"]["train"]
    train["shard_lengths"][0] = 10 ** 12
    train.pop("num_samples", None)
    write_info(folder, info)
    with ShardServer(folder) as server:
        code, _, err = c.train("--data_path", server.url, *SMALL, "--output", c.path("runs-remote"), timeout=120)
    return refusal(code, err)


# ---------------------------------------------------------------- runs
@probe("a clean run", "exit 0, last.pth and best.pth")
def clean_run(c):
    run = c.path("runs", "clean")
    code, _, err = c.train("--data_path", c.data, *SMALL, "--output", c.path("runs"), "--experiment", "clean")
    files = [f for f in ("last.pth", "best.pth") if os.path.exists(os.path.join(run, f))]
    return f"exit {code}, {', '.join(files) or 'no checkpoints'}", code == 0 and len(files) == 2


@probe("validate.py CKPT whose config.data_path is a pipe: command", "exit 2, one line, the command never runs")
def pipe_from_checkpoint(c):
    import torch
    clean = c.path("runs", "clean", "last.pth")
    if not os.path.exists(clean):
        clean_run(c)
    marker = c.path("ckpt-pipe-ran")
    state = torch.load(clean, map_location="cpu", weights_only=False)
    state["config"]["data_path"] = f"pipe:touch {marker}; cat {c.data}/{{}}"
    torch.save(state, c.path("pipe.pth"))
    code, _, err = c.run("tools/validate.py", c.path("pipe.pth"))
    lines = messages(err)
    got = f"exit {code}, {'one line' if len(lines) == 1 and 'Traceback' not in err else 'not one line'}"
    return got + (", the command ran" if os.path.exists(marker) else ""), code == 2 and not os.path.exists(marker)


@probe("a validation split with empty lists", "exit 0, a warning, no 'new best', no best.pth")
def empty_validation(c):
    folder = c.copy("wds-noval")
    info = info_of(folder)
    info["splits"]["validation"].update(filenames=[], shard_lengths=[], num_samples=0)
    write_info(folder, info)
    run = c.path("runs", "noval")
    code, out, err = c.train("--data_path", folder, *SMALL, "--output", c.path("runs"), "--experiment", "noval")
    best = os.path.exists(os.path.join(run, "best.pth"))
    got = f"exit {code}{', new best' if 'new best' in out else ''}{', best.pth' if best else ''}"
    return got, code == 0 and not best and "new best" not in out and "lists 0 samples" in out


@probe("a diverging run (--lr 1e30)", "exit 1, one line, no last.pth/best.pth")
def divergence(c):
    run = c.path("runs", "nan")
    code, _, err = c.train("--data_path", c.data, *SMALL, "--lr", "1e30", "--output", c.path("runs"),
                           "--experiment", "nan")
    left = [f for f in ("last.pth", "best.pth") if os.path.exists(os.path.join(run, f))]
    return said(code, err) + (f", left {', '.join(left)}" if left else ""), code == 1 and one_line(err) and not left


@probe("two runs with the same --output/--experiment at once", "one exit 0, the other exit 2 naming the pid")
def two_runs(c):
    args = [sys.executable, os.path.join(ROOT, "train_stream.py"), "--data_path", c.data, *SMALL,
            "--output", c.path("runs"), "--experiment", "twice"]
    lock = c.path("runs", "twice", ".lock")
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=c.env, cwd=c.tmp)
    deadline = time.time() + 60
    while first.poll() is None and time.time() < deadline and not (os.path.exists(lock) and open(lock).read()):
        time.sleep(0.05)
    code2, _, err2 = c.train(*args[2:])
    _, err1 = first.communicate(timeout=240)
    got = f"exit {first.returncode} and {code2}, {'one line' if one_line(err2) else 'not one line'}"
    return got, first.returncode == 0 and code2 == 2 and one_line(err2) and f"pid {first.pid}" in err2


@probe("disk full during a checkpoint", "exit 1, one line, no .tmp, no partial checkpoint")
def disk_full(c):
    wrap = ("import errno, os, torch\n"
            "def full(*a, **k): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
            "torch.save = full")
    run = c.path("runs", "full")
    code, _, err = c.run("train_stream.py", "--data_path", c.data, *SMALL, "--output", c.path("runs"),
                         "--experiment", "full", wrap=wrap)
    left = [f for f in os.listdir(run) if f.endswith((".tmp", ".pth"))] if os.path.isdir(run) else []
    return said(code, err) + (f", left {', '.join(left)}" if left else ""), code == 1 and one_line(err) and not left


def _png_bomb() -> bytes:
    """A valid 8x8 PNG whose header claims 60000 x 60000 pixels."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + 'IHDR'
    data[ihdr:ihdr + 8] = struct.pack(">II", 60000, 60000)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


@probe("a hostile shard: labels -1 and 10^9, a PNG pixel bomb, a '../' member",
       "exit 0, the samples skipped and counted, nothing written outside")
def hostile_shard(c):
    folder = c.copy("wds-hostile")
    shard = os.path.join(folder, info_of(folder)["splits"]["train"]["filenames"][0])
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    keys = sorted({m.name.rsplit(".", 1)[0] for m, _ in members})
    labels = {keys[0]: b"-1", keys[1]: b"1000000000"}  # the third sample's image is the bomb
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, data in members:
            key, ext = m.name.rsplit(".", 1)
            if ext == "cls" and key in labels:
                data = labels[key]
            elif ext in ("jpg", "jpeg", "png") and key == keys[2]:
                data = _png_bomb()
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
        evil = tarfile.TarInfo("../../escaped.cls")
        evil.size = 1
        tf.addfile(evil, io.BytesIO(b"0"))
    code, out, err = c.train("--data_path", folder, *SMALL, "--max-missing", "0.5", "--output", c.path("runs"),
                             "--experiment", "hostile")
    escaped = os.path.exists(os.path.join(os.path.dirname(c.tmp), "escaped.cls"))
    counted = "samples skipped" in out and len([x for x in err.splitlines() if "skipped sample" in x]) >= 3
    got = f"exit {code}{', skipped and counted' if counted else ''}{', a file escaped' if escaped else ''}"
    return got, code == 0 and counted and not escaped and "Traceback" not in err


@probe("make_shards with train/a/up -> .. and a link to a sibling class", "no image moves between classes")
def shards_through_links(c):
    from dataprep.demo import make_demo_data
    src = c.path("links-src")
    make_demo_data(src, num_classes=3, train_per_class=2, val_per_class=1, seed=0, image_size=(32, 24),
                   odd_images=False)
    a, b, _ = sorted(os.path.join(src, "train", d) for d in os.listdir(os.path.join(src, "train")))
    os.symlink("..", os.path.join(a, "up"))
    os.symlink(f"../{os.path.basename(b)}", os.path.join(a, "sibling"))
    code, _, err = c.run("tools/make_shards.py", src, "--out", c.path("links-wds"), "--max-count", "4")
    n = info_of(c.path("links-wds"))["splits"]["train"]["num_samples"] if code == 0 else None
    return f"exit {code}, {n} train samples (6 real)", code == 0 and n == 6


def _loads(path: str) -> bool:
    """A complete checkpoint: it loads as the trainer loads it."""
    import torch
    try:
        return isinstance(torch.load(path, map_location="cpu", weights_only=True).get("model"), dict)
    except Exception:
        return False


def _signalled(c, args, twice: bool):
    """(exit status, stderr) of a run sent SIGTERM (twice: a second one 0.2 s later) at its first step."""
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=c.env, cwd=c.tmp)
    deadline = time.time() + 120
    for line in p.stdout:
        if line.startswith("epoch ") or time.time() > deadline:
            break
    p.send_signal(signal.SIGTERM)
    if twice:
        time.sleep(0.2)
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    return p.returncode, err


@probe("SIGTERM, then SIGTERM twice after --auto-resume",
       "exit 75 with a resumable last.pth; then exit 143 at once, one line, a complete last.pth, no .tmp")
def sigterm_twice(c):
    run = c.path("runs", "term")
    args = [sys.executable, os.path.join(ROOT, "train_stream.py"), "--data_path", c.data, *SMALL[:-1], "50",
            "--output", c.path("runs"), "--experiment", "term", "--auto-resume"]
    code1, err1 = _signalled(c, args, twice=False)
    last = os.path.join(run, "last.pth")
    saved = open(last, "rb").read() if os.path.exists(last) else None
    code2, err2 = _signalled(c, args, twice=True)
    kept = saved is not None and _loads(last)  # the old one, or the new one if the first stop finished its write
    tmp = [f for f in os.listdir(run) if f.endswith(".tmp")] if os.path.isdir(run) else []
    # a second signal during a checkpoint write exits at once and may leave its temporary: the
    # next start removes it (CheckpointSaver), as a rerun would
    from model.checkpoint import CheckpointSaver
    removed = CheckpointSaver(run).removed if tmp else 0
    after = [f for f in os.listdir(run) if f.endswith(".tmp")] if os.path.isdir(run) else []
    got = (f"exit {code1}{', last.pth' if saved else ''}; then exit {code2}, {len(messages(err2))} line(s)"
           f"{', a complete last.pth' if kept else ''}{f', {removed} .tmp removed at the next start' if tmp else ''}")
    # 143: our handler's exit; -15: the signal's own default action once the checkpoint is written and
    # the handlers are gone (shutting down). A shell or scheduler sees 143 for both.
    held = code1 == 75 and saved is not None and code2 in (128 + signal.SIGTERM, -signal.SIGTERM) and kept \
        and not after \
        and "Traceback" not in err1 + err2 and len(messages(err2)) == 1
    return got, held


def run_probes(only=(), fast: bool = False, tmp: str | None = None, out=sys.stdout) -> list:
    """Run the probes (all, the fast ones, or those whose name contains a word of `only`);
    returns [(name, expected, got, held)] and prints the table."""
    own = tmp is None
    tmp = tmp or tempfile.mkdtemp(prefix="hostile-")
    c = Ctx(tmp)
    rows = []
    try:
        for name, expected, is_fast, fn in PROBES:
            if (fast and not is_fast) or (only and not any(w in name for w in only)):
                continue
            try:
                got, held = fn(c)
            except Exception as e:  # a probe that breaks is a failed probe, with its reason
                got, held = f"probe error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", False
            rows.append((name, expected, got, bool(held)))
            print(f"{'held' if held else 'FAILED':6}  {name}  |  expected: {expected}  |  got: {got}", file=out,
                  flush=True)
    finally:
        if own:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="only the refusals (no training run)")
    p.add_argument("--only", action="append", default=[], help="probes whose name contains this (repeatable)")
    args = p.parse_args(argv)
    rows = run_probes(args.only, args.fast)
    print()
    print("| probe | expected | got | held |\n|---|---|---|---|")
    for name, expected, got, held in rows:
        print(f"| {name} | {expected} | {got} | {'yes' if held else 'NO'} |")
    for name, where in COVERED:
        print(f"| {name} | (covered by {where}) | - | - |")
    held = sum(r[3] for r in rows)
    print(f"\n{len(rows)} probes, {held} held, {len(rows) - held} failed")
    return 0 if held == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
