"""Training over several processes under torchrun.

Every process builds the same model from the same seed and takes its contiguous share of each global
batch; DistributedDataParallel averages the gradients. Only rank 0 writes checkpoints, metrics and
progress. The data order, crops, flips and noise are pure functions of (seed, stream position)
(jetcli.data), so N processes at global batch B follow one process at batch B. Every process reads the
run folder to resume, so on several machines it must be on shared storage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join torchrun's process group when there is one: nccl with one GPU per local rank on CUDA, gloo
    on CPU. The rendezvous (MASTER_ADDR/PORT, RANK, WORLD_SIZE) comes from torchrun's environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size()), device


def finish_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
