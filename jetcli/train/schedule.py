"""big_vision's learning-rate schedule and optimiser (configs/proj/jet/imagenet64.py, big_vision/optax.py).

Adam with betas (0.9, 0.95) and eps 1e-8, lr 3e-4, clipping at global norm 1.0, decoupled weight decay
1e-5 on every parameter (wd_mults (('.*', 1.0),)), linear warmup over 10% of the steps, then cosine
decay to 0. The optax chain is clip -> scale_by_adam -> scale(lr) -> add_decayed_weights(wd) ->
scale_by_schedule -> scale(-1), so one update is

    param <- param - sched(t) * (lr * adam_direction + wd * param):

the decay, wd * sched(t) * param, does not depend on lr. torch's AdamW decays by lr(t) * weight_decay *
param; with lr(t) = lr * sched(t) we pass weight_decay = wd / lr and get the same update. The split
orders are buffers, never trained (big_vision freezes its projections). One difference: big_vision
keeps Adam's first moment in bfloat16, we keep it in float32.
"""

from __future__ import annotations

import math

import torch

from jetcli.errors import SettingError
from jetcli.model import Jet
from jetcli.train.options import TrainOptions


def warmup_steps(total: int, warmup: float) -> int:
    """big_vision's rounding of warmup_percent: to the nearest step, at least 1 unless it is 0."""
    return max(1, round(warmup * total)) if warmup else 0


def epoch_steps(epochs: float, images: int, batch_size: int) -> int:
    """The steps of `epochs` passes over `images` at `batch_size`, rounded as big_vision rounds
    total_epochs (to the nearest step, at least 1)."""
    if not 0 < epochs < math.inf:
        raise SettingError("{epochs} must be positive and finite, got {value}", value=epochs)
    return max(1, round(epochs * images / batch_size))


def lr_factor(step: int, total: int, warmup: float) -> float:
    """big_vision's schedule at optimiser step `step` (0 = the first update): linear warmup from 0, then
    cosine decay to 0 at `total`."""
    warm = warmup_steps(total, warmup)
    progress = min(1.0, max(0.0, (step - warm) / max(1, total - warm)))
    factor = 0.5 * (1 + math.cos(math.pi * progress))
    return factor * min(1.0, step / warm) if warm else factor


def make_optimizer(model: Jet, opts: TrainOptions) -> torch.optim.AdamW:
    params = list(model.parameters())
    settings = dict(lr=opts.lr, betas=opts.betas, eps=1e-8, weight_decay=opts.weight_decay / opts.lr)
    try:  # one fused kernel over all tensors: 2-3x faster than the per-tensor loop torch defaults to on CPU
        return torch.optim.AdamW(params, fused=True, **settings)
    except RuntimeError:  # torch < 2.4 has no fused AdamW on the CPU
        return torch.optim.AdamW(params, **settings)
