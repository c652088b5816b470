"""What a new user trips over (issue 14, item 5): help and flags, progress, sampling into grids and
folders, EXIF-rotated photos, which array of an .npz is read, resuming a run from another folder or
with other --steps, latents that are no latents, outputs that cannot be written.

Every model is a tiny random Jet; every command runs in-process (CliRunner) on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.text import Text
from typer.testing import CliRunner

from jetcli import checkpoints
from conftest import TINY_TRAIN
from jetcli.cli import app
from jetcli.cli.output import progress_bar
from jetcli.images import grid



def jet(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def refused(result, fragment: str) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, (result.output, result.exception)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and fragment in error, result.stderr
    return error


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


# --------------------------------------------------------------------------- help, -h, --debug
@pytest.mark.parametrize("command", ["bpd", "encode", "decode", "sample", "train", "info"])
def test_help_with_h_and_flags_shown_without_a_value(command):
    text = ok(jet(command, "-h")).output
    assert text == ok(jet(command, "--help")).output and "Usage: " in text
    flag_rows = [line for line in text.splitlines() if any(f in line for f in ("--force", "--json", "--help",
                                                                                 "--strict", "--resume"))]
    assert flag_rows and not any("<bool>" in row for row in flag_rows), text
    assert "--device" not in text or command not in ("encode", "decode")  # hidden there: the codec runs on the CPU


def test_debug_after_the_command_shows_the_traceback(here, model):
    result = jet("info", "-m", "no/such/checkpoint.safetensors", "--debug")
    assert result.exit_code != 0 and type(result.exception).__name__ == "CheckpointError"
    refused(jet("info", "-m", "no/such/checkpoint.safetensors"), "no such file")


# --------------------------------------------------------------------------- progress
def test_progress_counts_whole_numbers():
    bar = progress_bar(disable=True)
    task = bar.add_task("x", total=2.0)  # rich's track() gives float totals: it showed "2/2.0"
    bar.advance(task, 1)
    bar.advance(task, 1.0)
    shown = " ".join(str(text) for column in bar.columns if isinstance(text := column(bar.tasks[task]), Text))
    assert "2/2" in shown and "2/2.0" not in shown and "2.0/2" not in shown, shown


def test_a_single_large_image_reports_progress_over_its_tiles(here, model, monkeypatch):
    from jetcli import codec
    real, seen = codec.encode, []

    def watched(model, pixels, verify=True, progress=None):
        return real(model, pixels, verify, lambda done, total: (seen.append((done, total)), progress(done, total)))

    monkeypatch.setattr(codec, "encode", watched)
    Image.fromarray(np.zeros((160, 170, 3), np.uint8)).save("big.png")  # pads to 10 x 11 tiles
    ok(jet("encode", "big.png", "-o", "big.npz", "-m", model))
    assert len(seen) > 2 and seen[-1] == (220, 220)  # encode and its verifying decode: 2 passes over 110 tiles


# --------------------------------------------------------------------------- sample
def test_sample_of_one_is_the_bare_image_and_encodes(here, model):
    ok(jet("sample", "-n", "1", "-o", "one.png", "-m", model, "--device", "cpu", "--precision", "fp32"))
    assert pixels("one.png").shape == (16, 16, 3)
    ok(jet("encode", "one.png", "-o", "one.npz", "-m", model))
    ok(jet("decode", "one.npz", "-o", "back.png", "-m", model))
    assert np.array_equal(pixels("back.png"), pixels("one.png"))


def test_sample_zoom_repeats_pixels(here, model):
    common = ["-m", model, "--device", "cpu", "--precision", "fp32", "--seed", "3"]
    ok(jet("sample", "-n", "3", "-o", "plain/", *common))
    ok(jet("sample", "-n", "3", "-o", "zoomed/", "--zoom", "3", *common))
    ok(jet("sample", "-n", "3", "-o", "grid.png", "--zoom", "3", *common))
    plain = np.stack([pixels(p) for p in sorted(Path("plain").iterdir())])
    zoomed = np.stack([pixels(p) for p in sorted(Path("zoomed").iterdir())])
    assert zoomed.shape == (3, 48, 48, 3) and np.array_equal(zoomed[:, ::3, ::3], plain)
    assert np.array_equal(pixels("grid.png"), grid(zoomed))
    refused(jet("sample", "-n", "1", "-o", "z.png", "--zoom", "0", *common), "--zoom")


def test_sample_into_a_folder_writes_each_batch_as_it_is_drawn(here, model, monkeypatch):
    """Ctrl-C while the third batch is drawn: the four samples of the first two are on disk, complete."""
    from jetcli.cli import sample as command

    real = command.sample_batches

    def interrupted(*args, **kwargs):
        for k, batch in enumerate(real(*args, **kwargs)):
            if k == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(command, "sample_batches", interrupted)
    result = jet("sample", "-n", "10", "--batch-size", "2", "-o", "each/", "-m", model, "--device", "cpu")
    assert result.exit_code == 130, result.output
    assert "interrupted: 4 of 10 samples written to each, each complete" in result.stderr
    written = sorted(Path("each").iterdir())
    assert [p.name for p in written] == [f"sample_{i:03d}.png" for i in range(4)]
    assert all(pixels(p).shape == (16, 16, 3) for p in written)


# --------------------------------------------------------------------------- images
def test_exif_rotated_photo_is_read_as_stored_with_a_warning(here, model):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    for name, orientation in (("rotated.jpg", 6), ("upright.jpg", 1)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(name, exif=exif.tobytes(), quality=95)
    rotated = ok(jet("bpd", "rotated.jpg", "-m", model, "--device", "cpu"))
    warnings = [line for line in rotated.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: rotated.jpg: its EXIF orientation (6) asks viewers to rotate or flip it; jet "
                        "reads the pixels as stored (save it upright first for the picture viewers show)"]
    assert "16x24" in rotated.stdout  # as stored, not turned to 24x16
    assert "warning" not in ok(jet("bpd", "upright.jpg", "-m", model, "--device", "cpu")).stderr


# --------------------------------------------------------------------------- decode's inputs
def test_decode_tells_what_a_file_is_from_its_first_bytes(here, model):
    Image.new("RGB", (4, 4)).save("photo.npy", format="PNG")
    Image.new("RGB", (4, 4)).save("photo.jpg.npy", format="JPEG")
    Path("notes.npy").write_text("hello")
    refused(jet("decode", "photo.npy", "-o", "a.png", "-m", model), "it is a PNG image (jet encode turns images into")
    refused(jet("decode", "photo.jpg.npy", "-o", "b.png", "-m", model), "it is a JPEG image")
    error = refused(jet("decode", "notes.npy", "-o", "c.png", "-m", model), "neither an .npz archive nor a .npy")
    assert "pickle" not in error


def test_old_bare_npy_latents_still_decode_with_a_warning(here, model):
    from jetcli import codec
    image = np.random.default_rng(1).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    np.save("old.npy", codec.encode(checkpoints.load(model), image).latent)
    result = ok(jet("decode", "old.npy", "-o", "old.png", "-m", model))
    assert np.array_equal(pixels("old.png"), image)
    assert "warning: old.npy: a bare .npy latent (jetcli 0.1.0): it records no model" in result.stderr


# --------------------------------------------------------------------------- outputs checked first
def test_outputs_are_checked_for_writability_before_the_work(here, model, monkeypatch):
    """A place no file can be created in is refused before the model is even loaded."""
    from jetcli.cli import files

    def unwritable(path):
        raise files.WriteError(path, PermissionError(13, "Permission denied"))

    monkeypatch.setattr(files, "check_writable", unwritable)
    monkeypatch.setattr(files, "open_model", lambda *a: pytest.fail("the model was loaded before the check"))
    Image.new("RGB", (16, 16)).save("a.png")
    refused(jet("encode", "a.png", "-o", "locked/a.npz", "-m", model), "locked/a.npz: cannot be written (Permission")
    monkeypatch.setattr("jetcli.cli.sample.open_model", lambda *a: pytest.fail("the model was loaded"))
    refused(jet("sample", "-n", "2", "-o", "locked/", "-m", model, "--device", "cpu"), "cannot be written")
    monkeypatch.setattr("jetcli.train.state.check_writable", unwritable)
    monkeypatch.setattr("jetcli.train.session.load_datasets", lambda *a: pytest.fail("the data was loaded"))
    refused(jet("train", "a.png", *TINY_TRAIN, "-o", "locked/run"), "locked/run/state.safetensors: cannot be written")
    assert not Path("locked").exists()


# --------------------------------------------------------------------------- training data and resuming
def test_npz_without_a_key_names_the_array_it_reads(here, model):
    rng = np.random.default_rng(0)
    np.savez("set.npz", train_images=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
             test_images=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    result = ok(jet("train", "set.npz", *TINY_TRAIN, "--steps", "1", "-o", "run"))
    path = here / "set.npz"  # as the run stores it
    assert (f"warning: {path}: reading its array 'train_images' (it also holds test_images); pass {path}:KEY for "
            "another") in result.stderr
    assert "warning" not in ok(jet("train", "set.npz:train_images", *TINY_TRAIN, "--steps", "1", "-o", "run2")).stderr


def test_resume_from_another_folder_and_with_other_steps(here, model, monkeypatch):
    rng = np.random.default_rng(0)
    (here / "project").mkdir()
    np.save("project/pixels.npy", rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    monkeypatch.chdir(here / "project")
    ok(jet("train", "pixels.npy", *TINY_TRAIN, "--steps", "4", "--ckpt-every", "2", "-o", "run"))
    options = json.loads(checkpoints.read_metadata(here / "project" / "run" / "state.safetensors")["options"])
    assert options["extra"]["data"] == str(here / "project" / "pixels.npy")  # stored absolute
    monkeypatch.chdir(here)  # elsewhere: the run still finds its data
    result = ok(jet("train", "--resume", "-o", "project/run", "--steps", "6", "--device", "cpu"))
    assert ("warning: --steps 6 (the run had 4): the learning-rate schedule (warmup, then cosine decay) now spans "
            "6 steps") in result.stderr
    assert "step 6/6" in result.stderr
    assert "warning" not in ok(jet("train", "--resume", "-o", "project/run", "--steps", "6", "--device", "cpu")).stderr


def test_relative_data_paths_of_older_runs_still_resume_from_their_folder(here, model):
    """Runs saved before data paths were stored absolute: relative to the folder they are resumed from."""
    from jetcli.train import saved_run
    np.save("pixels.npy", np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    ok(jet("train", "pixels.npy", *TINY_TRAIN, "--steps", "2", "-o", "run"))
    state = here / "run" / "state.safetensors"
    from safetensors.torch import load_file, save_file
    meta = checkpoints.read_metadata(state)
    options = json.loads(meta["options"])
    options["extra"]["data"] = "pixels.npy"  # as older versions stored it
    save_file(load_file(state), state, metadata={**meta, "options": json.dumps(options)})
    assert saved_run(here / "run")[1]["data"] == str(here / "pixels.npy")
    ok(jet("train", "pixels.npy", "--resume", "-o", "run", "--steps", "3", "--device", "cpu"))
