"""Object stores and the node-local shard cache, against a local S3-compatible server (moto's
server mode on 127.0.0.1), with tools/chaos.py's proxy in front of it for stalls and failures;
and the remote read bounds (minimum rate, info values) over http."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import ROOT, SMALL, child_env, read_metrics, run_folder

from common.errors import ConfigError, DataError, DataLoadingError
from pipeline.cache import ShardCache, cache_key, parse_size
from pipeline.info import MAX_CLASSES, load_info
from pipeline.loader import create_loader
from pipeline.remote import Budget, RemoteError, RemoteOptions
from pipeline.shards import open_shard
from tools.chaos import ChaosProxy, ShardServer

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

B, SIZE = 8, 32
BUCKET, PREFIX = "shards", "imagenet-wds"
PATIENT = RemoteOptions(timeout=5.0, retries=2, backoff=0.1)
FAST = RemoteOptions(timeout=0.5, retries=1, backoff=0.1)
BOUND = 30  # seconds a failing read may take to end, far above what the options allow


@pytest.fixture(scope="module")
def s3(demo_shards):
    """moto on 127.0.0.1 holding the demo shards under s3://shards/imagenet-wds/, reached through a
    ChaosProxy; the process's AWS variables point the libraries at the proxy."""
    import boto3
    import s3fs
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    client.create_bucket(Bucket=BUCKET)
    for name in os.listdir(demo_shards):
        client.upload_file(str(demo_shards / name), BUCKET, f"{PREFIX}/{name}")
    proxy = ChaosProxy((host, port))
    os.environ["AWS_ENDPOINT_URL_S3"] = proxy.url
    s3fs.S3FileSystem.clear_instance_cache()
    yield proxy
    proxy.close()
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def proxy(s3):
    s3.mode = "pass"
    yield s3
    s3.mode = "pass"


URL = f"s3://{BUCKET}/{PREFIX}/"


def labels(root, split="validation", remote=PATIENT, workers=0):
    loader = create_loader(load_info(root, remote).split(split), train=False, batch_size=B, img_size=SIZE,
                           num_workers=workers, remote=remote)
    loader.set_epoch(0)
    return [y.tolist() for _, y in loader], loader.stats()


def test_the_loader_reads_s3_as_it_reads_the_folder(demo_shards, proxy):
    info = load_info(URL, PATIENT)
    assert info.split("train").urls[0] == URL + "demo-train-000000.tar"
    assert info.num_classes == load_info(str(demo_shards)).num_classes
    got, stats = labels(URL)
    assert got == labels(str(demo_shards))[0]
    shard_bytes = sum(os.path.getsize(u) for u in load_info(str(demo_shards)).split("validation").urls)
    assert stats["fetched_bytes"] == shard_bytes and stats["cache_misses"] == 0


def test_missing_objects_and_unknown_schemes_are_one_line(proxy):
    with pytest.raises(DataError, match=r"could not read _info.json from s3://shards/nothing-here/ "
                                        r"\(_info.json: not found; info.json: not found\)"):
        load_info(f"s3://{BUCKET}/nothing-here/", PATIENT)
    with pytest.raises(DataError, match="nosuchscheme:// is not a storage scheme that fsspec knows"):
        load_info("nosuchscheme://bucket/x/", PATIENT)


def test_second_epoch_is_served_from_the_cache_without_the_store(proxy, tmp_path):
    remote = RemoteOptions(timeout=5.0, retries=0, cache_dir=str(tmp_path / "cache"), cache_limit=1 << 30)
    split = load_info(URL, PATIENT).split("train")
    loader = create_loader(split, train=True, batch_size=B, img_size=SIZE, num_workers=2, remote=remote)
    loader.set_epoch(0)
    first = sum(len(y) for _, y in loader)
    after_first = loader.stats()
    assert after_first["cache_misses"] == len(split.urls) and after_first["cache_hits"] >= 0
    assert after_first["fetched_bytes"] == sum(os.path.getsize(p) for p in (tmp_path / "cache" / "shards").iterdir())
    proxy.mode, seen = "reset", proxy.request_bytes  # any request to the store would now fail
    loader.set_epoch(1)
    assert sum(len(y) for _, y in loader) == first
    stats = loader.stats()
    assert proxy.request_bytes == seen  # not one byte asked of the store: every shard came from the cache
    assert stats["fetched_bytes"] == after_first["fetched_bytes"] and stats["cache_misses"] == len(split.urls)
    assert stats["cache_hits"] - after_first["cache_hits"] >= len(split.urls)
    assert os.listdir(tmp_path / "cache" / "tmp") == []


