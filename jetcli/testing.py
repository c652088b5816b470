"""Helpers for tests and benchmarks: random Jets whose couplings all matter, and the same model as
jet-pytorch 0.0.2 builds it (for parity checks; needs the `jet-pytorch` package)."""

from __future__ import annotations

import math

import torch

from jetcli.checkpoints import to_jet_pytorch
from jetcli.config import JetConfig, preset
from jetcli.model import Jet, unpatchify


def random_jet(config: JetConfig | None = None, seed: int = 0, strength: float = 0.3,
               device: torch.device | str = "cpu") -> Jet:
    """A Jet (in eval mode) whose couplings are not the identity: every zero-initialised final projection
    gets normal noise, so that bias and raw scale have a standard deviation of about `strength`."""
    config = config or preset("tiny-16")
    torch.manual_seed(seed)
    model = Jet(config).eval()
    with torch.no_grad():
        for coupling in model.couplings:
            proj = coupling.vit.final_proj
            proj.weight.normal_(std=strength / math.sqrt(config.width))
            proj.bias.normal_(std=strength)
    return model.to(device)


def port_of(model: Jet) -> torch.nn.Module:
    """jet-pytorch 0.0.2's Jet with `model`'s architecture and weights, on its device and in its mode."""
    from jet_pytorch.jet import Jet as PortJet

    cfg = model.config
    port = PortJet(patch_size=cfg.patch_size, patch_dim=cfg.patch_dim, n_patches=cfg.num_patches,
                   img_dims=cfg.image_size, coupling_layers=cfg.couplings, block_depth=cfg.block_depth,
                   block_width=cfg.width, num_heads=cfg.heads, scale_factor=cfg.scale_factor,
                   coupling_types=cfg.kinds, spatial_coupling_projs=cfg.spatial_projs)
    port.load_state_dict(to_jet_pytorch(model), strict=True)
    return port.to(next(model.parameters()).device).train(model.training)


def port_forward(port, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The port's forward in jetcli's conventions: images (B, H, W, C) and logdets (B,)."""
    z, logdet = port(x)  # the port returns patchified latents and (B, 1) logdets
    return unpatchify(z, port.patch_size, (port.img_height, port.img_width)), logdet[:, 0]
