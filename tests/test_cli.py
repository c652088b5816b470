"""The `jet` command line, run for real: in-process with typer's CliRunner, and as subprocesses where the
environment (HF_HOME, HF_HUB_OFFLINE), pipes or an installed wheel are the point.

Every model is a tiny random Jet saved into a temporary folder. Its config uses jet-pytorch's numerics
(ln_eps 1e-5, exact GELU, 8 heads), so the same weights saved in jet-pytorch's layout load back into the
same function and both layouts must give identical numbers.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, on_cpu
from PIL import Image
from typer.testing import CliRunner

from jetcli import JetConfig, __version__, checkpoints, hub
from jetcli.cli import app
from jetcli.images import covered, grid, pad_to_tiles, png_bytes, tiles
from jetcli.likelihood import image_bits
from jetcli.precision import resolve
from jetcli.scoring import tile_generators
from jetcli.testing import random_jet

COMMANDS = ("train", "bpd", "sample", "encode", "decode", "info")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def jet():
    config = JetConfig(image_size=(16, 16), couplings=5, block_depth=1, width=32, heads=8,
                                   ln_eps=1e-5, gelu="exact")
    return random_jet(config, seed=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory, jet):
    """The model in three layouts and a few images, in a module-wide temporary folder."""
    root = tmp_path_factory.mktemp("cli")
    checkpoints.save(jet, root / "own")
    checkpoints.save_jet_pytorch(jet, root / "jp.safetensors")
    checkpoints.save_big_vision(jet, root / "bv.npz")
    rng = np.random.default_rng(0)
    images = {"even.png": (32, 48), "ragged.png": (40, 50), "tiny.png": (8, 8)}
    for name, (h, w) in images.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    return root


@pytest.fixture()
def run(monkeypatch, tmp_path):
    """Invoke `jet ARGS` in-process in a fresh working folder; returns click's Result."""
    monkeypatch.chdir(tmp_path)

    def invoke(*args, input=None):
        return CliRunner().invoke(app, on_cpu(args), input=input)

    return invoke


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def user_error(result, *fragments):
    """Exit 2, and the reason on one stderr line that starts with 'error:'; no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def reference_bits(model, path, seed=0, samples=1) -> float:
    """An image's bits as jet bpd defines them, computed with the library tile by tile: the edge-padded
    image's tiles, each with its own noise generator (scoring.tile_generators)."""
    image = pixels(path)
    padded = tiles(pad_to_tiles(image, (16, 16)), (16, 16))
    generators = tile_generators(image, seed, len(padded))
    with torch.inference_mode():
        return sum(float(image_bits(model, torch.from_numpy(tile[None]), samples, g).bpd) * tile.size
                   for tile, g in zip(padded, generators))


def fake_hub_repo(hub_cache: Path, repo: str, files: dict[str, Path], refs=("main",)) -> str:
    """A model repo in huggingface_hub's cache layout: blobs named by hash, snapshot symlinks, refs."""
    root = hub_cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for name, source in files.items():
        blob = hashlib.sha256(source.read_bytes()).hexdigest()
        shutil.copy(source, root / "blobs" / blob)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    (root / "refs").mkdir()
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return commit


# --------------------------------------------------------------------------- help, version, errors
def test_help_lists_commands_and_each_has_a_worked_example(run):
    top = ok(run("--help")).output
    assert all(command in top for command in COMMANDS)
    for command in COMMANDS:
        text = ok(run(command, "--help")).output.split("Usage:")[1]
        examples = [line for line in text.splitlines() if line.strip().startswith(f"jet {command} ")]
        assert examples or command == "train" and "jet train " in text, f"{command} --help has no example"
    assert ok(run("--version")).output.strip().startswith(f"jet {__version__}")


def test_option_parsing_errors_are_one_line_too(run):
    user_error(run("sample", "-n", "0"), "'-n' / '--num'", "greater than or equal to 1", "sample --help)")
    user_error(run("bpd", "x.png", "--samples", "many"), "'--samples'", "valid integer", "bpd --help)")
    user_error(run("sample", "--bogus"), "No such option: --bogus")
    user_error(run("sample", "--precision", "bf16"), "'bf16' is not one of 'auto', 'fp32', 'fast'")
    user_error(run("bpd"), "Missing argument")
    user_error(run("nosuch"), "No such command 'nosuch'", " --help)")
    alone = run()  # `jet` alone still prints the help, and exits 2 as click does
    assert "Usage:" in alone.output and alone.exit_code == 2 and isinstance(alone.exception, SystemExit)


