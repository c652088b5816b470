"""The lossless codec: bit-exact round trips on real, adversarial and random images, or clear refusals.

Three models stand in for the ones users bring:
- trained_like: 8 couplings whose final projections carry small random weights (scales near 1, as
  after training); float32 is safe for it.
- random64: 64 couplings with every weight at PyTorch's default init (final projections included);
  its inverse amplifies float32 rounding to tenths of a pixel and more, so the codec must use float64.
- chaotic: the same flow with unit-variance final projections; not even float64 can invert it.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from jetcli import codec
from jetcli.codec import SAFE_MARGIN, CodecError, decode, encode, reconstruct
from jetcli.config import JetConfig
from jetcli.images import pad_to_tiles
from jetcli.model import Jet

SIZE = 32


def final_projections(model: Jet, std: float, seed: int) -> Jet:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for coupling in model.couplings:
            proj = coupling.vit.final_proj
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * std)
            proj.bias.copy_(torch.randn(proj.bias.shape, generator=g) * std)
    return model


def random64_config() -> JetConfig:
    return JetConfig(image_size=(SIZE, SIZE), patch_size=8, couplings=64, block_depth=1, width=16, heads=2)


@functools.cache
def make_trained_like() -> Jet:
    torch.manual_seed(0)
    cfg = JetConfig(image_size=(SIZE, SIZE), patch_size=8, couplings=8, block_depth=1, width=32, heads=2)
    return final_projections(Jet(cfg), std=0.05, seed=0)


@functools.cache
def make_random64() -> Jet:
    torch.manual_seed(0)
    model = Jet(random64_config())
    for coupling in model.couplings:
        coupling.vit.final_proj.reset_parameters()
    return model


@pytest.fixture
def trained_like() -> Jet:
    return make_trained_like()


@pytest.fixture
def random64() -> Jet:
    return make_random64()


@pytest.fixture
def chaotic() -> Jet:
    torch.manual_seed(0)
    return final_projections(Jet(random64_config()), std=1.0, seed=0)


@pytest.fixture(params=["trained_like", "random64"])
def model(request) -> Jet:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def cifar(shared_data: Path) -> np.ndarray:
    with np.load(shared_data / "cifar10_lossless_subset.npz") as data:
        return data["test_images"]


def column(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> one (N*32, 32, 3) image whose tiles are the N images: one batched encode."""
    return images.reshape(-1, *images.shape[2:])


