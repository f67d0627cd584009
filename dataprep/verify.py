"""make_shards --verify: re-read a shard folder against its _info.json."""
from __future__ import annotations

import io
import json
import os
import tarfile

from PIL import Image

from common.errors import ShardError
from common.host import usable_cores

from .outdir import INFO, read_json
from .report import bar, print_list
from .writer import _pool


def _verify_shard(job):
    """Problems found in one shard: samples not grouped as cls/jpg/json, bad labels, undecodable images."""
    path, expected, num_classes = job
    problems, count, keys = [], 0, set()
    name = os.path.basename(path)
    try:
        # tarfile on purpose: an independent reader checks what our own reader and writer did.
        with tarfile.open(path, "r:") as tar:
            members = iter(tar)
            for cls_m in members:
                group = [cls_m, next(members, None), next(members, None)]
                key = cls_m.name.split(".", 1)[0]
                if [m.name if m else None for m in group] != [f"{key}.cls", f"{key}.jpg", f"{key}.json"]:
                    problems.append(f"{name}: sample {key!r} is not the members .cls, .jpg, .json in order")
                    break
                cls_b, jpg, meta = (tar.extractfile(m).read() for m in group)
                count += 1
                if key in keys:
                    problems.append(f"{name}: duplicate key {key!r}")
                keys.add(key)
                if not cls_b.isdigit() or int(cls_b) >= num_classes:
                    problems.append(f"{name}: {key}: bad class {cls_b[:20]!r}")
                try:
                    if "path" not in json.loads(meta):
                        problems.append(f"{name}: {key}: .json has no path")
                    with Image.open(io.BytesIO(jpg)) as im:
                        im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
                        im.load()  # reduced-size decode still reads all the coded data
                        if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                            problems.append(f"{name}: {key}: image is {im.format} {im.mode}, not an RGB/gray JPEG")
                except Exception as e:
                    problems.append(f"{name}: {key}: {e}")
    except (OSError, tarfile.TarError, EOFError) as e:
        problems.append(f"{name}: cannot read: {e}")
    if count != expected:
        problems.append(f"{name}: {count} samples, _info.json says {expected}")
    return count, problems


def verify_shards(out, progress=True):
    """Re-read a shard folder against its _info.json; returns a report with report['ok']."""
    out = os.path.abspath(out)
    info = read_json(os.path.join(out, INFO))
    if not info:
        raise ShardError(f"{out} has no readable {INFO}" if os.path.isdir(out) else f"{out} is not a folder")
    problems, jobs, splits = [], [], {}
    try:
        for split, s in info["splits"].items():
            if len(s["filenames"]) != len(s["shard_lengths"]) or sum(s["shard_lengths"]) != s["num_samples"]:
                problems.append(f"{split}: filenames, shard_lengths and num_samples disagree")
            splits[split] = {"shards": len(s["filenames"]), "samples": 0}
            for filename, expected in zip(s["filenames"], s["shard_lengths"]):
                path = os.path.join(out, filename)
                if os.path.isfile(path):
                    jobs.append((split, (path, expected, info["num_classes"])))
                else:
                    problems.append(f"{filename}: missing")
    except (KeyError, TypeError, AttributeError) as e:
        raise ShardError(f"{os.path.join(out, INFO)} is not a make_shards info file (no {e})") from None
    workers = min(usable_cores(), max(1, len(jobs)))
    with _pool(workers) as pool, bar(progress, total=len(jobs), desc="verify", unit="shard") as b:
        for (split, _), (count, found) in zip(jobs, pool.imap(_verify_shard, [j for _, j in jobs])):
            splits[split]["samples"] += count
            problems += found
            b.update()
    report = {"ok": not problems, "out": out, "splits": splits, "problems": problems}
    for split, s in splits.items():
        print(f"make_shards: verify {split}: {s['samples']} samples in {s['shards']} shards")
    if problems:
        print_list(f"verify FAILED, {len(problems)} problem(s) in {out}:", problems)
    else:
        print(f"make_shards: verify OK: {out}")
    return report
