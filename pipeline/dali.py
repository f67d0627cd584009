"""`--loader dali`: NVIDIA DALI decodes, crops, resizes and flips, fed from our epoch plan.

DALI is optional (requirements-dali.txt); nothing else imports this module unless asked to.

    _info.json -> plan.py: this rank's samples for (seed, epoch), the same as the StreamLoader's
    ShardIndex:  one pass over each shard's tar headers (shards.members, data skipped by seeking):
                 sample -> shard, byte offset and size of its JPEG, label
    PlanSource:  fn.external_source(parallel=True, per sample) in DALI's Python worker
                 processes: sample p of the epoch = pread of its JPEG, the structure check
                 make_shards applies (jpeg.jpeg_frame), and its geometry:
                   train: RandomResizedCrop box (geometry.rrc_box, as our transform: drawn from
                          (seed, epoch, sample)), interpolation (bilinear, bicubic or random
                          per image, as timm) + flip -> decoders.image_slice (ROI decode: only
                          the box is decoded) -> resize to img_size (antialiased) -> flip
                   eval:  timm's resize(floor(size / crop_pct)) + centre crop, computed with
                          torchvision's rounding as a fractional source ROI -> decoders.image
                          -> one antialiased bicubic resize of that ROI (timm within 0.2 levels)
    DaliLoader:  a BatchLoader of (uint8 NHWC images, int64 labels): on the host with
                 decode='cpu', on the GPU with decode='gpu' (DALI's 'mixed' nvJPEG decoder)

Exactness comes from the plan alone: every rank runs `train_steps` full batches (a permutation
of its range, fresh each epoch), and validation reads each sample once, its last batch partial.

Bad data never reaches the decoder: a sample without a JPEG or label, one that fails
`jpeg_frame`, or the rest of a damaged shard is replaced by the next good sample of the rank's
plan and flagged; the loader counts the flags (train: skipped + padded, the batch stays full;
eval: dropped and skipped). A JPEG that passes the check but still makes DALI fail (a bogus
Huffman table) breaks a DALI pipeline for good: the loader then decodes the in-flight batches'
samples one by one, marks the culprits bad, and rebuilds the pipeline at the failed batch.
"""
from __future__ import annotations

import logging
import os
import random

import numpy as np

from common.errors import ConfigError, DataLoadingError

from .geometry import INTERPOLATIONS, eval_geometry, pick_interpolation, rrc_box
from .info import check_local_shards, is_remote
from .jpeg import jpeg_frame
from .plan import eval_plan, train_plan
from .shards import ShardCorrupt, members, open_shard, split_key
from .stream import STATS

log = logging.getLogger("pipeline")

IMAGE_KEYS = ("jpg", "jpeg")  # make_shards writes JPEG only; anything else counts as bad
OK, BAD, PAD = 0, 1, 2  # per-sample flags: as read, substituted for a bad sample, eval padding
INSTALL = ("pip install -r requirements-dali.txt (nvidia-dali-cuda120, or -cuda130 for CUDA 13; "
           "PyPI's bare 'nvidia-dali' is a placeholder)")


