"""The benchmark tools run end to end on the CPU, print the JSON they promise, and compare like
with like: each runs in its smallest mode with the CPU's fast bf16 forced off and on (the
`cpu_bf16` fixture), and both sides of every ratio must report the same settings.

No timing is asserted: these tests only check that each tool measures what it says it does.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # each runs a tool in a subprocess
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_DALI = importlib.util.find_spec("nvidia.dali") is not None  # make test installs it
sys.path.insert(0, os.path.join(ROOT, "tools"))


def run_tool(*args, timeout=300):
    # os.environ carries the cpu_bf16 fixture's STREAM_CPU_BF16 into the tool
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stdout


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


def test_bench_overhead_refuses_a_ratio_when_the_sides_differ(monkeypatch, capsys):
    """The issue's case the other way round: train_stream sees fast bf16, the bare loop does not."""
    import bench_overhead

    from model.device import CPU_BF16_ENV
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


def test_bench_control_compares_steps_with_and_without_the_check():
    result, out = run_tool("tools/bench_control.py", "--steps", "20", "--work-ms", "2", "--rounds", "1")
    assert result["step_ms"] > 0 and result["step_with_check_ms"] > 0 and result["poll_alone_us"] > 0
    assert result["check_us_per_step"] == pytest.approx(
        (result["step_with_check_ms"] - result["step_ms"]) * 1e3, abs=2.0)
    assert result["procs"] == 2 and "round 0" in out
