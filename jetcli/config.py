"""The Jet configuration: a small typed record that round-trips through JSON, plus named presets."""

from __future__ import annotations

import dataclasses
import json
import math
import operator
from dataclasses import dataclass

from jetcli.errors import SettingError

SPATIAL_PROJS = ("checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv", "hstripes", "hstripes-inv")
# The same halves, each kept token paired with its neighbour on the other side (jetcli's, not the paper's):
# the paper's pairing couples tokens 2j and 2j+1 only, and the borders between pairs show as a patch grid.
SHIFTED_PROJS = tuple(f"{p}-shift" for p in SPATIAL_PROJS)
SPATIAL_PATTERNS = SPATIAL_PROJS + SHIFTED_PROJS  # every name spatial_projs may hold
CHANNEL_PROJS = ("random",)
KINDS = ("channels", "spatial")
POSITIVE_INTS = ("channels", "patch_size", "couplings", "block_depth", "width", "heads", "mlp_ratio")


@dataclass(frozen=True)
class JetConfig:
    """Everything that fixes the shape and the function of a Jet model.

    `kinds`, `channel_projs` and `spatial_projs` each repeat cyclically over the couplings, exactly as
    in big_vision: coupling i has kind `kinds[i % len(kinds)]`, and the k-th spatial coupling uses
    `spatial_projs[k % len(spatial_projs)]`.
    """

    image_size: tuple[int, int] = (64, 64)  # (height, width) in pixels
    channels: int = 3
    patch_size: int = 4
    couplings: int = 32
    block_depth: int = 2  # ViT blocks per coupling
    width: int = 512  # ViT embedding width
    heads: int = 8
    mlp_ratio: int = 4
    scale_factor: float = 2.0  # scale = sigmoid(raw) * scale_factor, so identity at raw = 0
    kinds: tuple[str, ...] = ("channels", "channels", "channels", "channels", "spatial")
    channel_projs: tuple[str, ...] = CHANNEL_PROJS
    spatial_projs: tuple[str, ...] = SPATIAL_PROJS
    seed: int = 0  # seeds the channel permutations (they are stored in checkpoints too)
    # Numerical switches: big_vision uses flax defaults (eps 1e-6, tanh GELU); jet-pytorch 0.0.2 uses
    # torch defaults (eps 1e-5, exact GELU).
    ln_eps: float = 1e-6
    gelu: str = "tanh"  # "tanh" or "exact"

    def __post_init__(self):
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        for name in ("kinds", "channel_projs", "spatial_projs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        # Configs also come from files (checkpoint metadata): check types and ranges before any arithmetic.
        for name in (*POSITIVE_INTS, "seed"):
            object.__setattr__(self, name, operator.index(getattr(self, name)))  # TypeError for "5" or 5.0
        if min(*self.image_size, *(getattr(self, name) for name in POSITIVE_INTS)) < 1:
            raise ValueError(f"image_size, {', '.join(POSITIVE_INTS)} must be positive")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                   for v in (self.scale_factor, self.ln_eps)):
            raise ValueError(f"scale_factor and ln_eps must be positive numbers, got {self.scale_factor!r}, "
                             f"{self.ln_eps!r}")
        h, w = self.image_size
        p = self.patch_size
        problems = []
        if h % p or w % p:
            problems.append(f"image size {h}x{w} is not a multiple of the patch size {p}")
        elif (h // p) * (w // p) % 2:
            problems.append("spatial couplings need an even number of patches")
        if (p * p * self.channels) % 2:
            problems.append("channel couplings need an even number of dims per patch")
        if self.width % self.heads:
            problems.append(f"width {self.width} is not divisible by {self.heads} heads")
        if not self.kinds or set(self.kinds) - set(KINDS):
            problems.append(f"kinds must be drawn from {KINDS}, got {self.kinds}")
        if set(self.spatial_projs) - set(SPATIAL_PATTERNS) or not self.spatial_projs:
            problems.append(f"spatial_projs must be drawn from {SPATIAL_PATTERNS}, got {self.spatial_projs}")
        elif set(self.spatial_projs) & set(SHIFTED_PROJS) and "spatial" in self.kinds and (h // p % 2 or w // p % 2):
            problems.append("shifted spatial patterns need an even number of patches down and across")
        if set(self.channel_projs) - set(CHANNEL_PROJS) or not self.channel_projs:
            problems.append(f"channel_projs must be drawn from {CHANNEL_PROJS}, got {self.channel_projs}")
        if self.gelu not in ("tanh", "exact"):
            problems.append(f"gelu must be 'tanh' or 'exact', got {self.gelu!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def num_patches(self) -> int:
        h, w = self.image_size
        return (h // self.patch_size) * (w // self.patch_size)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    @property
    def dims(self) -> int:
        """D, the number of dimensions of one image."""
        h, w = self.image_size
        return h * w * self.channels

    def plan(self) -> list[tuple[str, str]]:
        """(kind, projection) of every coupling, cycling the patterns as big_vision does."""
        plan, n_channel, n_spatial = [], 0, 0
        for i in range(self.couplings):
            kind = self.kinds[i % len(self.kinds)]
            if kind == "channels":
                plan.append((kind, self.channel_projs[n_channel % len(self.channel_projs)]))
                n_channel += 1
            else:
                plan.append((kind, self.spatial_projs[n_spatial % len(self.spatial_projs)]))
                n_spatial += 1
        return plan

    def parameter_count(self) -> int:
        """The number of trained parameters of a Jet with this config (every coupling has the same)."""
        w, hidden, half = self.width, self.mlp_ratio * self.width, self.patch_dim // 2
        block = 4 * w + (3 * w * w + 3 * w) + (w * w + w) + (w * hidden + hidden) + (hidden * w + w)
        vit = (half * w + w) + self.num_patches * w + self.block_depth * block + 2 * w + (w * 2 * half + 2 * half)
        return self.couplings * vit

    def replace(self, **changes) -> JetConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> JetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> JetConfig:
        return cls.from_dict(json.loads(text))


PAPER_PATCHES = 256  # §3: the patch size is chosen so that an image has 256 patches

PRESETS: dict[str, JetConfig] = {
    # The paper's models (arXiv 2412.15129). Appendix A.1, the best model of each sweep: 64 couplings,
    # ViT depth / width / heads per column, patch 2 at 32x32 and 4 at 64x64 (256 patches).
    "imagenet1k-32": JetConfig(image_size=(32, 32), patch_size=2, couplings=64, block_depth=6, width=256, heads=4),
    "imagenet1k-64": JetConfig(couplings=64, block_depth=5, width=512, heads=8),
    "imagenet21k-32": JetConfig(image_size=(32, 32), patch_size=2, couplings=64, block_depth=6, width=768,
                                heads=12),
    "imagenet21k-64": JetConfig(couplings=64, block_depth=6, width=1024, heads=16),
    # §3.2's ablation default: ImageNet-1k 64x64, 32 couplings, ViT depth 2, width 512; the model of
    # big_vision's configs/proj/jet/imagenet64.py (3.72 bpd there).
    "ablation-64": JetConfig(),
    # The jet-pytorch 0.0.2 defaults and its public btrude/jet_imagenet64x64_200m checkpoint.
    "jet-pytorch-imagenet64": JetConfig(ln_eps=1e-5, gelu="exact"),
    # CPU-sized: the benchmark config of benchmarks/ (32x32, patch 4, 16 couplings, depth 2, width 256).
    "cpu-32": JetConfig(image_size=(32, 32), couplings=16, block_depth=2, width=256, heads=4),
    # Small enough to train on a laptop CPU in an hour or two.
    "small-32": JetConfig(image_size=(32, 32), couplings=12, block_depth=1, width=192, heads=4),
    # Tiny: for tests and smoke runs.
    "tiny-16": JetConfig(image_size=(16, 16), couplings=5, block_depth=1, width=32, heads=2),
}
# Earlier names of the same models.
ALIASES = {"imagenet64-ablation": "ablation-64", "bigvision-imagenet64": "ablation-64",
           "bigvision-imagenet64-64x5": "imagenet1k-64"}
# Presets that follow the paper's 256-patch rule at any image size (the CPU presets keep their patch size).
KEEP_PATCHES = ("imagenet1k-32", "imagenet1k-64", "imagenet21k-32", "imagenet21k-64", "ablation-64",
                "jet-pytorch-imagenet64")


def preset(name: str) -> JetConfig:
    try:
        return PRESETS[ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def preset_for(name: str, image_size: tuple[int, int]) -> JetConfig:
    """Preset `name` for images of `image_size`. The paper's presets keep their 256 patches by choosing
    the patch size (a 64x64 preset on 32x32 images gets patch 2); the others keep their patch size."""
    config = preset(name)
    if ALIASES.get(name, name) not in KEEP_PATCHES:
        return config.replace(image_size=image_size)
    (h, w), n = image_size, config.num_patches
    patch = math.isqrt(h * w // n)
    if patch < 1 or patch * patch * n != h * w or h % patch or w % patch:
        raise SettingError("{preset_name} {name} keeps the paper's {n} patches per image, and {h}x{w} images "
                           "cannot be cut into {n} square patches: give {patch_size}", name=name, n=n, h=h, w=w)
    return config.replace(image_size=image_size, patch_size=patch)


def describe_preset(name: str) -> str:
    """The preset's name, image size and parameter count, for --help."""
    c = preset(name)
    count = c.parameter_count()
    size = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"
    return f"{name} ({c.image_size[0]}x{c.image_size[1]}, {size} parameters)"
