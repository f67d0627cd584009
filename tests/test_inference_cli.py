"""validate/predict/export as a user meets them without training first: help before imports,
checkpoints that are not ours (timm's train.py, hostile ones), a recorded pipe: command, weights
that were never asked for, and the eval geometry of timm's pretrained configs."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from engine.inference import Loaded, load_model
from tools import predict as predict_tool
from tools import validate as validate_tool

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("tool,argv", [
    ("validate", ["--help"]), ("predict", ["--help"]), ("export", ["--help"]),
    ("export", ["some.pth"]),  # no -o: argparse's usage error
    ("predict", ["resnet50", "cat.jpg"]),  # a model name without weights: refused before any import
])
def test_help_and_usage_errors_do_not_import_torch(tool, argv):
    wrapper = ("import runpy, sys\n"
               f"sys.argv = [{tool!r}] + {argv!r}\n"
               "try:\n"
               f"    runpy.run_path('tools/{tool}.py', run_name='__main__')\n"
               "except SystemExit as e:\n"
               "    code = e.code\n"
               "print('IMPORTED', sorted(m for m in ('torch', 'timm', 'numpy') if m in sys.modules), code)\n")
    proc = subprocess.run([sys.executable, "-c", wrapper], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "IMPORTED [] " in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("0" if argv == ["--help"] else "2")


def _tiny_state(num_classes=3):
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=num_classes).state_dict()


def test_a_pipe_path_recorded_in_a_checkpoint_is_not_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "last.pth"
    config = {"model": "resnet10t", "img_size": 32, "data_path": f"pipe:touch {marker}; cat {tmp_path}/{{}}"}
    torch.save({"model": _tiny_state(), "config": config, "num_classes": 3}, ckpt)
    assert validate_tool.main([str(ckpt), "--device", "cpu"]) == 2
    one_line_error(capsys, "validate: error:", "a shell command", "pass --data explicitly")
    assert not marker.exists()
    # typed on the command line, the same source is the user's to run
    assert validate_tool.data_source(config["data_path"], config) == config["data_path"]
    assert validate_tool.data_source(None, {"data_path": "/data/wds"}) == "/data/wds"


def _timm_saver_checkpoint(folder: Path, num_classes: int):
    """What timm's train.py writes: its CheckpointSaver, with the flags as an argparse.Namespace."""
    from timm.utils import CheckpointSaver, ModelEmaV3
    torch.manual_seed(1)
    model = timm.create_model("resnet10t", num_classes=num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # an optimizer state with momentum buffers, as after training
    args = argparse.Namespace(model="resnet10t", lr=0.1, epochs=3, input_size=None, crop_pct=None,
                              device="cpu", amp_dtype="float16", data_dir=str(folder))
    saver = CheckpointSaver(model, optimizer, args=args, model_ema=ModelEmaV3(model), checkpoint_dir=str(folder),
                            recovery_dir=str(folder), max_history=2)
    saver.save_checkpoint(epoch=0, metric=12.5)
    return model, folder / "model_best.pth.tar"


def test_a_checkpoint_of_timms_train_py_is_read(tmp_path):
    model, path = _timm_saver_checkpoint(tmp_path, num_classes=6)
    assert path.is_file() and isinstance(torch.load(path, weights_only=False)["args"], argparse.Namespace)
    from model.checkpoint import timm_model_name
    assert timm_model_name(str(path)) == "resnet10t"  # timm's args.model: no --model needed
    loaded = load_model(str(path), model_name="resnet10t")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, msg=key)
    assert loaded.num_classes == 6
    ema = load_model(str(path), model_name="resnet10t", ema=True)
    assert ema.model.state_dict().keys() == model.state_dict().keys()


