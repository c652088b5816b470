"""Where the ViT may run in bf16, and where it must not.

"fast" runs the bodies of the couplings' ViTs under bf16 autocast. Splitting/merging are index
gathers, and each ViT's final projection, the affine update, the logdet and the loss are computed in
float32 (see `Coupling.forward` and `kernels.Float32Linear`), so only the networks' hidden activations
lose precision. The lossless codec never uses it: the bias and scale must be bit-identical on encode and
decode.

"auto" picks fast where the hardware multiplies bf16 natively (CUDA from Ampere on; CPUs with
AVX512-BF16 or AMX) and float32 elsewhere, where emulated bf16 would be slower than float32; "fast"
asked for there runs, with a warning.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

PRECISIONS = ("fp32", "fast")
CHOICES = ("auto", *PRECISIONS)


def native_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run in hardware on `device` (private torch probes, absent ones read as no)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def resolve(precision: str, device: torch.device | str) -> str:
    """`precision` with "auto" replaced by what suits `device`."""
    if precision not in CHOICES:
        raise ValueError(f"precision must be one of {CHOICES}, got {precision!r}")
    if precision == "auto":
        return "fast" if native_bf16(device) else "fp32"
    if precision == "fast" and not native_bf16(device):
        warnings.warn(f"precision fast on {device}: bf16 is emulated on this device (no native bf16 "
                      "matmuls), slower than fp32", stacklevel=2)
    return precision


def compute_context(device: torch.device | str, precision: str = "fp32"):
    """A context manager under which `Jet.forward`/`inverse` run at the given precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
