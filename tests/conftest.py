"""Shared tiny fixtures: the repository paths and random non-identity Jets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from jetcli import Jet, JetConfig, preset

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository (read-only); skips the test where it is absent."""
    path = REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


def random_jet(config: JetConfig | None = None, seed: int = 0, strength: float = 0.3) -> Jet:
    """A Jet whose couplings are not the identity: every final projection is re-initialised with
    normal noise so that bias and raw scale have a standard deviation of about `strength`."""
    config = config or preset("tiny-16")
    torch.manual_seed(seed)
    model = Jet(config).eval()
    with torch.no_grad():
        for coupling in model.couplings:
            proj = coupling.vit.final_proj
            proj.weight.normal_(std=strength / math.sqrt(config.width))
            proj.bias.normal_(std=strength)
    return model


@pytest.fixture(name="random_jet")
def random_jet_fixture():
    """Factory: `random_jet(config=None, seed=0, strength=0.3)` -> a random non-identity Jet."""
    return random_jet
