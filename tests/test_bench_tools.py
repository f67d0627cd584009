"""The benchmark tools run end to end on the CPU, print the JSON they promise, and compare like
with like: each runs in its smallest mode with the CPU's fast bf16 forced off and on (the
`cpu_bf16` fixture), and both sides of every ratio must report the same settings.

No timing is asserted: these tests only check that each tool measures what it says it does.
The harness itself (tools/benchlib.py: registry, timing helpers, generated data, the table) is
tested at the end without running a tool; the tools that take more than a few seconds are slow.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None  # make test installs it


def run_tool(*args, timeout=300):
    # os.environ carries the cpu_bf16 fixture's STREAM_CPU_BF16 into the tool
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stdout


@pytest.mark.slow
def test_bench_loader_compares_rows_with_the_same_settings(demo_shards, cpu_bf16):
    result, out = run_tool("tools/bench_loader.py", "--data_path", str(demo_shards), "-j", "1", "-b", "8",
                           "--img-size", "32", "--steps", "3", "--warmup", "1", "--ceiling-seconds", "0.5",
                           "--loader", "ours", "dali", "--decode", "cpu", "gpu", "--vs-timm", "--epochs", "2",
                           "--rounds", "1")
    rows = result["rows"]
    assert result["host"]["fast_bf16"] is cpu_bf16 and result["host"]["fast_bf16_forced"]
    ours, timm, ceiling = rows["ours-cpu"], rows["timm"], rows["ceiling"]
    assert ours["img_per_s"] > 0 and timm["img_per_s"] > 0 and ceiling["img_per_s"] > 0
    # each side names what it ran; workers are read back from the loaders themselves
    for row in (ours, timm):
        s = row["settings"]
        assert (s["workers"], s["cores"], s["batch_size"], s["img_size"]) == (1, 1, 8, 32)
        assert s["output"] == "uint8 NHWC"
    assert ours["settings"]["decoder"] == ceiling["settings"]["decoder"] == "torchvision"
    assert timm["settings"]["decoder"] == "PIL"
    # the tool divides unrounded rates; the printed rates are rounded
    ratios = result["ratios"]
    assert ratios["ours-cpu/ceiling"] == pytest.approx(ours["img_per_s"] / ceiling["img_per_s"], abs=2e-3)
    assert ratios["ours-cpu/timm"] == pytest.approx(ours["img_per_s"] / timm["img_per_s"], abs=2e-3)
    assert ours["images"] == 3 * 8 and len(ours["worker_rss_mb_per_epoch"]) == 1
    # GPU decoding without a GPU only ships JPEG bytes: no ratio against decoded pixels
    assert "ours-gpu/ceiling" not in ratios and "ours-gpu/timm" not in ratios
    assert "decoder" in result["refused"]["ours-gpu/ceiling"] and "output" in result["refused"]["ours-gpu/timm"]
    assert "ours-gpu/timm: no ratio: ours-gpu and timm differ in output" in out
    # DALI's mixed decoder needs DALI and CUDA; else the row says why it was skipped
    assert ("skipped" in rows["dali-gpu"]) is not (HAVE_DALI and torch.cuda.is_available())
    if HAVE_DALI:
        dali = rows["dali-cpu"]
        s = dali["settings"]
        assert dali["img_per_s"] > 0 and (s["workers"], s["cores"], s["batch_size"], s["img_size"]) == (1, 1, 8, 32)
        assert s["decoder"] == "DALI cpu" and s["output"] == "uint8 NHWC" and dali["images"] == 3 * 8
        assert ratios["ours-cpu/dali-cpu"] == pytest.approx(ours["img_per_s"] / dali["img_per_s"], abs=2e-3)


@pytest.mark.slow
def test_bench_loader_recipe_augmentation_on_every_side_and_against_plain(demo_shards):
    """The recipe's worker side (random interpolation, jitter in the workers) reaches ours, timm's
    loader and the ceiling alike, so their ratios stand; the plain row is the A/B of its cost."""
    result, out = run_tool("tools/bench_loader.py", "--data_path", str(demo_shards), "-j", "1", "-b", "8",
                           "--img-size", "32", "--steps", "3", "--warmup", "1", "--ceiling-seconds", "0.5",
                           "--vs-timm", "--rounds", "2", "--train-interpolation", "random",
                           "--color-jitter", "0.4", "--jitter-in", "workers", "--vs-plain")
    rows, ratios = result["rows"], result["ratios"]
    recipe = rows["ours-cpu"]["settings"]["augment"]
    assert "random interpolation, colour jitter 0.4 per image" in recipe
    assert rows["timm"]["settings"]["augment"] == rows["ceiling"]["settings"]["augment"] == recipe
    assert "bilinear interpolation" in rows["plain"]["settings"]["augment"] and "jitter" not in \
        rows["plain"]["settings"]["augment"]
    assert {"ours-cpu/timm", "ours-cpu/ceiling", "ours-cpu/plain"} <= set(ratios) and not result["refused"]
    per_round = ratios["ours-cpu/plain rounds"]
    assert len(per_round) == 2 and ratios["ours-cpu/plain"] == pytest.approx(sorted(per_round)[0] / 2 +
                                                                             sorted(per_round)[1] / 2, abs=2e-3)
    assert "ours-cpu/plain:" in out and "median of the per-round ratios" in out


@pytest.mark.slow
def test_bench_jitter_compares_workers_and_device():
    result, out = run_tool("tools/bench_jitter.py", "--img-size", "32", "-b", "8", "--seconds", "0.2", "--rounds", "1")
    assert result["worker_us_per_image"] > 0 and result["device_us_per_image"] > 0
    assert result["device"] == "cpu" and result["batch_size"] == 8
    assert result["workers_over_device"] == pytest.approx(
        result["worker_us_per_image"] / result["device_us_per_image"], rel=1e-2)
    assert "per image" in out


def test_bench_loader_clear_error_without_info(tmp_path):
    p = subprocess.run([sys.executable, "tools/bench_loader.py", "--data_path", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "no _info.json" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_bench_overhead_both_sides_resolve_precision_alike(cpu_bf16):
    result, out = run_tool("tools/bench_overhead.py", "--model", "resnet10t", "--img-size", "32", "-b", "4",
                           "--steps", "2", "--warmup", "1", "--rounds", "1")
    bare, ours = result["sides"]["bare"], result["sides"]["train_stream"]
    assert bare == ours
    # train_stream's own choice: bf16 autocast only where bf16 is fast, else float32
    assert ours["amp_dtype"] == ("bfloat16" if cpu_bf16 else "float32") and ours["fast_bf16"] is cpu_bf16
    assert ours["threads"] == 1 and ours["channels_last"] is True and ours["num_classes"] == 1000
    assert result["host"]["fast_bf16"] is cpu_bf16
    assert result["overhead"] == pytest.approx(result["bare_img_per_s"] / result["train_stream_img_per_s"] - 1,
                                               abs=2e-3)
    assert "round 0" in out and "refused" not in result


@pytest.mark.slow
def test_bench_overhead_refuses_a_ratio_when_the_sides_differ(monkeypatch, capsys):
    """The mismatch the other way round: train_stream sees fast bf16, the bare loop does not."""
    from model.device import CPU_BF16_ENV
    from tools import bench_overhead
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    real_ours = bench_overhead.ours

    def ours_with_bf16(args):
        monkeypatch.setenv(CPU_BF16_ENV, "1")
        try:
            return real_ours(args)
        finally:
            monkeypatch.setenv(CPU_BF16_ENV, "0")
    monkeypatch.setattr(bench_overhead, "ours", ours_with_bf16)
    assert bench_overhead.main(["--model", "resnet10t", "--img-size", "32", "-b", "2", "--steps", "1",
                                "--warmup", "0", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["overhead"] is None
    assert result["refused"].startswith("bare and train_stream differ in amp_dtype (float32 vs bfloat16)")
    assert "no overhead ratio: bare and train_stream differ in amp_dtype" in out and "per-step overhead" not in out


@pytest.mark.slow
def test_bench_make_shards_compares_the_same_images(tmp_path, cpu_bf16):
    result, out = run_tool("tools/bench_make_shards.py", "--images", "40", "--repeats", "1",
                           "--workdir", str(tmp_path))
    assert result["host"]["fast_bf16"] is cpu_bf16
    for row in result["sizes"].values():
        tar, ours = row["sides"]["tar"], row["sides"]["make_shards"]
        assert ours["images"] == tar["images"] == row["images"] > 0 and ours["skipped"] == ours["transcoded"] == 0
        assert ours["processes"] == result["workers"] == len(os.sched_getaffinity(0))
        assert row["ratio"] == pytest.approx(row["make_shards_s"] / row["tar_s"], abs=0.01 * row["ratio"] + 0.01)
    assert not result["refused"]


@pytest.fixture(scope="module")
def gpu_bench_data(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_bench")  # shards built by the first run, reused by the second


@pytest.mark.slow
def test_gpu_bench_tiny_runs_every_stage_on_the_cpu(tmp_path, gpu_bench_data, cpu_bf16):
    out_json = tmp_path / "gb.json"
    # the DALI rows run once (with bf16 forced off): they add a training run, and bf16 does not touch them
    dali = HAVE_DALI and not cpu_bf16
    headline, out = run_tool("tools/gpu_bench.py", "--tiny", "--out", str(out_json), "--data-dir", str(gpu_bench_data),
                             *([] if dali else ["--no-dali"]))
    results = json.loads(out_json.read_text())
    assert headline["device"] == "cpu" and headline["fast_bf16"] is cpu_bf16
    assert results["env"]["device"] == "cpu" and results["env"]["torch"]
    compute = results["compute"]["eager"]
    assert compute["fps"] > 0 and compute["synthetic"] is True
    assert results["loader"]["ours-cpu"]["img_per_s"] > 0 and results["loader"]["ours-gpu"]["img_per_s"] > 0
    assert set(results["e2e"]) == {"ours-cpu", "dali-cpu"}  # no CUDA: DALI's rows use its cpu decoder
    assert "skipped" in results["e2e"]["dali-cpu"] or dali
    assert ("dali-gpu" in results["loader"]) is dali and "skipped" in out
    runs = ["ours-cpu", "dali-cpu"] if dali else ["ours-cpu"]
    for name in runs:
        e2e = results["e2e"][name]
        assert e2e["fps"] > 0 and e2e["synthetic"] is False and headline[f"e2e_{name}_fps"] == e2e["fps"]
        assert e2e["data"] == "shards, decode cpu" and e2e["loader"] == name.split("-")[0]
        # both sides of end-to-end / compute-only ran the same computation, as train_stream resolved it
        for r in (compute, e2e):
            assert r["amp_dtype"] == ("bfloat16" if cpu_bf16 else "float32") and r["settings"]["fast_bf16"] is cpu_bf16
        assert compute["settings"] == e2e["settings"] and compute["num_classes"] == e2e["num_classes"] == 10
        ratio = results["ratios"][f"e2e {name} / compute eager"]
        assert ratio == pytest.approx(e2e["fps"] / compute["fps"], abs=2e-3) and f"e2e {name} / compute eager" in out
    assert not results["refused"]


@pytest.mark.slow
def test_bench_control_compares_steps_with_and_without_the_check():
    result, out = run_tool("tools/bench_control.py", "--steps", "20", "--work-ms", "2", "--rounds", "1")
    assert result["step_ms"] > 0 and result["step_with_check_ms"] > 0 and result["poll_alone_us"] > 0
    assert result["check_us_per_step"] == pytest.approx(
        (result["step_with_check_ms"] - result["step_ms"]) * 1e3, abs=2.0)
    assert result["procs"] == 2 and "round 0" in out


def test_bench_resolution_compute_data_and_loader(tmp_path, capsys):
    """Ratios per image size from one model, and per size and shard set from one set of loaders
    (in this process: the tool's main)."""
    from tools import bench_resolution
    assert bench_resolution.main(["compute", "--model", "resnet10t", "--sizes", "32", "48", "-b", "4",
                                  "--steps", "1", "--warmup", "1", "--rounds", "1", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rates = result["img_per_s"]
    assert set(rates) == {"32", "48"} and result["vs_48"]["32"] == pytest.approx(rates["32"] / rates["48"], abs=2e-3)
    assert result["pixels_48_over"]["32"] == 2.25 and result["settings"]["device"] == "cpu"
    assert bench_resolution.main(["data", str(tmp_path), "--image-size", "640", "480", "--images", "20"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["full"]["resized"] == 0 and data["500"]["resized"] > 0 and data["500"]["mb"] < data["full"]["mb"]
    paths = [data["full"]["path"], data["500"]["path"]]
    assert bench_resolution.main(["loader", "--data_path", *paths, "--sizes", "32", "64", "-j", "1", "-b", "4",
                                  "--steps", "2", "--warmup", "1", "--rounds", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rates = result["img_per_s"]
    assert len(rates) == 4 and all(v > 0 for v in rates.values())
    assert result["vs_first_data"]["64"][paths[1]] == pytest.approx(
        rates[f"{paths[1]}@64"] / rates[f"{paths[0]}@64"], abs=2e-3)
    assert result["vs_64px"][paths[0]]["32"] == pytest.approx(rates[f"{paths[0]}@32"] / rates[f"{paths[0]}@64"],
                                                             abs=2e-3)


@pytest.mark.slow
def test_bench_resolution_counts_compiled_graphs(capsys):
    """`compile` runs `compile-one` per mode in a fresh process; here one mode runs in this one
    (tests/test_fast_recipe.py compares static graphs with torch's default)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from tools import bench_resolution
    torch._dynamo.reset()
    counters.clear()
    assert bench_resolution.main(["compile-one", "--mode", "static", "--backend", "eager", "--device", "cpu",
                                  "--sizes", "32", "48", "32", "--steps", "1", "-b", "2"]) == 0
    torch._dynamo.reset()
    static = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert static["graphs"] == 2  # one per size, none for the repeat
    assert [(s, new) for s, _, new in static["first_step_s"]] == [(32, True), (48, True), (32, False)]


def test_time_to_accuracy_reads_the_first_validation_at_the_target(tmp_path, capsys):
    from tools import time_to_accuracy
    rows = [{"kind": "config", "time": 100.0}, {"kind": "train", "time": 110.0},
            {"kind": "val", "epoch": 0, "top1": 50.0, "time": 120.0},
            {"kind": "val", "epoch": 1, "top1": 91.0, "time": 150.5},
            {"kind": "val", "epoch": 2, "top1": 95.0, "time": 180.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert time_to_accuracy.main([str(tmp_path), "--target", "90"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    assert (result["seconds_to_target"], result["epoch_reached"], result["best_top1"]) == (50.5, 1, 95.0)
    assert result["total_seconds"] == 80.0
    assert time_to_accuracy.main([str(tmp_path), "--target", "99"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]["seconds_to_target"] is None


# ---------------------------------------------------------------- the harness (fast: no tool is run)
def test_every_bench_tool_registers_itself_and_make_bench_runs_its_registered_defaults():
    from tools import benchlib
    registry = benchlib.discover()
    files = sorted(f for f in os.listdir(os.path.join(ROOT, "tools")) if f.startswith("bench_") and f != "bench_all.py")
    assert sorted(os.path.basename(s.script) for s in registry.values() if s.name != "gpu") == files
    assert os.path.basename(registry["gpu"].script) == "gpu_bench.py"
    assert [name for name, s in registry.items() if s.argv] == ["make_shards", "loader", "overhead"]
    ctx = benchlib.Context(workdir="/w", cores=3)
    assert registry["make_shards"].command(registry["make_shards"].argv(ctx)) == [
        "tools/bench_make_shards.py", "--workdir", "/w", "--keep"]


def test_a_new_benchmark_is_one_file_and_its_rows_reach_the_table(tmp_path, monkeypatch):
    """A benchmark registered with the harness runs under `make bench` and its rows make the table."""
    from tools import bench_all, benchlib
    script = tmp_path / "bench_fake.py"
    script.write_text(
        "import sys\n"
        "from tools import benchlib\n"
        "rounds = benchlib.alternate({'a': lambda: 3.0, 'b': lambda: 1.5}, 2, ' img/s')\n"
        "a, b = benchlib.median(rounds['a']), benchlib.median(rounds['b'])\n"
        "r, why = benchlib.ratio(a, b, {'a': {'cores': 1}, 'b': {'cores': 1}}, ['cores'])\n"
        "benchlib.emit({'ratio': r, 'report': [benchlib.row('fake', 'a / b', r, 2, f'{a} vs {b}', sys.argv[1])]})\n")
    monkeypatch.setitem(benchlib.REGISTRY, "fake", benchlib.Spec("fake", str(script), "a test benchmark",
                                                                 argv=lambda ctx: [f"in {ctx.workdir}"]))
    monkeypatch.setitem(benchlib.REGISTRY, "broken", benchlib.Spec("broken", str(tmp_path / "missing.py"), "",
                                                                   argv=lambda ctx: []))
    out = tmp_path / "r.json"
    assert bench_all.main(["--only", "fake", "broken", "--out", str(out), "--workdir", str(tmp_path / "w")]) == 1
    results = json.loads(out.read_text())
    assert results["benchmarks"]["fake"]["result"]["ratio"] == 2.0
    assert results["host"]["cores"] == len(os.sched_getaffinity(0))
    md = (tmp_path / "r.md").read_text()
    assert f"| fake | a / b | **2.000** | 2 | 3.0 vs 1.5 | in {tmp_path / 'w'} |" in md
    assert "| broken | failed: exit 2: " in md and not (tmp_path / "w").exists()  # no --keep
    with pytest.raises(SystemExit):
        bench_all.main(["--only", "no_such_bench"])


def test_timing_helpers_warm_up_alternate_and_take_medians():
    from tools import benchlib
    calls = []
    assert benchlib.timed(lambda: calls.append(1), 0.0, warmup=2) > 0 and len(calls) == 3  # 2 warm-up + 1 timed
    order = []
    rounds = benchlib.alternate({"a": lambda: order.append("a") or 4.0, "b": lambda: order.append("b") or 2.0}, 3,
                                echo=None)
    assert order == ["a", "b"] * 3 and rounds == {"a": [4.0] * 3, "b": [2.0] * 3}
    assert benchlib.median_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 3.0]) == 2.0
    batches = [(torch.zeros(4, 2), torch.zeros(4)) for _ in range(5)]
    rate, n = benchlib.time_batches(batches, warmup=2, steps=10)
    assert n == 3 * 4 and rate > 0


def test_generated_data_is_made_once_per_settings(tmp_path):
    from tools import benchlib
    folder = str(tmp_path / "photos")
    benchlib.demo_images(folder, 2, classes=2, val_per_class=1, image_size=(32, 24))
    files = sorted(str(p) for p in (tmp_path / "photos").rglob("*.JPEG"))
    assert len(files) == 2 * 2 + 2 * 1 and os.path.isfile(folder + ".made.json")
    stamp = os.path.getmtime(files[0])
    benchlib.demo_images(folder, 2, classes=2, val_per_class=1, image_size=(32, 24))
    assert os.path.getmtime(files[0]) == stamp  # reused
    benchlib.demo_images(folder, 1, classes=2, val_per_class=1, image_size=(32, 24))
    assert len(list((tmp_path / "photos").rglob("*.JPEG"))) == 2 * 1 + 2 * 1  # other settings: made anew
    shards = benchlib.demo_shards(folder, str(tmp_path / "wds"), 2)
    assert os.path.isfile(os.path.join(shards, "_info.json"))


def test_bench_loader_places_jitter_by_the_engine_rule(monkeypatch):
    from types import SimpleNamespace

    from tools import bench_loader
    args = SimpleNamespace(color_jitter=0.4, jitter_in="workers", train_interpolation="bilinear")
    assert bench_loader.jitter_in_workers(args) and not bench_loader.jitter_in_workers(args, plain=True)
    assert not bench_loader.jitter_in_workers(SimpleNamespace(color_jitter=0.4, jitter_in="device"))
    assert not bench_loader.jitter_in_workers(SimpleNamespace(color_jitter=0.0, jitter_in="workers"))
    assert bench_loader.jitter_in_workers(SimpleNamespace(color_jitter=0.4, jitter_in="auto"))  # a CPU run: workers
    seen = []
    monkeypatch.setattr(bench_loader, "jitter_place", lambda run, device: seen.append((run.loader, device)) or "device")
    assert not bench_loader.jitter_in_workers(args) and seen == [("ours", "cpu")]
    assert "colour jitter" not in bench_loader.augment_desc(args)


def test_gpu_bench_table_comes_from_its_results():
    from tools import benchlib, gpu_bench
    results = {"compute": {"eager": {"fps": 812.5, "amp_dtype": "bfloat16", "peak_mem_gb": 20.1},
                           "compile": {"error": "exit 1: boom"}},
               "loader": {"ours-cpu": {"img_per_s": 1500.0, "settings": {"decoder": "torchvision", "cores": 15}},
                          "dali-gpu": {"skipped": "DALI is not installed"}},
               "e2e": {"ours-cpu": {"fps": 700.0, "compute_mode": "eager", "data_wait_fraction": 0.1}},
               "ratios": {"e2e ours-cpu / compute eager": 0.8614}, "refused": {"loader x / y": "they differ"}}
    gpu = {"command": "python tools/gpu_bench.py", "wall_s": 1, "result": {"report": gpu_bench.report_rows(results)}}
    md = benchlib.table({"host": _host(), "benchmarks": {"gpu": gpu}})
    assert "| compute-only | eager | **812.5** | | img/s | bfloat16, peak 20.1 GB |" in md
    assert "| compute-only | compile | - | | img/s | exit 1: boom |" in md
    assert "| loader-only | dali-gpu | skipped |" in md and "| ratio | e2e ours-cpu / compute eager | **0.861** |" in md
    assert "| ratio | loader x / y | refused: they differ |" in md


def _host():
    return {"machine": "m1", "date": "2026-01-02 03:04 UTC", "cpu": "Example CPU", "cpu_flags": [], "fast_bf16": False,
            "fast_bf16_forced": False, "cores": 2, "cpus": 2, "torch": "2.99.0", "python": "3.11.0", "gpu": None}
