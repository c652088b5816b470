"""Telling checkpoint layouts apart, and loading any of them.

- own format (jetcli.checkpoints.own): a folder, or a `.safetensors` with `format=jetcli` metadata;
- jet-pytorch 0.0.2 state dicts (jetcli.checkpoints.jet_pytorch): any other `.safetensors`, or a
  `.pt/.bin/.pth` that loads with `torch.load(weights_only=True)`;
- big_vision Flax params (jetcli.checkpoints.big_vision): an `.npz` of the flattened param tree.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

from jetcli.checkpoints.big_vision import from_big_vision
from jetcli.checkpoints.jet_pytorch import from_jet_pytorch
from jetcli.checkpoints.own import FORMAT, WEIGHTS_NAME, CheckpointError, load_own, load_state, read_metadata
from jetcli.config import JetConfig
from jetcli.fileio import one_line
from jetcli.model import Jet

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


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



def _check_overrides(config: JetConfig, overrides: dict, source: str) -> None:
    differ = {k: v for k, v in overrides.items() if getattr(config, k, object()) != v}
    if differ:
        raise CheckpointError(f"{source}: stores its own config, which disagrees with {differ}")

