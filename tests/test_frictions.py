"""What a new user (often coming from timm's train.py) meets first: flags that keep their
meaning, paths refused at once, Ctrl-C that checkpoints, files timm's loaders read, a thread
count that leaves the loader its cores, the evaluation geometry of the model's own config."""
import os
import signal
import socket
import subprocess
import sys
import warnings

import pytest
import torch

from common.errors import ConfigError
from engine.flags import build_parser, parse_config
from tests.conftest import ROOT, SMALL, child_env, read_metrics, run_folder, run_main, torchrun_cmd

PY = sys.executable


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line
    return err


# ---------------------------------------------------------------- flags
def test_no_prefix_matching_and_the_nearest_flag_is_named(capsys):
    args = build_parser().parse_args(["--drop", "0.2"])  # timm's dropout, never silently --drop-path
    assert args.drop == 0.2 and args.drop_path is None
    assert "did you mean --drop-path?" in _error(["--drop-pat", "0.2"], capsys)
    assert "did you mean --epochs?" in _error(["--epoch", "3"], capsys)
    assert "did you mean --batch-size?" in _error(["--bach-size", "3"], capsys)
    err = _error(["--lr", "0.1", "/data/imagenet"], capsys)  # timm's positional data folder
    assert "--data_path /data/imagenet" in err
    assert "did you mean" not in _error(["--zzzz"], capsys)


def test_data_dir_is_timms_name_for_data_path():
    assert build_parser().parse_args(["--data-dir", "/d"]).data_path == "/d"


def test_empty_choices_are_readable_in_help():
    text = build_parser().format_help()
    assert "{reduce,broadcast,''}" in text and "{'',linear,sqrt}" in text
    assert "broadcast,}" not in text and "{,linear" not in text