def dali_missing() -> str | None:
    """Why DALI cannot be used here (one line), or None."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return f"the DALI loader needs NVIDIA DALI, which is not installed: {INSTALL}"
    return None


# ------------------------------------------------------------------ geometry (torch-free)
def eval_roi(width: int, height: int, size: int, crop_pct: float):
    """timm's eval crop (Resize(floor(size / crop_pct)) then CenterCrop(size), torchvision's
    rounding: geometry.eval_geometry) as a region of the source image: ((y0, x0), (y1, x1)) in
    source pixels.

    Resizing exactly this region to size x size samples where resize-then-crop samples (DALI's
    ROI resize reads the pixels around the region for the filter, as a full resize does)."""
    g = eval_geometry(width, height, size, crop_pct)
    sy, sx = height / g.rh, width / g.rw
    return (g.top * sy, g.left * sx), ((g.top + size) * sy, (g.left + size) * sx)


# ------------------------------------------------------------------ where each sample is
class ShardIndex:
    """Byte offset and size of every sample's JPEG, and its label, from one pass over the tar
    headers of each shard. A sample without a JPEG or an integer label, and every sample after
    damage in a shard, has offset -1: it is bad, and the source replaces it."""

    def __init__(self, urls, lengths):
        self.urls, self.lengths = tuple(urls), tuple(lengths)
        self.base = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]).astype(np.int64)
        n = int(self.base[-1])
        self.shard = np.repeat(np.arange(len(self.lengths), dtype=np.int32), self.lengths)
        self.offset = np.full(n, -1, np.int64)
        self.size = np.zeros(n, np.int32)
        self.label = np.full(n, -1, np.int32)
        self.shard_errors = 0
        for s, url in enumerate(self.urls):
            if is_remote(url):
                raise ConfigError(f"the DALI loader reads samples by their offsets and needs local shards, not {url}")
            self._scan(s, url)

    def _scan(self, s: int, url: str) -> None:
        i, key, n, base = -1, None, self.lengths[s], int(self.base[s])
        try:
            with open_shard(url) as f:
                for name, size, read in members(f):
                    k, ext = split_key(name)
                    if k != key:
                        i, key = i + 1, k
                        if i >= n:
                            return
                    if ext in IMAGE_KEYS and self.offset[base + i] < 0:
                        self.offset[base + i], self.size[base + i] = f.tell(), size
                    elif ext == "cls":
                        try:
                            label = int(read())
                        except ValueError:
                            continue
                        if 0 <= label < 2**31:  # else it stays -1: a bad sample, skipped and counted
                            self.label[base + i] = label
            first_lost, why = i + 1, f"holds {i + 1} samples, _info.json lists {n}"
        except (ShardCorrupt, OSError) as e:  # the sample being read when it broke is lost too
            first_lost, why = max(i, 0), str(e)
        if first_lost < n:
            self.shard_errors += 1
            self.offset[base + first_lost:base + n] = -1
            log.warning("shard %s: %s; its samples from %d on are skipped", url, why, first_lost)

    def __len__(self) -> int:
        return int(self.base[-1])


# ------------------------------------------------------------------ the external source
class PlanSource:
    """The per-sample callable of fn.external_source(parallel=True): a pure function of
    (SampleInfo.epoch_idx, idx_in_epoch), as DALI's worker processes (each with a pickled copy)
    require. Epoch = base_epoch + epoch_idx; the first epoch of a pipeline may start at batch
    `start_batch` (a pipeline rebuilt after a decoder failure). Outputs per sample: JPEG bytes,
    label, flag (OK, BAD, PAD), then train: box anchor (x, y), box shape (w, h), flip,
    interpolation (index into geometry.INTERPOLATIONS); eval: ROI start (y, x), ROI end (y, x)."""

    def __init__(self, index: ShardIndex, *, train: bool, batch_size: int, seed: int, world_size: int,
                 rank: int, img_size: int, crop_pct: float, base_epoch: int = 0, start_batch: int = 0,
                 bad=frozenset(), interpolation: str = "bilinear"):
        self.index, self.train, self.batch_size = index, train, batch_size
        self.interpolation = interpolation
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.img_size, self.crop_pct = img_size, crop_pct
        self.base_epoch, self.start_batch, self.bad = base_epoch, start_batch, frozenset(bad)
        self._fds, self._pid, self._order = {}, None, (None, None)

    def __getstate__(self):  # file descriptors and the plan cache stay in the process that made them
        state = dict(self.__dict__)
        state.update(_fds={}, _pid=None, _order=(None, None))
        return state

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample ids for the epoch, in reading order."""
        if self._order[0] == epoch:
            return self._order[1]
        lengths, base = self.index.lengths, self.index.base
        common = dict(world_size=self.world_size, rank=self.rank, num_workers=1, worker=0,
                      batch_size=self.batch_size)
        plan = (train_plan(lengths, seed=self.seed, epoch=epoch, **common) if self.train
                else eval_plan(lengths, **common))
        ids = np.concatenate([np.arange(base[p.shard] + p.skip, base[p.shard] + p.skip + p.take)
                              for p in plan.pieces] or [np.zeros(0, np.int64)]).astype(np.int64)
        if self.train:  # random access allows a full permutation of the rank's range
            ids = ids[np.random.default_rng([self.seed, epoch, self.rank, 0xDA11]).permutation(len(ids))]
        self._order = (epoch, ids)
        return ids

    def num_batches(self, epoch: int) -> int:
        n = len(self.order(epoch))
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def read(self, g: int):
        """(JPEG bytes, (width, height)) of sample g, or None when it is bad."""
        ix = self.index
        off = int(ix.offset[g])
        if off < 0 or ix.label[g] < 0 or g in self.bad:
            return None
        if self._pid != os.getpid():  # a worker: open its own descriptors
            self._fds, self._pid = {}, os.getpid()
        s = int(ix.shard[g])
        try:
            fd = self._fds.get(s)
            if fd is None:
                fd = self._fds[s] = os.open(ix.urls[s], os.O_RDONLY)
            data = os.pread(fd, int(ix.size[g]), off)
        except OSError:
            return None
        wh = jpeg_frame(data) if len(data) == ix.size[g] else None
        return (data, wh) if wh else None

    def sample(self, epoch: int, p: int, flag: int = OK):
        """The outputs for position p of the epoch's order; a bad sample is replaced by the next
        good one of the order (wrapping around) and flagged BAD."""
        ids = self.order(epoch)
        q = p
        got = self.read(int(ids[q]))
        while got is None:
            flag, q = max(flag, BAD), (q + 1) % len(ids)
            if q == p:
                raise DataLoadingError(f"rank {self.rank}: not one of its {len(ids)} samples could be read")
            got = self.read(int(ids[q]))
        g = int(ids[q])
        data, (w, h) = got
        out = [np.frombuffer(data, np.uint8), np.array(self.index.label[g], np.int64), np.array(flag, np.uint8)]
        if self.train:
            rng = random.Random(f"dali-augment:{self.seed}:{epoch}:{g}")
            x, y, bw, bh = rrc_box(w, h, rng)  # then the interpolation, then the flip: our transform's order
            mode = INTERPOLATIONS.index(pick_interpolation(self.interpolation, rng))
            flip = rng.random() < 0.5
            out += [np.array((x, y), np.int32), np.array((bw, bh), np.int32), np.array(flip, np.int32),
                    np.array(mode, np.int32)]
        else:
            start, end = eval_roi(w, h, self.img_size, self.crop_pct)
            out += [np.array(start, np.float32), np.array(end, np.float32)]
        return out

    def position(self, epoch_idx: int, idx_in_epoch: int) -> int:
        return idx_in_epoch + (self.start_batch * self.batch_size if epoch_idx == 0 else 0)

    def __call__(self, info):
        epoch = self.base_epoch + info.epoch_idx
        p = self.position(info.epoch_idx, info.idx_in_epoch)
        n = len(self.order(epoch))
        if p >= self.num_batches(epoch) * self.batch_size:
            raise StopIteration  # DALI drops a batch in which any sample raised: eval pads below
        if p >= n:
            return tuple(self.sample(epoch, n - 1, flag=PAD))  # eval's last batch, dropped later
        return tuple(self.sample(epoch, p))