def test_a_cache_smaller_than_the_data_set_loads_everything_and_stays_under_its_limit(demo_shards, proxy, tmp_path):
    local = sorted(sum(labels(str(demo_shards))[0], []))
    sizes = sorted(os.path.getsize(u) for u in load_info(str(demo_shards)).split("validation").urls)
    limit = sizes[-1] + sizes[-2]  # two shards at most: fewer than the split has
    cache = ShardCache(str(tmp_path / "cache"), limit)
    remote = RemoteOptions(timeout=30.0, retries=1, cache_dir=cache.root, cache_limit=limit)
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], cache.usage())
            time.sleep(0.002)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(2):
            got, stats = labels(URL, remote=remote, workers=2)
            assert sorted(sum(got, [])) == local
    finally:
        stop.set()
        watcher.join()
    assert 0 < peak[0] <= limit and cache.usage() <= limit
    assert stats["cache_misses"] > len(sizes) // 2  # evicted shards were fetched again


def test_a_shard_larger_than_the_cache_is_read_uncached(demo_shards, proxy, tmp_path):
    remote = RemoteOptions(timeout=30.0, retries=1, cache_dir=str(tmp_path / "c"), cache_limit=1000)
    got, stats = labels(URL, remote=remote)
    assert got == labels(str(demo_shards))[0] and stats["cache_hits"] == 0
    assert os.listdir(tmp_path / "c" / "shards") == [] and os.listdir(tmp_path / "c" / "tmp") == []


def test_a_stalled_store_ends_in_one_line_within_the_bound(proxy):
    split = load_info(URL, PATIENT).split("validation")
    loader = create_loader(split, train=False, batch_size=B, img_size=SIZE, num_workers=0, remote=FAST)
    proxy.mode = "stall"
    t0 = time.monotonic()
    with pytest.raises(DataLoadingError, match=r"shard s3://shards/imagenet-wds/demo-validation-000000\.tar: "
                                               r".*(no response|stalled).*0\.5 s \(tried 2 times\)") as e:
        list(loader)
    assert time.monotonic() - t0 < BOUND and "\n" not in str(e.value)


def test_a_failing_store_ends_in_one_line_within_the_bound(proxy):
    split = load_info(URL, PATIENT).split("validation")
    loader = create_loader(split, train=False, batch_size=B, img_size=SIZE, num_workers=0, remote=FAST)
    proxy.mode = "reset"
    t0 = time.monotonic()
    with pytest.raises(DataLoadingError, match=r"demo-validation-000000\.tar: .*\(tried 2 times\); the data "
                                               r"source is unreachable") as e:
        list(loader)
    assert time.monotonic() - t0 < BOUND and "\n" not in str(e.value)


def test_a_trickling_store_fails_the_minimum_rate_in_one_line(proxy):
    remote = RemoteOptions(timeout=1.0, retries=0, min_rate=1 << 20)
    split = load_info(URL, PATIENT).split("validation")
    loader = create_loader(split, train=False, batch_size=B, img_size=SIZE, num_workers=0, remote=remote)
    proxy.mode, proxy.trickle = "trickle", (512, 0.1)
    t0 = time.monotonic()
    with pytest.raises(DataLoadingError, match=r"(too slow: .* below the minimum rate of 1024 KiB/s|stalled)"):
        list(loader)
    assert time.monotonic() - t0 < BOUND


def test_a_trickling_http_server_ends_by_the_minimum_rate_not_the_stall(demo_shards):
    """512 bytes every 0.1 s never stall for the 2 s timeout; the rate rule ends the read."""
    remote = RemoteOptions(timeout=2.0, retries=1, backoff=0.1, min_rate=64 << 10)
    with ShardServer(demo_shards) as server:
        split = load_info(server.url, PATIENT).split("validation")
        loader = create_loader(split, train=False, batch_size=B, img_size=SIZE, num_workers=0, remote=remote)
        server.trickle = (512, 0.1)
        t0 = time.monotonic()
        with pytest.raises(DataLoadingError, match=r"demo-validation-000000\.tar: too slow: [\d,]+ bytes in 2 s of "
                                                   r"waiting, below the minimum rate of 64 KiB/s .*\(tried 2 times\)"):
            list(loader)
        assert time.monotonic() - t0 < BOUND
        server.trickle = None


