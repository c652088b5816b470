"""Checkpoints: jetcli's own safetensors format, and where a model comes from.

Own format: a `model.safetensors` whose metadata carries `format=jetcli`, `format_version` and the
config as JSON, with a `config.json` beside it in a folder (the layout of a Hub repo).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from jetcli.config import JetConfig
from jetcli.fileio import atomic_write
from jetcli.model import Jet

FORMAT = "jetcli"
FORMAT_VERSION = "1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match its model."""


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
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def build(config: JetConfig, state: dict[str, torch.Tensor], source: str) -> Jet:
    """A Jet from a config and a state dict in jetcli's layout, refusing any mismatch."""
    model = Jet(config)
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
        if not torch.isfinite(tensor.float()).all():
            raise CheckpointError(f"{source}: {name} holds NaN or Inf")
    model.load_state_dict(state)
    model.eval()
    return model


def load_own(path: Path) -> Jet:
    """Load jetcli's own format from a folder or a .safetensors file."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    meta = read_metadata(weights)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{weights}: not a jetcli checkpoint (no format=jetcli metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{weights}: format version {meta.get('format_version')} is not supported "
                              f"(this jetcli reads version {FORMAT_VERSION})")
    try:
        config = JetConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{weights}: bad config in metadata ({e})") from None
    side = weights.parent / CONFIG_NAME
    if side.exists():
        try:
            side_config = JetConfig.from_json(side.read_text())
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{side}: unreadable config ({e})") from None
        if side_config != config:
            raise CheckpointError(f"{side} disagrees with the config stored in {weights.name}")
    return build(config, load_state(weights), str(weights))
