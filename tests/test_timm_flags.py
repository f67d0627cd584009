"""timm's options as flags: each reaches its component with timm's meaning (compared with timm's
own factories), a timm args.yaml with them is applied, and gradient accumulation updates as one
batch of N times the size would."""
import math

import pytest
import torch
import yaml
from conftest import read_metrics, run_main

from common.errors import ConfigError
from engine.builder import build, updates_per_epoch
from engine.config import Config
from engine.flags import parse_config
from engine.resolved import resolve
from engine.trainer import Trainer

TINY = ["--synthetic", "--model", "resnet10t", "--img-size", "32", "-b", "4", "--no-output", "--no-amp",
        "--epochs", "6", "--warmup-epochs", "1"]


def parts_of(*argv):
    config, _ = parse_config([*TINY, *argv])
    return build(resolve(config))


def test_opt_adamw_is_timms_with_its_param_groups_and_sqrt_lr_scaling():
    from timm.optim import create_optimizer_v2
    parts = parts_of("--opt", "adamw", "--opt-eps", "1e-6", "--opt-betas", "0.8", "0.95", "--weight-decay", "0.05")
    opt = parts.optimizer
    assert type(opt).__name__ == "AdamW"
    assert parts.lr == pytest.approx(0.2 * math.sqrt(4 / 256))  # timm: sqrt for Ada*/LAMB without --lr
    theirs = create_optimizer_v2(parts.plain, "adamw", lr=parts.lr, weight_decay=0.05, eps=1e-6, betas=(0.8, 0.95))
    assert len(opt.param_groups) == len(theirs.param_groups)
    for ours, ref in zip(opt.param_groups, theirs.param_groups):
        assert [id(p) for p in ours["params"]] == [id(p) for p in ref["params"]]
        for key in ("weight_decay", "eps", "betas"):
            assert ours[key] == ref[key]
    assert parts_of("--opt", "sgd").lr == pytest.approx(0.2 * 4 / 256)  # linear for SGD, unchanged


def test_unknown_opt_is_one_line_after_parsing():
    with pytest.raises(ConfigError, match="--opt adamx: unknown optimizer"):
        parse_config(["--opt", "adamx"])
    assert parse_config(["--opt", "lookahead_adamw"])[0].opt == "lookahead_adamw"


@pytest.mark.parametrize("sched,extra", [("multistep", ["--decay-milestones", "2", "4", "--decay-rate", "0.5"]),
                                         ("poly", ["--decay-rate", "2"])])
def test_sched_flags_give_timms_lr_sequence(sched, extra):
    from timm.scheduler import create_scheduler_v2
    parts = parts_of("--sched", sched, "--lr", "0.1", "--min-lr", "0.001", "--warmup-lr", "0.01",
                     "--cooldown-epochs", "0", *extra)
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    kw = dict(decay_milestones=(2, 4), decay_rate=0.5) if sched == "multistep" else dict(decay_rate=2.0)
    theirs, _ = create_scheduler_v2(holder, sched, num_epochs=6, warmup_epochs=1, warmup_lr=0.01, min_lr=0.001,
                                    cooldown_epochs=0, **kw)
    spe = parts.schedule.cfg.steps_per_epoch
    for epoch in range(6):
        theirs.step(epoch)
        assert parts.schedule.step(epoch * spe) == pytest.approx(holder.param_groups[0]["lr"], rel=1e-12)


def test_plateau_follows_the_eval_metric_and_is_restored_on_resume(tmp_path):
    parts = parts_of("--sched", "plateau", "--patience-epochs", "0", "--eval-metric", "loss", "--lr", "0.1",
                     "--warmup-epochs", "0", "--decay-rate", "0.5")
    s = parts.schedule
    assert s.cfg.plateau_mode == "min" and not s.cfg.on_updates
    s.metric(0, 2.0)
    s.metric(1, 3.0)  # a loss that got worse: cut
    spe = s.cfg.steps_per_epoch
    assert s.step(2 * spe) == pytest.approx(0.05)
    from model.checkpoint import CheckpointSaver
    saver = CheckpointSaver(str(tmp_path))
    saver.save(1, parts.plain, parts.optimizer, parts.precision, s, {}, metric=3.0, higher_is_better=False,
               position={"epoch": 2, "step": 0})
    again = parts_of("--sched", "plateau", "--patience-epochs", "0", "--eval-metric", "loss", "--lr", "0.1",
                     "--warmup-epochs", "0", "--decay-rate", "0.5", "--resume", saver.last_path)
    assert again.start.epoch == 2
    assert again.schedule.step(2 * spe) == pytest.approx(0.05)
    assert again.schedule.state_dict()["plateau"] == s.state_dict()["plateau"]


