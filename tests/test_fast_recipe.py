"""FFCV's ResNet-50 recipes (ffcv-imagenet): the linear-step LR and the resolution schedule against
FFCV's own formulas, BlurPool, validation at its own size with flip TTA, and configs/fast_*.yaml."""
import math
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_trainer, read_metrics, run_folder

import train_stream
from common.errors import ConfigError
from engine.config import parse_args
from engine.data import make_data
from engine.dist import setup_distributed
from model.blurpool import BlurPoolConv2d, apply_blurpool
from model.schedule import ScheduleConfig, lr_at, scale_lr, total_epochs, total_steps
from pipeline.resolution import ResolutionSchedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--model", "resnet10t", "--img-size", "32", "-b", "8", "-j", "1", "--log-interval", "1",
         "--warmup-epochs", "1", "--lr", "0.05", "--shuffle-buffer", "16", "--device", "cpu"]


# ---------------------------------------------------------------- FFCV's formulas, copied
# From libffcv/ffcv-imagenet, train_imagenet.py @ 606c584137a8ceebb748db9cb5d17ea23a413c01
# (schedule code unchanged since 2fff1da4): get_step_lr l.96-105, get_cyclic_lr l.107-113,
# get_lr l.159-166, get_resolution l.168-185, the per-iteration LR of train_loop l.356-364.
# Re-written without numpy: `_interp` follows numpy.interp's formula slope * (x - xp[j]) + fp[j]
# (fp[j] exactly when x == xp[j]); np.round is round-half-to-even, as Python's round().

def _interp(x, xp, fp):
    """np.interp for a scalar x and strictly increasing xp (clamps outside)."""
    n = len(xp)
    if x > xp[-1]:
        return float(fp[-1])
    if x < xp[0]:
        return float(fp[0])
    j = 0
    while j + 1 < n and xp[j + 1] <= x:
        j += 1
    if j == n - 1 or xp[j] == x:
        return float(fp[j])
    slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j])
    return slope * (x - xp[j]) + fp[j]


def ffcv_get_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    assert min_res <= max_res
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    # otherwise, linearly interpolate to the nearest multiple of 32
    interp = _interp(epoch, [start_ramp, end_ramp], [min_res, max_res])
    return int(round(interp / 32)) * 32


def ffcv_get_step_lr(epoch, lr, step_ratio, step_length, epochs):
    if epoch >= epochs:
        return 0
    num_steps = epoch // step_length
    return step_ratio ** num_steps * lr


def ffcv_get_cyclic_lr(epoch, lr, epochs, lr_peak_epoch):
    xs = [0, lr_peak_epoch, epochs]
    ys = [1e-4 * lr, lr, 0]
    return _interp(epoch, xs, ys)


def ffcv_lr_at(epoch, ix, iters, lr, epochs, lr_peak_epoch):
    """train_loop: lrs = np.interp(np.arange(iters), [0, iters], [get_lr(epoch), get_lr(epoch + 1)])."""
    lr_start = ffcv_get_cyclic_lr(epoch, lr, epochs, lr_peak_epoch)
    lr_end = ffcv_get_cyclic_lr(epoch + 1, lr, epochs, lr_peak_epoch)
    return _interp(ix, [0, iters], [lr_start, lr_end])


# rn50_configs/rn50_{E}_epochs.yaml @ 5bab20e: start_ramp, end_ramp (min_res 160, max_res 192 in all)
RN50_RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}


# ---------------------------------------------------------------- linear-step LR
@pytest.mark.parametrize("epochs,peak,spe", [(16, 2, 312), (88, 2, 312), (6, 2, 7), (5, 1, 3), (3, 2, 4)])
def test_linear_step_equals_ffcv_every_iteration(epochs, peak, spe):
    """Per update: every iteration of the run equals FFCV's per-iteration LR, bit for bit."""
    cfg = ScheduleConfig(1.7, epochs, spe, sched="linear-step", peak_epoch=peak, on_updates=True)
    assert total_epochs(cfg) == epochs and total_steps(cfg) == epochs * spe
    ours = [lr_at(s, cfg) for s in range(epochs * spe)]
    theirs = [ffcv_lr_at(e, ix, spe, 1.7, epochs, peak) for e in range(epochs) for ix in range(spe)]
    assert ours == theirs
    assert ours[0] == 1.7e-4 and max(ours) == 1.7 and ours[-1] > 0  # the triangle, never 0 inside the run


