"""Drawing images from a Jet: z ~ N(0, temperature²) pushed through the inverse flow."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from jetcli.model import Jet
from jetcli.precision import compute_context


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Model space [-1, 1] -> uint8: the bin each value falls in (the inverse of dequantisation)."""
    return torch.floor((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


def sample(model: Jet, n: int, temperature: float = 1.0, generator: torch.Generator | None = None,
           batch_size: int = 64, precision: str = "fp32", on_batch=None) -> np.ndarray:
    """`n` uint8 images (n, H, W, C). The noise is drawn on the CPU from `generator`, so a seed gives
    the same latents on every device."""
    out = []
    for images in sample_batches(model, n, temperature, generator, batch_size, precision):
        out.append(images)
        if on_batch is not None:
            on_batch(len(images))
    return np.concatenate(out)


@torch.no_grad()
def sample_batches(model: Jet, n: int, temperature: float = 1.0, generator: torch.Generator | None = None,
                   batch_size: int = 64, precision: str = "fp32") -> Iterator[np.ndarray]:
    """The images of `sample`, a batch (b, H, W, C) at a time, as they are drawn: the same images, in
    the same order, without holding them all."""
    model.eval()
    device = next(model.parameters()).device
    h, w = model.config.image_size
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        z = torch.randn(b, h, w, model.config.channels, generator=generator) * temperature
        with compute_context(device, precision):
            x, _ = model.inverse(z.to(device))
        yield to_pixels(x)