def test_user_errors_are_one_line_and_debug_shows_the_traceback(run, files):
    user_error(run("bpd", files / "missing.png", "-m", files / "own"), "missing.png: no such file")
    user_error(run("bpd", files / "even.png", "-m", files / "nothing"), "nothing: no such file or folder")
    user_error(run("bpd", files / "even.png", "-m", files / "own", "--device", "tpu"), "--device 'tpu'")
    user_error(run("bpd", files / "even.png", "-m", files / "own", "--json", "--csv"), "choose one")
    if not torch.cuda.is_available():
        user_error(run("sample", "-m", files / "own", "--device", "cuda"), "no CUDA device is available")
    for args in (["--debug", "bpd"], ["bpd", "--debug"]):  # --debug is taken after the command too
        result = run(*args, files / "missing.png", "-m", files / "own")
        assert result.exit_code != 0 and type(result.exception).__name__ == "ImageError"
    assert run("bpd", "--", "--debug", "-m", files / "own").exit_code == 2  # after --, a file name


# --------------------------------------------------------------------------- bpd
def test_bpd_json_counts_every_pixel_and_matches_the_library(run, files, jet):
    images = [files / "ragged.png", files / "even.png", files / "tiny.png"]
    result = json.loads(ok(run("bpd", *images, "-m", files / "own", "--json")).stdout)
    assert set(result) == {"model", "model_sha256", "jetcli_version", "precision", "device", "seed", "samples",
                           "batch_size", "complete", "images", "skipped", "mean_bpd", "sem", "png_bpd", "tiles",
                           "pixels", "padded_pixels"}
    assert result["model"] == str(files / "own") and result["precision"] == "fp32"  # the default: exact numbers
    assert result["model_sha256"] == hashlib.sha256((files / "own" / "model.safetensors").read_bytes()).hexdigest()
    assert (result["jetcli_version"], result["seed"], result["samples"]) == (__version__, 0, 1)
    assert result["complete"] is True and result["skipped"] == []
    # ragged 40x50 pads to 48x64: 3x4 tiles; even 32x48 is 2x3 whole tiles; tiny 8x8 pads to one tile
    rows = result["images"]
    assert [(r["height"], r["width"], r["tiles"], r["padded_pixels"]) for r in rows] == [
        (40, 50, 12, 48 * 64 - 40 * 50), (32, 48, 6, 0), (8, 8, 1, 256 - 64)]
    bits = [reference_bits(jet, path) for path in images]
    dims = np.array([40 * 50 * 3, 32 * 48 * 3, 8 * 8 * 3])
    for row, path, image_bits_, image_dims in zip(rows, images, bits, dims):
        assert set(row) == {"path", "height", "width", "tiles", "padded_pixels", "bpd", "png_bpd"}
        assert row["path"] == str(path)
        assert row["bpd"] == pytest.approx(image_bits_ / image_dims, rel=1e-6)  # over the image's own dims
        assert row["png_bpd"] == 8 * len(png_bytes(pixels(path), optimize=True)) / image_dims
    assert result["mean_bpd"] == pytest.approx(sum(bits) / dims.sum(), rel=1e-6)
    per_image = np.array(bits) / dims  # the ratio estimator's standard error, images as draws
    weights = dims / dims.sum()
    expected_sem = math.sqrt(3 / 2 * np.sum(weights ** 2 * (per_image - result["mean_bpd"]) ** 2))
    assert result["sem"] == pytest.approx(expected_sem, rel=1e-5)
    assert (result["tiles"], result["pixels"]) == (19, 40 * 50 + 32 * 48 + 64)


