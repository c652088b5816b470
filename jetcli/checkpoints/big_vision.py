"""big_vision's layout: its Flax param tree, flattened to '/'-joined keys with the scan axis over
couplings first (`couplings/dnn/...`), to ours and back, as an `.npz`.

The tree stores weights only. What its shapes cannot say comes from big_vision's defaults
(BIG_VISION_DEFAULTS: flax numerics, the Model's scale factor, RGB, square images);
`from_big_vision(params, **overrides)` replaces any of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from jetcli.checkpoints.layouts import cyclic_pattern, finish_config, matrix_from_order, order_from_matrix, require, \
    spatial_pattern
from jetcli.checkpoints.own import CheckpointError, build_model, count_indexed
from jetcli.config import JetConfig
from jetcli.fileio import atomic_write, one_line
from jetcli.model import Jet

BIG_VISION_DEFAULTS = dict(scale_factor=2.0, channels=3, ln_eps=1e-6, gelu="tanh")
BV_CHANNEL_MASKS = "channel_coupling_masks-FREEZE_ME"
BV_SPATIAL_MASKS = "spatial_coupling_masks-FREEZE_ME"
_BV_MASKS = {"channels": BV_CHANNEL_MASKS, "spatial": BV_SPATIAL_MASKS}
_BV = "couplings/dnn/"
_BV_BLOCK = _BV + "vit/encoderblock_{d}/"
_BV_ATTN = _BV_BLOCK + "MultiHeadDotProductAttention_0/"


def _dense(prefix: str, our: str):
    """A flax Dense <-> torch Linear: kernel (in, out) is the transposed weight."""
    return [(our + ".weight", [prefix + "kernel"], lambda k, c: k[0].T, lambda w, c: [w.T]),
            (our + ".bias", [prefix + "bias"], lambda b, c: b[0], lambda b, c: [b])]


def _plain(path: str, our: str):
    return [(our, [path], lambda a, c: a[0], lambda a, c: [a])]


# (our ViT param, big_vision paths, to ours (arrays, cfg), to big_vision (array, cfg)); {d} = block.
# Jet builds big_vision's vit.Encoder without scan, so each block is its own `encoderblock_{d}`.
# Flax attention: query/key/value kernels (W, heads, head_dim), out kernel (heads, head_dim, W).
_BIG_VISION_TABLE = [
    *_dense(_BV + "init_proj/", "init_proj"),
    *_plain(_BV + "posemb", "posemb"),
    *_plain(_BV_BLOCK + "LayerNorm_0/scale", "blocks.{d}.norm1.weight"),
    *_plain(_BV_BLOCK + "LayerNorm_0/bias", "blocks.{d}.norm1.bias"),
    ("blocks.{d}.attn.qkv.weight", [_BV_ATTN + f"{n}/kernel" for n in ("query", "key", "value")],
     lambda ks, c: np.concatenate([k.reshape(c.width, c.width).T for k in ks]),
     lambda w, c: [x.T.reshape(c.width, c.heads, -1) for x in np.split(w, 3)]),
    ("blocks.{d}.attn.qkv.bias", [_BV_ATTN + f"{n}/bias" for n in ("query", "key", "value")],
     lambda bs, c: np.concatenate([b.reshape(-1) for b in bs]),
     lambda b, c: [x.reshape(c.heads, -1) for x in np.split(b, 3)]),
    ("blocks.{d}.attn.out.weight", [_BV_ATTN + "out/kernel"],
     lambda k, c: k[0].reshape(c.width, c.width).T, lambda w, c: [w.T.reshape(c.heads, -1, c.width)]),
    *_plain(_BV_ATTN + "out/bias", "blocks.{d}.attn.out.bias"),
    *_plain(_BV_BLOCK + "LayerNorm_1/scale", "blocks.{d}.norm2.weight"),
    *_plain(_BV_BLOCK + "LayerNorm_1/bias", "blocks.{d}.norm2.bias"),
    *_dense(_BV_BLOCK + "MlpBlock_0/Dense_0/", "blocks.{d}.mlp.fc1"),
    *_dense(_BV_BLOCK + "MlpBlock_0/Dense_1/", "blocks.{d}.mlp.fc2"),
    *_plain(_BV + "vit/encoder_norm/scale", "norm.weight"),
    *_plain(_BV + "vit/encoder_norm/bias", "norm.bias"),
    *_dense(_BV + "final_proj/", "final_proj"),
]


def _table_rows(depth: int):
    for our, paths, to_ours, to_bv in _BIG_VISION_TABLE:
        for d in range(depth if "{d}" in our else 1):
            yield our.format(d=d), [p.format(d=d) for p in paths], to_ours, to_bv


def big_vision_config(params: dict[str, np.ndarray], source: str = "big_vision params",
                      **overrides) -> JetConfig:
    """Infer the config of a big_vision Jet param tree from its shapes and the masks."""
    params = _strip_params_prefix(params)
    channel_masks = require(params, BV_CHANNEL_MASKS, source)
    spatial_masks = require(params, BV_SPATIAL_MASKS, source)
    kinds = _big_vision_kinds(channel_masks, spatial_masks, source)
    _, width, heads, _ = require(params, _BV_ATTN.format(d=0) + "query/kernel", source).shape
    hidden = require(params, _BV_BLOCK.format(d=0) + "MlpBlock_0/Dense_0/kernel", source).shape[-1]
    depth = count_indexed(params, r"couplings/dnn/vit/encoderblock_(\d+)/")
    inferred = dict(BIG_VISION_DEFAULTS, couplings=len(kinds), kinds=cyclic_pattern(kinds, JetConfig.kinds),
                    width=width, heads=heads, block_depth=depth,
                    mlp_ratio=hidden // width, patch_dim=channel_masks.shape[-1], tokens=spatial_masks.shape[-1])
    config = finish_config(inferred, overrides, source)
    nh, nw = config.image_size[0] // config.patch_size, config.image_size[1] // config.patch_size
    names = [spatial_pattern(order_from_matrix(torch.from_numpy(spatial_masks[i]), f"{BV_SPATIAL_MASKS}[{i}]",
                                            source), nh, nw, source, i)
             for i, kind in enumerate(kinds) if kind == "spatial"]
    return config.replace(spatial_projs=cyclic_pattern(names, config.spatial_projs))


def from_big_vision(params: dict[str, np.ndarray], source: str = "big_vision params", **overrides) -> Jet:
    """A Jet from big_vision's flattened Flax param tree ('/'-joined keys, scan axis first)."""
    params = _strip_params_prefix(params)
    config = big_vision_config(params, source, **overrides)
    ours, used = {}, set(_BV_MASKS.values())
    for i, (kind, _) in enumerate(config.plan()):
        name = _BV_MASKS[kind]
        ours[f"couplings.{i}.split.order"] = order_from_matrix(torch.from_numpy(params[name][i]), f"{name}[{i}]",
                                                               source)
    for our, paths, to_ours, _ in _table_rows(config.block_depth):
        arrays = [require(params, p, source) for p in paths]
        used.update(paths)
        for i in range(config.couplings):
            try:
                value = to_ours([a[i] for a in arrays], config)
            except (IndexError, ValueError) as e:
                raise CheckpointError(f"{source}: {paths[0]} has an unexpected shape ({one_line(e)})") from None
            ours[f"couplings.{i}.vit.{our}"] = torch.from_numpy(np.asarray(value, dtype=np.float32))
    extra = sorted(set(params) - used)
    if extra:
        raise CheckpointError(f"{source}: {len(extra)} unexpected arrays (e.g. {extra[0]})")
    return build_model(config, ours, source)


