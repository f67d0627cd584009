"""The reference recipe as defaults and config files, and timm's training features end to end:
EMA, clipping, drop path, fine-tuning weights, validation interval and batch, class count,
per-update LR, distributed BN statistics."""
import copy
import os

import pytest
import torch
from conftest import make_trainer, read_metrics

import train_stream
from engine.config import parse_args
from engine.data import make_data
from engine.dist import Dist, setup_distributed
from model.recipe import canonical_name
from model.schedule import ScheduleConfig, lr_at, scale_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--model", "resnet10t", "--img-size", "32", "-b", "8", "-j", "1", "--log-interval", "1",
         "--warmup-epochs", "1", "--lr", "0.05", "--shuffle-buffer", "16", "--device", "cpu"]
REFERENCE = dict(model="gluon_resnet50_v1b", batch_size=256, sched="cosine", epochs=90, cooldown_epochs=0,
                 amp=True, apex_amp=True, use_multi_epochs_loader=True, opt="sgd", momentum=0.9,
                 weight_decay=1e-4, warmup_epochs=3, warmup_lr=1e-4, min_lr=1e-5, sched_on_updates=False,
                 smoothing=0.1, color_jitter=0.4, train_interpolation="random", seed=42, img_size=224,
                 crop_pct=0.875, interpolation="bicubic", mixup=0.0, cutmix=0.0, reprob=0.0)


def test_defaults_are_the_reference_run():
    """train_stream.py with only --data_path is the port's train.py with its scripts' flags (only
    Apex, which needs a source build, is opt-in); the LR follows from --lr-base 0.2 per 256.
    (Without --data_path the demo's settings replace a few: tests/test_run.py.)"""
    from engine.inference import with_model_eval_defaults  # crop_pct, interpolation: the model's config
    args = with_model_eval_defaults(parse_args(["--data_path", "/data/imagenet-wds"]))
    for key, value in REFERENCE.items():
        if key == "model":  # the port's gluon_resnet50_v1b is timm's old name of our default
            assert canonical_name(args.model) == canonical_name(value) == "resnet50.gluon_in1k"
        elif key != "apex_amp":
            assert getattr(args, key) == value, key
    assert args.lr is None and (args.lr_base, args.lr_base_size, args.lr_base_scale) == (0.2, 256, "")
    assert scale_lr(args.lr_base, 8 * args.batch_size, args.lr_base_size) == pytest.approx(1.6)  # 8p script
    assert scale_lr(args.lr_base, 1 * args.batch_size, args.lr_base_size) == pytest.approx(0.2)  # 1p script
    assert args.aa is None and args.remode == "const" and not args.model_ema and args.dist_bn == ""
    assert not args.ddp_broadcast_buffers  # the port: NativeDDP(..., broadcast_buffers=False)


@pytest.mark.parametrize("name,world,lr", [("reference_8p.yaml", 8, 1.6), ("reference_1p.yaml", 1, 0.2)])
def test_reference_configs_spell_out_the_ports_runs(name, world, lr):
    path = os.path.join(ROOT, "configs", name)
    args = parse_args(["-c", path])
    for key, value in {**REFERENCE, "lr": lr}.items():
        assert getattr(args, key) == value, key
    assert scale_lr(args.lr_base, world * args.batch_size, args.lr_base_size) == pytest.approx(args.lr)
    assert parse_args(["-c", path, "--no-apex-amp"]).apex_amp is False  # for machines without Apex


def synthetic_batches(trainer, n):
    trainer.data.train.set_epoch(0)
    return [b for b, _ in zip(trainer.data.feed(trainer.data.train), range(n))]


