"""jetcli's own checkpoint format, and the checked way every layout ends in a model.

A `model.safetensors` whose metadata carries `format=jetcli`, `format_version` and the config as JSON,
with a `config.json` beside it in a folder (the layout of a Hub repo). Every layout, own or foreign,
ends in `build_model`: the config's size checked against the tensors before anything is allocated,
then every tensor checked as it is loaded.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from jetcli.config import JetConfig
from jetcli.fileio import atomic_write, one_line, os_error
from jetcli.model import Jet

FORMAT = "jetcli"
FORMAT_VERSION = "1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Read through the open file handle. The default backend ("mmap") maps the file by its path a second
# time: a file replaced in between (a run writing its next checkpoint) failed to load, or gave tensors
# read at the old offsets of the new file (about 1 read in 150 while a writer replaced it in a loop).
READ_BACKEND = "pread"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its model."""


def save(model: Jet, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> Path:
    """Save to a folder (model.safetensors + config.json) or to a single .safetensors file."""
    path = Path(path)
    weights = path if path.suffix == ".safetensors" else path / WEIGHTS_NAME
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_json(),
                **(extra_metadata or {})}
    write_safetensors(weights, tensors, metadata)
    if weights.parent == path:
        atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(model.config.to_json() + "\n"))
    return weights


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A .safetensors file written atomically; a failed write (a full disk...) is a WriteError naming it."""

    def write(tmp: str) -> None:
        try:
            save_file(tensors, tmp, metadata=metadata)
        except SafetensorError as e:  # it wraps the OSError in its message: "... (os error 28)"
            raise os_error(str(e)) from None

    atomic_write(path, write)


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


def build_model(config: JetConfig, state: dict[str, torch.Tensor], source: str) -> Jet:
    """A Jet from a config and a state dict in jetcli's layout, refusing any mismatch."""
    check_size(config, {k: tuple(v.shape) for k, v in state.items()}, source)
    return load_weights(empty_model(config), state, source)


def empty_model(config: JetConfig) -> Jet:
    """A Jet with uninitialised storage, for a checkpoint to fill: no random init that loading would
    throw away (building and filling the 200M-parameter ImageNet64 model: 1.3 s -> 0.4 s here)."""
    with torch.device("meta"):
        model = Jet(config)
    return model.to_empty(device="cpu")


def check_size(config: JetConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse a config whose model would be larger than its tensors (given by name -> shape) before that
    model is built: a stored config is text, and one saying 10**9 couplings must not allocate anything.

    The numbers of couplings and blocks and the shapes of three tensors of coupling 0 fix the size of
    every tensor; `load_weights` then checks each one."""
    counts = {"couplings": (config.couplings, count_indexed(shapes, r"couplings\.(\d+)\.")),
              "blocks per coupling": (config.block_depth,
                                      count_indexed(shapes, r"couplings\.0\.vit\.blocks\.(\d+)\."))}
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


def load_weights(model: Jet, state: dict[str, torch.Tensor], source: str) -> Jet:
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
    return build_model(config, load_state(weights), str(weights))



def count_indexed(keys, pattern: str) -> int:
    """How many distinct indices `pattern`'s group matches among the keys (couplings, blocks...)."""
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

