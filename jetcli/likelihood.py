"""Dequantisation and bits per dimension, exactly as big_vision's Jet trainer defines them.

Pixels p in {0..255} map to x = p / 127.5 - 1 in [-1, 1]; one 8-bit bin is 1/127.5 wide, so uniform
noise u ~ U[0, 1/127.5) turns the discrete image into a continuous one, and

    bpd = (sum_d [-log N(z_d; 0, 1)] + D log 127.5 - logdet) / (D ln 2)

is an upper bound on the discrete model's code length in bits per dimension.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from jetcli.model import Jet

BIN = 1 / 127.5  # width of one 8-bit bin in model space
LOG_BIN_INV = math.log(127.5)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def to_model_space(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (or integer-valued) pixels -> [-1, 1], the bottom edge of each bin."""
    return pixels.to(dtype) / 127.5 - 1


def dequantize(pixels: torch.Tensor, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixels -> x + u with u ~ U[0, 1/127.5), the reference's uniform dequantisation."""
    x = to_model_space(pixels, dtype)
    noise = torch.rand(x.shape, generator=generator, dtype=dtype, device="cpu" if generator is None
                       else generator.device).to(x.device)
    return x + noise * BIN


class Bits(NamedTuple):
    """Per-image bits per dim and its two parts: bpd = nll - logdet."""

    bpd: torch.Tensor
    nll: torch.Tensor  # (standard-normal NLL of z + D log 127.5) / (D ln 2)
    logdet: torch.Tensor  # logdet / (D ln 2)


def bits_per_dim(z: torch.Tensor, logdet: torch.Tensor) -> Bits:
    """Per-image bits per dim of latents z (B, ...) with log|det dz/dx| (B,), in float32 or wider."""
    z = z.flatten(1).float() if z.dtype not in (torch.float32, torch.float64) else z.flatten(1)
    dims = z.shape[1]
    nll = (0.5 * z.square() + HALF_LOG_2PI).sum(dim=1) + dims * LOG_BIN_INV
    norm = dims * math.log(2)
    logdet = logdet.to(nll.dtype)
    return Bits((nll - logdet) / norm, nll / norm, logdet / norm)


def image_bits(model: Jet, pixels: torch.Tensor, samples: int = 1,
               generator: torch.Generator | None = None) -> Bits:
    """bpd of uint8 images (B, H, W, C), averaged over `samples` dequantisation draws."""
    total = None
    for _ in range(samples):
        z, logdet = model(dequantize(pixels, generator))
        bits = bits_per_dim(z, logdet)
        total = bits if total is None else Bits(*(a + b for a, b in zip(total, bits)))
    return Bits(*(t / samples for t in total))
