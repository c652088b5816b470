"""Checkpoints: jetcli's own format, and adapters from the two public Jet layouts.

Every format ends in the one parameter layout of `jetcli.model.Jet`; the adapters only rename, reshape
and turn stored projection matrices into the `order` index buffers. `load(path)` tells them apart:

- own format: a `model.safetensors` whose metadata carries `format=jetcli`, `format_version` and the
  config as JSON, with a `config.json` beside it in a folder (the layout of a Hub repo);
- jet-pytorch 0.0.2 state dicts (`.safetensors`, or a `.pt/.bin/.pth` that loads with
  `torch.load(weights_only=True)`), e.g. the public `btrude/jet_imagenet64x64_200m.safetensors`;
- big_vision Flax params as an `.npz` of the flattened param tree (`couplings/dnn/...` with the
  leading scan axis over couplings).

The foreign layouts store weights only. What their shapes cannot say is taken from the writer's own
defaults (`JET_PYTORCH_DEFAULTS`, `BIG_VISION_DEFAULTS`: numerics, scale factor, RGB, square images,
and for jet-pytorch its heads and kinds pattern); `load(path, **overrides)` replaces any of them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from jetcli.config import SPATIAL_PROJS, JetConfig
from jetcli.fileio import atomic_write, one_line
from jetcli.model import Jet, spatial_order

FORMAT = "jetcli"
FORMAT_VERSION = "1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
# Read through the open file handle. The default backend ("mmap") maps the file by its path a second
# time: a file replaced in between (a run writing its next checkpoint) failed to load, or gave tensors
# read at the old offsets of the new file (about 1 read in 150 while a writer replaced it in a loop).
READ_BACKEND = "pread"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its model."""


# =========================================================================== own format
def save(model: Jet, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
    """Save to a folder (model.safetensors + config.json) or to a single .safetensors file."""
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path / WEIGHTS_NAME
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_json(),
                **(extra_metadata or {})}
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    if weights.parent == path:
        atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(model.config.to_json() + "\n"))
    return weights


def read_metadata(path: Path) -> dict[str, str]:
    with _readable(path), safe_open(str(path), framework="pt", backend=READ_BACKEND) as f:
        return f.metadata() or {}


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor, from the header alone."""
    with _readable(path), safe_open(str(path), framework="pt", backend=READ_BACKEND) as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def load_state(path: Path) -> dict[str, torch.Tensor]:
    with _readable(path):
        return load_file(str(path), backend=READ_BACKEND)


@contextlib.contextmanager
def _readable(path: Path):
    """Whatever safetensors raises on a missing, damaged or foreign file, as one CheckpointError."""
    try:
        yield
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(e)})") from None


def build(config: JetConfig, state: dict[str, torch.Tensor], source: str) -> Jet:
    """A Jet from a config and a state dict in jetcli's layout, refusing any mismatch."""
    check_size(config, {k: tuple(v.shape) for k, v in state.items()}, source)
    return fill(unfilled(config), state, source)


def unfilled(config: JetConfig) -> Jet:
    """A Jet with uninitialised storage, for a checkpoint to fill: no random init that loading would
    throw away (building and filling the 200M-parameter ImageNet64 model: 1.3 s -> 0.4 s here)."""
    with torch.device("meta"):
        model = Jet(config)
    return model.to_empty(device="cpu")