@pytest.mark.parametrize("epochs,peak", [(16, 2), (40, 2), (6, 3)])
def test_linear_step_per_epoch_equals_ffcv_get_lr(epochs, peak):
    """Per epoch (the reading of a per-epoch schedule): every update of epoch e uses FFCV's get_lr(e)."""
    spe = 5
    cfg = ScheduleConfig(1.7, epochs, spe, sched="linear-step", peak_epoch=peak)
    for e in range(epochs):
        want = ffcv_get_cyclic_lr(e, 1.7, epochs, peak)
        assert [lr_at(e * spe + i, cfg) for i in range(spe)] == [want] * spe, e
    assert lr_at(epochs * spe, cfg) == 0  # FFCV's lr at `epochs` (np.interp clamps)


def test_linear_step_reproduces_ffcvs_logged_lrs():
    """ffcv-imagenet assets/agg.csv @ eebd5af logs `current_lr` (the LR of the last iteration of
    each epoch) of the 16-epoch run: 8 x 512 images per step, 312 steps per epoch."""
    iters = math.ceil(1_281_167 / 8) // 512
    assert iters == 312
    cfg = ScheduleConfig(scale_lr(0.10625, 8 * 512), 16, iters, sched="linear-step", on_updates=True)
    logged = {0: 0.8473609134615381, 1: 1.697275913461538, 2: 1.578960622710622,
              12: 0.364674908424908, 15: 0.000389194139194}
    for e, want in logged.items():
        assert lr_at(e * iters + iters - 1, cfg) == pytest.approx(want, rel=0, abs=1e-12)


def test_ffcv_step_schedule_is_timm_step_without_warmup_per_epoch():
    """FFCV's other type, `step` (no published config uses it): per epoch it is --sched step with
    --warmup-epochs 0 (--decay-epochs = step_length, --decay-rate = step_ratio)."""
    cfg = ScheduleConfig(0.5, 90, 3, sched="step", warmup_epochs=0, decay_epochs=30, decay_rate=0.1)
    for e in range(90):
        assert lr_at(e * 3 + 2, cfg) == pytest.approx(ffcv_get_step_lr(e, 0.5, 0.1, 30, 90), rel=1e-12)


def test_linear_step_errors_and_flags():
    with pytest.raises(ConfigError, match="lr-peak-epoch"):
        ScheduleConfig(1.0, 4, 10, sched="linear-step", peak_epoch=4)
    with pytest.raises(ConfigError, match="lr-peak-epoch"):
        parse_args(["--sched", "linear-step", "--epochs", "2", "--lr-peak-epoch", "2"])
    args = parse_args(["--sched", "linear-step", "--lr-peak-epoch", "3", "--sched-on-updates"])
    assert (args.sched, args.lr_peak_epoch, args.sched_on_updates) == ("linear-step", 3, True)
    # peak at epoch 0: straight down from lr (FFCV's xs would repeat 0)
    cfg = ScheduleConfig(1.0, 4, 1, sched="linear-step", peak_epoch=0)
    assert [lr_at(s, cfg) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]


# ---------------------------------------------------------------- resolution schedule
@pytest.mark.parametrize("epochs", sorted(RN50_RAMPS))
def test_resolution_equals_ffcv_get_resolution_for_the_rn50_configs(epochs):
    start, end = RN50_RAMPS[epochs]
    res = ResolutionSchedule(160, 192, start, end)
    ours = [res.at(e) for e in range(epochs)]
    assert ours == [ffcv_get_resolution(e, 160, 192, end, start) for e in range(epochs)]
    assert set(ours) == {160, 192} and res.largest == 192
    assert res.sizes(epochs) == [160, 192]


@pytest.mark.parametrize("min_res,max_res,start,end", [
    (160, 256, 2, 9), (128, 224, 0, 5), (160, 192, 3, 3), (161, 250, 1, 12), (64, 96, 0, 2), (32, 64, 0, 1)])
def test_resolution_equals_ffcv_on_other_ramps(min_res, max_res, start, end):
    """Rounding inside the ramp to multiples of 32, half to even (176 -> 192, 208 -> 192)."""
    res = ResolutionSchedule(min_res, max_res, start, end)
    assert [res.at(e) for e in range(end + 3)] == \
        [ffcv_get_resolution(e, min_res, max_res, end, start) for e in range(end + 3)]


def test_resolution_without_progressive_resizing_is_img_size():
    res = ResolutionSchedule.from_args(parse_args(["--img-size", "96"]))
    assert [res.at(e) for e in range(5)] == [96] * 5 and res.largest == 96 and not res.progressive
    res = ResolutionSchedule.from_args(parse_args(["--min-res", "64", "--max-res", "128", "--end-ramp", "2"]))
    assert res.progressive and res.largest == 128 and [res.at(e) for e in range(4)] == [64, 96, 128, 128]


