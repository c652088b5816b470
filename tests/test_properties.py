"""Property-based tests (hypothesis, bounded: few examples, no deadline) of the readers and the round trip.

- Image reader: random small arrays in every mode Pillow writes (RGB, L, 1, P, RGBA, LA, I;16, CMYK),
  saved as PNG, BMP, TIFF, lossless WebP, GIF or JPEG, give `read_rgb` exactly the pixels the policy of
  jetcli.images documents, or a clean ImageError where it documents a refusal; random bytes and
  truncated files give an 8-bit RGB array or an ImageError, never another exception.
- Latent reader: random bytes, damaged latent files (truncated, bytes flipped) and bare .npy latents,
  .npy headers declaring any shape, and random arrays of random shapes and dtypes (NaN/Inf included)
  saved as .npy, through jetcli.latents and the codec: a CodecError or a valid decode, never anything
  else; the same through `jet decode -` end to end: exit 0 with a PNG, or exit 2 with one error line.
- Training data reader: random bytes, and .npy headers declaring any shape (up to terabytes over a few
  bytes), as .npy, .npz or a pickled CIFAR-10 batch give images or a DataError.
- Round trip: random images of any size through random tiny flows (random geometry, depth and strength)
  and the latent file format decode to the same pixels, or `encode` refuses; never a different image.
"""

from __future__ import annotations

import io
import math
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import on_cpu
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays
from PIL import Image
from typer.testing import CliRunner

from jetcli import JetConfig, checkpoints, codec, latents
from jetcli.cli import app
from jetcli.codec import CodecError
from jetcli.data import DataError, load_images
from jetcli.images import ImageError, pad_to_tiles, read_rgb
from jetcli.testing import random_jet

BOUNDED = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                   derandomize=True)
MODEL = random_jet(JetConfig(image_size=(8, 8), patch_size=4, couplings=2, block_depth=1, width=8, heads=2),
                   seed=7, strength=0.2)
MODEL_SHA256 = "5" * 64  # stands for its weights' sha256 in the latent files made here

# --------------------------------------------------------------------------- images
LOSSLESS = {"PNG": ("RGB", "L", "1", "P", "RGBA", "LA", "I;16"), "BMP": ("RGB", "L", "1", "P"),
            "TIFF": ("RGB", "L", "1", "P", "RGBA", "I;16", "CMYK"), "WEBP": ("RGB", "RGBA"), "GIF": ("P", "L")}


@st.composite
def saved_images(draw):
    """(file bytes, the array it was made from, mode, format)."""
    fmt = draw(st.sampled_from([*LOSSLESS, "JPEG"]))
    mode = draw(st.sampled_from(LOSSLESS.get(fmt, ("RGB", "L", "CMYK"))))
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    if mode in ("RGB", "CMYK"):
        array = draw(arrays(np.uint8, (h, w, 3 if mode == "RGB" else 4)))
        image = Image.fromarray(array[..., :3]).convert("CMYK") if mode == "CMYK" else Image.fromarray(array)
    elif mode in ("RGBA", "LA"):
        array = draw(arrays(np.uint8, (h, w, 4 if mode == "RGBA" else 2)))
        if draw(st.booleans()):
            array[..., -1] = 255  # opaque: read with the alpha dropped
        image = Image.fromarray(array, mode)
    elif mode == "P":
        colours = draw(st.integers(1, 8))
        palette = draw(arrays(np.uint8, (colours, 3)))
        array = draw(arrays(np.uint8, (h, w), elements=st.integers(0, colours - 1)))
        image = Image.fromarray(array, "P")
        image.putpalette(palette.ravel().tolist())
        array = palette[array]  # the colours the policy promises
    elif mode == "I;16":
        array = draw(arrays(np.uint16, (h, w)))
        image = Image.fromarray(array)
    else:  # L and 1
        array = draw(arrays(np.uint8, (h, w)))
        if mode == "1":
            array = np.where(array > 127, 255, 0).astype(np.uint8)
        image = Image.fromarray(array).convert(mode) if mode == "1" else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue(), array, mode, fmt


def documented(array: np.ndarray, mode: str) -> np.ndarray | None:
    """The RGB pixels jetcli.images promises for an image of this mode, or None for a refusal."""
    if mode in ("I;16", "CMYK"):
        return None
    if mode in ("RGBA", "LA"):
        if (array[..., -1] != 255).any():
            return None
        array = array[..., :-1] if mode == "RGBA" else array[..., 0]
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array


@BOUNDED
@given(saved_images())
def test_image_reader_gives_the_documented_pixels_or_a_clean_refusal(case):
    data, array, mode, fmt = case
    expected = documented(array, mode)
    try:
        pixels = read_rgb(data, name="x")
    except ImageError as e:
        assert expected is None, f"{mode} {fmt} refused: {e}"
        return
    assert expected is not None, f"{mode} {fmt} read, but the policy refuses it"
    assert pixels.dtype == np.uint8 and pixels.shape == (*array.shape[:2], 3)
    if fmt != "JPEG":
        np.testing.assert_array_equal(pixels, expected)


@BOUNDED
@given(saved_images(), st.data())
def test_image_reader_on_damaged_files_gives_rgb_or_an_image_error(case, data):
    raw = case[0]
    cut = data.draw(st.integers(0, len(raw)))
    noise = data.draw(st.binary(max_size=64))
    for damaged in (raw[:cut], raw[:cut] + noise, noise):
        try:
            pixels = read_rgb(damaged, name="x")
        except ImageError as e:
            assert "\n" not in str(e)
        else:
            assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3


# --------------------------------------------------------------------------- latents
LATENT_DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.uint8, np.complex64, np.bool_,
                                 np.dtype(">f4"), np.dtype(">f8")])


