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


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