def test_the_budget_allows_timeout_plus_bytes_over_the_rate():
    b = Budget(timeout=10, min_rate=100)
    b.spent(9, 0)
    assert b.allowed() == pytest.approx(1)
    b.spent(5, 1000)  # 14 s waited for 1000 bytes: 10 + 1000/100 = 20 s allowed in all
    assert b.allowed() == pytest.approx(6)
    with pytest.raises(RemoteError, match="too slow: 1,000 bytes in 20 s"):
        b.spent(6, 0)
    assert Budget(timeout=10).allowed() == 10  # no rate: the stall timeout alone


def test_a_killed_download_leaves_nothing_that_looks_complete(demo_shards, proxy, tmp_path):
    url = URL + "demo-train-000000.tar"
    cache_dir = tmp_path / "cache"
    code = textwrap.dedent(f"""
        from pipeline.remote import RemoteOptions
        from pipeline.shards import open_shard
        remote = RemoteOptions(timeout=30.0, retries=0, min_rate=0, cache_dir={str(cache_dir)!r}, cache_limit=1 << 30)
        with open_shard({url!r}, remote) as f:
            print("done", flush=True)
    """)
    proxy.mode, proxy.trickle = "trickle", (4096, 0.05)  # slow enough to be killed half-way
    proc = subprocess.Popen([sys.executable, "-c", code], env=child_env(), cwd=ROOT)
    part = None
    try:
        for _ in range(600):
            parts = list((cache_dir / "tmp").glob("*.part")) if (cache_dir / "tmp").is_dir() else []
            if parts:
                part = parts[0]
                break
            time.sleep(0.05)
        assert part is not None, "the download never started"
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert part.exists() and list((cache_dir / "shards").iterdir()) == []  # nothing under a complete name
    proxy.mode = "pass"
    cache = ShardCache(str(cache_dir), 1 << 30)
    assert cache.start() == 0 and list((cache_dir / "tmp").iterdir()) == []  # the next run cleans up
    remote = RemoteOptions(timeout=5.0, retries=0, cache_dir=str(cache_dir), cache_limit=1 << 30)
    with open_shard(url, remote) as f:
        data = f.read()
    assert data == (demo_shards / "demo-train-000000.tar").read_bytes()
    assert (cache_dir / "shards" / cache_key(url)).read_bytes() == data


OPEN_ONE = """
import json, sys
from pipeline.remote import RemoteOptions
from pipeline.shards import open_shard
class Tally:
    def __init__(self):
        self.counts = {}
    def add(self, stat, n=1):
        self.counts[stat.name] = self.counts.get(stat.name, 0) + n
tally = Tally()
remote = RemoteOptions(timeout=30.0, retries=0, min_rate=0, cache_dir=sys.argv[1], cache_limit=1 << 30)
with open_shard(sys.argv[2], remote, tally) as f:
    tally.counts["bytes"] = len(f.read())
print(json.dumps(tally.counts))
"""


@pytest.mark.slow
def test_processes_that_want_the_same_shard_download_it_once(demo_shards, proxy, tmp_path):
    url, cache_dir = URL + "demo-train-000002.tar", tmp_path / "cache"
    size = (demo_shards / "demo-train-000002.tar").stat().st_size
    proxy.mode, proxy.trickle = "trickle", (4096, 0.05)  # a download of a few seconds

    def start():
        return subprocess.Popen([sys.executable, "-c", OPEN_ONE, str(cache_dir), url], stdout=subprocess.PIPE,
                                text=True, env=child_env(), cwd=ROOT)
    first = start()
    for _ in range(600):  # the first download is under way...
        if (cache_dir / "tmp").is_dir() and list((cache_dir / "tmp").glob("*.part")):
            break
        time.sleep(0.05)
    others = [start(), start()]  # ...when two more processes ask for the same shard
    results = [json.loads(p.communicate(timeout=120)[0]) for p in [first, *others]]
    assert results[0] == {"CACHE_MISSES": 1, "FETCHED_BYTES": size, "bytes": size}
    assert results[1:] == [{"CACHE_HITS": 1, "bytes": size}] * 2  # they waited for it, then read the cache


