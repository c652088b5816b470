"""The flow: invertibility, identity at init, exact splits, parity with jet-pytorch, and the config."""

from __future__ import annotations

import json

import pytest
import torch

from jetcli import Jet, JetConfig, preset
from jetcli.checkpoints import matrix_from_order
from jetcli.config import PRESETS, SHIFTED_PROJS, SPATIAL_PROJS
from jetcli.model import patchify, spatial_order
from jetcli.testing import port_forward, port_of

TINY = JetConfig(image_size=(16, 16), patch_size=4, couplings=4, block_depth=1, width=32, heads=2)
ALL_SPLITS = [("channels", "random")] + [("spatial", proj) for proj in SPATIAL_PROJS + SHIFTED_PROJS]


def images(config: JetConfig, batch: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *config.image_size, config.channels, generator=g) * 2 - 1


# --------------------------------------------------------------------------- invertibility
@torch.no_grad()
def round_trip(model, x):
    """(z, logdet, the inverse's logdet, max |inverse(forward(x)) - x|)."""
    z, logdet = model(x)
    x_back, logdet_back = model.inverse(z)
    return z, logdet, logdet_back, (x_back - x).abs().max().item()


@pytest.mark.parametrize("kind,proj", ALL_SPLITS, ids=[p for _, p in ALL_SPLITS])
def test_inverse_of_forward_for_every_split(kind, proj, random_jet):
    config = TINY.replace(kinds=(kind,), spatial_projs=(proj,) if kind == "spatial" else SPATIAL_PROJS)
    x = images(config)
    z, logdet, logdet_back, error = round_trip(random_jet(config, strength=0.5), x)
    print(f"{proj}: max |inverse(forward(x)) - x| = {error:.3g}")
    assert (z - x).abs().max() > 0.1, "the test model should not be the identity"
    assert error < 1e-5
    torch.testing.assert_close(logdet_back, -logdet, rtol=1e-5, atol=1e-4)


def test_inverse_of_forward_whole_model_non_square(random_jet):
    # Every kind and all six spatial projections in one flow, on a non-square image.
    config = TINY.replace(image_size=(16, 32), couplings=12, kinds=("channels", "spatial"))
    assert {p for k, p in config.plan() if k == "spatial"} == set(SPATIAL_PROJS)
    x = images(config)
    z, _, _, error = round_trip(random_jet(config, strength=0.5), x)
    print(f"12 couplings, 16x32: max |inverse(forward(x)) - x| = {error:.3g}")
    assert (z - x).abs().max() > 0.5
    assert error < 3e-5  # float32 round-off over 12 couplings: 0.7-2.2e-5 over seeds 0-5


def test_identity_at_init():
    model = Jet(TINY.replace(couplings=5, kinds=("channels", "spatial"))).eval()
    x = images(model.config)
    with torch.no_grad():
        z, logdet = model(x)
        x_back, logdet_back = model.inverse(x)
    assert torch.equal(z, x) and torch.equal(x_back, x)
    assert torch.equal(logdet, torch.zeros(len(x))) and torch.equal(logdet_back, torch.zeros(len(x)))