def test_bpd_of_an_image_is_the_same_alone_beside_others_and_in_any_order(run, files, tmp_path):
    def scores(*paths, options=()):
        rows = json.loads(ok(run("bpd", *paths, "-m", files / "own", "--json", *options)).stdout)["images"]
        return {Path(r["path"]).name: r["bpd"] for r in rows}

    alone = scores(files / "ragged.png")["ragged.png"]
    assert scores(files / "even.png", files / "ragged.png")["ragged.png"] == alone
    assert scores(files / "ragged.png", files / "even.png")["ragged.png"] == alone
    shutil.copy(files / "ragged.png", tmp_path / "copy.png")  # another name, another folder: the same noise
    assert scores(tmp_path / "copy.png")["copy.png"] == alone
    assert scores(files / "ragged.png", options=("--batch-size", "5"))["ragged.png"] == pytest.approx(alone, rel=1e-6)
    assert scores(files / "ragged.png", options=("--seed", "1"))["ragged.png"] != alone


def test_bpd_same_in_all_three_checkpoint_layouts(run, files):
    means = [json.loads(ok(run("bpd", files / "even.png", "-m", files / name, "--json")).stdout)["mean_bpd"]
             for name in ("own", "jp.safetensors")]
    assert means[0] == means[1]
    # big_vision's layout implies flax numerics (eps 1e-6, tanh GELU): the same weights, another function.
    bv = json.loads(ok(run("bpd", files / "even.png", "-m", files / "bv.npz", "--json")).stdout)["mean_bpd"]
    assert bv != means[0] and abs(bv - means[0]) < 0.05


def test_bpd_seed_samples_and_precision(run, files):
    def bpd(*args):
        return json.loads(ok(run("bpd", files / "even.png", "-m", files / "own", "--json", *args)).stdout)

    def mean(*args):
        return bpd(*args)["mean_bpd"]

    assert mean("--seed", "1") == mean("--seed", "1") != mean("--seed", "2")
    assert mean("--samples", "3") != mean()
    assert mean("--batch-size", "4") == pytest.approx(mean(), abs=1e-6)
    fast = bpd("--precision", "fast")
    assert fast["precision"] == "fast" and fast["mean_bpd"] != mean() and abs(fast["mean_bpd"] - mean()) < 0.01
    assert bpd("--precision", "auto")["precision"] == resolve("auto", "cpu")


def test_bpd_folders_stdin_lists_csv_and_table(run, files, tmp_path):
    nested = tmp_path / "set" / "deeper"
    nested.mkdir(parents=True)
    shutil.copy(files / "even.png", nested / "a.png")
    shutil.copy(files / "ragged.png", tmp_path / "set" / "b.PNG")
    (tmp_path / "set" / "notes.txt").write_text("not an image")
    csv = ok(run("bpd", "set", "-m", files / "own", "--csv")).stdout.splitlines()
    assert csv[0] == ("path,height,width,tiles,padded_pixels,bpd,png_bpd,model,model_sha256,precision,seed,samples,"
                      "jetcli_version")
    assert [line.split(",")[:5] for line in csv[1:]] == [[str(Path("set", "b.PNG")), "40", "50", "12", "1072"],
                                                         [str(Path("set", "deeper", "a.png")), "32", "48", "6", "0"]]
    assert all(line.split(",")[7:] == [str(files / "own"), hashlib.sha256((files / "own" / "model.safetensors")
                                       .read_bytes()).hexdigest(), "fp32", "0", "1", __version__] for line in csv[1:])
    listed = ok(run("bpd", "-", "-m", files / "own", "--csv", input=f"{nested / 'a.png'}\n\n")).stdout
    alone = ok(run("bpd", nested / "a.png", "-m", files / "own", "--csv")).stdout
    assert listed.splitlines()[1:] == [f"{nested / 'a.png'}," + alone.splitlines()[1].split(",", 1)[1]]
    table = ok(run("bpd", nested / "a.png", "-m", files / "own")).stdout
    assert "a.png" in table and "over 1 image (6 tiles, 0.0% padding); PNG" in table
    (tmp_path / "none").mkdir()
    user_error(run("bpd", "none", "-m", files / "own"), "none: no images found")


def test_bpd_scores_images_smaller_than_a_tile_padded_to_one(run, files):
    table = ok(run("bpd", files / "tiny.png", "-m", files / "own")).stdout
    assert "8x8" in table and "300.0%" in table  # 192 padding pixels for its 64


