"""Jet: a normalizing flow of affine couplings whose networks are ViTs (arXiv 2412.15129, §2).

Public layout: images are (B, H, W, C) float tensors in [-1, 1] (channels last, as in big_vision).
`Jet.forward(x) -> (z, logdet)` maps images to latents of the same shape; `Jet.inverse(z) -> (x, logdet)`
maps back, with logdet = log|det dx/dz| = -log|det dz/dx|.

Each coupling splits the tokens into a kept half x1 and a transformed half x2, computes
(bias, raw_scale) = ViT(x1) and sets x2 <- (x2 + bias) * sigmoid(raw_scale) * scale_factor.
Splits and merges are index gathers, so they are exact whatever the matmul precision (the paper warns
that tf32/bf16 projections destroy the dequantisation noise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from jetcli.config import JetConfig
from jetcli.kernels import Float32Linear, TunedLinear, attention


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """b (h p) (w p) c -> b (h w) (p p c)."""
    b, hh, ww, c = x.shape
    x = x.reshape(b, hh // p, p, ww // p, p, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (hh // p) * (ww // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, image_size: tuple[int, int]) -> torch.Tensor:
    """b (h w) (p p c) -> b (h p) (w p) c."""
    b, _, d = x.shape
    h, w = image_size[0] // p, image_size[1] // p
    x = x.reshape(b, h, w, p, p, d // (p * p)).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, d // (p * p))


# --------------------------------------------------------------------------- splits
def channel_permutation(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A fixed random permutation of the patch dims: x1, x2 = halves of x[..., perm]."""
    return torch.randperm(dim, generator=generator, device="cpu")  # index data: on the CPU, like the generator


