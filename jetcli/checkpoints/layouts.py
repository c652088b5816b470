"""What the foreign layouts share: projection matrices as index orders, spatial patterns recognised
from their orders, and a config finished from what the tensors' shapes say."""

from __future__ import annotations

import math

import torch

from jetcli.checkpoints.own import CheckpointError
from jetcli.config import SPATIAL_PATTERNS, JetConfig
from jetcli.fileio import one_line
from jetcli.model import spatial_order


def order_from_matrix(matrix: torch.Tensor, name: str, source: str) -> torch.Tensor:
    """The index order of a projection P with x @ P == x[..., order]: P[order[m], m] = 1."""
    n = matrix.shape[-1]
    ones = matrix == 1
    if matrix.shape != (n, n) or not ((matrix == 0) | ones).all() or not (ones.sum(0) == 1).all() \
            or not (ones.sum(1) == 1).all():
        raise CheckpointError(f"{source}: {name} is not an exact permutation matrix")
    return ones.long().argmax(0)


def matrix_from_order(order: torch.Tensor) -> torch.Tensor:
    n = len(order)
    matrix = torch.zeros(n, n)
    matrix[order, torch.arange(n)] = 1
    return matrix


def spatial_pattern(order: torch.Tensor, nh: int, nw: int, source: str, index: int) -> str:
    """Which spatial pattern (checkerboard, vstripes-shift, ...) an order is. jet-pytorch builds its
    matrices on the transposed (width, height) grid, so that grid is accepted too; the stored order is
    what the model uses."""
    for pattern in SPATIAL_PATTERNS:
        if any(torch.equal(order, spatial_order(pattern, a, b)) for a, b in ((nh, nw), (nw, nh))):
            return pattern
    raise CheckpointError(f"{source}: spatial projection {index} is not one of {', '.join(SPATIAL_PATTERNS)}")


def cyclic_pattern(seq: list[str], preferred: tuple[str, ...]) -> tuple[str, ...]:
    """A pattern that, repeated as big_vision cycles kinds and projections, gives seq: `preferred` if it
    does (so default configs come back equal), else the shortest one."""
    for pattern in (preferred, *(tuple(seq[:p]) for p in range(1, len(seq) + 1))):
        if pattern and all(s == pattern[i % len(pattern)] for i, s in enumerate(seq)):
            return pattern
    return preferred


def finish_config(inferred: dict, overrides: dict, source: str) -> JetConfig:
    """The inferred fields with any overrides; patch and image size (square) from the shapes unless given."""
    fields = {**inferred, **overrides}
    patch_dim, tokens = fields.pop("patch_dim"), fields.pop("tokens")
    fields.setdefault("patch_size", math.isqrt(patch_dim // fields["channels"]))
    fields.setdefault("image_size", (math.isqrt(tokens) * fields["patch_size"],) * 2)
    try:
        config = JetConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: inferred config is invalid ({one_line(e)})") from None
    if config.patch_dim != patch_dim or config.num_patches != tokens:
        raise CheckpointError(f"{source}: cannot infer the image geometry from {tokens} tokens of {patch_dim} "
                              "dims; pass image_size=, patch_size= and channels=")
    return config



def require(state: dict, key: str, source: str):
    if key not in state:
        raise CheckpointError(f"{source}: missing tensor {key} (not a Jet checkpoint of this layout?)")
    return state[key]