# --------------------------------------------------------------------------- sample
def test_sample_grid_folder_seed_and_overwrite(run, files, tmp_path):
    own = files / "own"
    first_run = ok(run("sample", "-n", "5", "-t", "0.8", "-o", "grid.png", "-m", own, "--batch-size", "2"))
    first = pixels("grid.png")
    assert first.shape == (2 * 18 + 2, 3 * 18 + 2, 3)  # 5 samples: 2 rows x 3 columns, 2 px padding
    user_error(run("sample", "-n", "5", "-o", "grid.png", "-m", own), "grid.png: exists; pass --force")
    assert np.array_equal(pixels("grid.png"), first)
    ok(run("sample", "-n", "5", "-t", "0.8", "-o", "grid.png", "-m", own, "--force"))
    assert np.array_equal(pixels("grid.png"), first)  # same seed, same images (batch size aside)
    ok(run("sample", "-n", "5", "-t", "0.8", "-o", "other.png", "-m", own, "--seed", "1"))
    assert not np.array_equal(pixels("other.png"), first)
    ok(run("sample", "-n", "5", "-t", "0.8", "-o", "each/", "-m", own))
    singles = sorted((tmp_path / "each").iterdir())
    assert [p.name for p in singles] == [f"sample_{i:03d}.png" for i in range(5)]
    assert np.array_equal(grid(np.stack([pixels(p) for p in singles])), first)
    user_error(run("sample", "-n", "2", "-o", "grid.jpg", "-m", own), "give a .png file")
    # the default precision is auto; fp32 and fast draw the same latents, so the images barely differ
    assert f"temperature 0.8, {resolve('auto', 'cpu')})" in first_run.stderr
    exact = ok(run("sample", "-n", "5", "-t", "0.8", "-o", "fp32.png", "-m", own, "--precision", "fp32"))
    fast = ok(run("sample", "-n", "5", "-t", "0.8", "-o", "fast.png", "-m", own, "--precision", "fast"))
    assert "fp32) to fp32.png" in exact.stderr and "fast) to fast.png" in fast.stderr
    difference = np.abs(pixels("fp32.png").astype(int) - pixels("fast.png").astype(int))
    assert 0 < difference.max() <= 8


# --------------------------------------------------------------------------- encode / decode
def test_encode_decode_round_trip_through_files_and_folders(run, files, tmp_path):
    own = files / "own"
    ok(run("encode", files / "even.png", "-o", "even.npy", "-m", own))  # .npy: the same archive
    with np.load("even.npy", allow_pickle=False) as archive:  # what the README tells numpy users
        latent, header = archive["latent"], json.loads(archive["header"][()])
    assert latent.shape == (32, 48, 3) and latent.dtype == np.float32
    assert (header["height"], header["width"], header["tile"]) == (32, 48, [16, 16])
    assert header["model_sha256"] == hashlib.sha256((own / "model.safetensors").read_bytes()).hexdigest()
    ok(run("decode", "even.npy", "-o", "even.png", "-m", own))
    assert np.array_equal(pixels("even.png"), pixels(files / "even.png"))
    shutil.copy(files / "even.png", tmp_path / "second.png")
    result = ok(run("encode", files / "even.png", "second.png", "-o", "latents", "-m", own))
    assert "round trip verified" in result.stderr
    ok(run("decode", "latents/even.npz", "latents/second.npz", "-o", "back/", "-m", own))
    for name in ("even", "second"):
        assert np.array_equal(pixels(tmp_path / "back" / f"{name}.png"), pixels(files / "even.png"))
    # stdout when -o is omitted (CliRunner's stdout is not a terminal), stdin when the input is "-"
    data = ok(run("encode", files / "even.png", "-m", own)).stdout_bytes
    assert data == Path("even.npy").read_bytes()  # deterministic, to the byte
    png = ok(run("decode", "-", "-m", own, input=data)).stdout_bytes
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels(files / "even.png"))
    assert "not verified" in ok(run("encode", "-", "-o", "nv.npy", "--no-verify", "-m", own,
                                    input=(files / "even.png").read_bytes())).stderr