@pytest.mark.parametrize("metric,cuts", [("loss", 2), ("top1", 0)])
def test_fit_feeds_the_eval_metric_to_plateau_after_each_validation(metric, cuts):
    """Losses 2, 3, 4 (worse each epoch) with top-1 30, 40, 50 (better): only a loss metric cuts."""
    trainer = Trainer(parts_of("--sched", "plateau", "--eval-metric", metric, "--epochs", "3", "--warmup-epochs", "0",
                               "--patience-epochs", "0", "--decay-rate", "0.5", "--lr", "0.1"))
    results = [{"top1": 30.0 + 10 * e, "top5": 90.0, "loss": 2.0 + e, "n": 10, "complete": True} for e in range(3)]
    trainer.train_epoch = lambda epoch, epochs, start=0: trainer.steps_per_epoch
    trainer.validate = lambda epoch, model=None, kind="val": results[epoch]
    trainer.data_stats = dict
    trainer.fit()
    assert trainer.schedule.lr(3 * trainer.updates_per_epoch) == pytest.approx(0.1 * 0.5 ** cuts)


def test_eval_metric_loss_ranks_lowest_first(tmp_path):
    parts = parts_of()
    from model.checkpoint import CheckpointSaver
    saver = CheckpointSaver(str(tmp_path), hist=2)
    bests = [saver.save(e, parts.plain, parts.optimizer, parts.precision, parts.schedule, {}, metric=m,
                        higher_is_better=False) for e, m in enumerate([2.0, 1.0, 3.0])]
    assert bests == [True, True, False]
    assert [r[0] for r in saver.history] == ["checkpoint-1.pth.tar", "checkpoint-0.pth.tar"]


def test_bce_flags_reach_timms_binary_cross_entropy():
    from timm.loss import BinaryCrossEntropy
    crit = parts_of("--bce-loss", "--bce-target-thresh", "0.2", "--bce-sum", "--bce-pos-weight", "2").criterion
    assert isinstance(crit, BinaryCrossEntropy)
    assert crit.target_threshold == 0.2 and crit.sum_classes and float(crit.pos_weight) == 2.0
    assert isinstance(parts_of().criterion, torch.nn.CrossEntropyLoss)  # the reference path
    with pytest.raises(ConfigError, match="need --bce-loss"):
        parse_config(["--bce-sum"])


def test_drop_start_epoch_and_no_resume_opt(tmp_path):
    parts = parts_of("--drop", "0.3", "--opt", "adamw")
    assert parts.plain.drop_rate == 0.3
    parts.plain.train()
    out = parts.plain(torch.randn(2, 3, 32, 32))
    out.sum().backward()
    parts.optimizer.step()
    from model.checkpoint import CheckpointSaver
    saver = CheckpointSaver(str(tmp_path))
    saver.save(0, parts.plain, parts.optimizer, parts.precision, parts.schedule, {}, position={"epoch": 1, "step": 0})
    weights_only = parts_of("--drop", "0.3", "--opt", "adamw", "--resume", saver.last_path, "--no-resume-opt")
    assert not weights_only.optimizer.state  # fresh AdamW moments
    for a, b in zip(parts.plain.state_dict().values(), weights_only.plain.state_dict().values()):
        assert torch.equal(a, b)
    full = parts_of("--drop", "0.3", "--opt", "adamw", "--resume", saver.last_path)
    assert full.optimizer.state and full.start.epoch == 1
    later = parts_of("--resume", saver.last_path, "--start-epoch", "4")
    assert later.start.epoch == 4 and later.start.step == 0
    assert parts_of("--start-epoch", "3").start.epoch == 3
    with pytest.raises(ConfigError, match="--no-resume-opt applies to --resume"):
        parse_config(["--no-resume-opt"])


