"""`jet train` as the paper trains: no flips unless --flip (kept by the run), --epochs, and the paper's
presets at other image sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from jetcli import checkpoints
from jetcli.train import STATE_NAME, read_metrics, saved_run

PIXELS = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
TINY = ["--couplings", "1", "--block-depth", "1", "--width", "32", "--heads", "2", "--batch-size", "4",
        "--ckpt-every", "1", "--device", "cpu", "--precision", "fp32"]


def run_cli(*args):
    from jetcli.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def data(tmp_path):
    np.save(tmp_path / "pixels.npy", PIXELS)
    return tmp_path / "pixels.npy"


def test_flip_is_off_unless_asked_and_a_resumed_run_keeps_it(tmp_path, data):
    for name, flags in (("plain", []), ("flipped", ["--flip"])):
        result = run_cli("train", data, "--preset", "tiny-16", *TINY, "--steps", "1", "-o", tmp_path / name, *flags)
        assert result.exit_code == 0, result.output
        assert saved_run(tmp_path / name)[1]["flip"] is bool(flags)
    result = run_cli("train", "--resume", "-o", tmp_path / "plain", "--flip")
    assert result.exit_code == 2 and "--flip True (the run has False)" in result.output
    result = run_cli("train", "--resume", "-o", tmp_path / "flipped", "--steps", "2")
    assert result.exit_code == 0, result.output
    assert saved_run(tmp_path / "flipped")[1]["flip"] is True


def test_runs_saved_before_flips_were_a_setting_resume_flipping(tmp_path, data):
    out = tmp_path / "old"
    assert run_cli("train", data, "--preset", "tiny-16", *TINY, "--steps", "1", "-o", out).exit_code == 0
    path = out / STATE_NAME
    meta = checkpoints.read_metadata(path)
    options = json.loads(meta["options"])
    del options["extra"]["flip"]  # as the trainer before this change wrote it
    save_file(load_file(str(path)), str(path), metadata={**meta, "options": json.dumps(options)})
    assert saved_run(out)[1]["flip"] is None
    result = run_cli("train", "--resume", "-o", out, "--steps", "2")
    assert result.exit_code == 0, result.output
    assert "keeps its random flips" in " ".join(result.output.split())
    assert saved_run(out)[1]["flip"] is True and [r["step"] for r in read_metrics(out)] == [1, 2]


def test_epochs_set_the_steps(tmp_path, data):
    result = run_cli("train", data, "--preset", "tiny-16", *TINY, "--epochs", "0.55", "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(tmp_path / "a")] == [1, 2, 3]  # 0.55 x 20 images / 4 = 2.75
    result = run_cli("train", data, "--preset", "tiny-16", *TINY, "--epochs", "1", "--steps", "3", "-o", tmp_path / "b")
    assert result.exit_code == 2 and "--steps or --epochs" in result.output
    result = run_cli("train", data, "--preset", "tiny-16", *TINY, "--epochs", "0", "-o", tmp_path / "c")
    assert result.exit_code == 2 and "--epochs must be positive" in result.output


def test_a_paper_preset_on_other_images_keeps_256_patches_or_says_why(tmp_path):
    np.save(tmp_path / "small.npy", np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    np.save(tmp_path / "odd.npy", PIXELS[:, :12, :12])
    result = run_cli("train", tmp_path / "small.npy", "--preset", "imagenet1k-64", *TINY, "--steps", "1",
                     "-o", tmp_path / "a")
    assert result.exit_code == 0, result.output
    assert checkpoints.load(tmp_path / "a").config.patch_size == 2  # 32x32: 256 patches of 2x2
    result = run_cli("train", tmp_path / "odd.npy", "--preset", "imagenet1k-64", *TINY, "--steps", "1",
                     "-o", tmp_path / "b")
    assert result.exit_code == 2 and "--patch-size" in result.output and "256 square patches" in result.output
    result = run_cli("train", tmp_path / "odd.npy", "--preset", "imagenet1k-64", *TINY, "--steps", "1",
                     "--patch-size", "2", "-o", tmp_path / "c")
    assert result.exit_code == 0, result.output