@pytest.mark.slow
def test_validate_scores_a_checkpoint_of_timms_train_py(tmp_path, demo_folder, capsys):
    _, path = _timm_saver_checkpoint(tmp_path, num_classes=6)
    assert validate_tool.main([str(path), "--data", str(demo_folder), "-j", "0",
                               "-b", "16", "--device", "cpu", "--use-ema", "--img-size", "64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == result["images_expected"] > 0 and result["source"] == str(path)
    assert result["model"] == "resnet10t" and result["img_size"] == 64


class _Touch:
    """A hostile object: unpickling it in full would create the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_holding_another_class_is_refused(tmp_path, capsys):
    marker = str(tmp_path / "unpickled")
    path = tmp_path / "hostile.pth.tar"
    torch.save({"state_dict": _tiny_state(), "args": argparse.Namespace(model="resnet10t"),
                "hook": _Touch(marker)}, path)
    assert not os.path.exists(marker)
    assert validate_tool.main([str(path), "--data", str(tmp_path), "--device", "cpu"]) == 2
    one_line_error(capsys, f"cannot read checkpoint {path}: it holds io.open", "not an allowed type")
    assert not os.path.exists(marker)


def test_predict_refuses_random_weights_unless_asked(demo_folder, capsys):
    image = str(next((demo_folder / "val").rglob("*.JPEG")))
    assert predict_tool.main(["resnet10t", image]) == 2
    one_line_error(capsys, "predict: error: resnet10t is a model name without weights", "--pretrained",
                   "--random-weights")
    assert predict_tool.main(["resnet10t", image, "--random-weights", "--top", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(image + ": ") and out.count("%") == 2


def _loaded(name, config=None):
    return Loaded(timm.create_model(name, pretrained=False), name, 1000, config=config or {})


def test_eval_geometry_is_the_models_pretrained_config_as_in_timms_validate():
    geometry = validate_tool.eval_geometry
    a1 = _loaded("resnet18.a1_in1k")  # timm's cfg: 224 px, crop_pct 0.95; at test time 288 px, crop_pct 1.0
    assert geometry(a1) == (288, 1.0, "bicubic")
    assert geometry(a1, use_train_size=True) == (224, 0.95, "bicubic")
    assert geometry(a1, 160, 0.9, "bilinear") == (160, 0.9, "bilinear")  # flags win
    assert geometry(a1, crop_pct=0.8, use_train_size=True) == (224, 0.8, "bicubic")
    # the reference model keeps its values
    assert geometry(_loaded("resnet50.gluon_in1k")) == (224, 0.875, "bicubic")
    # a checkpoint of our trainer: its run's validation settings, then the flags
    ours = _loaded("resnet18.a1_in1k", {"img_size": 64, "val_res": 72, "crop_pct": 0.875,
                                        "interpolation": "bilinear"})
    assert geometry(ours) == (72, 0.875, "bilinear")
    assert geometry(ours, crop_pct=0.95) == (72, 0.95, "bilinear")


@pytest.mark.slow
def test_validate_uses_the_models_geometry_end_to_end(demo_folder, capsys):
    assert validate_tool.main(["resnet18.a1_in1k", "--num-classes", "6", "--data", str(demo_folder), "-j", "0",
                               "-b", "30", "--device", "cpu", "--use-train-size"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["img_size"], result["crop_pct"], result["interpolation"]) == (224, 0.95, "bicubic")
    assert result["n"] == result["images_expected"] > 0


def test_eval_normalisation_is_the_one_the_run_trained_with():
    """validate/predict/export normalise as the run did: its --mean/--std, else the model's
    pretrained config, else ImageNet's."""
    from engine.inference import Loaded, eval_mean_std
    from pipeline.autoaugment import resolve_mean_std
    model = torch.nn.Linear(1, 1)
    assert eval_mean_std(Loaded(model, "m", 2, [], {"mean": [0.5], "std": [0.25]}, "ckpt")) == \
        ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert eval_mean_std(Loaded(model, "m", 2, [], {}, "ckpt")) == resolve_mean_std(None, None)  # ImageNet's
    model.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # e.g. an inception-style model
    assert eval_mean_std(Loaded(model, "m", 2, [], {}, "ckpt")) == ((0.5,) * 3, (0.5,) * 3)