def test_ema_equals_timm_model_ema_v3_updated_after_every_step():
    """--model-ema: timm's ModelEmaV3 fed the model after each update with step = updates done
    (so the first update copies), as timm's train.py does."""
    from timm.utils import ModelEmaV3
    for extra in ([], ["--model-ema-warmup"]):
        trainer = make_trainer(["--synthetic", *SMALL, "--model-ema", "--model-ema-decay", "0.9", *extra])
        ref = ModelEmaV3(copy.deepcopy(trainer.plain), decay=0.9, use_warmup=bool(extra))
        for step, (images, labels) in enumerate(synthetic_batches(trainer, 4)):
            trainer.step(images, labels, step)
            ref.update(trainer.plain, step=step + 1)
        ours = trainer.ema.module.state_dict()
        for key, value in ref.module.state_dict().items():
            assert torch.equal(ours[key], value), key
        model = trainer.plain.state_dict()
        assert any(not torch.equal(ours[k], model[k]) for k in ours if ours[k].is_floating_point())


def _grads(trainer):
    return [p.grad for p in trainer.plain.parameters() if p.grad is not None]


def test_clip_grad_norm_value_and_agc():
    images, labels = synthetic_batches(make_trainer(["--synthetic", *SMALL]), 1)[0]
    free = make_trainer(["--synthetic", *SMALL])
    free.step(images, labels, 0)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in _grads(free)]))
    assert norm > 0.02
    clipped = make_trainer(["--synthetic", *SMALL, "--clip-grad", "0.01"])
    clipped.step(images, labels, 0)  # the gradients stay in .grad after the step
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in _grads(clipped)]))
    assert total == pytest.approx(0.01, rel=1e-3)
    value = make_trainer(["--synthetic", *SMALL, "--clip-grad", "1e-4", "--clip-mode", "value"])
    value.step(images, labels, 0)
    assert max(g.abs().max() for g in _grads(value)) <= 1e-4
    agc = make_trainer(["--synthetic", *SMALL, "--clip-grad", "0.01", "--clip-mode", "agc"])
    head = [agc.plain.fc.weight, agc.plain.fc.bias]
    assert all(id(p) not in {id(h) for h in head} for p in agc.clip_params)  # timm leaves the head out
    agc.step(images, labels, 0)


def test_drop_path_num_classes_and_validation_batch(demo_shards, capsys):
    import timm
    trainer = make_trainer(["--synthetic", *SMALL, "--drop-path", "0.1", "--num-classes", "7"])
    rates = [m.drop_prob for m in trainer.plain.modules() if isinstance(m, timm.layers.DropPath)]
    assert rates and max(rates) == pytest.approx(0.1) and trainer.plain.fc.out_features == 7
    args = parse_args(["--data_path", str(demo_shards), *SMALL, "-vb", "3"])
    data = make_data(args, Dist(0, 1, 0, 1, setup_distributed("cpu").device))
    assert data.val.dataset.batch_size == 3 and data.train.dataset.batch_size == 8 and data.num_classes == 6
    code = train_stream.main(["--data_path", str(demo_shards), *SMALL, "--num-classes", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "--num-classes 5 does not match the 6 classes" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, device, where", [
    ([], "cpu", "workers"),  # auto: the workers when the CPU trains
    ([], "cuda", "device"),
    (["--jitter-in", "device"], "cpu", "device"),
    (["--jitter-in", "workers"], "cuda", "workers"),
    (["--loader", "dali"], "cpu", "device"),
    (["--synthetic"], "cpu", "device"),
    (["--aa", "rand-m9-mstd0.5"], "cpu", None),  # RandAugment replaces it, as in timm
    (["--color-jitter", "0"], "cpu", None),
])
def test_jitter_runs_where_it_is_cheaper(argv, device, where):
    from engine.config import jitter_place
    assert jitter_place(parse_args(argv), device) == where


def test_cpu_run_jitters_in_the_workers_and_not_on_the_device(demo_shards):
    from pipeline.augment import WorkerColorJitter
    d = Dist(0, 1, 0, 1, setup_distributed("cpu").device)
    data = make_data(parse_args(["--data_path", str(demo_shards), *SMALL]), d)
    assert isinstance(data.train.dataset.builder.transform.augment, WorkerColorJitter)
    assert data.augment is None or data.augment.jitter is None
    data = make_data(parse_args(["--data_path", str(demo_shards), *SMALL, "--jitter-in", "device"]), d)
    assert data.train.dataset.builder.transform.augment is None and data.augment.jitter is not None


