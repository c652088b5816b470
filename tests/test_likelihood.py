"""Likelihood: logdet against the full Jacobian, and bits per dim against closed forms."""

from __future__ import annotations

import math

import numpy as np
import torch

from jetcli import Jet, JetConfig
from jetcli.likelihood import BIN, bits_per_dim, dequantize, image_bits, to_model_space

TINY = JetConfig(image_size=(16, 16), patch_size=4, couplings=4, block_depth=1, width=32, heads=2)


def pixels(config: JetConfig, batch: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, *config.image_size, config.channels), generator=g, dtype=torch.uint8)


def test_logdet_equals_log_abs_det_of_the_jacobian(random_jet):
    # 8x8 RGB with patch 2: D = 192, channel and spatial couplings, float64 throughout.
    config = JetConfig(image_size=(8, 8), patch_size=2, couplings=4, block_depth=1, width=16, heads=2,
                       kinds=("channels", "spatial"), spatial_projs=("checkerboard", "hstripes-inv"))
    model = random_jet(config, strength=0.5).double()
    x = torch.rand(1, 8, 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def flow(flat):
        return model(flat.view(1, 8, 8, 3))[0].flatten()

    jacobian = torch.autograd.functional.jacobian(flow, x.flatten(), vectorize=True)
    sign, log_abs_det = torch.linalg.slogdet(jacobian)
    with torch.no_grad():
        z, logdet = model(x)
        _, inverse_logdet = model.inverse(z)
    error = abs(logdet.item() - log_abs_det.item())
    print(f"logdet {logdet.item():.12f} vs log|det J| {log_abs_det.item():.12f}: difference {error:.3g}")
    assert sign.item() == 1.0  # affine couplings with positive scales preserve orientation
    assert abs(logdet.item()) > 1.0  # a non-trivial flow
    assert error < 1e-9
    assert abs(inverse_logdet.item() + logdet.item()) < 1e-9


def closed_form_bpd(x: np.ndarray) -> float:
    """bpd of the identity flow (z = x, logdet = 0), per big_vision: standard-normal NLL of z plus
    D log 127.5 for the bin width, over D ln 2."""
    d = x.size
    nll = 0.5 * np.sum(x**2) + 0.5 * d * math.log(2 * math.pi) + d * math.log(127.5)
    return nll / (d * math.log(2))


def test_identity_flow_bpd_equals_closed_form():
    model = Jet(TINY).double().eval()
    p = pixels(TINY)
    x = dequantize(p, torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        bits = bits_per_dim(*model(x))
    expected = [closed_form_bpd(xi) for xi in x.numpy()]
    np.testing.assert_allclose(bits.bpd.numpy(), expected, rtol=1e-13)
    assert torch.equal(bits.logdet, torch.zeros(len(p), dtype=torch.float64))
    torch.testing.assert_close(bits.bpd, bits.nll - bits.logdet, rtol=0, atol=0)
    # In float32, as the CLI computes it, through image_bits and its own noise draw.
    with torch.no_grad():
        bits32 = image_bits(Jet(TINY).eval(), p, generator=torch.Generator().manual_seed(3))
    x32 = dequantize(p, torch.Generator().manual_seed(3)).double().numpy()
    np.testing.assert_allclose(bits32.bpd.numpy(), [closed_form_bpd(xi) for xi in x32], rtol=1e-6)


def test_constant_scale_logdet_closed_form():
    # Zero weights and a constant raw scale c: each coupling scales half of the D dims by 2 sigmoid(c).
    model = Jet(TINY).double().eval()
    c, half = -0.7, TINY.patch_dim // 2
    with torch.no_grad():
        for coupling in model.couplings:
            coupling.vit.final_proj.bias[half:] = c
    x = to_model_space(pixels(TINY), torch.float64)
    with torch.no_grad():
        _, logdet = model(x)
    expected = TINY.couplings * TINY.dims / 2 * math.log(2 / (1 + math.exp(-c)))
    np.testing.assert_allclose(logdet.numpy(), expected, rtol=1e-12)


def test_dequantisation_noise_stays_inside_each_bin():
    p = torch.tensor([[0, 1, 127, 128, 254, 255]], dtype=torch.uint8).repeat(2000, 1)
    x = dequantize(p, torch.Generator().manual_seed(0))
    low = p.float() / 127.5 - 1
    u = (x - low) / BIN
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01  # uniform, not a fixed offset


def test_image_bits_averages_dequantisation_draws(random_jet):
    model = random_jet(TINY)
    p = pixels(TINY)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        averaged = image_bits(model, p, samples=3, generator=torch.Generator().manual_seed(5))
        draws = [bits_per_dim(*model(dequantize(p, g))) for _ in range(3)]
    for field in ("bpd", "nll", "logdet"):
        torch.testing.assert_close(getattr(averaged, field), sum(getattr(b, field) for b in draws) / 3)
    assert not torch.allclose(draws[0].bpd, draws[1].bpd, rtol=0, atol=1e-9)  # the draws differ
    torch.testing.assert_close(averaged.bpd, averaged.nll - averaged.logdet)