@pytest.mark.parametrize("argv,message", [
    (["--min-res", "160"], "go together"),
    (["--min-res", "192", "--max-res", "160"], "--min-res <= --max-res"),
    (["--start-ramp", "5", "--end-ramp", "3"], "start <= end"),
    (["--val-res", "0"], "--val-res"),
    (["--val-crop-pct", "1.5"], "--val-crop-pct"),
    (["--loader", "dali", "--min-res", "160", "--max-res", "192"], "needs --loader ours"),
])
def test_fast_flag_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


# ---------------------------------------------------------------- BlurPool
class FFCVBlurPoolConv2d(torch.nn.Module):
    """ffcv-imagenet train_imagenet.py @ 606c584 l.115-126, verbatim but for `ch` -> `torch`."""

    def __init__(self, conv):
        super().__init__()
        default_filter = torch.tensor([[[[1, 2, 1], [2, 4, 2], [1, 2, 1]]]]) / 16.0
        filt = default_filter.repeat(conv.in_channels, 1, 1, 1)
        self.conv = conv
        self.register_buffer('blur_filter', filt)

    def forward(self, x):
        blurred = F.conv2d(x, self.blur_filter, stride=1, padding=(1, 1),
                           groups=self.conv.in_channels, bias=None)
        return self.conv.forward(blurred)


def test_blurpool_on_resnet50_keeps_shape_and_parameters_and_wraps_ffcvs_six_convs():
    torch.manual_seed(0)
    model = timm.create_model("resnet50.gluon_in1k", num_classes=10).eval()
    count = sum(p.numel() for p in model.parameters())
    assert count == 25_557_032 - 1000 * 2048 - 1000 + 10 * 2048 + 10
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        wrapped = apply_blurpool(model)
        after = model(x)
    assert wrapped == [f"layer{i}.0.{c}" for i in (2, 3, 4) for c in ("conv2", "downsample.0")]
    assert sum(p.numel() for p in model.parameters()) == count
    assert after.shape == before.shape == (2, 10) and not torch.allclose(after, before, atol=1e-3)  # it blurs
    for name in wrapped:  # each wrapper computes FFCV's BlurPoolConv2d
        ours = model.get_submodule(name)
        theirs = FFCVBlurPoolConv2d(ours.conv)
        y = torch.randn(1, ours.conv.in_channels, 16, 16)
        torch.testing.assert_close(ours(y), theirs(y), rtol=0, atol=0)
    assert {k for k in model.state_dict() if "blur" in k} == {f"{n}.blur_filter" for n in wrapped}


def test_blurpool_checkpoints_load_into_timm_as_documented(tmp_path, capsys):
    """Off: a plain timm model loads the weights (tests/test_train.py). On: the keys carry the
    wrappers; timm.create_model + apply_blurpool loads them, a plain model refuses them, and
    --initial-checkpoint says why."""
    trainer = make_trainer(["--synthetic", *SMALL, "--blurpool"])
    assert sum(isinstance(m, BlurPoolConv2d) for m in trainer.plain.modules()) == 3  # resnet10t
    images, labels = next(iter(trainer.data.feed(trainer.data.train)))
    trainer.step(images, labels, 0)
    state = trainer.plain.state_dict()
    model = timm.create_model("resnet10t", num_classes=1000)
    with pytest.raises(RuntimeError, match="blur_filter"):
        model.load_state_dict(state)
    apply_blurpool(model)
    model.load_state_dict(state)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    code = train_stream.main(["--synthetic", *SMALL, "--initial-checkpoint", str(path), "--epochs", "1",
                              "--perf-steps", "1", "--perf-warmup", "0", "--performance"])
    err = capsys.readouterr().err
    assert code == 2 and "differ in --blurpool" in err and len(err.strip().splitlines()) == 1
    assert make_trainer(["--synthetic", *SMALL, "--blurpool", "--initial-checkpoint", str(path)])


