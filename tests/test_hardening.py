"""Hostile and broken inputs for every command (issue 8).

Every case below runs the real CLI (CliRunner, or a subprocess where the environment is the point) and
must end with exit status 2, exactly one `error:` line on stderr (the last line), no traceback, and
every file that existed before byte-identical afterwards, with nothing new written (no output, no
half-written temporary file). Cases that other files already test are not repeated here: test_cli.py
(encode and bpd on every refused image mode and on PNG bombs, decode on malformed latents, outputs that
exist), test_checkpoints.py and test_codec.py (library-level refusals), test_data.py (data sources).

Images (bpd, encode; `jet train` reads folders with the same reader)
  1. missing file; empty file; truncated PNG; a text file named .png; random bytes named .png; an .npy
     latent named .png given to encode
  2. misnamed but valid, read by content and accepted: a PNG named .jpg and a lossless WebP named .png
     round-trip exactly through encode/decode
  3. decompression bombs in BMP, GIF and TIFF: a few hundred bytes whose header declares >= 4e9 pixels
  4. bpd on a folder holding one bad file among good ones: skipped with one warning line, listed again at
     the end, exit 3; with --strict, refused at the first; bpd on a stdin list that is not UTF-8
  5. train on a folder holding one of: a truncated PNG, a text file named .png, an empty .png, a CMYK
     JPEG, a 16-bit PNG, an RGBA PNG with one transparent pixel, a PNG bomb; a folder with no images;
     images of two sizes without --crop; --crop larger than the images; --crop 0
  6. train reads grey, bilevel, palette and opaque RGBA/LA images as the RGB pixels jetcli.images documents;
     a TIFF whose unneeded description tag overruns the file is read with one `warning:` line naming it,
     one whose strip offsets overrun it is refused with the error line alone
Latents (decode)
  7. bare .npy latents (jetcli 0.1.0): a header declaring 100000x100000x3 float32 over 64 bytes of data
     (must not try to allocate 112 GiB); a header declaring more data than follows; a header that is no
     longer a Python literal (one byte damaged); complex64, strings, a structured dtype, a 0-d scalar, a
     4-d batch; a PNG named .npy; a text file named .npy (big-endian float latents are accepted: same
     pixels). Latent files (.npz): truncated; a latent member that declares more than its header's image
     can hold (a zip bomb); its header missing, not JSON, of another format or of a newer version; a latent
     whose shape is not its header's size padded; a latent of another model
Checkpoints (--model of bpd, sample, encode, decode and info: every case through every command)
  8. truncated, empty and random-bytes model.safetensors; config.json disagreeing with the stored config;
     the stored config disagreeing with the tensors (width 4096, 10**9 couplings: refused before any
     model is built); stored configs with patch size 0, 0 heads, a negative scale factor, a string seed
  9. a tensor missing, an extra tensor, a NaN tensor
 10. a pickled .pt that would run code (never unpickled: its marker file never appears); a .bin that is
     not a state dict; an .npz whose member header declares 112 GiB; one whose header is damaged
 11. accepted: a weights-only .bin state dict in jet-pytorch's layout gives the same bpd as the original
Hub ids
 12. owner/name not in the cache while offline (an empty cache in the test's folder), for every command;
     once more in a subprocess with the real HF_HOME and HF_HUB_OFFLINE=1
Outputs (encode, decode, sample; train --out)
 13. -o inside a regular file (FILE/x.npy); -o under /proc, which cannot be created; a read-only folder
     (skipped as root, where permissions do not stop writes: the two cases before stand in for it)
 14. would overwrite an input, refused even with --force: decode of a latent named .png onto itself;
     encode -o DIR where DIR/NAME.npy is the input; -o a symbolic or a hard link to the input
 15. exists without --force: decode's .png; one of sample's per-image files in a folder
 16. train --out is a file; train --out holds a user's model (model.safetensors, config.json)
Train data and options
 17. data missing; a text file named .npy; an .npy with a damaged header; an object (pickled) .npy; a
     float .npy; zero images; an .npy whose header declares 2.7 PiB; a CIFAR-10 style pickle that would
     run code (marker never appears); random bytes behind a pickle header
 18. --val of another image size; --val with --val-fraction; --val-fraction 1 and -0.5; --lr inf;
     --clip nan
Train --resume on a damaged run folder
 19. no state.safetensors; --out a file; the state truncated, empty or junk; a model tensor missing; Adam
     moments of the wrong shape; NaN weights; NaN Adam moments; Adam state missing; a negative step;
     options that are not a JSON object; no config; a stored config disagreeing with the tensors (width
     4096, 10**9 couplings: refused before any model is built); the run's data gone
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from conftest import on_cpu
from test_cli import converted_images, raw_png
from typer.testing import CliRunner

from jetcli import JetConfig, checkpoints, codec, hub, latents
from jetcli.checkpoints import own as own_format
from jetcli.train import loop as training_loop
from jetcli.cli import app
from jetcli.images import IMAGE_SUFFIXES
from jetcli.testing import random_jet

# jet-pytorch's numerics and heads, so the .bin in its layout loads back into the same function.
CONFIG = JetConfig(image_size=(16, 16), couplings=2, block_depth=1, width=16, heads=8, ln_eps=1e-5, gelu="exact")
HUGE_NPY = {"descr": "<f4", "fortran_order": False, "shape": (100_000, 100_000, 3)}  # 112 GiB of float32
MODEL_COMMANDS = {
    "bpd": lambda w: ["bpd", w / "good.png"],
    "sample": lambda w: ["sample", "-n", "1", "-o", "s.png"],
    "encode": lambda w: ["encode", w / "good.png", "-o", "e.npy"],
    "decode": lambda w: ["decode", w / "good.npy", "-o", "d.png"],
    "info": lambda w: ["info"],
}
TINY_TRAIN = ["--preset", "tiny-16", "--couplings", "1", "--width", "16", "--heads", "2", "--batch-size", "4"]


# --------------------------------------------------------------------------- helpers
def npy_header(header: dict, data: bytes = b"\0" * 64) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def snapshot(*roots: Path) -> dict[str, bytes | None]:
    """Every file and folder under the roots, with the bytes of each file."""
    return {str(p): (p.read_bytes() if p.is_file() else None) for root in roots for p in sorted(root.rglob("*"))}


def refused(*args, expect: str | tuple[str, ...], input=None, watch: tuple[Path, ...] = ()) -> str:
    """Run `jet ARGS` in the current folder; it must refuse with exit 2 and one `error:` line (the last on
    stderr) containing `expect` (each of them, if several), no traceback, and leave the current folder
    and `watch` as they were."""
    roots = (Path.cwd(), *watch)
    before = snapshot(*roots)
    result = CliRunner().invoke(app, on_cpu(args), input=input)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert all(fragment in errors[0] for fragment in ([expect] if isinstance(expect, str) else expect)), errors[0]
    after = snapshot(*roots)
    assert after.keys() == before.keys(), f"files appeared or vanished: {set(after) ^ set(before)}"
    assert [k for k in before if before[k] != after[k]] == [], "a file changed"
    return errors[0]


def accepted(*args, input=None):
    result = CliRunner().invoke(app, on_cpu(args), input=input)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def rewrite_safetensors(source: Path, dest: Path, change=lambda tensors: None, meta_change=lambda meta: None):
    """A copy of a safetensors file with its tensors and metadata changed in place."""
    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(source))
    change(tensors)
    meta_change(meta)
    save_file(tensors, str(dest), metadata=meta)
    return dest


def nan_first(tensors: dict, prefix: str) -> None:
    name = next(k for k, v in tensors.items() if k.startswith(prefix) and v.is_floating_point() and v.numel())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")


class Payload:
    """Unpickling this creates a file: loaders must never do it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(autouse=True)
