"""CPU-fast equivalents of the ViT's two hot operations, and the float32 head of fast mode; the model
reads the same without them.

See BENCHMARKS.md for the measurements behind each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear whose CPU products run on oneDNN, as a 1x1 convolution over rows of tokens.

    PyTorch sends float32 CPU matmuls to MKL, which takes its AVX2 path on AMD CPUs; the same product
    as a channels-last 1x1 convolution runs on oneDNN's AVX-512 kernels: about 2x faster there, still
    IEEE float32 (BENCHMARKS.md). Deterministic mode (the lossless codec) keeps the plain
    matmul, because PyTorch picks the convolution kernel by batch size and thread count.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dim() != 3 or x.dtype not in (torch.float32, torch.bfloat16)
                or torch.are_deterministic_algorithms_enabled()):
            return super().forward(x)
        images = x.unsqueeze(1).permute(0, 3, 1, 2)  # b images of 1 x n pixels, channels-last
        y = F.conv2d(images, self.weight[:, :, None, None], self.bias)
        return y.permute(0, 2, 3, 1).reshape(*x.shape[:2], -1)


class Float32Linear(Linear):
    """A Linear that keeps its weights' precision under autocast: the ViT's head.

    Its outputs are the coupling's bias and scale, which enter z and the logdet directly. In fast mode,
    computing them in bf16 tripled the bpd error against float32, for ~1% of the FLOPs (BENCHMARKS.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v (PyTorch's CPU softmax accumulates bf16 inputs in float32)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v