def check_size(config: JetConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse a config whose model would be larger than its tensors (given by name -> shape) before that
    model is built: a stored config is text, and one saying 10**9 couplings must not allocate anything.

    The numbers of couplings and blocks and the shapes of three tensors of coupling 0 fix the size of
    every tensor; `fill` then checks each one."""
    counts = {"couplings": (config.couplings, _count(shapes, r"couplings\.(\d+)\.")),
              "blocks per coupling": (config.block_depth, _count(shapes, r"couplings\.0\.vit\.blocks\.(\d+)\."))}
    for what, (wanted, found) in counts.items():
        if wanted != found:
            raise CheckpointError(f"{source}: the config has {wanted} {what}, the tensors {found}")
    half, width = config.patch_dim // 2, config.width
    needed = {"couplings.0.vit.init_proj.weight": (width, half),
              "couplings.0.vit.posemb": (1, config.num_patches, width),
              "couplings.0.vit.blocks.0.mlp.fc1.weight": (config.mlp_ratio * width, width)}
    for name, wanted in needed.items():
        if name in shapes and tuple(shapes[name]) != wanted:
            raise CheckpointError(f"{source}: {name} has shape {tuple(shapes[name])}, the config needs {wanted}")


def fill(model: Jet, state: dict[str, torch.Tensor], source: str) -> Jet:
    """Load a state dict in jetcli's layout into a freshly built model, refusing any mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        what += [f"{len(extra)} unexpected (e.g. {extra[0]})"] if extra else []
        raise CheckpointError(f"{source}: tensors do not match the config: {', '.join(what)}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the config needs {tuple(expected[name].shape)}")
        if name.endswith(".split.order"):
            # A bad order would silently break invertibility: it must be a permutation.
            if tensor.dtype.is_floating_point or not torch.equal(tensor.sort().values.long(),
                                                                  torch.arange(len(tensor))):
                raise CheckpointError(f"{source}: {name} is not a permutation")
        # A sum is NaN/Inf whenever an element is; the slower exact check runs only when it is.
        elif not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: {name} holds NaN or Inf")
    model.load_state_dict(state)
    model.eval()
    return model


def load_own(path: str | os.PathLike) -> Jet:
    """Load jetcli's own format from a folder or a .safetensors file."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    meta = read_metadata(weights)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{weights}: not a jetcli checkpoint (no format=jetcli metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{weights}: format version {meta.get('format_version')} is not supported "
                              f"(this jetcli reads version {FORMAT_VERSION})")
    config = _config_from_json(meta.get("config"), f"{weights}: bad config in metadata")
    side = weights.parent / CONFIG_NAME
    if side.exists():
        if _config_from_json(_read_text(side), f"{side}: unreadable config") != config:
            raise CheckpointError(f"{side} disagrees with the config stored in {weights.name}")
    return build(config, load_state(weights), str(weights))


# =========================================================================== detection
def load(path: str | os.PathLike, **overrides) -> Jet:
    """Load a Jet from a local folder or file in any supported format (see the module docstring).

    `overrides` are JetConfig fields for what a foreign checkpoint does not store (e.g. `heads=4` for
    a jet-pytorch file, `ln_eps=1e-5, gelu="exact"` to read big_vision weights with the port's
    numerics). For the own format, which stores its config, they must agree with it.
    """
    weights, layout = identify(path)
    if layout == "big_vision":
        return from_big_vision(read_npz(weights), str(weights), **overrides)
    if layout == FORMAT:
        model = load_own(path)
        _check_overrides(model.config, overrides, str(weights))
        return model
    pickled = weights.suffix.lower() in PICKLE_SUFFIXES
    return from_jet_pytorch(read_pickled_state(weights) if pickled else load_state(weights), str(weights),
                            **overrides)


def identify(path: str | os.PathLike) -> tuple[Path, str]:
    """The weights file a local checkpoint path names (a folder names its model.safetensors) and its
    layout: "jetcli", "jet-pytorch" or "big_vision"."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{path}: folder has no {WEIGHTS_NAME}")
        path = path / WEIGHTS_NAME
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return path, "big_vision"
    if suffix in PICKLE_SUFFIXES:
        return path, "jet-pytorch"
    if suffix != ".safetensors":
        raise CheckpointError(f"{path}: unknown checkpoint format (expected a folder, .safetensors, "
                              f".npz, or a weights-only {'/'.join(PICKLE_SUFFIXES)})")
    return path, FORMAT if read_metadata(path).get("format") == FORMAT else "jet-pytorch"


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz, never unpickling anything."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # damaged bytes raise OSError, BadZipFile, SyntaxError, MemoryError (a lying header)...
        raise CheckpointError(f"{path}: not a readable .npz of plain arrays ({one_line(e)})") from None