def no_huge_models(monkeypatch):
    """Fail (instead of allocating gigabytes on a shared machine) if a hostile config reaches Jet()."""
    real = own_format.Jet

    def guarded(config):
        assert config.couplings <= 8 and config.width <= 64, f"a model was built from a hostile config {config}"
        return real(config)

    monkeypatch.setattr(own_format, "Jet", guarded)
    monkeypatch.setattr(training_loop, "Jet", guarded)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Read-only inputs shared by the cases: a model, an image and its latent, training data, a run."""
    root = tmp_path_factory.mktemp("world")
    model = random_jet(CONFIG, seed=5)
    checkpoints.save(model, root / "own")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(image).save(root / "good.png")
    np.save(root / "good.npy", codec.encode(model, image).latent)  # a bare latent, as jetcli 0.1.0 wrote
    (root / "good.npz").write_bytes(latents.to_bytes(codec.encode(model, image), hub.load_model(str(root / "own")).sha256(),
                                                     "own", CONFIG.image_size))
    pixels = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    np.save(root / "pixels.npy", pixels)
    np.save(root / "pixels8.npy", pixels[:, :8, :8])
    cwd = os.getcwd()
    os.chdir(root)
    try:
        accepted("train", root / "pixels.npy", *TINY_TRAIN, "--steps", "2", "--ckpt-every", "1", "-o", "run")
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------- 1-4: images
def bomb(kind: str) -> bytes:
    """A 1x1 image whose header is patched to declare a huge size."""
    buffer = io.BytesIO()
    Image.new("P" if kind == "GIF" else "RGB", (1, 1)).save(buffer, kind)
    data = bytearray(buffer.getvalue())
    if kind == "BMP":
        data[18:26] = struct.pack("<ii", 100_000, 100_000)
    elif kind == "GIF":
        data[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen, then the frame's descriptor
        frame = data.index(b",", 10)
        data[frame + 5:frame + 9] = struct.pack("<HH", 65535, 65535)
    else:  # TIFF: the ImageWidth and ImageLength tags of the first directory
        offset = struct.unpack("<I", data[4:8])[0]
        for k in range(struct.unpack("<H", data[offset:offset + 2])[0]):
            entry = offset + 2 + 12 * k
            tag, kind_of_value = struct.unpack("<HH", data[entry:entry + 4])
            if tag in (256, 257):
                value = struct.pack("<H", 65535) + b"\0\0" if kind_of_value == 3 else struct.pack("<I", 100_000)
                data[entry + 8:entry + 12] = value
    return bytes(data)


def bad_image_files(world: Path) -> dict[str, tuple[bytes, str]]:
    good = (world / "good.png").read_bytes()
    return {
        "empty.png": (b"", "not an image file"),
        "truncated.png": (good[: len(good) // 2], "cannot decode the image"),
        "text.png": (b"hello, not an image", "not an image file"),
        "random.png": (np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes(), "not an image file"),
        "latent.png": ((world / "good.npy").read_bytes(), "not an image file"),
        "bomb.bmp": (bomb("BMP"), "decompression bomb"),
        "bomb.gif": (bomb("GIF"), "decompression bomb"),
        "bomb.tif": (bomb("TIFF"), "decompression bomb"),
    }


def test_bad_image_files_are_refused_by_bpd_and_encode(world, here):
    model = ["-m", world / "own"]
    refused("bpd", "missing.png", *model, expect="missing.png: no such file", watch=(world,))
    refused("encode", "missing.png", "-o", "x.npy", *model, expect="missing.png: no such file", watch=(world,))
    for name, (data, reason) in bad_image_files(world).items():
        Path(name).write_bytes(data)
        refused("bpd", name, *model, expect=(f"{name}: ", reason), watch=(world,))
        refused("encode", name, "-o", "x.npy", *model, expect=(f"{name}: ", reason), watch=(world,))
        if Path(name).suffix not in IMAGE_SUFFIXES:
            continue  # folders are searched for these suffixes only
        # among good images in a folder: skipped, named with its reason, the others scored (exit 3);
        # --strict refuses the whole command at it
        folder = Path(f"set_{name}")
        (folder / "deeper").mkdir(parents=True)
        shutil.copy(world / "good.png", folder / "a.png")
        Path(name).rename(folder / "deeper" / name)
        result = CliRunner().invoke(app, on_cpu(["bpd", folder, *model, "--json"]))
        assert result.exit_code == 3 and "Traceback" not in result.output, result.output
        assert [r["path"] for r in json.loads(result.stdout)["images"]] == [str(folder / "a.png")]
        bad = f"{folder / 'deeper' / name}: "
        warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert len(warned) == 1 and warned[0].startswith(f"warning: {bad}") and reason in warned[0], result.stderr
        assert warned[0].endswith("; skipped")
        listed = result.stderr.splitlines()[-2:]
        assert listed[0] == "skipped 1 of 2 files:" and listed[1].startswith(f"  {bad}") and reason in listed[1]
        refused("bpd", folder, "--strict", *model, expect=(f"{name}: ", reason), watch=(world,))


def tiff_with_oversized_tag(pixels: np.ndarray, tag: int) -> bytes:
    """A TIFF one of whose tags claims a million values: more than the file holds, so Pillow skips it."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="TIFF", tiffinfo={270: "a description stored out of line"})
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] == tag:
            struct.pack_into("<I", data, entry + 4, 10**6)
            return bytes(data)
    raise KeyError(tag)