# --------------------------------------------------------------------------- exact splits
def pairs(pattern: str, nh: int, nw: int) -> set[frozenset]:
    """The token pairs a spatial coupling puts in one ViT token: the k-th kept with the k-th changed."""
    order = spatial_order(pattern, nh, nw).tolist()
    return {frozenset(p) for p in zip(order[: len(order) // 2], order[len(order) // 2:])}


@pytest.mark.parametrize("nh,nw", [(8, 8), (4, 6)])
def test_shifted_patterns_pair_the_other_neighbours(nh, nw):
    """The paper's pairing couples each token with one fixed neighbour (columns 2j and 2j+1, or rows); its
    "-shift" keeps the same tokens but pairs them with the other neighbour, so between them every two
    adjacent tokens of a row and of a column (the grid wrapping round) are paired by some coupling."""
    neighbours = {frozenset((r * nw + c, r * nw + (c + 1) % nw)) for r in range(nh) for c in range(nw)} | \
                 {frozenset((r * nw + c, (r + 1) % nh * nw + c)) for r in range(nh) for c in range(nw)}
    covered = set()
    for pattern in SPATIAL_PROJS:
        plain, shifted = spatial_order(pattern, nh, nw), spatial_order(f"{pattern}-shift", nh, nw)
        assert sorted(shifted.tolist()) == list(range(nh * nw))
        assert set(shifted[: nh * nw // 2].tolist()) == set(plain[: nh * nw // 2].tolist())  # the same kept half
        assert pairs(pattern, nh, nw) <= neighbours and pairs(f"{pattern}-shift", nh, nw) <= neighbours
        assert not pairs(pattern, nh, nw) & pairs(f"{pattern}-shift", nh, nw)
        covered |= pairs(pattern, nh, nw) | pairs(f"{pattern}-shift", nh, nw)
    assert covered == neighbours
    assert len(set().union(*(pairs(p, nh, nw) for p in SPATIAL_PROJS))) == len(neighbours) // 2


def test_shifted_patterns_need_an_even_grid():
    with pytest.raises(ValueError, match="even number of patches down and across"):
        TINY.replace(image_size=(12, 16), kinds=("spatial",), spatial_projs=("vstripes-shift",))


@pytest.fixture
def medium_matmul_precision():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # lets matmuls drop to bf16/tf32 where supported
    yield
    torch.set_float32_matmul_precision(previous)


def reference_split(x: torch.Tensor, matrix: torch.Tensor, spatial: bool):
    """big_vision's definition: a projection by a 0/1 matrix (in float64: exact), then halves."""
    x, matrix = x.double(), matrix.double()
    if not spatial:
        return (x @ matrix).chunk(2, dim=-1)
    b, n, d = x.shape
    x1, x2 = torch.einsum("ntk,tm->nmk", x, matrix).chunk(2, dim=1)
    return x1.reshape(b, n, d // 2), x2.reshape(b, n, d // 2)


def test_split_merge_bit_exact_under_medium_precision(medium_matmul_precision):
    config = TINY.replace(couplings=14, kinds=("channels", "spatial"))
    model = Jet(config).eval()
    g = torch.Generator().manual_seed(0)
    # Values with full float32 mantissas: any bf16/tf32 rounding would show.
    h = torch.rand(3, config.num_patches, config.patch_dim, generator=g) * 2 - 1 + 1e-4 * torch.rand(
        3, config.num_patches, config.patch_dim, generator=g)
    assert not torch.equal(h, h.bfloat16().float())
    for coupling in model.couplings:
        split = coupling.split
        x1, x2 = split.split(h)
        r1, r2 = reference_split(h, matrix_from_order(split.order), split.spatial)
        assert torch.equal(x1, r1.float()) and torch.equal(x2, r2.float())
        assert torch.equal(split.merge(x1, x2), h)
    x = images(config)
    with torch.no_grad():
        z, _ = model(x)  # identity couplings: the result is exactly x only if every split/merge is exact
        x_back, _ = model.inverse(z)
    assert torch.equal(z, x) and torch.equal(x_back, x)
    assert torch.get_float32_matmul_precision() == "medium"


# --------------------------------------------------------------------------- jet-pytorch parity
def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


PORT_NUMERICS = dict(ln_eps=1e-5, gelu="exact")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_parity_with_jet_pytorch(random_jet):
    pytest.importorskip("jet_pytorch")
    config = TINY.replace(couplings=10, **PORT_NUMERICS)  # 8 channel and 2 spatial couplings
    model = random_jet(config)
    port = port_of(model)
    x = images(config)
    with torch.no_grad():
        z, logdet = model(x)
        z_port, logdet_port = port_forward(port, x)
        x_back, _ = model.inverse(z)
        x_port, _ = port.inverse(patchify(z, config.patch_size))
    errors = relative_error(z, z_port), relative_error(logdet, logdet_port), relative_error(x_back, x_port)
    print(f"relative error vs jet-pytorch: z {errors[0]:.3g}, logdet {errors[1]:.3g}, inverse {errors[2]:.3g}")
    assert (z - x).abs().max() > 0.1
    assert max(errors) <= 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("switch", [dict(gelu="tanh"), dict(ln_eps=1e-6)], ids=["gelu", "ln_eps"])
def test_numeric_switches_change_the_function(switch, random_jet):
    pytest.importorskip("jet_pytorch")
    config = TINY.replace(couplings=10, **PORT_NUMERICS)
    model = random_jet(config)
    with torch.no_grad():  # a small residual stream, where LayerNorm's eps matters
        for coupling in model.couplings:
            for p in (coupling.vit.init_proj.weight, coupling.vit.init_proj.bias, coupling.vit.posemb):
                p.mul_(0.03)
    port = port_of(model)
    switched = Jet(config.replace(**switch)).eval()
    switched.load_state_dict(model.state_dict())
    x = images(config)
    with torch.no_grad():
        z_port, _ = port_forward(port, x)
        same, _ = model(x)
        other, _ = switched(x)
    assert relative_error(same, z_port) <= 1e-5
    assert relative_error(other, z_port) > 1e-4


# --------------------------------------------------------------------------- config
def parameter_count(cfg: JetConfig) -> int:
    """Parameters of a Jet, from its config alone."""
    w, hidden, half = cfg.width, cfg.mlp_ratio * cfg.width, cfg.patch_dim // 2
    block = 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * hidden + hidden) + (hidden * w + w)
    vit = (half * w + w) + cfg.num_patches * w + cfg.block_depth * block + 2 * w + (w * 2 * half + 2 * half)
    return cfg.couplings * vit


@pytest.mark.parametrize("cfg", [preset("tiny-16"), TINY.replace(mlp_ratio=2, block_depth=3, patch_size=2,
                                                                  image_size=(8, 16), channels=1)])
def test_parameter_count_formula_matches_the_model(cfg):
    assert Jet(cfg).num_params() == parameter_count(cfg)


def test_ablation_preset_parameter_count():
    cfg = preset("imagenet64-ablation")
    # Every coupling has the same shapes: count one real coupling instead of building 200M parameters.
    one = Jet(cfg.replace(couplings=1)).num_params()
    print({name: parameter_count(c) for name, c in PRESETS.items()})
    assert one * cfg.couplings == parameter_count(cfg)


def test_ablation_plan_cycles_like_big_vision():
    plan = preset("imagenet64-ablation").plan()
    spatial = [(i, p) for i, (k, p) in enumerate(plan) if k == "spatial"]
    assert [i for i, _ in spatial] == [4, 9, 14, 19, 24, 29]
    assert tuple(p for _, p in spatial) == SPATIAL_PROJS
    assert sum(k == "channels" for k, _ in plan) == 26


@pytest.mark.parametrize("name", PRESETS)
def test_config_json_round_trip(name):
    cfg = PRESETS[name]
    assert JetConfig.from_json(cfg.to_json()) == cfg
    assert JetConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize("changes,message", [
    (dict(image_size=(30, 32)), "not a multiple of the patch size"),
    (dict(image_size=(12, 12)), "even number of patches"),
    (dict(patch_size=1, channels=1), "even number of dims"),
    (dict(width=30, heads=4), "not divisible"),
    (dict(kinds=("channels", "pixels")), "kinds"),
    (dict(spatial_projs=("diagonal",)), "spatial_projs"),
    (dict(gelu="relu"), "gelu"),
    (dict(couplings=0), "positive"),
])
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**changes)


def test_config_rejects_unknown_keys_and_presets():
    with pytest.raises(ValueError, match="unknown config keys"):
        JetConfig.from_dict({**TINY.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("imagenet1024")