def per_tile_error(model: Jet, latent: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """max |p_hat - p| of every 32x32 tile of a column image."""
    error = np.abs(reconstruct(model, latent) - pixels)
    return error.reshape(-1, SIZE * SIZE * 3).max(axis=1)


def assert_round_trip(model: Jet, pixels: np.ndarray) -> codec.Encoded:
    encoded = encode(model, pixels)
    assert encoded.latent.shape == pixels.shape
    assert encoded.margin <= SAFE_MARGIN
    decoded = decode(model, encoded.latent)
    np.testing.assert_array_equal(decoded.pixels, pixels)
    assert decoded.margin == encoded.margin  # decode repeats encode's check bit for bit
    return encoded


# --------------------------------------------------------------------------- round trips
def test_every_cifar_test_image_round_trips_in_float32(trained_like, cifar):
    pixels = column(cifar)
    encoded = assert_round_trip(trained_like, pixels)
    assert encoded.latent.dtype == np.float32
    assert len(cifar) == 1017


def test_cifar_with_random64_needs_and_gets_float64(random64, cifar):
    pixels = column(cifar[:128])
    encoded = assert_round_trip(random64, pixels)
    assert encoded.latent.dtype == np.float64
    assert encoded.float32_margin > SAFE_MARGIN
    # Proof that float32 was not safe: its latent decodes some of these images to wrong pixels.
    unchecked = encode(random64, pixels, verify=False).latent
    float32_errors = per_tile_error(random64, unchecked, pixels)
    assert float32_errors.max() == encoded.float32_margin
    assert (float32_errors > 0.5).sum() > 0


@functools.cache
def photo_tiles(data: Path) -> list[np.ndarray]:
    from PIL import Image

    paths = [data / "cbsd68" / "101085.png", data / "mcmaster" / "1.png", data / "skimage" / "astronaut.png",
             data / "skimage" / "chelsea.png"]
    crops = []
    for path in paths:
        with Image.open(path) as im:
            photo = np.asarray(im.convert("RGB"))
        top, left = photo.shape[0] // 3, photo.shape[1] // 4
        crops.append(photo[top:top + 2 * SIZE, left:left + 3 * SIZE])  # a view, not contiguous
    return crops


@pytest.mark.parametrize("index", range(4))
def test_photo_tiles_round_trip(model, shared_data, index):
    crop = photo_tiles(shared_data)[index]
    assert crop.shape == (2 * SIZE, 3 * SIZE, 3)
    encoded = assert_round_trip(model, crop)
    assert encoded.latent.dtype == (np.float64 if model.config.couplings == 64 else np.float32)


def adversarial() -> dict[str, np.ndarray]:
    checker = (np.indices((SIZE, SIZE)).sum(axis=0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, axis=2)
    blocks = np.kron(checker[: SIZE // 4, : SIZE // 4], np.ones((4, 4, 1), np.uint8))
    rng = np.random.default_rng(0)
    return {
        "all-0": np.zeros((SIZE, SIZE, 3), np.uint8),
        "all-255": np.full((2 * SIZE, 2 * SIZE, 3), 255, np.uint8),
        "checker-0/255": checker,
        "checker-255/0": 255 - checker,
        "checker-4px": blocks,
        "channels-0/255/0": np.stack([np.zeros((SIZE, SIZE)), np.full((SIZE, SIZE), 255), np.zeros((SIZE, SIZE))],
                                     axis=-1).astype(np.uint8),
        "uniform-noise": rng.integers(0, 256, (SIZE, 3 * SIZE, 3), dtype=np.uint8),
        "noise-0-or-255": (rng.integers(0, 2, (SIZE, SIZE, 3)) * 255).astype(np.uint8),
    }


@pytest.mark.parametrize("name", list(adversarial()))
def test_adversarial_images_round_trip(model, name):
    assert_round_trip(model, adversarial()[name])


def test_tiles_are_coded_independently_in_place(trained_like):
    pixels = adversarial()["uniform-noise"][:, : 2 * SIZE]
    latent = encode(trained_like, pixels).latent
    for col in range(2):
        tile = pixels[:, col * SIZE:(col + 1) * SIZE]
        np.testing.assert_allclose(latent[:, col * SIZE:(col + 1) * SIZE], encode(trained_like, tile).latent,
                                   rtol=0, atol=1e-5)


@st.composite
def images(draw) -> np.ndarray:
    """1x1 to 2x2 tiles of blocks of 2, 8 or 32 pixels, every block's RGB drawn by hypothesis."""
    rows, cols = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    block = draw(st.sampled_from([2, 8, SIZE]))
    coarse = draw(arrays(np.uint8, (rows * SIZE // block, cols * SIZE // block, 3)))
    return coarse.repeat(block, axis=0).repeat(block, axis=1)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(pixels=images())
def test_round_trip_property(pixels):
    for model in (make_trained_like(), make_random64()):  # hypothesis examples cannot take fixtures
        encoded = encode(model, pixels)
        np.testing.assert_array_equal(decode(model, encoded.latent).pixels, pixels)
        assert encoded.margin <= SAFE_MARGIN


# --------------------------------------------------------------------------- precision and determinism
def test_chaotic_model_is_refused_not_miscoded(chaotic):
    with pytest.raises(CodecError, match="cannot encode the image losslessly.*float64"):
        encode(chaotic, adversarial()["all-0"])


def test_encode_is_deterministic_and_leaves_model_and_settings_alone(random64):
    pixels = adversarial()["uniform-noise"]
    before = {k: v.clone() for k, v in random64.state_dict().items()}
    flags = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision,
             torch.are_deterministic_algorithms_enabled())
    first, second = encode(random64, pixels), encode(random64, pixels)
    assert first.latent.dtype == np.float64
    assert first.latent.tobytes() == second.latent.tobytes()
    assert all(torch.equal(before[k], v) for k, v in random64.state_dict().items())
    assert all(p.dtype == torch.float32 for p in random64.parameters())
    assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision,
            torch.are_deterministic_algorithms_enabled()) == flags


def test_reduced_precision_settings_outside_do_not_leak_in(trained_like):
    pixels = adversarial()["uniform-noise"]
    reference = encode(trained_like, pixels).latent
    saved = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latent = encode(trained_like, pixels).latent
            assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
            np.testing.assert_array_equal(decode(trained_like, latent).pixels, pixels)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = saved
    assert latent.tobytes() == reference.tobytes()


def test_inside_the_codec_arithmetic_is_exact():
    with codec.exact_arithmetic(torch.device("cpu")):
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_autocast_enabled("cpu")


def test_verify_false_is_the_unchecked_float32_latent(trained_like):
    pixels = adversarial()["checker-0/255"]
    unchecked = encode(trained_like, pixels, verify=False)
    assert unchecked.latent.dtype == np.float32
    assert np.isnan(unchecked.margin) and np.isnan(unchecked.float32_margin)
    assert unchecked.latent.tobytes() == encode(trained_like, pixels).latent.tobytes()


# --------------------------------------------------------------------------- refusals
def good_latent(model: Jet) -> np.ndarray:
    return encode(model, adversarial()["checker-0/255"]).latent


@pytest.mark.parametrize("make_bad, message", [
    (lambda z: z[..., 0], r"shape \(32, 32\); expected \(height, width, 3\)"),
    (lambda z: np.concatenate([z, z[..., :1]], axis=-1), r"shape \(32, 32, 4\)"),
    (lambda z: z[None], r"shape \(1, 32, 32, 3\)"),
    (lambda z: z[:31], r"31x32 .* whole multiples of 32x32"),
    (lambda z: z[:0], r"0x32 .* whole multiples"),
    (lambda z: z.astype(np.float16), "dtype float16; encode writes float32 or float64"),
    (lambda z: z.astype(np.int32), "dtype int32"),
    (lambda z: z.tolist(), "must be a numpy array, got list"),
    (lambda z: np.where(np.arange(z.size).reshape(z.shape) == 7, np.nan, z).astype(np.float32),
     "NaN or Inf at 1 of its 3072 values"),
    (lambda z: np.full_like(z, np.inf), "NaN or Inf at 3072 of its 3072"),
])
def test_malformed_latents_are_refused(trained_like, make_bad, message):
    with pytest.raises(CodecError, match=message):
        decode(trained_like, make_bad(good_latent(trained_like)))


def test_latent_of_another_model_is_refused(trained_like, random64):
    with pytest.raises(CodecError, match="another model, or altered"):
        decode(random64, good_latent(trained_like).astype(np.float64))


def test_altered_latent_is_refused(trained_like):
    latent = good_latent(trained_like)
    latent[5, 5, 1] += 0.3
    with pytest.raises(CodecError, match="does not decode to an 8-bit image"):
        decode(trained_like, latent)


def test_latent_outside_the_pixel_range_is_refused():
    identity = Jet(JetConfig(image_size=(16, 16), couplings=2, block_depth=1, width=8, heads=2))  # zero init
    on_grid = (np.arange(16 * 16 * 3).reshape(16, 16, 3) % 256 + 0.5) / 127.5 - 1
    np.testing.assert_array_equal(decode(identity, on_grid).pixels, np.arange(768).reshape(16, 16, 3) % 256)
    for value, distance in ((300, "45"), (-10, "10")):
        latent = np.full((16, 16, 3), (value + 0.5) / 127.5 - 1)
        with pytest.raises(CodecError, match=rf"lies {distance} px from the nearest level in 0\.\.255"):
            decode(identity, latent)


@pytest.mark.parametrize("pixels, message", [
    (np.zeros((32, 32, 3), np.uint16), "uint8 array .* got uint16"),
    (np.zeros((32, 32, 3), np.float32), "got float32"),
    (np.zeros((32, 32), np.uint8), r"shape \(32, 32\)"),
    (np.zeros((32, 32, 4), np.uint8), r"shape \(32, 32, 4\)"),
    (np.zeros((0, 32, 3), np.uint8), "0x32 .* it has no pixels"),
])
def test_images_the_codec_cannot_code_are_refused(trained_like, pixels, message):
    with pytest.raises(CodecError, match=message):
        encode(trained_like, pixels)


# --------------------------------------------------------------------------- any size
@functools.cache
def make_wide_tiles() -> Jet:
    """A cheap trained-like flow on 64x64 tiles: photo-sized images in few tiles."""
    torch.manual_seed(1)
    cfg = JetConfig(image_size=(64, 64), patch_size=8, couplings=2, block_depth=1, width=16, heads=2)
    return final_projections(Jet(cfg), std=0.05, seed=1)


@pytest.mark.parametrize("size", [(481, 321), (500, 333), (1, 1), (31, 33), (4000, 3), (3, 4000), (128, 65)])
def test_any_size_round_trips_through_edge_padding(size):
    model, tile = make_wide_tiles(), 64
    pixels = np.random.default_rng(sum(size)).integers(0, 256, (*size, 3), dtype=np.uint8)
    encoded = encode(model, pixels)
    assert encoded.size == size and encoded.margin <= SAFE_MARGIN
    assert encoded.latent.shape == (-(-size[0] // tile) * tile, -(-size[1] // tile) * tile, 3)
    decoded = decode(model, encoded.latent, size)
    assert decoded.pixels.shape == (*size, 3) and decoded.pixels.flags.c_contiguous
    np.testing.assert_array_equal(decoded.pixels, pixels)
    # the latent codes the edge-padded image: decoded whole, that is what comes back
    np.testing.assert_array_equal(decode(model, encoded.latent).pixels, pad_to_tiles(pixels, (tile, tile)))


def test_wrong_size_or_altered_padding_is_refused(trained_like):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 20, 3), dtype=np.uint8)
    latent = encode(trained_like, pixels).latent  # 64x32
    for size in ((40, 33), (31, 20), (0, 20), (65, 20)):
        with pytest.raises(CodecError, match="pads to .* but the latent is 64x32"):
            decode(trained_like, latent, size)
    # a size that pads to the same shape, but cuts the image elsewhere: the padding does not match
    with pytest.raises(CodecError, match="padding is not the edge padding of a 39x20 image"):
        decode(trained_like, latent, (39, 20))
    # the padded rows altered as a whole tile: the latent of other pixels, decoded exactly, is refused
    other = pad_to_tiles(pixels, (SIZE, SIZE)).copy()
    other[40:, :, 0] ^= 0x55
    with pytest.raises(CodecError, match="padding is not the edge padding of a 40x20 image"):
        decode(trained_like, encode(trained_like, other).latent, (40, 20))


def test_progress_counts_every_pass_over_the_tiles(trained_like, random64):
    pixels = adversarial()["uniform-noise"]  # 3 tiles
    calls = []
    encode(trained_like, pixels, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (6, 6) and all(d <= t for d, t in calls)  # encode, then the verifying decode
    calls.clear()
    encoded = encode(random64, pixels[:, :SIZE], progress=lambda done, total: calls.append((done, total)))
    assert encoded.latent.dtype == np.float64  # float32 failed its check: float64 encode and decode followed
    assert calls == [(1, 2), (2, 2), (3, 4), (4, 4)]
    calls.clear()
    decode(trained_like, encode(trained_like, pixels).latent, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 3)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_on_the_gpu_codes_on_the_cpu_bit_for_bit(trained_like):
    pixels = adversarial()["uniform-noise"]
    on_cpu = encode(trained_like, pixels)
    gpu_model = copy.deepcopy(trained_like).cuda()
    on_gpu = encode(gpu_model, pixels)
    assert on_gpu.latent.tobytes() == on_cpu.latent.tobytes() and on_gpu.margin == on_cpu.margin
    assert decode(gpu_model, on_cpu.latent).margin == on_cpu.margin
    assert next(gpu_model.parameters()).is_cuda  # the caller's model stays where it was