def test_damaged_metadata_is_one_warning_line_and_damaged_pixels_one_error(world, here):
    pixels = np.asarray(Image.open(world / "good.png"))
    Path("description.tif").write_bytes(tiff_with_oversized_tag(pixels, 270))  # ImageDescription: not needed
    result = accepted("encode", "description.tif", "-o", "d.npy", "-m", world / "own")
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warned == ["warning: description.tif: Tag data larger than file. Skipping tag 270"], result.stderr
    accepted("decode", "d.npy", "-o", "d.png", "-m", world / "own")
    assert np.array_equal(np.asarray(Image.open("d.png")), pixels)
    Path("strips.tif").write_bytes(tiff_with_oversized_tag(pixels, 273))  # StripOffsets: no pixels
    error = refused("bpd", "strips.tif", "-m", world / "own", expect="strips.tif: not an image file")
    assert "warning" not in CliRunner().invoke(app, on_cpu(["bpd", "strips.tif", "-m", world / "own"])).stderr, error


def test_misnamed_images_are_read_by_content(world, here):
    pixels = np.asarray(Image.open(world / "good.png"))
    shutil.copy(world / "good.png", "png.jpg")
    Image.fromarray(pixels).save("webp.png", format="WEBP", lossless=True)
    for name in ("png.jpg", "webp.png"):
        accepted("encode", name, "-o", f"{name}.npy", "-m", world / "own")
        accepted("decode", f"{name}.npy", "-o", f"{name}.out.png", "-m", world / "own")
        assert np.array_equal(np.asarray(Image.open(f"{name}.out.png")), pixels), name
    misnamed = json.loads(accepted("bpd", "png.jpg", "-m", world / "own", "--json").stdout)
    original = json.loads(accepted("bpd", world / "good.png", "-m", world / "own", "--json").stdout)
    assert misnamed["mean_bpd"] == original["mean_bpd"]  # the same pixels and seed