# ------------------------------------------------------------------ the DALI graph
def build_pipeline(source: PlanSource, *, batch_size: int, img_size: int, num_threads: int, device_id,
                   py_workers: int, start_method: str, interpolation: str, prefetch: int = 2):
    from nvidia.dali import fn, pipeline_def, types

    decoder = "cpu" if device_id is None else "mixed"
    interp = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC}.get(interpolation)
    codes = [int(types.INTERP_LINEAR), int(types.INTERP_CUBIC)]  # geometry.INTERPOLATIONS' order

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=source.seed % 2**31, prefetch_queue_depth=prefetch, py_num_workers=py_workers,
                  py_start_method=start_method)
    def pipe():
        parallel = dict(parallel=True, prefetch_queue_depth=2) if py_workers > 0 else {}
        n = 7 if source.train else 5
        outputs = fn.external_source(source, num_outputs=n, batch=False, **parallel,
                                     dtype=[types.UINT8, types.INT64, types.UINT8, None, None, types.INT32,
                                            types.INT32][:n])
        jpg, label, flag, a, b = outputs[:5]
        if source.train:
            img = fn.decoders.image_slice(jpg, a, b, device=decoder, output_type=types.RGB,
                                          adjust_orientation=False, axis_names="WH")
            # per-sample interpolation from the source: index i -> DALI code codes[i]
            mode = fn.cast(outputs[6] * (codes[1] - codes[0]) + codes[0], dtype=types.DALIDataType.INTERP_TYPE)
            img = fn.resize(img, size=(img_size, img_size), interp_type=mode, antialias=True)
            img = fn.flip(img, horizontal=outputs[5])
        else:
            img = fn.decoders.image(jpg, device=decoder, output_type=types.RGB, adjust_orientation=False)
            img = fn.resize(img, size=(img_size, img_size), roi_start=a, roi_end=b, roi_relative=False,
                            interp_type=interp, antialias=True)
        if device_id is not None:
            label = label.gpu()
        return img, label, flag  # the flags stay on the host

    return pipe()


