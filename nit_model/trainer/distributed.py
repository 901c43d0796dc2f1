"""Process-group set-up for `torchrun` and the few collectives the trainer needs.

Under ``torchrun --nproc_per_node N`` (WORLD_SIZE > 1 in the environment) the process group is
initialised here: NCCL when training on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on
CPU. A group that the caller initialised already is used as is and left alone at the end.
"""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup_distributed", "pick_device"]


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when available else CPU; 'cuda' fails clearly without a GPU."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from .config import ConfigError  # a setting that this machine cannot honour
            raise ConfigError("train.device='cuda' but torch sees no CUDA device (this torch build or machine has none); "
                               "use train.device=cpu or auto")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


@dataclasses.dataclass
class DistInfo:
    """Rank, world size and device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a no-op with one process)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj, src: int = 0):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def cleanup(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup_distributed(device_pref: str = "auto") -> DistInfo:
    """Join (or create, under torchrun) the default process group; one process otherwise."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = pick_device(device_pref, local)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistInfo(rank, world, local, device, owns_group=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, 0, pick_device(device_pref, 0), owns_group=False)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30), **kwargs)
    return DistInfo(rank, world, local, device, owns_group=True)
