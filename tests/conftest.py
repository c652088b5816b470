"""Shared tiny fixtures: the repository paths and random non-identity Jets (jetcli.testing)."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest
import typer

from jetcli import JetConfig, checkpoints
from jetcli.testing import random_jet

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CLI_CONFIG = JetConfig(image_size=(16, 16), couplings=2, block_depth=1, width=16, heads=2)
TINY_TRAIN = ["--preset", "tiny-16", "--couplings", "1", "--width", "16", "--heads", "2", "--batch-size", "4",
              "--device", "cpu"]  # `jet train` options of a model that trains in moments

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


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A folder holding a saved random Jet of TINY_CLI_CONFIG (16x16 images), for the commands to load."""
    folder = tmp_path_factory.mktemp("model")
    checkpoints.save(random_jet(TINY_CLI_CONFIG, seed=2), folder)
    return folder


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """The test's temporary folder, made the working directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
