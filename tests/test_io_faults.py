"""Faults while writing, and interruptions (issue 14, items 3 and 6): a full disk, a permission lost or a
closed stdout midway is one error line that says what failed and what is intact, never a traceback;
Ctrl-C keeps and reports what is done.

The full disk is simulated where a file is written (the OSError ENOSPC, or safetensors' own error for it,
with the exact message it gives on a full tmpfs), and real for stdout (/dev/full).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from typer.testing import CliRunner

from jetcli import checkpoints, latents
from jetcli.checkpoints import own
from conftest import TINY_TRAIN
from jetcli.cli import app
from jetcli.fileio import WriteError

FULL_DISK_SAFETENSORS = "Error while serializing: I/O error: No space left on device (os error 28)"  # as measured
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def jet(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def one_error(result, code: int = 2) -> str:
    assert result.exit_code == code and "Traceback" not in result.output, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
    return errors[0]


def images(count: int, size=(20, 20)) -> list[str]:
    rng = np.random.default_rng(0)
    names = [f"img{i}.png" for i in range(count)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(name)
    return names


def fail_on_call(monkeypatch, target: str, number: int, error: BaseException) -> None:
    """Make the `number`-th call of `target` (module.attribute) raise `error`; the others run."""
    module, _, name = target.rpartition(".")
    owner = sys.modules[module]
    real, calls = getattr(owner, name), []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)


def fail_writing(monkeypatch, name: str, error: OSError, when_creating: bool = False) -> None:
    """Make writes of the file `name` fail with `error`: as its data is written (a full disk), or as its
    temporary file is created (`when_creating`: a permission lost). Other files are written as usual."""
    if when_creating:
        real = tempfile.mkstemp

        def mkstemp(*args, prefix=None, **kwargs):
            if prefix == f".{name}.":
                raise error
            return real(*args, prefix=prefix, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    else:
        real_write = Path.write_bytes

        def write_bytes(self, data):
            if self.name.startswith(f".{name}."):
                raise error
            return real_write(self, data)

        monkeypatch.setattr(Path, "write_bytes", write_bytes)


def no_partial_files(folder: Path) -> bool:
    return not list(folder.rglob(".*.tmp"))


# --------------------------------------------------------------------------- a full disk, a lost permission
def test_encode_on_a_disk_that_fills_up(here, model, monkeypatch):
    names = images(3)
    fail_writing(monkeypatch, "img1.npz", OSError(errno.ENOSPC, "No space left on device"))
    error = one_error(jet("encode", *names, "-o", "out/", "-m", model))
    assert error == ("error: out/img1.npz: cannot be written (No space left on device); the 1 output(s) written "
                     "before it are complete")
    assert sorted(p.name for p in Path("out").iterdir()) == ["img0.npz"] and no_partial_files(here)
    latents.read(Path("out/img0.npz").read_bytes())  # complete


def test_decode_and_sample_when_a_permission_is_lost(here, model, monkeypatch):
    names = images(1)
    assert jet("encode", names[0], "-o", "a.npz", "-m", model).exit_code == 0
    lost = PermissionError(errno.EACCES, "Permission denied")
    fail_writing(monkeypatch, "a.png", lost, when_creating=True)
    assert one_error(jet("decode", "a.npz", "-o", "a.png", "-m", model)) == \
        "error: a.png: cannot be written (Permission denied)"
    fail_writing(monkeypatch, "sample_002.png", lost, when_creating=True)
    error = one_error(jet("sample", "-n", "5", "-o", "each/", "-m", model, "--device", "cpu"))
    assert error == ("error: each/sample_002.png: cannot be written (Permission denied); the 2 samples written "
                     "before it are complete")
    assert sorted(p.name for p in Path("each").iterdir()) == ["sample_000.png", "sample_001.png"]


def test_train_on_a_disk_that_fills_at_its_second_checkpoint(here, monkeypatch):
    """As reported on a 1.7 MB tmpfs: the weights of the step-4 checkpoint cannot be written. One line says
    so, the step-2 checkpoint is intact, and --resume ends bit-identical to a run never interrupted."""
    np.save("pixels.npy", np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    run = ["train", "pixels.npy", *TINY_TRAIN, "--steps", "6", "--ckpt-every", "2"]
    assert jet(*run, "-o", "whole").exit_code == 0
    fail_on_call(monkeypatch, "jetcli.checkpoints.own.save_file", 3, SafetensorError(FULL_DISK_SAFETENSORS))
    error = one_error(jet(*run, "-o", "full"))
    assert error == ("error: training stopped at step 4: full/model.safetensors: cannot be written (No space left on "
                     "device); the checkpoint of step 2 in full is intact: make room (or fix the folder) and "
                     "continue with jet train --resume -o full")
    assert no_partial_files(here)
    monkeypatch.undo()
    monkeypatch.chdir(here)
    assert jet("train", "--resume", "-o", "full", "--device", "cpu").exit_code == 0
    for name in ("model.safetensors", "state.safetensors"):
        assert checkpoints.load_state(here / "full" / name).keys() == checkpoints.load_state(here / "whole" / name).keys()
        for key, tensor in checkpoints.load_state(here / "whole" / name).items():
            assert (checkpoints.load_state(here / "full" / name)[key] == tensor).all(), key


def test_safetensors_write_errors_become_write_errors(here, monkeypatch):
    fail_on_call(monkeypatch, "jetcli.checkpoints.own.save_file", 1, SafetensorError(FULL_DISK_SAFETENSORS))
    with pytest.raises(WriteError, match=r"x.safetensors: cannot be written \(No space left on device\)") as caught:
        own.write_safetensors(here / "x.safetensors", {"a": torch.zeros(2)})
    assert caught.value.errno == errno.ENOSPC and list(here.iterdir()) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("command", [["bpd", "--json"], ["encode"]])  # text results; binary ones
def test_results_on_a_full_stdout_are_one_error_line(here, model, command):
    name = images(1)[0]
    with open("/dev/full", "wb") as full:
        result = subprocess.run([sys.executable, "-m", "jetcli", command[0], name, *command[1:], "-m", str(model)],
                                stdout=full, stderr=subprocess.PIPE, env=ENV, timeout=120)
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "error: <stdout>: cannot be written (No space left on device)"


# --------------------------------------------------------------------------- interruptions
def test_bpd_interrupted_prints_what_is_done_marked_incomplete(here, model, monkeypatch):
    names = images(3)

    def interrupted(at: int, *options):
        with monkeypatch.context() as patch:
            fail_on_call(patch, "jetcli.scoring.score_image", at, KeyboardInterrupt())
            result = jet("bpd", *names, "-m", model, "--device", "cpu", *options)
        assert result.exit_code == 130, result.output
        assert f"interrupted after {at - 1} of 3 images: the results above are incomplete" in result.stderr
        return result

    report = json.loads(interrupted(3, "--json").stdout)
    assert report["complete"] is False and [r["path"] for r in report["images"]] == names[:2]
    lines = interrupted(2, "--csv").stdout.splitlines()
    assert len(lines) == 3 and lines[1].startswith("img0.png,20,20,4,")
    assert lines[2] == "# incomplete: interrupted after 1 of 3 images"
    table = interrupted(3).stdout
    assert "interrupted after 2 of 3 images: incomplete" in table and "img1.png" in table and "img2" not in table


def test_bpd_strict_stops_at_the_first_bad_file(here, model):
    names = images(2)
    Path("broken.png").write_bytes(b"not a png")
    result = jet("bpd", names[0], "broken.png", names[1], "-m", model, "--device", "cpu", "--csv")
    assert result.exit_code == 3 and len(result.stdout.splitlines()) == 3
    one_error(jet("bpd", names[0], "broken.png", names[1], "-m", model, "--device", "cpu", "--strict"))
    error = one_error(jet("bpd", "broken.png", "-m", model, "--device", "cpu"))  # one file: scored or refused
    assert error.startswith("error: broken.png: not an image file")
    Path("also.png").write_text("text")
    error = one_error(jet("bpd", "broken.png", "also.png", "-m", model, "--device", "cpu"))
    assert error == "error: none of the 2 files could be scored (2 skipped)"


def test_ctrl_c_during_a_real_bpd_run(here, model):
    """SIGINT to a real process once its first CSV row is out: exit 130, the rows done, marked incomplete."""
    names = images(120, size=(512, 512))  # far more work than the signal's way takes, even on a fast machine
    process = subprocess.Popen([sys.executable, "-m", "jetcli", "bpd", *names, "-m", str(model), "--device", "cpu",
                                "--csv"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=here)
    header, first = process.stdout.readline(), process.stdout.readline()
    process.send_signal(signal.SIGINT)
    rest, stderr = process.communicate(timeout=120)
    lines = (header + first + rest).decode().splitlines()
    assert process.returncode == 130, stderr.decode()
    assert lines[0].startswith("path,height,width") and lines[1].startswith("img0.png,512,512,1024,0,")
    assert lines[-1].startswith("# incomplete: interrupted after ") and len(lines) < 122
    assert "Traceback" not in stderr.decode()