def test_a_cached_shard_of_the_wrong_size_is_fetched_again(demo_shards, proxy, tmp_path):
    url = URL + "demo-train-000001.tar"
    remote = RemoteOptions(timeout=5.0, retries=0, cache_dir=str(tmp_path / "c"), cache_limit=1 << 30)
    with open_shard(url, remote) as f:
        whole = f.read()
    cached = tmp_path / "c" / "shards" / cache_key(url)
    with open(cached, "r+b") as f:  # damaged on disk: cut short
        f.truncate(len(whole) // 2)
    before = proxy.request_bytes
    with open_shard(url, remote) as f:
        assert f.read() == whole
    assert proxy.request_bytes > before and cached.read_bytes() == whole


@pytest.mark.parametrize("change, message", [
    (lambda d: d["splits"]["train"]["shard_lengths"].__setitem__(0, 10 ** 12), "shard length 1,000,000,000,000"),
    (lambda d: d.update(num_classes=10 ** 9, classes=[]), "1,000,000,000 classes, more than"),
])
def test_remote_info_values_are_bounded(demo_shards, tmp_path, change, message):
    root = tmp_path / "wds"
    root.mkdir()
    for name in os.listdir(demo_shards):
        (root / name).write_bytes((demo_shards / name).read_bytes())
    data = json.loads((root / "_info.json").read_text())
    change(data)
    data["splits"]["train"].pop("num_samples", None)
    (root / "_info.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        load_info(str(root))
    with ShardServer(root) as server:
        with pytest.raises(DataError, match=message) as e:
            load_info(server.url, PATIENT)
    assert "\n" not in str(e.value) and MAX_CLASSES < 10 ** 9


def test_a_remote_shard_smaller_than_its_listed_samples_stops_in_one_line(demo_shards, tmp_path):
    root = tmp_path / "wds"
    root.mkdir()
    for name in os.listdir(demo_shards):
        (root / name).write_bytes((demo_shards / name).read_bytes())
    data = json.loads((root / "_info.json").read_text())
    data["splits"]["validation"]["shard_lengths"][0] = 10 ** 6  # under the bound, over the shard's size
    data["splits"]["validation"].pop("num_samples", None)
    (root / "_info.json").write_text(json.dumps(data))
    with ShardServer(root) as server:
        with pytest.raises(DataLoadingError, match=r"_info.json lists at least [\d,]+ samples for http://.*"
                                                   r"validation-000000\.tar, but its [\d,]+ bytes hold at most") as e:
            labels(server.url)
    assert "\n" not in str(e.value)


def test_sizes_parse_and_the_cache_needs_a_limit(tmp_path):
    assert parse_size("50G") == 50 << 30 and parse_size("500M") == 500 << 20 and parse_size("4096") == 4096
    assert parse_size("1.5k") == 1536
    with pytest.raises(ValueError):
        parse_size("lots")
    from engine.config import parse_args
    with pytest.raises(ConfigError, match="--cache-dir needs --cache-limit"):  # with the other flag checks
        parse_args(["--cache-dir", str(tmp_path / "c"), "--output", str(tmp_path)])
    r = subprocess.run([sys.executable, "train_stream.py", "--cache-limit", "lots"], capture_output=True,
                       text=True, cwd=ROOT, env=child_env())
    assert r.returncode == 2 and "--cache-limit" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_training_from_s3_fills_the_cache_then_reads_it(proxy, tmp_path):
    out, cache_dir = tmp_path / "run", tmp_path / "cache"
    cmd = [sys.executable, "train_stream.py", "--data_path", URL, *SMALL, "--epochs", "2", "--cache-dir",
           str(cache_dir), "--cache-limit", "64M", *run_folder(out)]
    env = dict(child_env(), **{k: os.environ[k] for k in os.environ if k.startswith("AWS_")})
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    epochs = [row for row in read_metrics(out) if row.get("kind") == "epoch"]
    assert len(epochs) == 2
    first, second = epochs
    assert first["cache_misses"] > 0 and first["fetched_bytes"] > 0
    assert second["cache_misses"] == first["cache_misses"] and second["fetched_bytes"] == first["fetched_bytes"]
    assert second["cache_hits"] > first["cache_hits"]
    assert list((cache_dir / "tmp").iterdir()) == []