# ---------------------------------------------------------------- validation size, crop, flip TTA
def test_val_res_and_val_crop_pct_set_the_eval_transform(demo_shards):
    """The validation batches are timm's eval transform at --val-res/--val-crop-pct (FFCV's
    validation.resolution 256 with DEFAULT_CROP_RATIO 224/256), the training ones stay at --img-size."""
    from pipeline.info import load_info
    from pipeline.shards import iter_samples, open_shard
    from pipeline.stream import image_and_label
    from pipeline.transforms import EvalTransform
    args = parse_args(["--data_path", str(demo_shards), *SMALL, "--val-res", "48", "--val-crop-pct", "0.5",
                       "-vb", "4"])
    data = make_data(args, setup_distributed("cpu"))
    data.val.set_epoch(0)
    it = iter(data.val)
    images, labels = (t.clone() for t in next(it))  # before the pooled buffer goes back to its worker
    del it
    assert images.shape == (4, 48, 48, 3)
    with open_shard(load_info(str(demo_shards)).split("validation").urls[0]) as f:
        samples = [image_and_label(s) for s, _ in zip(iter_samples(f), range(4))]
    want = torch.empty(4, 48, 48, 3, dtype=torch.uint8)
    for i, (jpeg, _) in enumerate(samples):
        EvalTransform(48, 0.5, "bicubic")(jpeg, want[i])
    assert torch.equal(images, want) and labels.tolist() == [label for _, label in samples]
    data.train.set_epoch(0)
    assert next(iter(data.train))[0].shape == (8, 32, 32, 3)


def test_val_tta_flip_sums_the_logits_of_both_views(demo_shards):
    """Top-1/top-5 of the summed logits (FFCV's val_loop), the loss of their mean."""
    trainer = make_trainer(["--data_path", str(demo_shards), *SMALL, "--val-tta", "flip", "-j", "0"])
    model = trainer.plain.eval()
    n, loss, top1 = 0, 0.0, 0
    trainer.data.val.set_epoch(0)
    with torch.no_grad():
        for images, labels in trainer.data.val_feed(trainer.data.val):
            with trainer.precision.autocast():
                logits = model(images) + model(torch.flip(images, dims=[3]))
            loss += F.cross_entropy(logits.float() / 2, labels, reduction="sum").item()
            top1 += (logits.argmax(1) == labels).sum().item()
            n += len(labels)
    result = trainer.validate(0)
    assert result["n"] == n == sum(trainer.data.val.dataset.lengths) > 0
    assert result["top1"] == pytest.approx(100 * top1 / n) and result["loss"] == pytest.approx(loss / n, rel=1e-5)


# ---------------------------------------------------------------- configs/fast_*.yaml
@pytest.mark.parametrize("epochs", [16, 24, 40, 88])
def test_fast_configs_mirror_ffcvs_rn50_configs(epochs):
    """Each value as rn50_configs/rn50_{E}_epochs.yaml (@ 5bab20e) and train_imagenet.py's
    defaults set it; the LR at 8 x 512 is FFCV's 1.7; the per-epoch sizes are get_resolution's."""
    args = parse_args(["-c", os.path.join(ROOT, "configs", f"fast_{epochs}ep.yaml"), "--data_path", "/data/in-500-wds"])
    start, end = RN50_RAMPS[epochs]
    want = dict(model="gluon_resnet50_v1b", batch_size=512, epochs=epochs, sched="linear-step",
                sched_on_updates=True, lr_peak_epoch=2, opt="momentum", momentum=0.9, weight_decay=1e-4,
                smoothing=0.1, min_res=160, max_res=192, start_ramp=start, end_ramp=end, blurpool=True,
                val_res=256, val_crop_pct=224 / 256, val_tta="flip", validation_batch_size=512,
                color_jitter=0.0, zero_init_last=False, lr=None, aa=None, mixup=0.0, cutmix=0.0, reprob=0.0,
                model_ema=False, train_interpolation="bilinear", interpolation="bilinear",
                ddp_broadcast_buffers=True, dist_bn="")
    assert {k: getattr(args, k) for k in want} == want
    assert scale_lr(args.lr_base, 8 * args.batch_size, args.lr_base_size) == 1.7
    res = ResolutionSchedule.from_args(args)
    assert [res.at(e) for e in range(epochs)] == [ffcv_get_resolution(e, 160, 192, end, start) for e in range(epochs)]
    cfg = ScheduleConfig(1.7, args.epochs, 312, sched=args.sched, on_updates=args.sched_on_updates,
                         peak_epoch=args.lr_peak_epoch)
    for e in (0, 1, 2, epochs // 2, epochs - 1):
        for ix in (0, 155, 311):
            assert lr_at(e * 312 + ix, cfg) == ffcv_lr_at(e, ix, 312, 1.7, epochs, 2)


def test_fast_demo_config_keeps_the_recipes_shape_on_the_demo():
    """configs/fast_demo.yaml (the time-to-accuracy run): FFCV's recipe at demo scale, the
    last third at the larger size, the LR peak after one epoch, validation above training size."""
    args = parse_args(["-c", os.path.join(ROOT, "configs", "fast_demo.yaml")])
    res = ResolutionSchedule.from_args(args)
    assert [res.at(e) for e in range(args.epochs)] == [48] * 4 + [64] * 2
    assert (args.sched, args.sched_on_updates, args.lr_peak_epoch) == ("linear-step", True, 1)
    assert args.blurpool and args.val_tta == "flip" and args.val_res > res.largest and args.color_jitter == 0
    assert args.data_path is None  # the demo data, as `make demo`


# ---------------------------------------------------------------- progressive resizing
def _epoch_batches(loader, epoch, size=None):
    loader.set_epoch(epoch)
    if size is not None:
        loader.set_img_size(size)
    return [(images.clone(), labels.clone()) for images, labels in loader]  # before the buffer is reused


def test_persistent_workers_change_size_per_epoch_in_buffers_sized_for_the_largest(demo_shards):
    """The size set before an epoch reaches workers that live across epochs; each epoch equals a
    fresh loader made at that size, bit for bit; the pooled buffers were made for the largest size,
    so no new ones appear when the size changes."""
    from pipeline.info import load_info
    from pipeline.loader import create_loader
    split = load_info(str(demo_shards)).split("train")
    common = dict(train=True, batch_size=8, num_workers=2, seed=3, shuffle_buffer=16, prefetch_factor=1)
    loader = create_loader(split, img_size=32, largest_img_size=64, reuse_buffers=True, **common)
    sizes = {0: 32, 1: 64, 2: 48}
    got = {e: _epoch_batches(loader, e, s) for e, s in sizes.items()}
    for e, s in sizes.items():
        assert len(got[e]) == len(loader) == 126 // 8 and {b[0].shape for b in got[e]} == {(8, s, s, 3)}
        fresh = create_loader(split, img_size=s, persistent=False, **common)
        want = _epoch_batches(fresh, e)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got[e], want)), e
    pool = 2 * (1 + 2)  # workers x (prefetch_factor + 2)
    assert 0 < loader.stats()["new_buffers"] <= pool
    with pytest.raises(ValueError, match="above the largest"):
        loader.set_img_size(96)