def test_sched_on_updates_changes_the_lr_every_update():
    """The trainer's LR follows lr_at in the mode the flags pick: per epoch by default, per
    update with --sched-on-updates (synthetic data: 100 steps per epoch)."""
    for extra, on_updates in (([], False), (["--sched-on-updates"], True)):
        trainer = make_trainer(["--synthetic", *SMALL, *extra])
        cfg = ScheduleConfig(0.05, 90, 100, warmup_epochs=1, on_updates=on_updates)
        assert trainer.sched_cfg == cfg
        lrs = []
        for step, (images, labels) in zip((0, 1, 2, 150), synthetic_batches(trainer, 4)):
            trainer.step(images, labels, step)
            lrs.append(float(trainer.optimizer.param_groups[0]["lr"]))
        assert lrs == pytest.approx([lr_at(s, cfg) for s in (0, 1, 2, 150)], rel=1e-6)  # float32 LR tensor
        assert (len(set(lrs[:3])) == 3) is on_updates


@pytest.mark.slow
def test_features_train_validate_checkpoint_and_resume(demo_shards, tmp_path, capsys):
    """EMA, mixup + cutmix, erasing, RandAugment, clipping and drop path in one run; validation and
    checkpoints every 2nd epoch and at the end; the EMA in the checkpoint and back on resume."""
    out = str(tmp_path / "run")
    common = ["--data_path", str(demo_shards), *SMALL, "--model-ema", "--model-ema-decay", "0.9",
              "--mixup", "0.2", "--cutmix", "1.0", "--reprob", "0.25", "--aa", "rand-m9-mstd0.5",
              "--clip-grad", "5", "--drop-path", "0.05", "-vb", "4", "--output", str(tmp_path), "--experiment", "run"]
    code = train_stream.main([*common, "--epochs", "3", "--val-interval", "2"])
    assert code == 0, capsys.readouterr().err
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows if r["kind"] == "val"] == [1, 2]
    assert [r["epoch"] for r in rows if r["kind"] == "val_ema"] == [1, 2]
    assert len([r for r in rows if r["kind"] == "epoch"]) == 3
    ckpt = torch.load(os.path.join(out, "last.pth"), weights_only=True)
    assert ckpt["epoch"] == 2 and set(ckpt["state_dict_ema"]) == set(ckpt["model"])
    assert ckpt["metric"] == [r for r in rows if r["kind"] == "val_ema"][-1]["top1"]  # the EMA ranks best, as timm
    # resume: the EMA comes back from the checkpoint, not from the model
    trainer = make_trainer([*common, "--epochs", "4", "--resume", os.path.join(out, "last.pth")])
    assert trainer.start_epoch == 3
    ema = trainer.ema.module.state_dict()
    assert all(torch.equal(ema[k], v) for k, v in ckpt["state_dict_ema"].items())
    assert any(not torch.equal(ckpt["model"][k], v) for k, v in ckpt["state_dict_ema"].items()
               if v.is_floating_point())