def test_encode_decode_refuse_to_overwrite_or_to_write_binary_to_a_terminal(run, files, tmp_path, monkeypatch):
    own = files / "own"
    Path("taken.npy").write_bytes(b"precious")
    user_error(run("encode", files / "even.png", "-o", "taken.npy", "-m", own), "exists; pass --force")
    assert Path("taken.npy").read_bytes() == b"precious"
    shutil.copy(files / "even.png", "image.npy")  # an image misnamed .npy, encoded onto itself
    user_error(run("encode", "image.npy", "-o", "image.npy", "-m", own, "--force"), "is an input")
    assert Path("image.npy").read_bytes() == (files / "even.png").read_bytes()
    user_error(run("encode", files / "even.png", files / "ragged.png", "-m", own), "pass -o DIR")
    user_error(run("decode", "taken.npy", "-o", "out.jpg", "-m", own), "is a .png file")
    user_error(run("encode", files / "even.png", "-o", "out.png", "-m", own), "is a .npz or .npy file")
    user_error(run("encode", "a.png", "b/a.png", "-o", "dir", "-m", own), "would both write")

    class Terminal(io.BytesIO):
        def isatty(self):
            return True

    monkeypatch.setattr("typer.get_binary_stream", lambda name: Terminal())
    user_error(run("encode", files / "even.png", "-m", own), "refusing to write binary data to a terminal")
    user_error(run("decode", "taken.npy", "-m", own), "refusing to write binary data to a terminal")