def test_yaml_syntax_error_names_its_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet10t\nepochs: 2\nlr: [0.1\nsmoothing: 0.1\n")
    with pytest.raises(SystemExit):
        parse_config(["-c", str(bad)])
    err = capsys.readouterr().err
    assert "line " in err and err.count("\n") == 1
    line = int(err.split("line ")[1].split(",")[0])
    assert line in (3, 4, 5)  # where the unclosed list is found, not "line 1" nor none


# ---------------------------------------------------------------- paths, before torch loads
def _main_in_child(args, tmp_path):
    """train_stream's main in a fresh interpreter: (status, stderr, whether torch was imported)."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r})\nfrom engine.cli import main\n"
            f"rc = main({args!r})\nprint(rc, 'torch' in sys.modules)\n")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=child_env(), timeout=120)
    rc, torch_loaded = r.stdout.split()
    return int(rc), r.stderr, torch_loaded == "True"


@pytest.mark.slow
def test_bad_paths_are_refused_without_importing_torch(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for args, expect in [(["--data_path", str(tmp_path / "missing")], "does not exist"),
                         (["--data_path", str(a_file)], "is not a folder"),
                         (["--synthetic", "--output", str(a_file)], "is a file, not a folder"),
                         (["--synthetic", "--output", str(a_file / "sub")], "is a file, not a folder")]:
        rc, err, torch_loaded = _main_in_child(args, tmp_path)
        assert rc == 2 and expect in err and err.count("\n") == 1, (args, err)
        assert not torch_loaded, args


def _checkpoint(path, config):
    torch.save({"model": {}, "optimizer": {}, "epoch": 0, "config": config}, path)
    return str(path)


def test_resume_without_data_path_uses_the_one_the_checkpoint_records(tmp_path):
    data = tmp_path / "wds"
    data.mkdir()
    ckpt = _checkpoint(tmp_path / "a.pth", {"data_path": str(data), "model": "resnet10t"})
    config, notes = parse_config(["--resume", ckpt])
    assert config.data.data_path == str(data)
    assert config.data.img_size == 224  # not the demo's defaults
    assert any("recorded in" in n for n in notes)
    # --data_path given: it wins, nothing is read
    config, notes = parse_config(["--resume", ckpt, "--data_path", "/elsewhere"])
    assert config.data.data_path == "/elsewhere" and not any("recorded" in n for n in notes)
    # a demo run's checkpoint records no path: the demo again
    demo = _checkpoint(tmp_path / "demo.pth", {"data_path": None})
    assert parse_config(["--resume", demo])[0].data.data_path is None


def test_resume_refuses_a_recorded_pipe_or_a_vanished_path(tmp_path):
    piped = _checkpoint(tmp_path / "p.pth", {"data_path": "pipe:curl -s http://x/{}"})
    with pytest.raises(ConfigError, match="pass --data_path"):
        parse_config(["--resume", piped])
    gone = _checkpoint(tmp_path / "g.pth", {"data_path": str(tmp_path / "gone")})
    with pytest.raises(ConfigError, match="is gone; pass --data_path"):
        parse_config(["--resume", gone])


# ---------------------------------------------------------------- Ctrl-C
def test_ctrl_c_stops_at_the_next_step_like_sigterm(monkeypatch):
    from engine.control import Control, reason
    from engine.dist import Dist
    from model.device import Device
    c = Control(Dist(0, 1, 0, 1, Device("cpu")))
    c.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: a stop request
        code, _ = c.poll()
        assert code == signal.SIGINT and reason(code) == "got SIGINT"
        # under torchrun the terminal's Ctrl-C comes again from torchrun: the same stop
        exits = []
        monkeypatch.setattr(os, "_exit", exits.append)
        c.parent = os.getppid()
        c._on_signal(signal.SIGINT, None)
        assert exits == []
        c.signal_at -= 10  # a second Ctrl-C later: exits at once, as a second SIGTERM
        c._on_signal(signal.SIGINT, None)
        assert exits == [128 + signal.SIGINT]
    finally:
        c.uninstall()


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resume_says_where_it_continues(demo_shards, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data_path", str(demo_shards), *SMALL, "--epochs", "2", *run_folder(out)]
    proc = subprocess.Popen([PY, os.path.join(ROOT, "train_stream.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(), cwd=tmp_path, start_new_session=True)
    for line in proc.stdout:  # the first logged step: training runs
        if "loss" in line and "epoch" in line.lower():
            break
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the loader workers get it too
    _, err = proc.communicate(timeout=120)
    ours = [line for line in err.splitlines() if line.startswith("train_stream:")]
    assert proc.returncode == 75 and len(ours) == 1 and "stopped (got SIGINT)" in ours[0], err[-2000:]
    assert "--resume" in ours[0] and "Traceback" not in err
    # an explicit --resume, without --data_path: the recorded data, and where it continues
    code, stdout, stderr = run_main(["--resume", str(out / "last.pth"), *SMALL, "--epochs", "2"], capsys)
    assert code == 0, stderr
    assert "recorded in" in stdout and "resuming at epoch 0 step " in stdout
    assert [r["epoch"] for r in read_metrics(out) if r["kind"] == "val"] == [0, 1]


@pytest.mark.slow
def test_ctrl_c_under_torchrun_checkpoints_with_one_line(demo_shards, tmp_path):
    out = tmp_path / "run"
    cmd = torchrun_cmd(["--data_path", str(demo_shards), *SMALL, "--epochs", "2", *run_folder(out)])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(),
                            cwd=tmp_path, start_new_session=True)
    for line in proc.stdout:
        if "loss" in line and "epoch" in line.lower():
            break
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C reaches torchrun and both ranks; torchrun repeats it
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ours = [line for line in err.splitlines() if line.startswith("train_stream:")]
    assert len(ours) == 1 and "stopped (got SIGINT)" in ours[0] and "--auto-resume" in ours[0], err[-3000:]
    assert "without a checkpoint" not in err and "broadcast_buffers" not in err
    assert torch.load(out / "last.pth", weights_only=True)["position"]["step"] > 0


# ---------------------------------------------------------------- checkpoints
def _tiny(seed=0):
    import timm
    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=3, pretrained=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt


def _step(model, opt):
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()


def test_timm_resumes_our_checkpoints_and_we_read_theirs(tmp_path):
    from timm.models import load_checkpoint as timm_load
    from timm.models import resume_checkpoint

    from model.checkpoint import CheckpointSaver, resume
    model, opt = _tiny(0)
    _step(model, opt)
    saver = CheckpointSaver(str(tmp_path / "run"))
    saver.save(3, model, opt, None, None, {"model": "resnet10t"}, metric=1.0)
    path = str(tmp_path / "run" / "last.pth")
    state = torch.load(path, weights_only=True)
    assert state["arch"] == "resnet10t" and state["version"] == 2
    other, other_opt = _tiny(1)
    assert resume_checkpoint(other, path, other_opt, log_info=False) == 4  # timm: the next epoch
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    ours, theirs = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k]["momentum_buffer"], theirs[k]["momentum_buffer"]) for k in ours)
    third, _ = _tiny(2)
    timm_load(third, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), third.state_dict().values()))
    # one copy of the weights although two keys name them
    old_style = {k: v for k, v in state.items() if k not in ("state_dict", "arch", "version")}
    torch.save(old_style, tmp_path / "old.pth")
    assert os.path.getsize(path) < 1.05 * os.path.getsize(tmp_path / "old.pth")
    # our loader: files of older versions (`model` only) and files with `state_dict` only
    del state["model"]
    torch.save(state, tmp_path / "new.pth")
    for name in ("old.pth", "new.pth"):
        m, o = _tiny(4)
        resume(str(tmp_path / name), m, o, None)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m.state_dict().values()))


def test_best_is_a_hard_link_of_last_not_a_second_copy(tmp_path, monkeypatch):
    from model.checkpoint import CheckpointSaver
    model, opt = _tiny(0)
    saver = CheckpointSaver(str(tmp_path))
    last, best = tmp_path / "last.pth", tmp_path / "best.pth"
    saver.save(0, model, opt, None, None, {}, metric=1.0)
    assert os.stat(last).st_ino == os.stat(best).st_ino
    saver.save(1, model, opt, None, None, {}, metric=0.5)  # no better: best keeps epoch 0
    assert os.stat(last).st_ino != os.stat(best).st_ino
    assert torch.load(best, weights_only=True)["epoch"] == 0
    assert torch.load(last, weights_only=True)["epoch"] == 1
    # a file system without hard links: a copy
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("no links")))
    saver.save(2, model, opt, None, None, {}, metric=2.0)
    assert os.stat(last).st_ino != os.stat(best).st_ino and best.read_bytes() == last.read_bytes()
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# ---------------------------------------------------------------- DDP
def test_ddp_is_built_without_the_deprecated_argument_warning():
    import torch.distributed as dist

    from engine.builder import wrap_ddp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        for broadcast in (False, True):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ddp = wrap_ddp(torch.nn.Linear(4, 2), None, broadcast)
            assert not [w for w in caught if "broadcast_buffers" in str(w.message)], broadcast
            synced = getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", None))
            assert synced is broadcast
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- threads
def test_default_threads_leave_the_loader_workers_their_cores(monkeypatch):
    import common.host
    from engine.runtime import configure_torch, resolve_threads
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, expected in [(2, 1), (16, 4), (64, 52)]:  # workers: cores - 1, at most 12
        monkeypatch.setattr(common.host, "usable_cores", lambda c=cores: c)
        assert resolve_threads(None, None) == expected
    monkeypatch.setattr(common.host, "usable_cores", lambda: 16)
    assert resolve_threads(None, 2) == 14  # -j 2
    assert resolve_threads(None, None, processes_per_node=4) == 1  # 4 cores each, 3 workers
    assert resolve_threads(None, None, loader_workers=False) == 16  # --synthetic: no workers
    assert resolve_threads(3, None) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert resolve_threads(None, None) is None  # the user's OMP_NUM_THREADS stays torch's
    before = torch.get_num_threads()
    try:
        assert configure_torch(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="--threads"):
        parse_config(["--threads", "0"])


# ---------------------------------------------------------------- precision
def test_float16_on_a_cpu_falls_back_with_one_line(cpu_bf16):
    from engine.config import Config
    from engine.runtime import precision_for
    from model.device import Device
    lines = []
    p = precision_for(Config.create(amp_dtype="float16"), Device("cpu"), say=lines.append)
    assert p.dtype_name == ("bfloat16" if cpu_bf16 else "float32")
    assert len(lines) == 1 and "float16" in lines[0] and p.dtype_name in lines[0]
    lines.clear()
    p = precision_for(Config.create(amp_dtype="bfloat16"), Device("cpu"), say=lines.append)
    assert p.dtype_name == "bfloat16" and lines == []  # asked for explicitly: honoured


# ---------------------------------------------------------------- evaluation geometry
def test_eval_crop_and_interpolation_default_to_the_models_config():
    from engine.config import Config
    from engine.flags import parse_args
    from engine.inference import with_model_eval_defaults
    a1 = with_model_eval_defaults(Config.create(model="resnet18.a1_in1k"))  # timm: crop_pct 0.95
    assert (a1.data.img_size, a1.data.crop_pct, a1.data.interpolation) == (224, 0.95, "bicubic")
    ref = with_model_eval_defaults(Config.create())  # the reference model keeps the reference values
    assert (ref.data.img_size, ref.data.crop_pct, ref.data.interpolation) == (224, 0.875, "bicubic")
    given = with_model_eval_defaults(Config.create(model="resnet18.a1_in1k", crop_pct=0.8, interpolation="bilinear"))
    assert (given.data.crop_pct, given.data.interpolation) == (0.8, "bilinear")
    run = with_model_eval_defaults(parse_args(["--synthetic", "--no-output", "--model", "resnet18.a1_in1k"]))
    assert run.crop_pct == 0.95 and run.run_dir is None  # a Resolved stays one


# ---------------------------------------------------------------- set-up
def test_make_demo_installs_only_what_the_demo_needs(tmp_path):
    r = subprocess.run(["make", "-n", "demo", f"VENV={tmp_path}/venv"], capture_output=True, text=True, cwd=ROOT)
    if r.returncode == 127 or "not found" in r.stderr:
        pytest.skip("no make")
    assert r.returncode == 0, r.stderr
    assert "-r requirements.txt" in r.stdout and "requirements-test.txt" not in r.stdout
    r = subprocess.run(["make", "-n", "lint", f"VENV={tmp_path}/venv"], capture_output=True, text=True, cwd=ROOT)
    assert "-r requirements-test.txt" in r.stdout
