"""What a device setting names: auto, cpu, cuda or cuda:N, checked against this machine."""

from __future__ import annotations

import torch

from jetcli.errors import SettingError


def resolve_device(spec: str) -> torch.device:
    """auto = the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SettingError("{device} {spec!r}: expected auto, cpu, cuda or cuda:N", spec=spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("{device} cuda: no CUDA device is available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SettingError("{device} {spec}: there are {count} CUDA devices (cuda:0 ...)", spec=spec,
                           count=torch.cuda.device_count())
    return device


def process_gpu(local_rank: int, visible: int) -> int:
    """The CUDA ordinal for the process of this local rank among several on one machine: its local rank
    when it sees that many GPUs (torchrun on a multi-GPU machine), else the one GPU it sees (launchers
    that give each process its own, like SLURM's --gpus-per-task=1, make the local rank no ordinal)."""
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise SettingError("local rank {rank}, but this process sees {count} CUDA devices: run at most {count} "
                       "processes per machine, or give each process one GPU (CUDA_VISIBLE_DEVICES)",
                       rank=local_rank, count=visible)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
