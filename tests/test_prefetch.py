"""Device feeding: normalisation, layout, stream discipline, synthetic data, GPU-decode batches."""
import contextlib
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from model.device import Device
from pipeline.gpu_decode import JpegBatches, crop_resize_flip, decode_batch
from pipeline.prefetch import IMAGENET_MEAN, IMAGENET_STD, DevicePrefetcher, Normalize
from pipeline.stream import Memory
from pipeline.synthetic import SyntheticBatches
from pipeline.transforms import EvalTransform, TrainTransform


def uint8_batches(n, b=4, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (b, s, s, 3), dtype=torch.uint8, generator=g),
             torch.arange(b, dtype=torch.int64) + i) for i in range(n)]


def test_normalize_values_dtype_and_channels_last():
    images, _ = uint8_batches(1)[0]
    x = Normalize("cpu")(images)
    ref = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and x.shape == (4, 3, 8, 8)
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    y = Normalize("cpu", channels_last=False)(images)
    assert y.is_contiguous() and torch.allclose(y, ref, atol=1e-5)


class FakeStream:
    def __init__(self, name):
        self.name, self.waits = name, []

    def wait_stream(self, other):
        self.waits.append(other.name)


class FakeAccelerator(Device):
    """A CPU 'accelerator' that records how the prefetcher uses streams."""
    made, recorded = [], []

    @property
    def is_accelerator(self):
        return True

    def new_stream(self):
        FakeAccelerator.made.append(FakeStream("copy"))
        return FakeAccelerator.made[-1]

    def current_stream(self):
        return COMPUTE

    def stream(self, stream):
        return contextlib.nullcontext()

    @staticmethod
    def record_stream(tensor, stream):
        FakeAccelerator.recorded.append(stream.name)


COMPUTE = FakeStream("compute")


def test_one_side_stream_reused_across_epochs_with_waits_both_ways():
    dev = FakeAccelerator("cpu")
    feeder = DevicePrefetcher(dev, Normalize("cpu"))
    for _ in range(3):  # epochs
        out = list(feeder(uint8_batches(5)))
        assert [y.tolist() for _, y in out] == [y.tolist() for _, y in uint8_batches(5)]
    assert len(FakeAccelerator.made) == 1
    assert feeder.stream.waits == ["compute"] * 15  # the copy waits for compute before each batch
    assert COMPUTE.waits.count("copy") == 15        # and compute waits for every copy
    assert FakeAccelerator.recorded == ["compute"] * 30  # images and labels handed across


def test_prefetcher_on_cpu_yields_every_batch_in_order():
    feeder = DevicePrefetcher(Device("cpu"), Normalize("cpu"))
    assert feeder.stream is None
    batches = uint8_batches(4)
    out = list(feeder(batches))
    assert len(out) == 4 and all(torch.equal(y, b[1]) for (_, y), b in zip(out, batches))


def test_synthetic_batches_are_fixed_and_counted():
    src = SyntheticBatches("cpu", batch_size=4, img_size=16, num_classes=10, steps=3)
    batches = list(src)
    assert len(src) == 3 == len(batches)
    assert batches[0][0].dtype == torch.uint8 and batches[0][0].shape == (4, 16, 16, 3)
    assert all(b[0] is batches[0][0] for b in batches) and batches[0][1].max() < 10


def jpeg(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8))
    im = im.resize((w, h), Image.BICUBIC).convert(mode)
    b = io.BytesIO()
    im.save(b, format="PNG" if mode == "RGBA" else "JPEG", quality=95)
    return bytearray(b.getvalue())


def test_gpu_decode_batches_match_cpu_decoding():
    """Everything of --decode gpu but the nvJPEG call, on the CPU."""
    tf = TrainTransform(32, reduce=False)  # nvJPEG decodes at full size
    datas = [jpeg(120, 90, seed=1), jpeg(64, 80, "L", seed=2), jpeg(100, 100, "CMYK", seed=3),
             jpeg(90, 60, "RGBA", seed=4)]
    builder = JpegBatches(tf, 4)
    builder.new(Memory(shared=False))
    for i, d in enumerate(datas):
        builder.add(i, d, i * 10, random.Random(i))
    batch = builder.finish(4)
    assert batch.pixel_index.tolist() == [2, 3]  # CMYK and PNG are decoded in the worker
    images, labels = decode_batch(batch, "cpu")
    assert labels.tolist() == [0, 10, 20, 30] and images.shape == (4, 32, 32, 3)
    for i, d in enumerate(datas):  # same random draws as CPU decoding -> nearly the same pixels
        ref = torch.empty((32, 32, 3), dtype=torch.uint8)
        tf(d, ref, random.Random(i))
        assert (images[i].int() - ref.int()).abs().float().mean() < 2.0


@pytest.mark.parametrize("tf", [TrainTransform(32, interpolation="random", reduce=False),
                                EvalTransform(32, crop_pct=0.875)], ids=["train-random", "eval"])
def test_gpu_decode_geometry_and_interpolation_match_cpu_decoding(tf):
    """Per-image interpolation (train 'random') and the eval resize-then-centre-crop travel
    with the bytes: the device's result equals the workers' within float rounding."""
    datas = [jpeg(120, 90, seed=i) if i % 2 else jpeg(70, 110, seed=i) for i in range(8)]
    builder = JpegBatches(tf, len(datas))
    builder.new(Memory(shared=False))
    for i, d in enumerate(datas):
        builder.add(i, d, i, random.Random(i))
    batch = builder.finish(len(datas))
    assert batch.boxes.shape == (8, 8)
    if isinstance(tf, TrainTransform):
        assert set(batch.modes.tolist()) == {0, 1}  # both bilinear and bicubic were drawn
    images, _ = decode_batch(batch, "cpu")
    for i, d in enumerate(datas):
        ref = torch.empty((32, 32, 3), dtype=torch.uint8)
        tf(d, ref, random.Random(i))
        assert (images[i].int() - ref.int()).abs().float().mean() < 1.0


def test_float_crop_resize_flip_matches_uint8_path():
    from pipeline.transforms import decode, resize_into
    img, box = decode(jpeg(200, 150), lambda w, h: (10, 20, 120, 100), (48, 48))
    a, b = (torch.empty((48, 48, 3), dtype=torch.uint8) for _ in range(2))
    resize_into(img, box, a, True, "bilinear")
    crop_resize_flip(img, box, b, True, "bilinear")
    assert (a.int() - b.int()).abs().max() <= 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetcher_and_nvjpeg_decode():
    dev = Device("cuda")
    feeder = DevicePrefetcher(dev, Normalize(dev.torch))
    stream = feeder.stream
    for _ in range(2):
        out = list(feeder(uint8_batches(3)))
        assert feeder.stream is stream
        assert out[0][0].is_cuda and out[0][0].is_contiguous(memory_format=torch.channels_last)
    tf = TrainTransform(32)
    builder = JpegBatches(tf, 2)
    builder.new(Memory(shared=False))
    for i in range(2):
        builder.add(i, jpeg(120, 90, seed=i), i, random.Random(i))
    images, labels = decode_batch(builder.finish(2), dev.torch)
    assert images.is_cuda and images.shape == (2, 32, 32, 3)
