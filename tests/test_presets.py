"""The paper's presets (Appendix A.1, §3.2), the 256-patch rule, and the attention's flax initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from jetcli.config import ALIASES, KEEP_PATCHES, PRESETS, preset, preset_for
from jetcli.errors import SettingError
from jetcli.model import Attention, Jet

# Appendix A.1 (../shared/paper/jet-appendix.md): (image side, couplings, depth, width, heads, patch).
PAPER = {"imagenet1k-32": (32, 64, 6, 256, 4, 2), "imagenet1k-64": (64, 64, 5, 512, 8, 4),
         "imagenet21k-32": (32, 64, 6, 768, 12, 2), "imagenet21k-64": (64, 64, 6, 1024, 16, 4),
         "ablation-64": (64, 32, 2, 512, 8, 4)}


@pytest.mark.parametrize("name", PAPER)
def test_paper_presets_have_the_appendix_shapes_and_256_patches(name):
    c = preset(name)
    assert (c.image_size[0], c.couplings, c.block_depth, c.width, c.heads, c.patch_size) == PAPER[name]
    assert c.num_patches == 256 and c.image_size[0] == c.image_size[1]
    # Every coupling has the same shapes: one real coupling checks the count without building billions.
    assert Jet(c.replace(couplings=1)).num_params() * c.couplings == c.parameter_count()


def test_the_largest_model_is_the_papers_4_9_billion():
    assert 4.8e9 < preset("imagenet21k-64").parameter_count() < 5.0e9


def test_aliases_name_the_same_models_once():
    assert all(preset(old) == PRESETS[new] for old, new in ALIASES.items())
    assert len(set(PRESETS.values())) == len(PRESETS)  # one name per model (jet-pytorch's differs in numerics)
    assert preset("bigvision-imagenet64") == preset("imagenet64-ablation") == preset("ablation-64")


@pytest.mark.parametrize("name,size,patch", [("imagenet1k-64", (32, 32), 2), ("imagenet1k-32", (64, 64), 4),
                                             ("ablation-64", (32, 128), 4), ("imagenet21k-32", (32, 32), 2)])
def test_paper_presets_keep_256_patches_at_other_sizes(name, size, patch):
    c = preset_for(name, size)
    assert (c.image_size, c.patch_size, c.num_patches) == (size, patch, 256)


def test_a_size_without_256_square_patches_is_refused_and_cpu_presets_keep_their_patch():
    with pytest.raises(SettingError, match="cannot be cut into 256 square patches"):
        preset_for("imagenet1k-64", (40, 40))
    assert preset_for("small-32", (64, 64)).patch_size == preset("small-32").patch_size
    assert "small-32" not in KEEP_PATCHES


def test_qkv_start_as_flax_initialises_each_of_q_k_v():
    """flax's DenseGeneral flattens each of q, k, v to a (width, width) kernel and applies xavier_uniform:
    std sqrt(1 / width), bound sqrt(3 / width). Xavier on the fused (3 width, width) matrix gives
    std sqrt(1 / (2 width)), which this test refuses."""
    width = 512
    torch.manual_seed(0)
    weight = Attention(width, 8).qkv.weight.detach()
    for kernel in weight.chunk(3):
        assert kernel.abs().max() <= math.sqrt(3 / width)
        assert kernel.std().item() == pytest.approx(math.sqrt(1 / width), rel=0.01)
        assert abs(kernel.mean().item()) < 1e-3
    assert weight.std().item() == pytest.approx(0.0442, abs=5e-4)