@pytest.mark.parametrize("size", [(40, 50), (1, 1), (17, 3), (3, 33)])
def test_encode_decode_any_size(run, files, size):
    image = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(image).save("odd.png")
    result = ok(run("encode", "odd.png", "-o", "odd.npz", "-m", files / "own"))
    padded = tuple(-(-side // 16) * 16 for side in size)
    assert f"{size[0]}x{size[1]} (padded to {padded[0]}x{padded[1]})" in result.stderr
    ok(run("decode", "odd.npz", "-o", "back.png", "-m", files / "own"))
    assert np.array_equal(pixels("back.png"), image)


def test_decode_refuses_bad_latents(run, files, tmp_path):
    own = files / "own"
    good = np.zeros((16, 16, 3), np.float32)
    cases = {
        "shape.npy": (np.zeros((16, 16), np.float32), "expected (height, width, 3)"),
        "size.npy": (np.zeros((16, 20, 3), np.float32), "whole multiples of 16x16"),
        "dtype.npy": (good.astype(np.float16), "dtype float16"),
        "nan.npy": (np.where(np.eye(16)[..., None] > 0, np.nan, good).astype(np.float32), "NaN or Inf"),
        "inf.npy": (np.full((16, 16, 3), np.inf, np.float32), "NaN or Inf"),
        "foreign.npy": (np.random.default_rng(0).normal(size=(16, 16, 3)).astype(np.float32),
                        "does not decode to an 8-bit image"),
    }
    for name, (array, _) in cases.items():
        np.save(name, array)
    np.save("pickled.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    np.savez("archive.npz", latent=good)
    Path("junk.npy").write_bytes(b"\x93NUMPY garbage")
    Path("empty.npy").write_bytes(b"")
    shutil.copy(files / "even.png", "image.npy")
    ok(run("encode", files / "even.png", "-o", "other.npz", "-m", files / "jp.safetensors"))  # same weights,
    cases.update({"pickled.npy": (None, "pickled Python objects, which are never loaded"),  # another file
                  "archive.npz": (None, "an .npz archive of latent.npy, not a latent file"),
                  "junk.npy": (None, "not a readable .npy latent"), "empty.npy": (None, "the file is empty"),
                  "image.npy": (None, "it is a PNG image (jet encode turns images into latents)"),
                  "other.npz": (None, "encoded with another model")})
    for name, (_, message) in cases.items():
        user_error(run("decode", name, "-o", f"{name}.png", "-m", own), f"{name}: ", message)
        assert not Path(f"{name}.png").exists()
    user_error(run("decode", "missing.npy", "-o", "m.png", "-m", own), "missing.npy: no such file")


# --------------------------------------------------------------------------- info, model resolution
@pytest.mark.parametrize("name, fmt", [("own", "jetcli"), ("jp.safetensors", "jet-pytorch"), ("bv.npz", "big_vision")])
def test_info_json_for_every_layout(run, files, jet, name, fmt):
    result = json.loads(ok(run("info", "-m", files / name, "--json")).stdout)
    weights = files / name / "model.safetensors" if name == "own" else files / name
    assert result["format"] == fmt and result["weights"] == str(weights)
    assert result["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert result["parameters"] == jet.num_params() and result["input_size"] == [16, 16, 3]
    assert result["config"]["couplings"] == 5 and result["config"]["width"] == 32
    text = ok(run("info", "-m", files / name)).stdout
    assert result["sha256"] in text and fmt in text


def test_embedded_models_are_found_through_the_package(run, files, tmp_path, monkeypatch):
    assert Path(str(__import__("importlib").resources.files("jetcli.weights"))) == REPO_ROOT / "weights"
    assert hub.DEFAULT_MODEL in hub.embedded_models()
    package = tmp_path / "fake_weights"
    (package / "tiny").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(hub, "EMBEDDED_PACKAGE", "fake_weights")
    monkeypatch.setattr(hub, "DEFAULT_MODEL", "tiny")
    user_error(run("info"), "no embedded model 'tiny'", "--model")
    for name in ("model.safetensors", "config.json"):
        shutil.copy(files / "own" / name, package / "tiny" / name)
    result = json.loads(ok(run("info", "--json")).stdout)
    assert result["model"] == "tiny" and result["weights"] == str(package / "tiny" / "model.safetensors")
    assert json.loads(ok(run("bpd", files / "even.png", "--json")).stdout)["model"] == "tiny"
    assert json.loads(ok(run("info", "-m", "tiny", "--json")).stdout)["model"] == "tiny"
    Path("tiny").mkdir()  # a local path spelled like an embedded name wins
    user_error(run("info", "-m", "tiny"), "tiny")
    monkeypatch.setattr(hub, "EMBEDDED_PACKAGE", "no_such_weights_package")
    user_error(run("info"), "has no embedded model")


def test_hub_ids_from_the_offline_cache(run, files, tmp_path, monkeypatch):
    """In-process, huggingface_hub's settings are patched (they are read once, at import); the
    subprocess test below shows the real environment variables are honoured."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    own = {n: files / "own" / n for n in ("model.safetensors", "config.json")}
    commit = fake_hub_repo(cache, "someone/jet-own", own, refs=("main", "v1"))
    fake_hub_repo(cache, "someone/two", {"a.safetensors": files / "jp.safetensors",
                                         "b.npz": files / "bv.npz"})
    local = json.loads(ok(run("bpd", files / "even.png", "-m", files / "own", "--json")).stdout)
    for spec in ("someone/jet-own", "someone/jet-own@v1", f"someone/jet-own@{commit}"):
        remote = json.loads(ok(run("bpd", files / "even.png", "-m", spec, "--json")).stdout)
        assert remote["model"] == f"someone/jet-own@{commit}" and remote["mean_bpd"] == local["mean_bpd"]
    info = json.loads(ok(run("info", "-m", "someone/jet-own", "--json")).stdout)
    assert info["format"] == "jetcli" and info["sha256"] == hashlib.sha256(own["model.safetensors"].read_bytes()).hexdigest()
    user_error(run("info", "-m", "someone/jet-own@v2"), "someone/jet-own@v2: not a local path",
               "HF_HUB_OFFLINE is set")
    user_error(run("info", "-m", "someone/uncached"), "not in the Hub cache")
    user_error(run("info", "-m", "someone/two"), "holds 2 checkpoints (a.safetensors, b.npz)")
    user_error(run("info", "-m", "owner/name.safetensors"), "no such file or folder")


# --------------------------------------------------------------------------- real processes
def jet_process(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "jetcli", *on_cpu(args)], capture_output=True,
                          env=env or SUBPROCESS_ENV, timeout=120, **kwargs)


def test_subprocess_hub_env_jet_pytorch_layout(files, tmp_path):
    """HF_HOME and HF_HUB_OFFLINE=1 from the environment: a jet-pytorch repo (one .safetensors, as
    btrude/jet_imagenet64x64_200m has) loads from the cache and scores as the local own-format copy."""
    commit = fake_hub_repo(tmp_path / "hf" / "hub", "someone/jet-pt", {"jet_tiny.safetensors": files / "jp.safetensors"})
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k not in ("HF_HUB_CACHE", "HF_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = jet_process("bpd", files / "even.png", "-m", "someone/jet-pt", "--json", env=env)
    assert result.returncode == 0, result.stderr.decode()
    remote = json.loads(result.stdout)
    assert remote["model"] == f"someone/jet-pt@{commit}"
    local = json.loads(CliRunner().invoke(app, on_cpu(["bpd", files / "even.png", "-m", files / "own",
                                                       "--json"])).stdout)
    assert remote["mean_bpd"] == local["mean_bpd"]


def test_subprocess_encode_decode_pipe(files, tmp_path):
    """`jet encode - < img.png | jet decode - -o out.png` with the console script, exact pixels back."""
    jet_script = Path(sys.executable).parent / "jet"
    command = [str(jet_script)] if jet_script.exists() else [sys.executable, "-m", "jetcli"]
    model = ["-m", str(files / "own")]
    with open(files / "even.png", "rb") as image:
        encoder = subprocess.Popen([*command, *on_cpu(["encode", "-", *model])], stdin=image,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=SUBPROCESS_ENV)
        decoder = subprocess.run([*command, *on_cpu(["decode", "-", "-o", tmp_path / "out.png", *model])],
                                 stdin=encoder.stdout, capture_output=True, env=SUBPROCESS_ENV, timeout=120)
        encoder.stdout.close()
        assert encoder.wait(timeout=120) == 0, encoder.stderr.read().decode()
    assert decoder.returncode == 0, decoder.stderr.decode()
    assert np.array_equal(pixels(tmp_path / "out.png"), pixels(files / "even.png"))


def test_wheel_ships_the_embedded_models(files, tmp_path):
    """Build a wheel from a copy of the project with tiny weights in two folders of weights/, unpack it
    as an install would, and run `python -m jetcli info` from it: both models are found in the package."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "LICENSE", "README.md"):
        if (REPO_ROOT / name).exists():
            shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "jetcli", source / "jetcli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(files / "own", source / "weights" / hub.DEFAULT_MODEL)
    shutil.copytree(files / "own", source / "weights" / "second")
    shutil.copy(REPO_ROOT / "weights" / "__init__.py", source / "weights")
    build = subprocess.run([sys.executable, "-c", "import setuptools.build_meta as b, sys; "
                                                  "print(b.build_wheel(sys.argv[1]))", str(tmp_path / "dist")],
                           cwd=source, capture_output=True, env=SUBPROCESS_ENV, timeout=120)
    assert build.returncode == 0, build.stderr.decode()[-2000:]
    wheel = tmp_path / "dist" / build.stdout.decode().split()[-1]
    with zipfile.ZipFile(wheel) as archive:
        assert {f"jetcli/weights/{name}/{file}" for name in (hub.DEFAULT_MODEL, "second")
                for file in ("model.safetensors", "config.json")} <= set(archive.namelist())
        archive.extractall(tmp_path / "site")
    env = {**SUBPROCESS_ENV, "PYTHONPATH": str(tmp_path / "site")}
    for args, name in ((), hub.DEFAULT_MODEL), (("-m", "second"), "second"):
        result = jet_process("info", "--json", *args, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr.decode()
        info = json.loads(result.stdout)
        assert info["model"] == name
        assert info["weights"] == str(tmp_path / "site" / "jetcli" / "weights" / name / "model.safetensors")
        assert info["sha256"] == hashlib.sha256((files / "own" / "model.safetensors").read_bytes()).hexdigest()


# --------------------------------------------------------------------------- the image reading policy
def raw_png(path: Path, array: np.ndarray, bit_depth: int, color_type: int, size=None) -> Path:
    """A PNG written by hand, for what Pillow will not write (16-bit RGB, lying headers)."""
    import struct
    import zlib

    h, w = array.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\0" + array[i].astype(dtype).tobytes() for i in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = size or (h, w)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def converted_images(folder: Path) -> dict[str, np.ndarray]:
    """Files that are read, each with the exact RGB pixels they must give."""
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(grey).save(folder / "grey.png")
    Image.fromarray(grey > 127).save(folder / "bilevel.png")
    palette = Image.fromarray(rgb).quantize(7)
    palette.save(folder / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full((16, 16), 255, np.uint8)])).save(folder / "opaque_rgba.png")
    Image.fromarray(np.dstack([grey, np.full((16, 16), 255, np.uint8)])).save(folder / "opaque_la.png")
    Image.fromarray(rgb).save(folder / "rgb.bmp")
    return {"grey.png": np.repeat(grey[..., None], 3, axis=2),
            "bilevel.png": np.repeat(np.where(grey > 127, 255, 0).astype(np.uint8)[..., None], 3, axis=2),
            "palette.png": np.asarray(palette.convert("RGB")),
            "opaque_rgba.png": rgb, "opaque_la.png": np.repeat(grey[..., None], 3, axis=2), "rgb.bmp": rgb}


def refused_images(folder: Path) -> dict[str, str]:
    """Files that are refused, each with a piece of its one-line reason."""
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, np.full((16, 16), 255, np.uint8)])
    rgba[3, 4, 3] = 254
    Image.fromarray(rgba).save(folder / "transparent.png")
    Image.fromarray(rgb).save(folder / "colour_key.png", transparency=tuple(int(v) for v in rgb[0, 0]))
    palette = Image.fromarray(rgb).quantize(5)
    palette.save(folder / "palette_alpha.png", transparency=int(np.asarray(palette)[0, 0]))
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (16, 16), dtype=np.uint16)).save(folder / "grey16.png")
    raw_png(folder / "rgb16.png", rng.integers(0, 65535, (16, 16, 3)), 16, 2)
    Image.fromarray(rng.random((16, 16), dtype=np.float32)).save(folder / "float.tif")
    frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    raw_png(folder / "bomb.png", np.zeros((1, 1, 3)), 8, 2, size=(10_000, 10_000))  # 1e8 px: Pillow only warns
    raw_png(folder / "huge_bomb.png", np.zeros((1, 1, 3)), 8, 2, size=(100_000, 100_000))
    good = (folder / "transparent.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[:len(good) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image at all")
    (folder / "folder.png").mkdir()
    return {"transparent.png": "1 pixel(s) not fully opaque", "colour_key.png": "not fully opaque",
            "palette_alpha.png": "not fully opaque", "cmyk.jpg": "CMYK images are", "grey16.png": "16-bit",
            "rgb16.png": "16-bit", "float.tif": "16-bit or float", "animated.gif": "has 2 frames",
            "bomb.png": "decompression bomb", "huge_bomb.png": "decompression bomb",
            "truncated.png": "cannot decode", "empty.png": "not an image file", "text.png": "not an image file",
            "folder.png": "is a folder"}


