"""Every kernel route computes the same numbers; choices are probed once, cached, and skipped where the
numbers must not depend on a timing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from jetcli import kernels, preset
from jetcli.likelihood import bits_per_dim, dequantize


@pytest.fixture(autouse=True)
def fresh_choices(tmp_path, monkeypatch):
    monkeypatch.setenv("JETCLI_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("JETCLI_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_choices", None)


def _grads(fn, args):
    leaves = [a.detach().requires_grad_() for a in args]
    out = fn(*leaves)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype))
    return out.detach().float(), [leaf.grad.float() for leaf in leaves]


def _linear_args(dtype):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 10, 24, generator=g, dtype=dtype), torch.randn(40, 24, generator=g, dtype=dtype) / 5,
            torch.randn(40, generator=g, dtype=dtype))


def _attention_args(dtype):
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(2, 3, 16, 8, generator=g, dtype=dtype) for _ in range(3))


@pytest.mark.parametrize("routes, make_args", [(kernels.LINEAR_ROUTES, _linear_args),
                                               (kernels.ATTENTION_ROUTES, _attention_args)], ids=["linear", "attention"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_routes_agree(routes, make_args, dtype, tol):
    """Every route of an operation gives the reference route's values and gradients."""
    args = make_args(dtype)
    ref_out, ref_grads = _grads(next(iter(routes.values())), args)
    for name, fn in routes.items():
        out, grads = _grads(fn, args)
        assert torch.allclose(out, ref_out, rtol=tol, atol=tol), name
        for grad, ref in zip(grads, ref_grads):
            assert torch.allclose(grad, ref, rtol=tol, atol=tol * ref.abs().max().item()), name


def test_choice_is_probed_once_and_cached(monkeypatch):
    calls = []
    real = kernels.fastest
    monkeypatch.setattr(kernels, "fastest", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = kernels.TunedLinear(8, 16)
    x = torch.randn(2, 5, 8)
    layer(x), layer(x)
    with torch.no_grad():
        layer(x)  # inference is a separate choice
    assert len(calls) == 2
    saved = json.loads(kernels.cache_path().read_text())
    assert len(saved) == 2 and set(saved.values()) <= set(kernels.LINEAR_ROUTES)
    monkeypatch.setattr(kernels, "_choices", None)  # a new process: reads the file, probes nothing
    layer(x)
    assert len(calls) == 2


def test_cached_choice_is_used(monkeypatch):
    layer = kernels.TunedLinear(8, 16)
    x = torch.randn(2, 5, 8)
    layer(x)
    key, = kernels.choices()
    for route in kernels.LINEAR_ROUTES:
        kernels.cache_path().write_text(json.dumps({key: route}))
        monkeypatch.setattr(kernels, "_choices", None)
        seen = []
        monkeypatch.setitem(kernels.LINEAR_ROUTES, route, lambda *a, r=route: seen.append(r) or F.linear(*a))
        layer(x)
        assert seen == [route]


@pytest.mark.parametrize("why", ["reference", "deterministic", "damaged cache"])
def test_reference_route_without_probing(why, monkeypatch):
    monkeypatch.setattr(kernels, "fastest", lambda *a, **k: pytest.fail("probed"))
    if why == "reference":
        monkeypatch.setenv("JETCLI_KERNELS", "reference")
        assert kernels.choose("linear", kernels.LINEAR_ROUTES, (torch.randn(2, 3, 4),)) is F.linear
    elif why == "deterministic":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        assert kernels.choose("attention", kernels.ATTENTION_ROUTES, (torch.randn(1, 1, 2, 2),) * 3) \
            is F.scaled_dot_product_attention
    else:  # a damaged cache file is ignored and probed again
        monkeypatch.setattr(kernels, "fastest", lambda *a, **k: "conv1x1")
        kernels.cache_path().parent.mkdir(parents=True, exist_ok=True)
        kernels.cache_path().write_text("{not json")
        assert kernels.choose("linear", kernels.LINEAR_ROUTES, (torch.randn(2, 3, 4),)) is kernels._conv1x1


@pytest.mark.parametrize("precision", ["fp32", "fast"])
def test_model_is_the_same_on_every_route(precision, random_jet, monkeypatch):
    """The whole flow, forward and gradients, with each route forced: the same numbers."""
    from jetcli.precision import compute_context
    model = random_jet(preset("tiny-16"))
    x = dequantize(torch.randint(0, 256, (4, 16, 16, 3), dtype=torch.uint8), torch.Generator().manual_seed(0))
    results = []
    for linear_route, attention_route in [("matmul", "sdpa"), ("conv1x1", "softmax")]:
        monkeypatch.setattr(kernels, "fastest",
                            lambda routes, *a, **k: linear_route if "matmul" in routes else attention_route)
        monkeypatch.setattr(kernels, "_choices", {})
        model.zero_grad()
        with compute_context("cpu", precision):
            z, logdet = model(x)
        bits_per_dim(z.float(), logdet.float()).bpd.mean().backward()
        results.append((z.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (z0, g0), (z1, g1) = results
    tol = 1e-5 if precision == "fp32" else 2e-2
    assert torch.allclose(z0, z1, atol=tol)
    assert all(torch.allclose(a, b, atol=tol * max(a.abs().max().item(), 1e-3)) for a, b in zip(g0, g1))
