"""torchrun's environment (any number of nodes) or a single process, as one small object."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.errors import ConfigError
from model.device import Device, resolve_device

DIST_BN = ("reduce", "broadcast", "")  # timm's --dist-bn choices


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: Device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, msg: str) -> None:
        """Print on rank 0 only."""
        if self.main:
            print(msg, flush=True)

    def all_reduce(self, values: list[float], op=None) -> list[float]:
        """Sum (or `op`) a few numbers over all ranks; one small collective, one host sync."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device.torch)
        if self.world > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: str = "auto", device_id: int = 0, local_rank: int | None = None) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", local_rank if local_rank is not None else 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    dev = resolve_device(device, local if world > 1 else device_id)
    dev.set_current()
    if world > 1:
        kwargs = {"device_id": dev.torch} if dev.type == "cuda" else {}
        dist.init_process_group(dev.dist_backend, **kwargs)
    return Dist(rank, world, local, local_world, dev)


def sync_batchnorm(model, d: Dist):
    """--sync-bn: torch's SyncBatchNorm in place of every BatchNorm (only with several processes,
    as timm); call before building the optimizer and wrapping in DDP."""
    if d.world < 2:
        return model
    if d.device.type == "cpu":
        raise ConfigError("--sync-bn needs an accelerator: torch's SyncBatchNorm does not run on the CPU")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def distribute_bn(model, d: Dist, mode: str) -> None:
    """--dist-bn (timm's utils.distribute_bn): make every rank's BN running statistics the
    average over ranks ("reduce") or rank 0's ("broadcast"); "" leaves them per rank."""
    if mode not in DIST_BN:
        raise ConfigError(f"unknown --dist-bn {mode!r}: choose reduce, broadcast or ''")
    if d.world > 1 and mode:
        from timm.utils import distribute_bn as timm_distribute_bn
        timm_distribute_bn(model, d.world, reduce=mode == "reduce")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator",
              "ProcessGroupNCCL", "ProcessGroupHCCL")


def peer_failure(error: BaseException) -> str | None:
    """One line when a collective failed because another rank died; None for anything else."""
    if not (isinstance(error, RuntimeError) and dist.is_available() and dist.is_initialized()
            and dist.get_world_size() > 1):
        return None
    text = str(error).strip()
    if not (isinstance(error, dist.DistError) or any(s in text for s in _PEER_LOST)):
        return None
    first = text.splitlines()[0] if text else type(error).__name__
    if first.startswith("[") and "] " in first:  # gloo's "[.../pair.cc:561] Connection closed ..."
        first = first.split("] ", 1)[1]
    return f"lost another rank ({first.split('. ')[0]}); see its own error above"
