"""jet-pytorch 0.0.2's layout: its state dict (e.g. the public btrude/jet_imagenet64x64_200m) to ours and back.

The layout stores weights only. What its shapes cannot say comes from the port's own defaults
(JET_PYTORCH_DEFAULTS: its heads and kinds pattern, numerics, scale factor, RGB, square images);
`from_jet_pytorch(state, **overrides)` replaces any of them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from jetcli.checkpoints.layouts import (cyclic_pattern, finish_config, matrix_from_order, order_from_matrix, require,
                                        spatial_pattern)
from jetcli.checkpoints.own import CheckpointError, count_indexed, empty_model, load_weights, write_safetensors
from jetcli.config import JetConfig
from jetcli.model import Jet

JET_PYTORCH_DEFAULTS = dict(heads=8, scale_factor=2.0, channels=3, ln_eps=1e-5, gelu="exact",
                            kinds=("channels", "channels", "channels", "channels", "spatial"))

# Our state-dict names -> the port's, applied in order to `couplings.{i}.vit.*` keys.
_JET_PYTORCH_RENAMES = [
    (r"^couplings\.(\d+)\.vit\.", r"blocks.\1.dnn."),
    (r"\.dnn\.blocks\.", ".dnn.encoder.blocks."),
    (r"\.dnn\.norm\.", ".dnn.encoder.ln."),
    (r"\.norm([12])\.", r".ln\1."),
    (r"\.attn\.qkv\.", ".mha.in_proj_"),
    (r"\.attn\.out\.", ".mha.out_proj."),
    (r"\.mlp\.fc1\.", ".mlp.in_proj."),
    (r"\.mlp\.fc2\.", ".mlp.out_proj."),
    (r"\.posemb$", ".pos_emb"),
]
_JP_PROJECTIONS = {"channels": "channel_projections", "spatial": "spatial_projections"}


def jet_pytorch_name(ours: str) -> str:
    for pattern, replacement in _JET_PYTORCH_RENAMES:
        ours = re.sub(pattern, replacement, ours)
    return ours


def jet_pytorch_config(state: dict[str, torch.Tensor], source: str = "jet-pytorch state",
                       **overrides) -> JetConfig:
    """Infer the config of a jet-pytorch 0.0.2 state dict from its shapes and the port's defaults.

    Two quirks of the port are read as they are, since the stored matrices define its function: it
    fills spatial couplings beyond its list of projection types with "checkerboard" instead of cycling,
    and builds the spatial matrices with height and width swapped (the same for square images; pass
    image_size= for a non-square file). Its heads are not stored: 8, its default, unless overridden.
    """
    couplings = count_indexed(state, r"blocks\.(\d+)\.dnn\.init_proj\.weight$")
    if not couplings:
        raise CheckpointError(f"{source}: no jet-pytorch tensors (blocks.N.dnn.*) found")
    width, half = require(state, "blocks.0.dnn.init_proj.weight", source).shape
    tokens = require(state, "blocks.0.dnn.pos_emb", source).shape[1]
    depth = count_indexed(state, r"blocks\.0\.dnn\.encoder\.blocks\.(\d+)\.ln1\.weight$")
    hidden = require(state, "blocks.0.dnn.encoder.blocks.0.mlp.in_proj.weight", source).shape[0]
    inferred = dict(JET_PYTORCH_DEFAULTS, couplings=couplings, width=width, block_depth=depth,
                    mlp_ratio=hidden // width, patch_dim=2 * half, tokens=tokens)
    config = finish_config(inferred, overrides, source)
    n_spatial = sum(kind == "spatial" for kind, _ in config.plan())
    spatial = require(state, "spatial_projections", source)
    if len(spatial) != n_spatial or len(require(state, "channel_projections", source)) != couplings - n_spatial:
        raise CheckpointError(f"{source}: holds {len(spatial)} spatial projections, but kinds={config.kinds} "
                              f"over {couplings} couplings needs {n_spatial}; pass kinds=")
    nh, nw = config.image_size[0] // config.patch_size, config.image_size[1] // config.patch_size
    names = [spatial_pattern(order_from_matrix(m, f"spatial_projections[{k}]", source), nh, nw, source, k)
             for k, m in enumerate(spatial)]
    return config.replace(spatial_projs=cyclic_pattern(names, config.spatial_projs))


def from_jet_pytorch(state: dict[str, torch.Tensor], source: str = "jet-pytorch state", **overrides) -> Jet:
    """A Jet from a jet-pytorch 0.0.2 state dict (its `Jet.state_dict()` layout)."""
    config = jet_pytorch_config(state, source, **overrides)
    model = empty_model(config)
    ours, used, seen = {}, set(_JP_PROJECTIONS.values()), {"channels": 0, "spatial": 0}
    for i, (kind, _) in enumerate(config.plan()):
        name, k = _JP_PROJECTIONS[kind], seen[kind]
        seen[kind] += 1
        ours[f"couplings.{i}.split.order"] = order_from_matrix(state[name][k], f"{name}[{k}]", source)
    for key in model.state_dict():
        if not key.endswith(".split.order"):
            theirs = jet_pytorch_name(key)
            ours[key] = require(state, theirs, source)
            used.add(theirs)
    extra = sorted(set(state) - used)
    if extra:
        raise CheckpointError(f"{source}: {len(extra)} unexpected tensors (e.g. {extra[0]})")
    return load_weights(model, ours, source)


def to_jet_pytorch(model: Jet) -> dict[str, torch.Tensor]:
    """The model's weights in jet-pytorch 0.0.2's state-dict layout (load with strict=True there)."""
    state = {jet_pytorch_name(k): v.detach().cpu().clone() for k, v in model.state_dict().items()
             if not k.endswith(".split.order")}
    cfg = model.config
    for kind, name in _JP_PROJECTIONS.items():
        mats = [matrix_from_order(c.split.order.cpu()) for c, (k, _) in zip(model.couplings, cfg.plan())
                if k == kind]
        n = cfg.patch_dim if kind == "channels" else cfg.num_patches
        state[name] = torch.stack(mats) if mats else torch.zeros(0, n, n)
    return state


def save_jet_pytorch(model: Jet, path: str | os.PathLike) -> Path:
    """A jet-pytorch 0.0.2 .safetensors (no metadata, like the public checkpoint).

    The layout stores weights only: loading applies the port's defaults (JET_PYTORCH_DEFAULTS) unless
    overridden, so a model with other heads, kinds or numerics needs those overrides to come back.
    """
    path = Path(path)
    state = {k: v.contiguous() for k, v in to_jet_pytorch(model).items()}
    write_safetensors(path, state)
    return path