def test_crop_flags_are_refused_where_our_crop_does_not_run():
    for bad in (dict(loader="dali"), dict(decode="gpu")):
        with pytest.raises(ConfigError, match="do not combine with --loader dali or --decode gpu"):
            Config.create(hflip=0.2, **bad)
    with pytest.raises(ConfigError, match="--std needs 1 or 3 values > 0"):
        Config.create(std=[0.2, 0.0, 0.1])


def test_crop_mean_std_and_aa_reach_the_loader(demo_shards):
    from engine.data import Chain, make_data
    from pipeline.autoaugment import PolicyAugment
    config, _ = parse_config(["--data_path", str(demo_shards), "-j", "0", "--img-size", "32", "-b", "8", "--no-output",
                              "--scale", "0.5", "1", "--ratio", "0.9", "1.1", "--hflip", "0", "--vflip", "0.3",
                              "--mean", "0.5", "--std", "0.25", "0.5", "0.25", "--aa", "3a",
                              "--jitter-in", "workers"])
    from engine.dist import setup_distributed
    data = make_data(resolve(config), setup_distributed("cpu", 0, None))
    t = data.train.dataset.builder.transform
    assert (t.scale, t.ratio, t.hflip, t.vflip) == ((0.5, 1.0), (0.9, 1.1), 0.0, 0.3)
    assert isinstance(t.augment, Chain) and isinstance(t.augment.ops[0], PolicyAugment)  # 3a keeps colour jitter
    norm = data.feed.normalize
    assert torch.allclose(norm.scale.flatten().double(), torch.tensor([1 / (255 * s) for s in (0.25, 0.5, 0.25)],
                                                                       dtype=torch.double), rtol=1e-6)
    assert torch.allclose(norm.bias.flatten().double(), torch.tensor([-2.0, -1.0, -2.0], dtype=torch.double))


def test_timm_args_yaml_keys_are_applied_not_ignored(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump({
        "opt": "lamb", "opt_eps": 1e-7, "opt_betas": [0.9, 0.99], "sched": "multistep", "decay_milestones": [3, 6],
        "patience_epochs": 4, "bce_loss": True, "bce_target_thresh": 0.3, "bce_sum": False, "bce_pos_weight": None,
        "scale": [0.3, 1.0], "ratio": [0.75, 1.3333333333333333], "hflip": 0.4, "vflip": 0.1, "mean": None,
        "std": None, "drop": 0.2, "eval_metric": "top5", "grad_accum_steps": 2, "start_epoch": None,
        "no_resume_opt": False, "aa": "original"}))
    config, notes = parse_config(["-c", str(path)])
    assert not notes
    assert (config.opt, config.opt_eps, config.opt_betas) == ("lamb", 1e-7, (0.9, 0.99))
    assert (config.sched, config.decay_milestones, config.patience_epochs) == ("multistep", (3, 6), 4)
    assert (config.bce_loss, config.bce_target_thresh, config.drop, config.eval_metric) == (True, 0.3, 0.2, "top5")
    assert (config.scale, config.hflip, config.vflip, config.grad_accum_steps) == ((0.3, 1.0), 0.4, 0.1, 2)


def test_grad_accumulation_matches_one_batch_twice_the_size():
    """N=2 micro-batches of B == one batch of 2B (BN in eval mode: no batch coupling)."""
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 1000, (8,))
    weights = []
    for accum, batch in ((1, 8), (2, 4)):
        trainer = Trainer(parts_of("--grad-accum-steps", str(accum), "-b", str(batch), "--lr", "0.5",
                                   "--smoothing", "0"))
        trainer.plain.eval()
        for k in range(accum):
            part = slice(k * batch, (k + 1) * batch)
            trainer.step(images[part], labels[part], 0, accum=accum, first=k == 0, update=k == accum - 1)
        weights.append([p.detach().clone() for p in trainer.plain.parameters()])
    assert any(not torch.equal(p, q) for p, q in zip(weights[0], parts_of().plain.parameters()))
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_updates_per_epoch_is_timms():
    assert [updates_per_epoch(n, 4) for n in (8, 9, 11, 12)] == [2, 3, 3, 3]
    parts = parts_of("--grad-accum-steps", "4")
    assert parts.schedule.cfg.steps_per_epoch == updates_per_epoch(len(parts.data.train), 4)
    assert parts.lr == pytest.approx(0.2 * 4 * 4 / 256)  # the global batch of one update