class Probe:
    """Decodes single JPEGs with the pipeline's decoder, to find the one that broke it."""

    def __init__(self, device_id):
        self.device_id, self.pipe = device_id, None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=1, device_id=self.device_id, prefetch_queue_depth=1)
        def pipe():
            jpg = fn.external_source(name="jpg", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(jpg, device="cpu" if self.device_id is None else "mixed",
                                     output_type=types.RGB, adjust_orientation=False)
        self.pipe = pipe()
        self.pipe.build()

    def decodes(self, data: bytes) -> bool:
        if self.pipe is None:
            self._build()
        self.pipe.feed_input("jpg", [np.frombuffer(data, np.uint8)])
        try:
            self.pipe.run()
            return True
        except RuntimeError:
            self.pipe = None  # a failed DALI pipeline stays broken
            return False


# ------------------------------------------------------------------ the loader
class DaliLoader:
    """A BatchLoader (pipeline.loader) of (uint8 NHWC images, int64 labels) from a DALI pipeline.

    One pipeline serves consecutive epochs (DALI's epoch_idx counts them); a jump (resume,
    set_epoch out of order) or an abandoned epoch rebuilds it at the epoch asked for.
    `decode`: 'gpu' is DALI's mixed decoder (nvJPEG, needs `device_id`), 'cpu' its CPU decoder
    (engine.config refuses any other choice before a run starts).
    """

    def __init__(self, split, *, train: bool, batch_size: int, img_size: int = 224, seed: int = 0,
                 world_size: int = 1, rank: int = 0, num_threads: int = 2, py_workers: int | None = None,
                 decode: str = "cpu", device_id: int | None = None, crop_pct: float = 0.875,
                 interpolation: str | None = None, pin_memory: bool = False, index: ShardIndex | None = None,
                 num_classes: int | None = None):
        missing = dali_missing()
        if missing:
            raise ConfigError(missing)
        if decode == "gpu" and device_id is None:
            raise ConfigError("DALI's mixed decoder (decode 'gpu') needs a CUDA device id")
        check_local_shards(split)
        self.index = index or ShardIndex(split.urls, split.lengths)
        if num_classes:  # a label the model has no output for is a bad sample, as in our loader
            self.index.label[self.index.label >= num_classes] = -1
        self.train, self.batch_size, self.img_size = train, batch_size, img_size
        self.interpolation = interpolation or ("bilinear" if train else "bicubic")
        if self.interpolation not in INTERPOLATIONS + (("random",) if train else ()):
            raise ConfigError(f"the DALI loader: unknown interpolation {self.interpolation!r}")
        self.source_args = dict(train=train, batch_size=batch_size, seed=seed, world_size=world_size, rank=rank,
                                img_size=img_size, crop_pct=crop_pct, interpolation=self.interpolation)
        self.device_id = device_id if decode == "gpu" else None
        self.num_threads = max(1, num_threads)
        # The Python workers only read and check the JPEGs; DALI's threads decode and resize, the
        # far larger share: a quarter of the cores reads enough (threads = -j, readers = -j / 4 and
        # the variants tried: BENCHMARKS.md, section "DALI's CPU pipeline against ours").
        self.py_workers = py_workers if py_workers is not None else max(1, self.num_threads // 4)
        self.pin_memory = pin_memory
        self.epoch, self.bad = 0, set()
        self.pipe, self.pipe_epoch, self.pipe_batch = None, None, 0  # the epoch and batch it runs next
        self.counts = dict(samples=0, skipped=0, shard_errors=self.index.shard_errors, padded=0, new_buffers=0,
                           rebuilds=0)

    # -- the contract
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._source().num_batches(self.epoch)

    def stats(self) -> dict:
        return dict(dict.fromkeys(STATS, 0), **self.counts)  # the contract's keys; DALI reads no cache

    def settings(self) -> dict:
        """What runs where, for benchmark reports."""
        return {"threads": self.num_threads, "py_workers": self.py_workers,
                "decoder": "DALI mixed (nvJPEG)" if self.device_id is not None else "DALI cpu"}

    # -- the pipeline
    def _source(self, start_batch: int = 0) -> PlanSource:
        return PlanSource(self.index, base_epoch=self.epoch, start_batch=start_batch, bad=self.bad,
                          **self.source_args)

    def _start(self, start_batch: int = 0) -> None:
        if self.pipe is not None:
            self.counts["rebuilds"] += 1
        self.close()
        import torch
        # DALI's workers fork faster, but fork is refused once CUDA is initialised in this process
        method = "spawn" if torch.cuda.is_available() and torch.cuda.is_initialized() else "fork"
        self.pipe = build_pipeline(self._source(start_batch), batch_size=self.batch_size, img_size=self.img_size,
                                   num_threads=self.num_threads, device_id=self.device_id,
                                   py_workers=self.py_workers, start_method=method,
                                   interpolation=self.interpolation)
        self.pipe.build()
        self.pipe_epoch, self.pipe_batch = self.epoch, start_batch

    def close(self) -> None:
        """Stop the pipeline and its Python workers (DALI closes them when it is collected)."""
        if self.pipe is not None:
            self.pipe = None
            import gc
            gc.collect()

    def __iter__(self):
        if self.pipe is None or self.pipe_epoch != self.epoch or self.pipe_batch != 0:
            self._start()
        from nvidia.dali.plugin.pytorch import feed_ndarray
        k = 0  # batches of this epoch delivered
        while True:
            pipe = self.pipe
            try:
                images, labels, flags = pipe.run()
            except StopIteration:
                pipe.reset()  # the same pipeline runs the next epoch
                self.epoch += 1
                self.pipe_epoch, self.pipe_batch = self.epoch, 0
                return
            except RuntimeError as e:
                self._recover(k, e)  # rebuilds the pipeline at batch k, or raises
                continue
            self.pipe_batch = -1  # mid-epoch: abandoning it means a rebuild
            flags = np.asarray(flags.as_tensor()).reshape(-1)
            images, labels = self._to_torch(images, feed_ndarray), self._to_torch(labels, feed_ndarray)
            k += 1
            bad = int((flags == BAD).sum())
            self.counts["skipped"] += bad
            if self.train:
                self.counts["padded"] += bad  # each replaced by another sample of the plan
            elif (flags != OK).any():  # eval: every image once, nothing else
                import torch
                keep = torch.from_numpy(np.flatnonzero(flags == OK)).to(images.device)
                images, labels = images.index_select(0, keep), labels.index_select(0, keep)
            self.counts["samples"] += len(labels)
            if len(labels):
                yield images, labels

    def _to_torch(self, tensor_list, feed_ndarray):
        """Copy a DALI batch into a new torch tensor (DALI reuses its buffers at the next run)."""
        import torch
        from nvidia.dali.plugin.pytorch import to_torch_type
        t = tensor_list.as_tensor()
        if self.device_id is not None:
            out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=f"cuda:{self.device_id}")
            feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(out.device))
        else:
            out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], pin_memory=self.pin_memory)
            feed_ndarray(t, out)
        return out

    def _recover(self, k: int, error: Exception) -> None:
        """The pipeline failed at or after batch k of this epoch: find the samples the decoder
        rejects among the batches in flight, mark them bad and rebuild at batch k."""
        source, probe = self._source(), Probe(self.device_id)
        ids = source.order(self.epoch)
        found = []
        for p in range(k * self.batch_size, min(len(ids), (k + 4) * self.batch_size)):  # prefetch 2 + slack
            got = source.read(int(ids[p]))
            if got is not None and not probe.decodes(got[0]):
                found.append(int(ids[p]))
        if not found:
            raise error  # not a data problem we can name: keep DALI's traceback
        for g in found:
            log.warning("DALI could not decode sample %d (shard %s); it is skipped", g,
                        self.index.urls[int(self.index.shard[g])])
        self.bad.update(found)
        self._start(start_batch=k)
