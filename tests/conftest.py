"""Shared tiny fixtures: the repository paths and random non-identity Jets (jetcli.testing)."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest
import typer

from jetcli.testing import random_jet

REPO_ROOT = Path(__file__).resolve().parents[1]

# Kernel choices (jetcli.kernels) are cached per machine: tests keep theirs apart from the user's.
os.environ.setdefault("JETCLI_CACHE_DIR", tempfile.mkdtemp(prefix="jetcli-kernels-"))


@functools.cache
def device_commands() -> frozenset[str]:
    """The jet commands that take --device."""
    from jetcli.cli import app
    commands = typer.main.get_command(app).commands
    return frozenset(name for name, command in commands.items() if any(p.name == "device" for p in command.params))


def on_cpu(args) -> list[str]:
    """`jet ARGS` with `--device cpu` after the command, when it takes one and none is given. Tests that
    compare with numbers computed on the CPU (or rely on its bit-for-bit repeatability) say so: on a GPU
    host the default device, auto, is CUDA."""
    args = [str(a) for a in args]
    command = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    if command is None or args[command] not in device_commands() or "--device" in args:
        return args
    return [*args[:command + 1], "--device", "cpu", *args[command + 1:]]


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