@pytest.mark.slow
def test_grad_accumulation_resumes_exactly_at_an_update_boundary(demo_shards, tmp_path, capsys):
    """A run stopped by --checkpoint-interval's save and resumed matches the uninterrupted one."""
    base = ["--data_path", str(demo_shards), "--model", "resnet10t", "--img-size", "32", "-b", "4", "-j", "1",
            "--epochs", "2", "--warmup-epochs", "1", "--lr", "0.05", "--grad-accum-steps", "2",
            "--shuffle-buffer", "16", "--no-amp", "--log-interval", "1"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_main([*base, "--output", str(whole), "--experiment", "r"], capsys)[0] == 0
    assert run_main([*base, "--output", str(part), "--experiment", "r", "--stop-after", "1"], capsys)[0] == 0
    assert run_main([*base, "--output", str(part), "--experiment", "r", "--resume",
                     str(part / "r" / "last.pth")], capsys)[0] == 0
    a = torch.load(whole / "r" / "last.pth", weights_only=False)["model"]
    b = torch.load(part / "r" / "last.pth", weights_only=False)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [r for r in read_metrics(whole / "r") if r["kind"] == "train"]
    assert rows[-1]["step"] == len(rows)  # one row per update: steps count updates


@pytest.mark.parametrize("split", ["", "train"])
def test_an_imagefolder_data_path_is_sharded_once_and_streamed(demo_folder, tmp_path, split):
    """train/ and val/ class folders, or one folder of class folders (no validation then)."""
    from engine.data import make_data
    from engine.dist import setup_distributed
    from pipeline.info import load_info
    source = demo_folder / split if split else demo_folder
    config, _ = parse_config(["--data_path", str(source), "-j", "0", "--img-size", "32", "-b", "8", "--no-output",
                              "--demo-dir", str(tmp_path / "cache")])
    run = resolve(config)
    assert run.image_folder and str(tmp_path / "cache") in run.data_root
    d = setup_distributed("cpu", 0, None)
    data = make_data(run, d)
    assert data.num_classes == 6 and data.classes == tuple(sorted(p.name for p in (demo_folder / "train").iterdir()))
    assert (data.val is None) == bool(split)
    info = load_info(run.data_root)
    assert info.split("train").num_samples == len(list((demo_folder / "train").rglob("*.*")))
    data.train.set_epoch(0)
    images, labels = next(iter(data.feed(data.train)))
    assert images.shape[0] == 8 and labels.max() < 6
    again = make_data(resolve(config), d)  # the cache is confirmed, not rebuilt
    assert again.identity == data.identity


@pytest.mark.slow
def test_grad_accumulation_resumes_exactly_mid_epoch_at_an_update_boundary(demo_shards, tmp_path):
    """Stopped (as by SIGTERM) after 5 updates of 2 batches, resumed: the weights of the run that
    was never stopped, to the bit."""
    import signal

    from conftest import make_trainer

    from engine.control import Preempted
    base = ["--data_path", str(demo_shards), "--model", "resnet10t", "--img-size", "32", "-b", "4", "-j", "1",
            "--epochs", "1", "--warmup-epochs", "0", "--lr", "0.05", "--grad-accum-steps", "2", "--no-val",
            "--shuffle-buffer", "16", "--no-amp", "--log-interval", "3", "--experiment", "r"]
    whole = make_trainer([*base, "--output", str(tmp_path / "whole")])
    whole.fit()
    part = make_trainer([*base, "--output", str(tmp_path / "part")])
    polls, real = iter(range(10 ** 6)), part.parts.control.poll

    def poll():
        stop, save = real()
        return (signal.SIGTERM if next(polls) == 4 else stop), save
    part.parts.control.poll = poll
    with pytest.raises(Preempted):
        part.fit()
    last = tmp_path / "part" / "r" / "last.pth"
    pos = torch.load(last, weights_only=False)["position"]
    assert (pos["step"], pos["global_step"]) == (10, 5)  # loader batches, optimizer updates
    resumed = make_trainer([*base, "--output", str(tmp_path / "part"), "--resume", str(last)])
    assert (resumed.start.epoch, resumed.start.step) == (0, 10)
    resumed.fit()
    for a, b in zip(whole.plain.state_dict().values(), resumed.plain.state_dict().values()):
        assert torch.equal(a, b)