def test_images_that_convert_exactly_round_trip_to_their_rgb(run, files, tmp_path):
    for name, expected in converted_images(tmp_path).items():
        ok(run("encode", name, "-o", f"{name}.npy", "-m", files / "own"))
        ok(run("decode", f"{name}.npy", "-o", f"{name}.out.png", "-m", files / "own"))
        assert np.array_equal(pixels(f"{name}.out.png"), expected), name


def test_images_that_are_refused_give_one_line(run, files, tmp_path):
    for name, reason in refused_images(tmp_path).items():
        user_error(run("encode", name, "-o", "x.npy", "-m", files / "own"), f"{name}: ", reason)
        # bpd searches folders for images: an empty one is refused for that
        user_error(run("bpd", name, "-m", files / "own"), name, "no images found" if name == "folder.png" else reason)
        assert not Path("x.npy").exists()


def test_tiles_are_row_major_and_drop_the_remainder():
    image = np.arange(5 * 7 * 3, dtype=np.int64).reshape(5, 7, 3)
    cut = tiles(image, (2, 3))
    assert cut.shape == (4, 2, 3, 3)
    for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert np.array_equal(cut[k], image[2 * r:2 * r + 2, 3 * c:3 * c + 3])
    assert np.array_equal(covered(image, (2, 3)), image[:4, :6])
    assert tiles(image, (6, 3)).shape == (0, 6, 3, 3)