def spatial_order(kind: str, nh: int, nw: int) -> torch.Tensor:
    """Token order whose first half is kept (x1) and second half transformed (x2). Pairing puts the k-th
    of each half in one ViT token: in raster order the neighbours 2j and 2j+1 of a row (or column);
    "-shift" pairs the kept token with its other neighbour instead, so 2j-1 and 2j."""
    n = nh * nw
    idx = torch.arange(n, device="cpu")
    row = idx // nw
    if kind.startswith("checkerboard"):  # big_vision's formula (a true checkerboard when nw is even)
        first = (idx + row) % 2 == 0
    elif kind.startswith("vstripes"):  # alternate columns (big_vision: every other token index)
        first = idx % 2 == 0
    elif kind.startswith("hstripes"):  # alternate rows
        first = row % 2 == 0
    else:
        raise ValueError(f"unknown spatial coupling {kind!r}")
    if kind.removesuffix("-shift").endswith("-inv"):
        first = ~first
    kept, changed = idx[first], idx[~first]
    if kind.endswith("-shift"):  # pair each kept token with its neighbour on the other side, mod the grid
        rows, cols = 2 * (kept // nw) - changed // nw, 2 * (kept % nw) - changed % nw
        changed = (rows % nh) * nw + cols % nw
    return torch.cat([kept, changed])


class Split(nn.Module):
    """Exact split/merge along one token axis given an index order (a permutation)."""

    def __init__(self, order: torch.Tensor, spatial: bool):
        super().__init__()
        self.spatial = spatial
        self.register_buffer("order", order.long())
        self.register_buffer("inverse_order", torch.argsort(order), persistent=False)

    def refresh(self):
        """Recompute the inverse after `order` was loaded from a checkpoint."""
        self.inverse_order = torch.argsort(self.order)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.spatial:
            return x[..., self.order].chunk(2, dim=-1)
        b, n, d = x.shape
        x1, x2 = x[:, self.order].chunk(2, dim=1)
        # "Pairing": fold each pair of half-tokens into the token axis so the ViT sees all n tokens
        # at d/2 dims, as big_vision's `... n (s c) -> ... (n s) c` does.
        return x1.reshape(b, n, d // 2), x2.reshape(b, n, d // 2)

    def merge(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        if not self.spatial:
            return torch.cat([x1, x2], dim=-1)[..., self.inverse_order]
        b, n, d = x1.shape
        x = torch.cat([x1.reshape(b, n // 2, 2 * d), x2.reshape(b, n // 2, 2 * d)], dim=1)
        return x[:, self.inverse_order]


# --------------------------------------------------------------------------- the ViT
class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = TunedLinear(width, 3 * width)  # rows: [query; key; value], torch MHA layout
        self.out = TunedLinear(width, width)
        for kernel in self.qkv.weight.chunk(3):  # as flax: q, k and v each its own (width, width) kernel
            nn.init.xavier_uniform_(kernel)
        nn.init.zeros_(self.qkv.bias)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, w))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, gelu: str):
        super().__init__()
        self.fc1 = TunedLinear(width, hidden)
        self.fc2 = TunedLinear(hidden, width)
        self.approximate = "tanh" if gelu == "tanh" else "none"
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, cfg: JetConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = MLP(cfg.width, cfg.mlp_ratio * cfg.width, cfg.gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Maps the kept half (B, n, d/2) to (bias, raw_scale), each (B, n, d/2)."""

    def __init__(self, cfg: JetConfig):
        super().__init__()
        half = cfg.patch_dim // 2
        self.init_proj = TunedLinear(half, cfg.width)
        nn.init.trunc_normal_(self.init_proj.weight, std=1 / math.sqrt(half))  # flax lecun_normal
        nn.init.zeros_(self.init_proj.bias)
        self.posemb = nn.Parameter(torch.randn(1, cfg.num_patches, cfg.width) / math.sqrt(cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.block_depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.final_proj = Float32Linear(cfg.width, 2 * half)  # float32 even in fast mode
        nn.init.zeros_(self.final_proj.weight)  # zero init: every coupling starts as the identity
        nn.init.zeros_(self.final_proj.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.init_proj(x) + self.posemb
        for block in self.blocks:
            x = block(x)
        bias, raw_scale = self.final_proj(self.norm(x)).chunk(2, dim=-1)  # Coupling casts to x's dtype
        return bias, raw_scale


# --------------------------------------------------------------------------- the flow
class Coupling(nn.Module):
    """y1 = x1;  y2 = (x2 + b(x1)) * sigmoid(s(x1)) * scale_factor."""

    def __init__(self, cfg: JetConfig, split: Split):
        super().__init__()
        self.split = split
        self.vit = ViT(cfg)
        self.log_scale_factor = math.log(cfg.scale_factor)
        self.scale_factor = cfg.scale_factor

    def forward(self, x: torch.Tensor, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = self.split.split(x)
        bias, raw_scale = self.vit(x1)
        # Affine update and logdet in float32 (or float64) even when the ViT runs in bf16.
        bias, raw_scale = bias.to(x.dtype), raw_scale.to(x.dtype)
        scale = torch.sigmoid(raw_scale) * self.scale_factor
        logdet = (F.logsigmoid(raw_scale) + self.log_scale_factor).sum(dim=(1, 2))
        if reverse:
            return self.split.merge(x1, x2 / scale - bias), -logdet
        return self.split.merge(x1, (x2 + bias) * scale), logdet


class Jet(nn.Module):
    def __init__(self, cfg: JetConfig):
        super().__init__()
        self.config = cfg
        nh, nw = cfg.image_size[0] // cfg.patch_size, cfg.image_size[1] // cfg.patch_size
        generator = torch.Generator().manual_seed(cfg.seed)
        couplings = []
        for kind, proj in cfg.plan():
            if kind == "channels":
                split = Split(channel_permutation(cfg.patch_dim, generator), spatial=False)
            else:
                split = Split(spatial_order(proj, nh, nw), spatial=True)
            couplings.append(Coupling(cfg, split))
        self.couplings = nn.ModuleList(couplings)
        self.register_load_state_dict_post_hook(Jet._refresh_splits)

    @staticmethod
    def _refresh_splits(module: Jet, incompatible_keys) -> None:
        for coupling in module.couplings:
            coupling.split.refresh()

    def _check(self, x: torch.Tensor):
        expected = (*self.config.image_size, self.config.channels)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, H, W, C) in [-1, 1] -> latents (B, H, W, C) and log|det dz/dx| (B,)."""
        self._check(x)
        p = self.config.patch_size
        h = patchify(x, p)
        logdet = x.new_zeros(x.shape[0])
        for coupling in self.couplings:
            h, ld = coupling(h)
            logdet = logdet + ld
        return unpatchify(h, p, self.config.image_size), logdet

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (B, H, W, C) -> images (B, H, W, C) and log|det dx/dz| (B,)."""
        self._check(z)
        p = self.config.patch_size
        h = patchify(z, p)
        logdet = z.new_zeros(z.shape[0])
        for coupling in reversed(self.couplings):
            h, ld = coupling(h, reverse=True)
            logdet = logdet + ld
        return unpatchify(h, p, self.config.image_size), logdet

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
