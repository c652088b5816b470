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
    assert model.num_params() == 5_659_200
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