@pytest.mark.slow
def test_progressive_run_keeps_exact_epochs_and_resumes_at_any_epoch(demo_shards, tmp_path, capsys):
    """32, 64 then 96 px (FFCV's get_resolution with min 32, max 96, ramp 0..2) in persistent
    workers: every epoch has its steps at its size; stopped after epoch 0 and after epoch 1 and
    resumed each time, the run follows the uninterrupted one."""
    common = ["--data_path", str(demo_shards), *SMALL, "-b", "16", "-j", "2", "--no-val", "--epochs", "3",
              "--min-res", "32", "--max-res", "96", "--start-ramp", "0", "--end-ramp", "2",
              "--sched", "linear-step", "--lr-peak-epoch", "1", "--sched-on-updates"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert train_stream.main([*common, *run_folder(straight)]) == 0, capsys.readouterr().err
    for argv in (["--stop-after", "1"], ["--resume", f"{resumed}/last.pth", "--stop-after", "1"],
                 ["--resume", f"{resumed}/last.pth"]):
        assert train_stream.main([*common, *run_folder(resumed), *argv]) == 0, capsys.readouterr().err
    a = [r for r in read_metrics(straight) if r["kind"] == "train"]
    b = [r for r in read_metrics(resumed) if r["kind"] == "train"]
    steps = 126 // 16
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 3 * steps + 1))
    assert [r["img_size"] for r in a] == [r["img_size"] for r in b] == [32] * steps + [64] * steps + [96] * steps
    assert [ffcv_get_resolution(e, 32, 96, 2, 0) for e in range(3)] == [32, 64, 96]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4, abs=1e-4)
    epochs = [r for r in read_metrics(straight) if r["kind"] == "epoch"]
    assert [(r["steps_min"], r["steps_max"]) for r in epochs] == [(steps, steps)] * 3
    wa = torch.load(f"{straight}/last.pth", weights_only=True)["model"]
    wb = torch.load(f"{resumed}/last.pth", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)


def test_torchcompile_makes_one_static_graph_per_training_size():
    """Under --torchcompile each size compiles once, with static shapes (torch's default would
    switch to one dynamic-shape graph at the second size); going back to a size reuses its graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    trainer = make_trainer(["--synthetic", *SMALL, "--torchcompile", "eager", "--min-res", "32", "--max-res", "96",
                            "--end-ramp", "2"])
    for step, size in enumerate((32, 64, 96, 32)):
        trainer.data.train.set_img_size(size)
        images, labels = next(iter(trainer.data.feed(trainer.data.train)))
        assert images.shape[-1] == size
        trainer.step(images, labels, step)
    assert counters["stats"]["unique_graphs"] == 3
    torch._dynamo.reset()
