"""The ViT's hot operations, each with interchangeable routes that compute the same function, and the
fastest route for the machine at hand chosen by measurement.

    linear      "matmul" (F.linear) | "conv1x1" (the same product as a channels-last 1x1 convolution)
    attention   "sdpa" (F.scaled_dot_product_attention) | "softmax" (softmax(q kᵀ / √d) v, written out)

Which is faster depends on the CPU, the dtype and whether a backward pass follows: MKL's float32 GEMM
takes its AVX2 path on AMD CPUs, where the convolution (oneDNN, AVX-512) was 2x faster; on an Intel Xeon
with AMX plain F.linear wins; PyTorch's CPU SDPA has a fast float32 forward but a bf16 backward 4-8x
slower than the written-out softmax (BENCHMARKS.md has the numbers). So the first call of an operation
with a new (dtype, autocast, training or not, shapes) times every route, forward and, where gradients
flow, backward, and keeps the fastest. Choices are saved per machine and torch build in a JSON file
(`cache_path()`), so a machine uses the same kernels, and computes the same numbers, from run to run.

Not probed, the first route always: devices other than the CPU (cuBLAS and flash attention), torch's
deterministic mode (the lossless codec: its numbers must not depend on a timing), code being compiled
or traced by a dispatch mode, and JETCLI_KERNELS=reference. GELU and LayerNorm have one route each: the alternatives measured
(tanh-GELU as x·sigmoid(2u), compiled GELU, bf16 LayerNorm) were slower or changed the numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from jetcli.fileio import atomic_write


# --------------------------------------------------------------------------- the routes
def _conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.dim() != 3:
        return F.linear(x, weight, bias)
    images = x.unsqueeze(1).permute(0, 3, 1, 2)  # b images of 1 x n pixels, channels-last
    y = F.conv2d(images, weight[:, :, None, None], bias)
    return y.permute(0, 2, 3, 1).reshape(*x.shape[:2], -1)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v (PyTorch's CPU softmax accumulates bf16 inputs in float32)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return scores.softmax(dim=-1) @ v


LINEAR_ROUTES: dict[str, Callable] = {"matmul": F.linear, "conv1x1": _conv1x1}
ATTENTION_ROUTES: dict[str, Callable] = {"sdpa": F.scaled_dot_product_attention, "softmax": softmax_attention}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return choose("linear", LINEAR_ROUTES, (x, weight, bias))(x, weight, bias)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head attention on (B, heads, N, head_dim) queries, keys and values."""
    return choose("attention", ATTENTION_ROUTES, (q, k, v))(q, k, v)


class TunedLinear(nn.Linear):
    """nn.Linear computed by the fastest linear route (same parameters, same function)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Float32Linear(TunedLinear):
    """A Linear that keeps its weights' precision under autocast: the ViT's head.

    Its outputs are the coupling's bias and scale, which enter z and the logdet directly. In fast mode,
    computing them in bf16 tripled the bpd error against float32, for ~1% of the FLOPs (BENCHMARKS.md).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


# --------------------------------------------------------------------------- choosing
_choices: dict[str, str] | None = None  # key -> route name; loaded from the cache file on first use


def cache_path() -> Path:
    """$JETCLI_CACHE_DIR (default $XDG_CACHE_HOME/jetcli or ~/.cache/jetcli)/kernels-<machine>.json."""
    root = os.environ.get("JETCLI_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jetcli"
    return Path(root) / f"kernels-{machine_id()}.json"


def machine_id() -> str:
    """The CPU model and flags, torch's version and thread count: what a choice depends on."""
    cpu = platform.processor()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next((line for line in info.splitlines() if line.startswith("model name")), cpu)
        cpu += next((line for line in info.splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    text = f"{cpu}|{torch.__version__}|{torch.get_num_threads()}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def choices() -> dict[str, str]:
    """The choices made so far on this machine (read from the cache file once)."""
    global _choices
    if _choices is None:
        try:
            loaded = json.loads(cache_path().read_text())
            _choices = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, str)}
        except (OSError, ValueError, AttributeError):  # none yet, unreadable or damaged: probe again
            _choices = {}
    return _choices


def probing_enabled(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and os.environ.get("JETCLI_KERNELS", "") != "reference"
            and not torch.are_deterministic_algorithms_enabled() and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)  # e.g. a FLOP counter: timing calls would be counted


def choose(op: str, routes: dict[str, Callable], args: tuple) -> Callable:
    """The route of `op` to use for these arguments (the first route where nothing is probed)."""
    x = args[0]
    if not probing_enabled(x):
        return next(iter(routes.values()))
    training = torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in args)
    shapes = ",".join("x".join(map(str, a.shape)) for a in args if a is not None)
    key = (f"{op}|{str(x.dtype).removeprefix('torch.')}|autocast={torch.is_autocast_enabled('cpu')}"
           f"|{'train' if training else 'infer'}|{shapes}")
    known = choices()
    name = known.get(key)
    if name not in routes:
        name = fastest(routes, args, training)
        known[key] = name
        _save(known)
    return routes[name]


def fastest(routes: dict[str, Callable], args: tuple, training: bool, rounds: int = 5) -> str:
    """The name of the route with the shortest best time on copies of `args`. Routes take turns in
    every round, so load from other processes falls on all of them alike."""
    best = dict.fromkeys(routes, float("inf"))
    with torch.enable_grad() if training else torch.no_grad():
        for i in range(rounds + 1):  # round 0 warms up (allocations, oneDNN primitives)
            for name, fn in routes.items():
                inputs = [None if a is None else a.detach().requires_grad_(a.requires_grad) for a in args]
                start = time.perf_counter()
                out = fn(*inputs)
                if training:
                    out.backward(torch.ones_like(out))
                if i:
                    best[name] = min(best[name], time.perf_counter() - start)
    return min(best, key=best.get)


def _save(known: dict[str, str]) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(known, indent=1, sort_keys=True)))
    except OSError:  # a read-only home: the choice still holds for this process
        pass