def test_initial_checkpoint_and_pretrained_path_load_local_weights(tmp_path, capsys):
    import timm
    source = timm.create_model("resnet10t", num_classes=6)
    torch.save({"model": source.state_dict(), "epoch": 0}, tmp_path / "ours.pth")  # our checkpoint layout
    torch.save(source.state_dict(), tmp_path / "plain.pth")  # a bare state dict, as timm's hub files
    started = make_trainer(["--synthetic", *SMALL, "--num-classes", "6", "--initial-checkpoint",
                            str(tmp_path / "ours.pth")])
    for k, v in source.state_dict().items():
        assert torch.equal(started.plain.state_dict()[k], v), k
    tuned = make_trainer(["--synthetic", *SMALL, "--num-classes", "3",
                          "--pretrained-path", str(tmp_path / "plain.pth")])
    assert torch.equal(tuned.plain.conv1[0].weight, source.conv1[0].weight) and tuned.plain.fc.out_features == 3
    for argv, message in ((["--num-classes", "3", "--initial-checkpoint", str(tmp_path / "ours.pth")], "does not fit"),
                          (["--pretrained-path", str(tmp_path / "missing.pth")], "does not exist")):
        code = train_stream.main(["--synthetic", *SMALL, *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_pretrained_without_weights_is_one_line(monkeypatch, tmp_path, capsys):
    """No network and no hub cache: a clear refusal, naming the way out (--pretrained-path)."""
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    code = train_stream.main(["--synthetic", *SMALL, "--pretrained"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot obtain pretrained weights for resnet10t" in err and "--pretrained-path" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,message", [
    (["--mixup", "0.5", "-b", "7"], "-b must be even"),
    (["--aa", "bogus-m5"], "unknown augmentation policy"),
    (["--aa", "rand-m9", "--decode", "gpu"], "does not combine with --decode gpu"),
    (["--aa", "rand-m9", "--loader", "dali"], "does not combine with --loader dali"),
    (["--jitter-in", "workers"], "--jitter-in workers runs in our loader's workers"),
    (["--reprob", "1.5"], "--reprob must be in [0, 1]"),
    (["--cutmix-minmax", "0.8", "0.2"], "--cutmix-minmax"),
    (["--val-interval", "0"], "--val-interval must be at least 1"),
    (["-vb", "0"], "--validation-batch-size must be at least 1"),
])
def test_recipe_flag_errors_are_one_line(argv, message, capsys):
    code = train_stream.main(["--synthetic", *SMALL, *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_with_ema_mixup_erasing_and_clipping_has_no_host_sync():
    trainer = make_trainer(["--synthetic", *SMALL, "--device", "cuda", "--model-ema", "--mixup", "0.8",
                            "--cutmix", "1.0", "--reprob", "0.5", "--clip-grad", "1.0", "--amp-dtype", "float16"])
    trainer.data.augment.set_epoch(0)
    it = iter(trainer.data.feed(trainer.data.train))
    for step in range(3):  # warm-up: lazy initialisation, cuDNN autotuning, the fused-SGD probe
        trainer.step(*next(it), step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3, 8):
            trainer.step(*next(it), step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _bn_worker(rank, world, port, results):
    import torch.distributed as dist

    from common.errors import ConfigError
    from engine.dist import distribute_bn, sync_batchnorm
    from model.device import Device
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    d = Dist(rank, world, rank, world, Device("cpu"))
    out = {}
    for mode in ("reduce", "broadcast", ""):
        bn = torch.nn.BatchNorm2d(3)
        bn.running_mean.fill_(rank + 1.0)
        bn.running_var.fill_(10.0 * (rank + 1))
        distribute_bn(bn, d, mode)
        out[mode] = (bn.running_mean.tolist(), bn.running_var.tolist(), int(bn.num_batches_tracked))
    try:
        sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), d)
    except ConfigError as e:
        out["sync"] = str(e)
    results[rank] = out
    dist.destroy_process_group()


@pytest.mark.slow
def test_dist_bn_reduce_and_broadcast_over_two_processes():
    """timm's --dist-bn on a real 2-process gloo group: reduce averages the running statistics,
    broadcast copies rank 0's, '' keeps each rank's; --sync-bn refuses the CPU."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_bn_worker, args=(2, port, results), nprocs=2, join=True)
    for rank in (0, 1):
        r = results[rank]
        assert r["reduce"][:2] == ([1.5] * 3, [15.0] * 3)
        assert r["broadcast"][:2] == ([1.0] * 3, [10.0] * 3)
        assert r[""][:2] == ([rank + 1.0] * 3, [10.0 * (rank + 1)] * 3)
        assert "SyncBatchNorm does not run on the CPU" in r["sync"]
