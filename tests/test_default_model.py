"""The embedded CIFAR-10 model (weights/cifar10): trained, better than lossless WebP, and losslessly invertible.

These checks would fail for random or barely trained weights, or for a model the codec cannot invert.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from jetcli import checkpoints, codec
from jetcli.hub import load_model
from jetcli.likelihood import image_bits


@pytest.fixture(scope="module")
def model():
    return load_model("cifar10").model


@pytest.fixture(scope="module")
def cifar_test(shared_data):
    return np.load(shared_data / "cifar10_lossless_subset.npz")["test_images"]


def webp_bpd(image: np.ndarray) -> float:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="WEBP", lossless=True, quality=100, method=6)
    return len(buf.getvalue()) * 8 / image.size


def test_default_model_is_the_packaged_card_model(model, repo_root):
    assert model.config.image_size == (32, 32)
    assert model.num_params() == 5_186_688
    assert checkpoints.load_own(repo_root / "weights" / "cifar10").config == model.config
    assert (repo_root / "weights" / "cifar10" / "model.safetensors").stat().st_size < 25 * 2**20


def test_default_model_beats_lossless_webp_on_held_out_cifar(model, cifar_test):
    images = cifar_test[:256]
    with torch.no_grad():
        bpd = image_bits(model, torch.from_numpy(images), generator=torch.Generator().manual_seed(0)).bpd
    webp = np.mean([webp_bpd(im) for im in images])
    assert bpd.mean().item() < webp - 0.2, (bpd.mean().item(), webp)
    assert bpd.mean().item() < 4.5  # identity init would give ~8 bits/dim here


def test_default_model_round_trips_every_cifar_test_image_in_float32(model, cifar_test):
    tall = cifar_test.reshape(-1, 32, 3)  # the 1017 images stacked into one image of 1017 tiles
    encoded = codec.encode(model, tall)
    assert encoded.latent.dtype == np.float32 and encoded.margin < codec.SAFE_MARGIN
    decoded = codec.decode(model, encoded.latent)
    assert np.array_equal(decoded.pixels, tall)


@pytest.fixture(scope="module")
def photo_model():
    return load_model("photo").model


def test_the_default_is_the_photo_model(photo_model, repo_root):
    from jetcli.hub import DEFAULT_MODEL
    assert DEFAULT_MODEL == "photo" and load_model(None).sha256() == load_model("photo").sha256()
    assert photo_model.config.image_size == (32, 32) and photo_model.config.couplings == 24
    assert (repo_root / "weights" / "photo" / "model.safetensors").stat().st_size < 25 * 2**20


def test_photo_model_codes_held_out_photos_better_than_png_and_the_cifar_model(photo_model, model, shared_data):
    """Two held-out photos coded whole (edge-padded 32x32 tiles): trained photo statistics, not an init."""
    from jetcli.images import pad_to_tiles, png_bytes, read_rgb, tiles
    for name in ("101085.png", "3096.png"):
        photo = read_rgb(shared_data / "cbsd68" / name)
        padded = torch.from_numpy(tiles(pad_to_tiles(photo, (32, 32)), (32, 32)))
        bits = {}
        for label, jet in (("photo", photo_model), ("cifar10", model)):
            with torch.no_grad():
                bpd = image_bits(jet, padded, generator=torch.Generator().manual_seed(0)).bpd
            bits[label] = float(bpd.double().sum()) * 3072 / photo.size
        png = len(png_bytes(photo, optimize=True)) * 8 / photo.size
        assert bits["photo"] < png and bits["photo"] < bits["cifar10"] - 0.1, (name, bits, png)


def test_photo_model_round_trips_a_held_out_photo_in_float32(photo_model, shared_data):
    from jetcli.images import pad_to_tiles, read_rgb
    photo = pad_to_tiles(read_rgb(shared_data / "cbsd68" / "101085.png")[:96, :160], (32, 32))
    encoded = codec.encode(photo_model, photo)
    assert encoded.margin < codec.SAFE_MARGIN
    assert np.array_equal(codec.decode(photo_model, encoded.latent).pixels, photo)
