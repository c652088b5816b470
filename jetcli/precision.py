"""Where the ViT may run in bf16, and where it must not.

"fast" runs the couplings' ViTs under bf16 autocast. Splitting/merging are index gathers, and the
affine update, logdet and the loss are computed in float32 (see `Coupling.forward`), so only the
networks' bias and scale lose precision. The lossless codec never uses it: the bias and scale must be
bit-identical on encode and decode.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "fast")


def compute_context(device: torch.device | str, precision: str = "fp32"):
    """A context manager under which `Jet.forward`/`inverse` run at the given precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
