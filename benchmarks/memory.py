#!/usr/bin/env python
"""Training memory per preset: weights, gradients and AdamW state from the parameter count, and the
activations one image keeps for the backward pass, measured.

    JETCLI_KERNELS=reference python benchmarks/memory.py      # writes benchmarks/results/memory.json

Activations: the bytes of every tensor autograd saves during a training forward of ONE coupling
(torch.autograd.graph.saved_tensors_hooks, each storage counted once), on two images minus on one,
times the couplings (every coupling has the same shapes), in float32 and in fast mode (bf16 autocast on
the ViTs). With the
reference kernels (scaled_dot_product_attention, as on a GPU) attention saves no (tokens x tokens)
matrix. The flow's input and latents (12 KB an image at 64x64) are not counted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from jetcli.config import KEEP_PATCHES, preset
from jetcli.model import Jet
from jetcli.precision import compute_context

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


def saved_bytes(model: Jet, batch: int, precision: str) -> int:
    """Bytes of the storages autograd keeps for backward in one training forward of `batch` images."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.rand(batch, *model.config.image_size, 3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), compute_context(torch.device("cpu"), precision):
        model(x)
    return sum(seen.values())


def saved_bytes_per_image(name: str, precision: str) -> int:
    """What one more image adds (2 images minus 1: the weights autograd also keeps do not count), for
    one coupling, times the couplings."""
    config = preset(name)
    torch.manual_seed(0)
    model = Jet(config.replace(couplings=1)).train()
    return (saved_bytes(model, 2, precision) - saved_bytes(model, 1, precision)) * config.couplings


def main() -> None:
    rows = []
    for name in KEEP_PATCHES[:5]:  # the paper's presets
        params = preset(name).parameter_count()
        rows.append({"preset": name, "parameters": params, "weights_gb": 4 * params / GB,
                     "gradients_gb": 4 * params / GB, "adamw_state_gb": 8 * params / GB,
                     "state_total_gb": 16 * params / GB,
                     "activations_per_image_gb": {p: saved_bytes_per_image(name, p) / GB for p in ("fp32", "fast")}})
        print(json.dumps(rows[-1]), file=sys.stderr)
    out = REPO / "benchmarks" / "results" / "memory.json"
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