def test_bpd_stdin_list_that_is_not_utf8(world, here):
    refused("bpd", "-", "-m", world / "own", input=b"\xff\xfe-not-a-path\n", expect="no such file", watch=(world,))


@pytest.mark.parametrize("name, make, reason", [
    ("truncated.png", lambda w: (w / "good.png").read_bytes()[:120], "cannot decode the image"),
    ("text.png", lambda w: b"not an image", "not an image file"),
    ("empty.png", lambda w: b"", "not an image file"),
    ("cmyk.jpg", lambda w: _encoded(Image.open(w / "good.png").convert("CMYK"), "JPEG"), "CMYK images are not read"),
    ("deep.png", lambda w: _encoded(Image.fromarray(np.full((16, 16), 40000, np.uint16)), "PNG"), "16-bit"),
    ("alpha.png", lambda w: _encoded(_one_transparent_pixel(w), "PNG"), "1 pixel(s) not fully opaque"),
    ("bomb.png", lambda w: _png_bomb(), "decompression bomb"),
])
def test_train_refuses_a_bad_image_in_its_folder(world, here, name, make, reason):
    Path("data").mkdir()
    shutil.copy(world / "good.png", "data/good.png")
    Path("data", name).write_bytes(make(world))
    refused("train", "data", *TINY_TRAIN, "--steps", "1", "-o", "run", expect=(f"{name}: ", reason), watch=(world,))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _one_transparent_pixel(world: Path) -> Image.Image:
    rgba = np.asarray(Image.open(world / "good.png").convert("RGBA")).copy()
    rgba[2, 3, 3] = 0
    return Image.fromarray(rgba)


def _png_bomb() -> bytes:
    buffer_path = Path("bomb-source.png")
    raw_png(buffer_path, np.zeros((1, 1, 3)), 8, 2, size=(100_000, 100_000))
    data = buffer_path.read_bytes()
    buffer_path.unlink()
    return data


def test_train_refuses_bad_image_folders(world, here):
    Path("empty").mkdir()
    refused("train", "empty", *TINY_TRAIN, "-o", "run", expect="empty: no images found")
    Path("sizes").mkdir()
    shutil.copy(world / "good.png", "sizes/a.png")
    Image.new("RGB", (8, 16)).save("sizes/b.png")
    refused("train", "sizes", *TINY_TRAIN, "-o", "run", expect="2 different sizes: use --crop")
    refused("train", world / "pixels.npy", *TINY_TRAIN, "--crop", "32", "-o", "run",
            expect="--crop 32 is larger than an image of size 16x16", watch=(world,))
    refused("train", world / "pixels.npy", *TINY_TRAIN, "--crop", "0", "-o", "run", expect="--crop 0",
            watch=(world,))


def test_train_reads_the_documented_rgb_of_converted_modes(here):
    from jetcli.data import load_images

    expected = converted_images(here)
    loaded = load_images(str(here))
    names = sorted(expected, key=lambda n: str(here / n))
    assert len(loaded) == len(names)
    for name, image in zip(names, loaded):
        assert np.array_equal(image, expected[name]), name


