"""tools/validate.py, predict.py and export.py on a checkpoint trained here."""
import json
import os

import pytest
import torch
from conftest import run_folder

import train_stream
from tools import export as export_tool
from tools import predict as predict_tool
from tools import validate as validate_tool

pytestmark = pytest.mark.slow  # trains a small model once for the module


@pytest.fixture(scope="module")
def run(demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = train_stream.main(["--data_path", str(demo_shards), "--model", "resnet10t", "--img-size", "32", "-b", "8",
                              "-j", "1", "--epochs", "2", "--warmup-epochs", "0", "--lr", "0.05",
                              "--log-interval", "5", *run_folder(out)])
    assert code == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return out, [r for r in rows if r["kind"] == "val"][-1]


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_validate_agrees_with_the_runs_last_validation(run, demo_shards, demo_folder, capsys):
    out, last = run
    assert validate_tool.main([str(out / "last.pth")]) == 0  # data, size, precision: the run's own
    shards = last_json(capsys)
    assert shards["n"] == last_json_n(demo_shards) and shards["skipped"] == 0
    assert shards["top1"] == pytest.approx(last["top1"], abs=1e-9)
    assert shards["loss"] == pytest.approx(last["loss"], rel=1e-4)
    # the same images as an ImageFolder (make_shards' source): the same score
    assert validate_tool.main([str(out / "last.pth"), "--data", str(demo_folder)]) == 0
    folder = last_json(capsys)
    assert (folder["n"], folder["top1"]) == (shards["n"], shards["top1"])


def test_validate_reproduces_a_fast_recipe_run(demo_shards, tmp_path, capsys):
    """--blurpool, --val-res, --val-crop-pct and --val-tta flip are the run's: validate.py applies them."""
    out = tmp_path / "fast"
    assert train_stream.main(["--data_path", str(demo_shards), "--model", "resnet10t", "--img-size", "32", "-b", "8",
                              "-j", "1", "--epochs", "1", "--warmup-epochs", "0", "--lr", "0.05", "--blurpool",
                              "--val-res", "40", "--val-crop-pct", "1.0", "--val-tta", "flip",
                              *run_folder(out)]) == 0
    last = [json.loads(line) for line in open(out / "metrics.jsonl") if '"val"' in line][-1]
    capsys.readouterr()
    assert validate_tool.main([str(out / "last.pth")]) == 0
    got = last_json(capsys)
    assert (got["img_size"], got["crop_pct"], got["tta"]) == (40, 1.0, "flip")
    assert got["top1"] == pytest.approx(last["top1"], abs=1e-9)
    assert got["loss"] == pytest.approx(last["loss"], rel=1e-4)
    assert validate_tool.main([str(out / "last.pth"), "--tta", "none"]) == 0
    assert last_json(capsys)["tta"] == "none"


def last_json_n(shards):
    return json.loads((shards / "_info.json").read_text())["splits"]["validation"]["num_samples"]


def test_validate_errors_are_one_line(run, demo_folder, tmp_path, capsys):
    out, _ = run
    cases = [([str(tmp_path / "nope.pth")], "does not exist"),
             ([str(out / "last.pth"), "--num-classes", "9"], "does not fit model resnet10t with 9 classes"),
             ([str(out / "last.pth"), "--data", str(tmp_path)], "no class folders")]
    for argv, message in cases:
        assert validate_tool.main(argv) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_predict_names_the_top_classes_and_skips_bad_files(run, demo_shards, demo_folder, tmp_path, capsys):
    out, _ = run
    classes = json.loads((demo_shards / "_info.json").read_text())["classes"]
    images = sorted((demo_folder / "val" / classes[0]).glob("*.JPEG"))[:2]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    code = predict_tool.main([str(out / "last.pth"), *map(str, images), str(bad), "--top", "3", "--json",
                              "--classes-from", str(demo_shards)])
    captured = capsys.readouterr()
    assert code == 0 and "bad.jpg: not a readable image, skipped" in captured.err
    rows = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert [r["image"] for r in rows] == list(map(str, images))
    for r in rows:
        assert len(r["top"]) == 3 and {t["class"] for t in r["top"]} <= set(classes)
        ps = [t["probability"] for t in r["top"]]
        assert ps == sorted(ps, reverse=True) and 0 < sum(ps) <= 1.0001


def test_export_to_onnx_matches_pytorch(run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    out, _ = run
    path = tmp_path / "m.onnx"
    assert export_tool.main([str(out / "last.pth"), "-o", str(path)]) == 0, capsys.readouterr().err
    assert "onnxruntime agrees" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["model"] == "resnet10t" and json.loads(meta["input_size"]) == [3, 32, 32]
    # independent of the tool's own check: batch of 5, against the checkpoint loaded into timm
    import timm
    state = torch.load(out / "last.pth", weights_only=True)["model"]
    model = timm.create_model("resnet10t", num_classes=state["fc.weight"].shape[0]).eval()
    model.load_state_dict(state)
    x = torch.randn(5, 3, 32, 32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), rtol=1e-4, atol=1e-4)
    assert os.path.getsize(path) > 10_000
