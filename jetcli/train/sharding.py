"""Sharded training (`jet train --shard` under torchrun): PyTorch's FSDP2 (`fully_shard`), one unit per
coupling, for models whose weights, gradients and Adam moments do not fit one device.

Each process holds 1/N of every parameter, gradient and Adam moment (as DTensors sharded on dim 0); a
coupling's weights are gathered just before it runs, forward and backward, and its gradients
reduce-scattered (averaged over the processes, as DDP averages them) right after. The data, the loss
and the update are those of DDP, so the two agree to float tolerance (the reductions add in another
order). Checkpoints stay one `model.safetensors` and one `state.safetensors` of whole tensors: every
process gathers each tensor in turn and rank 0 writes them; resuming gives each process its shard.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from jetcli import checkpoints
from jetcli.model import Jet


def shard(model: Jet) -> Jet:
    """Shard the model over the process group in place: each coupling a unit, the root the rest."""
    for coupling in model.couplings:
        fully_shard(coupling)
    fully_shard(model)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


class Sharded:
    """What the training loop uses of its data-parallel wrapper (a call, and `no_sync` for accumulation),
    for a sharded model: gradients are reduce-scattered only after the last micro-batch."""

    def __init__(self, model: Jet):
        self.module = model

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module(x)

    @contextlib.contextmanager
    def no_sync(self):
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a collective: every process calls it); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A whole tensor cut like `reference`: this process's shard if it is a DTensor."""
    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.device), reference.device_mesh, reference.placements)
    return full.to(reference.device)


def gathered(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Whole CPU copies of `tensors`, gathered one at a time (every process calls it, in the same order);
    kept only where `keep` (rank 0), so the others never hold more than one whole tensor."""
    out = {}
    for name, tensor in tensors.items():
        full = whole(tensor.detach())
        if keep:
            out[name] = full.cpu()
    return out


def load_weights(model: Jet, state: dict[str, torch.Tensor], source: str) -> None:
    """checkpoints.load_weights for a model that may be sharded: every check on the whole tensors (against
    a model on the meta device, which holds no memory), then each process loads its shards."""
    if not is_sharded(model):
        checkpoints.load_weights(model, state, source)
        return
    with torch.device("meta"):
        shadow = Jet(model.config)
    with warnings.catch_warnings():  # loading into meta parameters is the point: no copy, no memory
        warnings.filterwarnings("ignore", message=".*meta parameter", category=UserWarning)
        checkpoints.load_weights(shadow, state, source)
    own = model.state_dict()
    model.load_state_dict({name: like(tensor, own[name]) for name, tensor in state.items()})
    model.eval()