# --------------------------------------------------------------------------- 7: latents
def bad_latent_files(world: Path) -> dict[str, tuple[bytes, str]]:
    def saved(array) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    good = np.load(world / "good.npy")
    return {
        "bomb.npy": (npy_header(HUGE_NPY), "declares 120,000,000,000 bytes of data, the file holds 64"),
        "damaged_header.npy": (damaged_header((world / "good.npy").read_bytes()), "not a readable .npy latent"),
        "short.npy": (npy_header({**HUGE_NPY, "shape": (16, 16, 3)}), "not a readable .npy latent"),
        "complex.npy": (saved(good.astype(np.complex64)), "dtype complex64"),
        "strings.npy": (saved(np.full((16, 16, 3), "x")), "dtype <U1"),
        "structured.npy": (saved(np.zeros((16, 16, 3), [("z", "<f4")])), "dtype [('z', '<f4')]"),
        "scalar.npy": (saved(np.float32(0.5)), "shape ()"),
        "batch.npy": (saved(good[None]), "shape (1, 16, 16, 3)"),
        "image.npy": ((world / "good.png").read_bytes(), "it is a PNG image"),
        "text.npy": (b"hello, not a latent", "neither an .npz archive nor a .npy array"),
        **bad_latent_archives(world),
    }


def bad_latent_archives(world: Path) -> dict[str, tuple[bytes, str]]:
    """Damaged latent files (.npz archives of latent.npy and header.npy)."""
    good = (world / "good.npz").read_bytes()
    with zipfile.ZipFile(world / "good.npz") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    header = json.loads(np.load(io.BytesIO(members["header.npy"]))[()])

    def archive(**changed) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as out:
            for name, data in {**members, **changed}.items():
                if data is not None:
                    out.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)
        return buffer.getvalue()

    def with_header(**fields) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, np.array(json.dumps({**header, **fields})))
        return archive(**{"header.npy": buffer.getvalue()})

    zeros = io.BytesIO()
    np.save(zeros, np.zeros((4096, 4096, 3)))  # 400 MB of zeros deflate to 400 kB
    return {
        "truncated.npz": (good[:len(good) // 2], "a damaged latent file"),
        "inflating.npz": (archive(**{"latent.npy": zeros.getvalue()}), "larger than its header allows"),
        "headless.npz": (archive(**{"header.npy": None}), "an .npz archive of latent.npy, not a latent file"),
        "not_json.npz": (archive(**{"header.npy": npy_bytes(np.array("{not json"))}), "a damaged latent file"),
        "foreign.npz": (with_header(format="something-else"), "not a jetcli latent header"),
        "newer.npz": (with_header(version=2), "format version 2; this jetcli reads version 1"),
        "resized.npz": (with_header(height=40), "a 40x16 image pads to 48x16 with 16x16 tiles, but the latent is 16x16"),
        "other_model.npz": (with_header(model_sha256="0" * 64), "encoded with another model"),
    }


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def damaged_header(npy: bytes) -> bytes:
    """A .npy whose header is no longer a Python literal: numpy's parser raises SyntaxError/TokenError."""
    at = npy.index(b"), }")
    return npy[:at] + b"\xd6" + npy[at + 1:]


def test_bad_latent_files_are_refused_by_decode(world, here):
    for name, (data, reason) in bad_latent_files(world).items():
        Path(name).write_bytes(data)
        refused("decode", name, "-o", "x.png", "-m", world / "own", expect=(f"{name}: ", reason), watch=(world,))
        refused("decode", "-", "-o", "x.png", "-m", world / "own", input=data, expect=("<stdin>: ", reason),
                watch=(world,))


def test_big_endian_latents_decode_like_native_ones(world, here):
    good = np.load(world / "good.npy")
    for dtype in (">f4", ">f8"):
        np.save("big.npy", good.astype(dtype))
        accepted("decode", "big.npy", "-o", f"{dtype[1:]}.png", "-m", world / "own")
        assert np.array_equal(np.asarray(Image.open(f"{dtype[1:]}.png")), np.asarray(Image.open(world / "good.png")))


# --------------------------------------------------------------------------- 8-11: checkpoints
def bad_checkpoints(world: Path, into: Path) -> dict[str, tuple[Path, str]]:
    """Damaged copies of the world's model, each with a piece of its one-line refusal."""
    own = world / "own"
    weights = own / "model.safetensors"
    cases = {}

    def folder(name: str) -> Path:
        shutil.copytree(own, into / name)
        return into / name

    data = weights.read_bytes()
    (folder("truncated") / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (into / "truncated", "not a readable safetensors file")
    (folder("empty") / "model.safetensors").write_bytes(b"")
    cases["empty"] = (into / "empty", "not a readable safetensors file")
    (into / "random.safetensors").write_bytes(np.random.default_rng(2).integers(0, 256, 999, np.uint8).tobytes())
    cases["random"] = (into / "random.safetensors", "not a readable safetensors file")
    (folder("side_config") / "config.json").write_text(json.dumps({**CONFIG.to_dict(), "scale_factor": 3.0}))
    cases["side_config"] = (into / "side_config", "disagrees with the config stored")
    for name, change, reason in [
        ("wide", {"width": 4096}, "the config needs (4096, 24)"),
        ("deep", {"couplings": 10**9}, "the config has 1000000000 couplings, the tensors 2"),
        ("patch0", {"patch_size": 0}, "must be positive"),
        ("heads0", {"heads": 0}, "must be positive"),
        ("negative_scale", {"scale_factor": -1.0}, "scale_factor and ln_eps must be positive"),
        ("string_seed", {"seed": "x"}, "bad config in metadata"),
    ]:
        config = json.dumps({**CONFIG.to_dict(), **change})
        rewrite_safetensors(weights, into / f"{name}.safetensors", meta_change=lambda m: m.update(config=config))
        cases[name] = (into / f"{name}.safetensors", reason)
    rewrite_safetensors(weights, into / "missing.safetensors", lambda t: t.pop("couplings.1.vit.norm.bias"))
    cases["missing"] = (into / "missing.safetensors", "1 missing (e.g. couplings.1.vit.norm.bias)")
    rewrite_safetensors(weights, into / "extra.safetensors", lambda t: t.update(extra=torch.zeros(2)))
    cases["extra"] = (into / "extra.safetensors", "1 unexpected (e.g. extra)")
    rewrite_safetensors(weights, into / "nan.safetensors", lambda t: nan_first(t, "couplings.1.vit.blocks"))
    cases["nan"] = (into / "nan.safetensors", "holds NaN or Inf")
    torch.save({"blocks.0.dnn.pos_emb": Payload(into / "pwned")}, into / "evil.pt")
    cases["pickle"] = (into / "evil.pt", "refused: not a weights-only torch file")
    torch.save({"step": 3}, into / "plain.bin")
    cases["not_a_state_dict"] = (into / "plain.bin", "refused: not a plain state dict")
    with zipfile.ZipFile(into / "bomb.npz", "w") as archive:
        archive.writestr("couplings/dnn/posemb.npy", npy_header(HUGE_NPY))
    cases["npz_bomb"] = (into / "bomb.npz", "not a readable .npz of plain arrays")
    with zipfile.ZipFile(into / "damaged.npz", "w") as archive:
        archive.writestr("couplings/dnn/posemb.npy", damaged_header(npy_header({**HUGE_NPY, "shape": (1,)})))
    cases["npz_damaged"] = (into / "damaged.npz", "not a readable .npz of plain arrays")
    return cases


@pytest.fixture(scope="module")
def broken_models(world, tmp_path_factory):
    into = tmp_path_factory.mktemp("models")
    return into, bad_checkpoints(world, into)


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_bad_checkpoints_are_refused_by_every_command(world, broken_models, here, command):
    into, cases = broken_models
    for name, (path, reason) in cases.items():
        refused(*MODEL_COMMANDS[command](world), "-m", path, expect=reason, watch=(world, into))
    assert not (into / "pwned").exists()  # the pickle was never run


def test_weights_only_state_dict_in_jet_pytorch_layout_is_accepted(world, here):
    torch.save(checkpoints.to_jet_pytorch(checkpoints.load(world / "own")), "port.bin")
    bits = [json.loads(accepted("bpd", world / "good.png", "-m", m, "--json").stdout)["mean_bpd"]
            for m in ("port.bin", world / "own")]
    assert bits[0] == bits[1]


# --------------------------------------------------------------------------- 12: Hub ids
@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_uncached_hub_id_while_offline(world, here, monkeypatch, command):
    """huggingface_hub reads its settings once, at import: patched here, the real environment below."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(here / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    refused(*MODEL_COMMANDS[command](world), "-m", "someone/not-cached",
            expect="someone/not-cached: not a local path, and not in the Hub cache", watch=(world,))


def test_uncached_hub_id_in_a_subprocess_with_hf_home_and_offline(world, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="300")
    command = on_cpu(["bpd", world / "good.png", "-m", "someone/not-cached@v2"])
    result = subprocess.run([sys.executable, "-m", "jetcli", *command], capture_output=True, env=env, timeout=120,
                            cwd=tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "someone/not-cached@v2: not a local path" in errors[0]
    assert "HF_HUB_OFFLINE is set" in errors[0] and str(tmp_path / "hf") in errors[0]
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "hf"])  # nothing but (perhaps) the empty cache


# --------------------------------------------------------------------------- 13-16: outputs
def test_unwritable_outputs(world, here):
    Path("afile").write_text("user data")
    model = ["-m", world / "own"]
    for args in (["encode", world / "good.png", "-o", "afile/x.npy"],
                 ["decode", world / "good.npy", "-o", "afile/x.png"],
                 ["sample", "-n", "1", "-o", "afile/x.png"], ["sample", "-n", "2", "-o", "afile/each/"]):
        refused(*args, *model, expect="afile is a file, not a folder", watch=(world,))
    if not Path("/proc/self").exists():
        return  # no procfs: the FILE/x cases above stand alone
    for args in (["encode", world / "good.png", "-o", "/proc/jetcli-test.npy"],
                 ["decode", world / "good.npy", "-o", "/proc/jetcli-test.png"],
                 ["sample", "-n", "1", "-o", "/proc/jetcli-test.png"]):
        refused(*args, *model, expect="cannot be written", watch=(world,))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders; the FILE/x and /proc cases cover unwritable paths")
def test_read_only_folder(world, here):
    Path("locked").mkdir()
    os.chmod("locked", 0o555)
    try:
        refused("sample", "-n", "1", "-o", "locked/x.png", "-m", world / "own", expect="cannot be written")
    finally:
        os.chmod("locked", 0o755)


def test_outputs_that_would_overwrite_an_input(world, here):
    model = ["-m", world / "own"]
    shutil.copy(world / "good.npy", "latent.png")  # a latent misnamed .png, decoded onto itself
    refused("decode", "latent.png", "-o", "latent.png", "--force", *model, expect="is an input", watch=(world,))
    Path("dir").mkdir()
    shutil.copy(world / "good.png", "dir/photo.npz")  # an image misnamed .npz; -o DIR writes DIR/photo.npz
    refused("encode", "dir/photo.npz", "-o", "dir/", "--force", *model, expect="is an input", watch=(world,))
    shutil.copy(world / "good.png", "photo.png")
    os.symlink("photo.png", "symlink.npy")
    os.link("photo.png", "hardlink.npy")
    for link in ("symlink.npy", "hardlink.npy"):
        refused("encode", "photo.png", "-o", link, "--force", *model, expect="is an input", watch=(world,))


def test_existing_outputs_need_force(world, here):
    Path("taken.png").write_bytes(b"precious")
    refused("decode", world / "good.npy", "-o", "taken.png", "-m", world / "own", expect="exists; pass --force",
            watch=(world,))
    Path("each").mkdir()
    Path("each/sample_001.png").write_bytes(b"precious")
    refused("sample", "-n", "3", "-o", "each/", "-m", world / "own", expect="sample_001.png: exists; pass --force",
            watch=(world,))


def test_train_out_that_is_a_file_or_holds_a_model(world, here):
    Path("afile").write_text("user data")
    refused("train", world / "pixels.npy", *TINY_TRAIN, "-o", "afile", expect="is a file, not a folder",
            watch=(world,))
    shutil.copytree(world / "own", "mine")
    refused("train", world / "pixels.npy", *TINY_TRAIN, "-o", "mine",
            expect="holds model.safetensors, config.json, which training would overwrite", watch=(world,))


# --------------------------------------------------------------------------- 17-18: train data, options
def test_bad_training_data(world, here):
    np.save("floats.npy", np.zeros((4, 16, 16, 3), np.float32))
    np.save("objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save("none.npy", np.zeros((0, 16, 16, 3), np.uint8))
    Path("text.npy").write_text("hello")
    np.save("good.npy", np.zeros((4, 16, 16, 3), np.uint8))
    Path("damaged.npy").write_bytes(damaged_header(Path("good.npy").read_bytes()))
    Path("bomb.npy").write_bytes(npy_header({"descr": "|u1", "fortran_order": False,
                                             "shape": (100_000, 100_000, 100_000, 3)}))
    Path("junk_batch").write_bytes(b"\x80\x04" + bytes(range(256)) * 4)
    import pickle
    Path("data_batch_1").write_bytes(pickle.dumps({"data": Payload(here / "pwned")}, protocol=4))
    cases = {
        "missing": "missing: no such file or folder",
        "floats.npy": "expected uint8 images",
        "objects.npy": "not a readable numpy array file",
        "none.npy": "no images",
        "text.npy": "not a readable numpy array file",
        "damaged.npy": "not a readable numpy array file",
        "bomb.npy": "not a readable numpy array file",
        "junk_batch": "not a CIFAR-10 python batch",
        "data_batch_1": "refused to load",
    }
    for data, reason in cases.items():
        refused("train", data, *TINY_TRAIN, "-o", "run", expect=reason, watch=(world,))
    assert not (here / "pwned").exists()


@pytest.mark.parametrize("options, reason", [
    (["--val", "{w}/pixels8.npy"], "validation images are (8, 8), training images (16, 16)"),
    (["--val", "{w}/pixels.npy", "--val-fraction", "0.5"], "either a validation set or a validation fraction"),
    (["--val-fraction", "1"], "between 0 and 1"),
    (["--val-fraction", "-0.5"], "between 0 and 1"),
    (["--lr", "inf"], "--lr must be positive and finite"),
    (["--clip", "nan"], "--clip must be positive and finite"),
])
def test_bad_training_options(world, here, options, reason):
    options = [o.format(w=world) for o in options]
    refused("train", world / "pixels.npy", *TINY_TRAIN, *options, "-o", "run", expect=reason, watch=(world,))


# --------------------------------------------------------------------------- 19: --resume
def damaged_runs(world: Path, into: Path) -> dict[str, tuple[Path, str]]:
    state = world / "run" / "state.safetensors"
    cases = {}

    def run_copy(name: str) -> Path:
        shutil.copytree(world / "run", into / name)
        return into / name / "state.safetensors"

    def damaged(name, reason, change=lambda t: None, meta_change=lambda m: None):
        rewrite_safetensors(state, run_copy(name), change, meta_change)
        cases[name] = (into / name, reason)

    data = state.read_bytes()
    for name, cut in (("truncated", data[: len(data) // 2]), ("empty", b""), ("junk", b"x" * 100)):
        run_copy(name).write_bytes(cut)
        cases[name] = (into / name, "state.safetensors: not a readable safetensors file")
    damaged("tensor_missing", "1 missing (e.g. couplings.0.vit.posemb)",
            lambda t: t.pop("model.couplings.0.vit.posemb"))
    damaged("adam_shape", "does not match the model (optim.0.exp_avg has shape (3,)",
            lambda t: t.update({"optim.0.exp_avg": torch.zeros(3)}))
    damaged("nan_weights", "holds NaN or Inf", lambda t: nan_first(t, "model.couplings.0.vit.blocks"))
    damaged("nan_adam", "optim.1.exp_avg_sq holds NaN or Inf", lambda t: nan_first(t, "optim.1.exp_avg_sq"))
    damaged("adam_missing", "optimiser state for 0 of the",
            lambda t: [t.pop(k) for k in [k for k in t if k.startswith("optim.")]])
    damaged("negative_step", "not a jet train state (step -5)", meta_change=lambda m: m.update(step="-5"))
    damaged("options_list", "options are not a JSON object", meta_change=lambda m: m.update(options="[1, 2]"))
    damaged("no_config", "not a jet train state", meta_change=lambda m: m.pop("config"))
    config = json.loads(JetConfig.from_json(load_meta(state)["config"]).to_json())
    for name, change, reason in (("wide", {"width": 4096}, "the config needs (4096, 24)"),
                                 ("deep", {"couplings": 10**9}, "the config has 1000000000 couplings")):
        text = json.dumps({**config, **change})
        damaged(name, reason, meta_change=lambda m: m.update(config=text))
    gone = run_copy("data_gone")
    options = json.loads(load_meta(gone)["options"])
    options["extra"]["data"] = str(gone.parent / "moved.npy")
    rewrite_safetensors(state, gone, meta_change=lambda m: m.update(options=json.dumps(options)))
    cases["data_gone"] = (into / "data_gone", "data_gone/moved.npy: no such file or folder")
    return cases


def load_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_resume_refuses_damaged_runs(world, here):
    Path("afile").write_text("user data")
    refused("train", "--resume", "-o", "nothing", expect="nothing to resume", watch=(world,))
    refused("train", "--resume", "-o", "afile", expect="nothing to resume", watch=(world,))
    into = here / "runs"
    for name, (run, reason) in damaged_runs(world, into).items():
        message = refused("train", "--resume", "-o", run, "--steps", "3", expect=reason, watch=(world,))
        assert name in message  # the line names the run's state
