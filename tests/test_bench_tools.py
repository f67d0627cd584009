"""The benchmark tools run end to end on the CPU and print the JSON they promise.

No timing is asserted: these tests only check that each tool measures what it says it does.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # each runs a tool in a subprocess
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(*args, timeout=300):
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stdout


def test_bench_loader_reports_ratio_to_ceiling_and_timm(demo_shards):
    result, out = run_tool("tools/bench_loader.py", "--data_path", str(demo_shards), "-j", "1", "-b", "8",
                           "--img-size", "32", "--steps", "3", "--warmup", "1", "--ceiling-seconds", "0.5",
                           "--vs-timm", "--epochs", "2")
    assert result["img_per_s"] > 0 and result["ceiling_img_per_s"] > 0
    # the tool divides unrounded rates; the printed rates are rounded
    assert result["ratio"] == pytest.approx(result["img_per_s"] / result["ceiling_img_per_s"], abs=2e-3)
    assert result["cores_used"] == 1 and result["images"] == 3 * 8
    assert result["timm_img_per_s"] > 0 and len(result["worker_rss_mb_per_epoch"]) == 1
    assert "ours/timm" in out


def test_bench_loader_clear_error_without_info(tmp_path):
    p = subprocess.run([sys.executable, "tools/bench_loader.py", "--data_path", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "no _info.json" in p.stderr and "Traceback" not in p.stderr


def test_bench_overhead_compares_both_loops():
    result, out = run_tool("tools/bench_overhead.py", "--model", "resnet10t", "--img-size", "32", "-b", "4",
                           "--steps", "2", "--warmup", "1", "--rounds", "1")
    assert result["bare_img_per_s"] > 0 and result["train_stream_img_per_s"] > 0
    assert result["overhead"] == pytest.approx(result["bare_img_per_s"] / result["train_stream_img_per_s"] - 1,
                                               abs=2e-3)
    assert "round 0" in out


def test_gpu_bench_tiny_runs_every_stage_on_the_cpu(tmp_path):
    out_json = tmp_path / "gb.json"
    headline, out = run_tool("tools/gpu_bench.py", "--tiny", "--out", str(out_json),
                             "--data-dir", str(tmp_path / "d"))
    results = json.loads(out_json.read_text())
    assert headline["e2e_fps"] == results["e2e"]["fps"] and headline["device"] == "cpu"
    assert results["env"]["device"] == "cpu" and results["env"]["torch"]
    assert results["compute"]["eager"]["fps"] > 0 and results["compute"]["eager"]["synthetic"] is True
    assert results["loader"]["cpu"]["img_per_s"] > 0 and results["loader"]["gpu"]["img_per_s"] > 0
    e2e = results["e2e"]
    assert e2e["fps"] > 0 and e2e["synthetic"] is False and e2e["decode"] in ("cpu", "gpu")
    assert results["e2e_over_compute"] == pytest.approx(e2e["fps"] / results["compute"]["eager"]["fps"], abs=2e-3)
    assert "end-to-end / compute-only" in out


def test_bench_control_compares_steps_with_and_without_the_check():
    result, out = run_tool("tools/bench_control.py", "--steps", "20", "--work-ms", "2", "--rounds", "1")
    assert result["step_ms"] > 0 and result["step_with_check_ms"] > 0 and result["poll_alone_us"] > 0
    assert result["check_us_per_step"] == pytest.approx(
        (result["step_with_check_ms"] - result["step_ms"]) * 1e3, abs=2.0)
    assert result["procs"] == 2 and "round 0" in out