def read_pickled_state(path: Path) -> dict[str, torch.Tensor]:
    """A .pt/.bin/.pth only if it is a plain state dict that loads with weights_only=True."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError... all mean "refused"
        # torch's message is a page that suggests weights_only=False; keep only the reason.
        reason = re.search(r"WeightsUnpickler error:\s*([^.\n]+)", str(e))
        reason = reason[1] if reason else f"{type(e).__name__}: {one_line(e)}"
        raise CheckpointError(f"{path}: refused: not a weights-only torch file ({reason}); "
                              "convert it to .safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: refused: not a plain state dict of tensors")
    return state


# =========================================================================== shared helpers
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


def spatial_kind(order: torch.Tensor, nh: int, nw: int, source: str, index: int) -> str:
    """Which of the six spatial splits an order is. jet-pytorch builds its matrices on the transposed
    (width, height) grid, so that grid is accepted too; the stored order is what the model uses."""
    for kind in SPATIAL_PROJS:
        if any(torch.equal(order, spatial_order(kind, a, b)) for a, b in ((nh, nw), (nw, nh))):
            return kind
    raise CheckpointError(f"{source}: spatial projection {index} is not one of {', '.join(SPATIAL_PROJS)}")


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


def _check_overrides(config: JetConfig, overrides: dict, source: str) -> None:
    differ = {k: v for k, v in overrides.items() if getattr(config, k, object()) != v}
    if differ:
        raise CheckpointError(f"{source}: stores its own config, which disagrees with {differ}")


def _require(state: dict, key: str, source: str):
    if key not in state:
        raise CheckpointError(f"{source}: missing tensor {key} (not a Jet checkpoint of this layout?)")
    return state[key]


def _count(keys, pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _config_from_json(text: str | None, what: str) -> JetConfig:
    try:
        return JetConfig.from_json(text)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{what} ({one_line(e)})") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({one_line(e)})") from None


# =========================================================================== jet-pytorch 0.0.2
# What the port's state dict cannot say: its constructor defaults, and its torch numerics.
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
    couplings = _count(state, r"blocks\.(\d+)\.dnn\.init_proj\.weight$")
    if not couplings:
        raise CheckpointError(f"{source}: no jet-pytorch tensors (blocks.N.dnn.*) found")
    width, half = _require(state, "blocks.0.dnn.init_proj.weight", source).shape
    tokens = _require(state, "blocks.0.dnn.pos_emb", source).shape[1]
    depth = _count(state, r"blocks\.0\.dnn\.encoder\.blocks\.(\d+)\.ln1\.weight$")
    hidden = _require(state, "blocks.0.dnn.encoder.blocks.0.mlp.in_proj.weight", source).shape[0]
    inferred = dict(JET_PYTORCH_DEFAULTS, couplings=couplings, width=width, block_depth=depth,
                    mlp_ratio=hidden // width, patch_dim=2 * half, tokens=tokens)
    config = finish_config(inferred, overrides, source)
    n_spatial = sum(kind == "spatial" for kind, _ in config.plan())
    spatial = _require(state, "spatial_projections", source)
    if len(spatial) != n_spatial or len(_require(state, "channel_projections", source)) != couplings - n_spatial:
        raise CheckpointError(f"{source}: holds {len(spatial)} spatial projections, but kinds={config.kinds} "
                              f"over {couplings} couplings needs {n_spatial}; pass kinds=")
    nh, nw = config.image_size[0] // config.patch_size, config.image_size[1] // config.patch_size
    names = [spatial_kind(order_from_matrix(m, f"spatial_projections[{k}]", source), nh, nw, source, k)
             for k, m in enumerate(spatial)]
    return config.replace(spatial_projs=cyclic_pattern(names, config.spatial_projs))


def from_jet_pytorch(state: dict[str, torch.Tensor], source: str = "jet-pytorch state", **overrides) -> Jet:
    """A Jet from a jet-pytorch 0.0.2 state dict (its `Jet.state_dict()` layout)."""
    config = jet_pytorch_config(state, source, **overrides)
    model = unfilled(config)
    ours, used, seen = {}, set(_JP_PROJECTIONS.values()), {"channels": 0, "spatial": 0}
    for i, (kind, _) in enumerate(config.plan()):
        name, k = _JP_PROJECTIONS[kind], seen[kind]
        seen[kind] += 1
        ours[f"couplings.{i}.split.order"] = order_from_matrix(state[name][k], f"{name}[{k}]", source)
    for key in model.state_dict():
        if not key.endswith(".split.order"):
            theirs = jet_pytorch_name(key)
            ours[key] = _require(state, theirs, source)
            used.add(theirs)
    extra = sorted(set(state) - used)
    if extra:
        raise CheckpointError(f"{source}: {len(extra)} unexpected tensors (e.g. {extra[0]})")
    return fill(model, ours, source)


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
    atomic_write(path, lambda tmp: save_file(state, tmp))
    return path


# =========================================================================== big_vision
# What big_vision's param tree cannot say: flax numerics, the Model's scale factor, RGB square images.
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
    channel_masks = _require(params, BV_CHANNEL_MASKS, source)
    spatial_masks = _require(params, BV_SPATIAL_MASKS, source)
    kinds = _big_vision_kinds(channel_masks, spatial_masks, source)
    _, width, heads, _ = _require(params, _BV_ATTN.format(d=0) + "query/kernel", source).shape
    hidden = _require(params, _BV_BLOCK.format(d=0) + "MlpBlock_0/Dense_0/kernel", source).shape[-1]
    inferred = dict(BIG_VISION_DEFAULTS, couplings=len(kinds), kinds=cyclic_pattern(kinds, JetConfig.kinds),
                    width=width, heads=heads, block_depth=_count(params, r"couplings/dnn/vit/encoderblock_(\d+)/"),
                    mlp_ratio=hidden // width, patch_dim=channel_masks.shape[-1], tokens=spatial_masks.shape[-1])
    config = finish_config(inferred, overrides, source)
    nh, nw = config.image_size[0] // config.patch_size, config.image_size[1] // config.patch_size
    names = [spatial_kind(order_from_matrix(torch.from_numpy(spatial_masks[i]), f"{BV_SPATIAL_MASKS}[{i}]",
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
        arrays = [_require(params, p, source) for p in paths]
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
    return build(config, ours, source)


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