@st.composite
def latent_arrays(draw) -> np.ndarray:
    dtype = np.dtype(draw(LATENT_DTYPES))
    if draw(st.booleans()):  # the right layout, random values
        shape = (8 * draw(st.integers(1, 2)), 8 * draw(st.integers(1, 2)), 3)
    else:
        shape = draw(array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=17))
    if draw(st.booleans()) and dtype.kind == "f":  # near an encoded latent: small normal values
        values = draw(arrays(np.float64, shape, elements=st.floats(-3, 3)))
        return values.astype(dtype)
    return draw(arrays(dtype, shape))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@st.composite
def lying_npy(draw) -> bytes:
    """A well-formed .npy header over data of any length: it may declare terabytes over a few bytes."""
    header = {"descr": draw(st.sampled_from(["<f4", "<f8", ">f4", "|u1", "<i8", "<c8", "|O"])),
              "fortran_order": draw(st.booleans()),
              "shape": tuple(draw(st.lists(st.integers(0, 10**6), max_size=4)))}
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + draw(st.binary(max_size=200))


def check_decode(data: bytes) -> None:
    try:
        file = latents.read(data)
        file.check_model(MODEL_SHA256, "the model")
        result = codec.decode(MODEL, file.latent, file.size)
    except CodecError as e:
        assert "\n" not in str(e)
        return
    assert result.pixels.dtype == np.uint8 and result.pixels.shape == (*file.size, 3)
    assert result.margin <= codec.DECODE_LIMIT


def latent_file(pixels: np.ndarray, model=MODEL) -> bytes:
    return latents.to_bytes(codec.encode(model, pixels), MODEL_SHA256, "the model", model.config.image_size)


@BOUNDED
@given(latent_arrays())
def test_latent_reader_on_random_arrays(latent):
    check_decode(npy_bytes(latent))


@BOUNDED
@given(st.binary(max_size=300), lying_npy(), st.data())
def test_latent_reader_on_random_and_damaged_bytes(noise, lying, data):
    check_decode(noise)
    check_decode(lying)
    image = data.draw(arrays(np.uint8, (data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9)), 3)))
    for valid in (npy_bytes(codec.encode(MODEL, pad_to_tiles(image, (8, 8))).latent), latent_file(image)):
        cut = data.draw(st.integers(0, len(valid)))
        check_decode(valid[:cut] + noise)
        flipped = bytearray(valid)
        for index in data.draw(st.lists(st.integers(0, len(valid) - 1), min_size=1, max_size=4)):
            flipped[index] ^= 0xFF
        check_decode(bytes(flipped))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    checkpoints.save(MODEL, folder)
    return folder


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.one_of(st.binary(max_size=200), latent_arrays().map(npy_bytes)))
def test_jet_decode_of_arbitrary_input_exits_cleanly(model_folder, data):
    result = CliRunner().invoke(app, on_cpu(["decode", "-", "-m", model_folder]), input=data)
    assert "Traceback" not in result.stderr and isinstance(result.exception, (SystemExit, type(None)))
    if result.exit_code == 0:
        assert Image.open(io.BytesIO(result.stdout_bytes)).mode == "RGB"
    else:
        assert result.exit_code == 2
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------- training data
@BOUNDED
@given(st.sampled_from(["x.npy", "x.npz", "data_batch_1"]), st.binary(max_size=300), lying_npy())
def test_training_data_reader_on_random_bytes(name, noise, lying):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        if name == "x.npz":
            with zipfile.ZipFile(path, "w") as archive:
                archive.writestr("images.npy", lying)
                archive.writestr("noise.npy", noise)
        else:
            path.write_bytes({"x.npy": lying, "data_batch_1": b"\x80\x04" + noise}[name])
        try:
            images = load_images(str(path))
        except DataError as e:
            assert "\n" not in str(e)
        else:
            assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3


# --------------------------------------------------------------------------- round trip
@st.composite
def flows_and_images(draw):
    patch = draw(st.sampled_from([2, 4]))
    tile = (draw(st.sampled_from([4, 8])), 8)
    assume((tile[0] // patch) * (tile[1] // patch) % 2 == 0)
    config = JetConfig(image_size=tile, patch_size=patch, couplings=draw(st.integers(1, 6)), block_depth=1,
                       width=8, heads=draw(st.sampled_from([1, 2])),
                       kinds=tuple(draw(st.lists(st.sampled_from(["channels", "spatial"]), min_size=1, max_size=3))),
                       seed=draw(st.integers(0, 9)))
    model = random_jet(config, seed=draw(st.integers(0, 99)), strength=draw(st.floats(0, 1.5)))
    height, width = draw(st.integers(1, 2 * tile[0] + 1)), draw(st.integers(1, 2 * tile[1] + 1))
    pixels = draw(arrays(np.uint8, (height, width, 3)))
    return model, pixels


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(flows_and_images())
def test_round_trip_through_random_tiny_flows(case):
    model, pixels = case
    try:
        encoded = codec.encode(model, pixels)
    except CodecError as e:
        assert "cannot encode the image losslessly" in str(e)
        return
    assert encoded.latent.shape == pad_to_tiles(pixels, model.config.image_size).shape
    assert encoded.latent.dtype in (np.float32, np.float64)
    assert encoded.margin <= codec.SAFE_MARGIN and math.isfinite(encoded.margin)
    file = latents.read(latents.to_bytes(encoded, MODEL_SHA256, "the model", model.config.image_size))
    decoded = codec.decode(model, file.latent, file.size)  # through the latent file format
    np.testing.assert_array_equal(decoded.pixels, pixels)
