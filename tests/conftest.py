"""Shared tiny fixtures: the repository paths and random non-identity Jets (jetcli.testing)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from jetcli.testing import random_jet

REPO_ROOT = Path(__file__).resolve().parents[1]

# Kernel choices (jetcli.kernels) are cached per machine: tests keep theirs apart from the user's.
os.environ.setdefault("JETCLI_CACHE_DIR", tempfile.mkdtemp(prefix="jetcli-kernels-"))


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


@pytest.fixture(name="random_jet")
def random_jet_fixture():
    """Factory: `random_jet(config=None, seed=0, strength=0.3)` -> a random non-identity Jet."""
    return random_jet