def to_big_vision(model: Jet) -> dict[str, np.ndarray]:
    """The model's weights as big_vision's flattened param tree (float32 numpy arrays)."""
    cfg = model.config
    state = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    params = {}
    for our, paths, _, to_bv in _table_rows(cfg.block_depth):
        per_coupling = [to_bv(state[f"couplings.{i}.vit.{our}"], cfg) for i in range(cfg.couplings)]
        for j, path in enumerate(paths):
            params[path] = np.stack([arrays[j] for arrays in per_coupling])
    # Each coupling has both masks; the one of the other kind is an all-zero placeholder.
    for kind, name in _BV_MASKS.items():
        n = cfg.patch_dim if kind == "channels" else cfg.num_patches
        masks = np.zeros((cfg.couplings, n, n), np.float32)
        for i, (c, (k, _)) in enumerate(zip(model.couplings, cfg.plan())):
            if k == kind:
                masks[i] = matrix_from_order(c.split.order.cpu()).numpy()
        params[name] = masks
    return params


def save_big_vision(model: Jet, path: str | os.PathLike) -> Path:
    """big_vision's .npz of the flattened param tree. Loading applies BIG_VISION_DEFAULTS (flax numerics)
    unless overridden."""
    path = Path(path)
    params = to_big_vision(model)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **params)

    atomic_write(path, write)
    return path


def _strip_params_prefix(params: dict) -> dict:
    """Accept a tree saved with its top-level 'params/' collection name."""
    if params and all(k.startswith("params/") for k in params):
        return {k[len("params/"):]: v for k, v in params.items()}
    return params


def _big_vision_kinds(channel_masks: np.ndarray, spatial_masks: np.ndarray, source: str) -> list[str]:
    if channel_masks.ndim != 3 or spatial_masks.ndim != 3 or len(channel_masks) != len(spatial_masks):
        raise CheckpointError(f"{source}: coupling masks have unexpected shapes "
                              f"{channel_masks.shape} and {spatial_masks.shape}")
    kinds = []
    for i, (c, s) in enumerate(zip(channel_masks, spatial_masks)):
        has_c, has_s = bool(np.any(c)), bool(np.any(s))
        if has_c == has_s:
            raise CheckpointError(f"{source}: coupling {i} needs exactly one non-zero mask (channel or spatial)")
        kinds.append("channels" if has_c else "spatial")
    return kinds
