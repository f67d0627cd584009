"""Like with like: the check every benchmark ratio passes, and the `make bench` report."""
import os

from common.compare import mismatch, ratio
from common.host import cpu_flags, cpu_model


def test_mismatch_names_each_differing_setting_with_both_values():
    a = {"device": "cpu", "amp_dtype": "bfloat16", "threads": 2, "img_size": 64}
    b = {"device": "cpu", "amp_dtype": "float32", "threads": 1, "img_size": 64}
    assert mismatch({"a": a, "b": dict(a)}, a) is None
    assert mismatch({"bare": a, "ours": b}, ["device", "amp_dtype", "threads", "img_size"]) == \
        "bare and ours differ in amp_dtype (bfloat16 vs float32), threads (2 vs 1)"
    # a setting one side does not report is a difference, not a match
    assert mismatch({"a": a, "b": {k: v for k, v in a.items() if k != "threads"}}, ["threads"]) == \
        "a and b differ in threads (2 vs <unset>)"
    assert mismatch({"a": a, "b": b}, ["device", "img_size"]) is None  # only the keys asked for


def test_ratio_is_refused_when_the_sides_differ():
    same, other = {"amp_dtype": "float32"}, {"amp_dtype": "bfloat16"}
    assert ratio(3.0, 2.0, {"x": same, "y": dict(same)}, ["amp_dtype"]) == (1.5, None)
    value, why = ratio(3.0, 2.0, {"x": same, "y": other}, ["amp_dtype"])
    assert value is None and why == "x and y differ in amp_dtype (float32 vs bfloat16)"


def test_host_facts_name_the_cpu():
    assert cpu_model() and isinstance(cpu_model(), str)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    assert ("avx512_bf16" in cpu_flags()) == (" avx512_bf16" in flags)


def _host(**over):
    h = {"machine": "m1", "date": "2026-01-02 03:04 UTC", "cpu": "Example CPU 9000", "cpu_flags": ["avx2"],
         "fast_bf16": False, "fast_bf16_forced": False, "cores": 2, "cpus": 4, "torch": "2.99.0",
         "python": "3.11.0", "gpu": None}
    h.update(over)
    return h


def test_bench_all_table_names_the_machine_and_every_ratio_with_its_rounds():
    """The table comes from the rows each benchmark reports (here bench_loader's own), not from
    per-tool code in bench_all."""
    from tools import bench_all, bench_loader
    side = {"cores": 2, "img_size": 224, "batch_size": 64, "decoder": "torchvision"}
    loader = {"rounds": 3, "ratios": {"ours-cpu/timm": 2.262},
              "refused": {"ours-gpu/ceiling": "they differ in decoder"},
              "rows": {"ours-cpu": {"img_per_s": 1476.6, "settings": side},
                       "ours-gpu": {"img_per_s": 900.0, "settings": dict(side, decoder="nvJPEG")},
                       "timm": {"img_per_s": 652.6, "settings": dict(side, decoder="PIL")},
                       "ceiling": {"img_per_s": 1511.6, "settings": side},
                       "dali-cpu": {"skipped": "DALI is not installed"}}}
    loader["report"] = bench_loader.report_rows(loader)
    results = {"host": _host(), "wall_s": 321.0, "benchmarks": {
        "loader": {"command": "python tools/bench_loader.py", "wall_s": 50.0, "result": loader},
        "overhead": {"command": "python tools/bench_overhead.py", "wall_s": 9.0, "error": "exit 1"}}}
    md = bench_all.table(results)
    assert "Example CPU 9000; flags: avx2" in md and "fast bf16: no" in md and "torch 2.99.0" in md
    assert "2026-01-02 03:04 UTC" in md and "321 s" in md
    assert "| loader | ours-cpu / timm | **2.262** | 3 | 1476.6 vs 652.6 img/s |" in md
    assert "| loader | ours-gpu / ceiling | refused: they differ in decoder | 3 |" in md
    assert "| loader | dali-cpu | skipped | | | DALI is not installed |" in md
    assert "| overhead | failed: exit 1 |" in md
    assert "fast bf16: yes (forced)" in bench_all.table(dict(results, host=_host(fast_bf16=True,
                                                                                 fast_bf16_forced=True)))
