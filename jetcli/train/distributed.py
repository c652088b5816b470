"""Training over several processes under torchrun.

Every process builds the same model from the same seed and takes its contiguous share of each global
batch; DistributedDataParallel averages the gradients. Only rank 0 writes checkpoints, metrics and
progress. The data order, crops, flips and noise are pure functions of (seed, stream position)
(jetcli.data), so N processes at global batch B follow one process at batch B. Every process reads the
run folder to resume, so on several machines it must be on shared storage.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from jetcli.devices import process_gpu

DDP_OPTIONS = inspect.signature(DistributedDataParallel).parameters


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_device(device: torch.device) -> torch.device:
    """This process's device: on CUDA the GPU of its local rank (jetcli.devices.process_gpu), whatever
    index was asked for, since each process needs its own GPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", process_gpu(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()))


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join torchrun's process group when there is one (or use the one the caller made): nccl with one
    GPU per process on CUDA, gloo on CPU. The rendezvous (MASTER_ADDR/PORT, RANK, WORLD_SIZE) comes from
    torchrun's environment. It comes before the data are loaded, so that a failed rendezvous shows at
    once rather than after every process has read the whole dataset."""
    if not in_process_group() and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed(), device
    device = process_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not in_process_group():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size()), device


def data_parallel(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP over the process group. The buffers are the splits' index orders, equal in every process (the
    same seed, or the same checkpoint) and never trained: DDP does not send them again at every forward,
    as it does by default (the switch is `forward_sync_buffers` from torch 2.13, `broadcast_buffers`
    before)."""
    switch = "forward_sync_buffers" if "forward_sync_buffers" in DDP_OPTIONS else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **{switch: False})


def finish_distributed(device: torch.device | None = None) -> None:
    """Every process leaves the group together, as soon as training ends: a barrier (each has finished
    its collectives), then the group is destroyed (nccl's teardown may wait for the other processes).
    Rank 0's pictures and upload come after, so a slow or failed upload keeps no process waiting."""
    if not in_process_group():
        return
    on_gpu = device is not None and device.type == "cuda" and dist.get_backend() == "nccl"
    dist.barrier(device_ids=[device.index] if on_gpu else None)
    dist.destroy_process_group()
