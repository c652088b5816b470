"""Training data: uint8 RGB images in memory, served as seeded, resumable batches.

Sources: a folder of image files (recursive), a .npy/.npz array of uint8 (N, H, W, 3) (pick an .npz
key with `file.npz:key`). With `crop=S`, every item is a random S×S crop of one image (photos of any
size); without it, all images must share one size. Validation is split off by whole image, never by crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jetcli.images import read_rgb, IMAGE_SUFFIXES

NPZ_KEYS = ("train_images", "images", "x", "data")


class DataError(ValueError):
    """Training data that cannot be used."""


def _as_images(array: np.ndarray, source: str) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise DataError(f"{source}: expected uint8 images (N, H, W, 3), got {array.dtype} {array.shape}")
    return array


def load_array(spec: str) -> np.ndarray:
    """A .npy or .npz (optionally `path.npz:key`) of uint8 (N, H, W, 3) images."""
    path, _, key = spec.partition(":") if spec.count(":") == 1 and not Path(spec).exists() else (spec, "", "")
    path = Path(path)
    try:
        if path.suffix == ".npy":
            return _as_images(np.load(path, allow_pickle=False), spec)
        with np.load(path, allow_pickle=False) as npz:
            if not key:
                found = [k for k in NPZ_KEYS if k in npz.files] or (npz.files if len(npz.files) == 1 else [])
                if not found:
                    raise DataError(f"{path}: say which array to use as {path}:KEY (one of {', '.join(npz.files)})")
                key = found[0]
            if key not in npz.files:
                raise DataError(f"{path}: no array {key!r} (has {', '.join(npz.files)})")
            return _as_images(npz[key], f"{path}:{key}")
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable numpy array file ({e})") from None


def load_images(spec: str) -> list[np.ndarray] | np.ndarray:
    """All images of a folder (a list, sizes may differ) or an array file (one array)."""
    path = Path(spec.split(":")[0]) if not Path(spec).exists() else Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
        return [read_rgb(f) for f in files]
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    return load_array(spec)


@dataclass
class ImageSet:
    """Images as one uint8 tensor (N, H, W, 3), or a list of photos cut into random `crop`-sized crops."""

    images: list[np.ndarray] | np.ndarray
    crop: int | None = None
    flip: bool = True

    def __post_init__(self):
        sizes = {im.shape[:2] for im in self.images}
        if self.crop is None:
            if len(sizes) != 1:
                raise DataError(f"images have {len(sizes)} different sizes: use --crop S to train on crops")
            self.images = torch.from_numpy(np.stack(list(self.images)) if isinstance(self.images, list)
                                           else np.ascontiguousarray(self.images))
        else:
            small = [s for s in sizes if min(s) < self.crop]
            if small:
                raise DataError(f"--crop {self.crop} is larger than an image of size {small[0][0]}x{small[0][1]}")
            self.images = [torch.from_numpy(np.ascontiguousarray(im)) for im in self.images]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.crop, self.crop) if self.crop else tuple(self.images.shape[1:3])

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 (B, H, W, 3): the indexed images, cropped and flipped with `generator`."""
        if self.crop is None:
            out = self.images[indices]
        else:
            crops = []
            for i in indices.tolist():
                im = self.images[i]
                top = int(torch.randint(im.shape[0] - self.crop + 1, (), generator=generator))
                left = int(torch.randint(im.shape[1] - self.crop + 1, (), generator=generator))
                crops.append(im[top:top + self.crop, left:left + self.crop])
            out = torch.stack(crops)
        if self.flip:
            flip = torch.rand(len(out), generator=generator) < 0.5
            out = torch.where(flip[:, None, None, None], out.flip(2), out)
        return out

    def split(self, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
        """Hold out a fraction of whole images (never crops of a training image)."""
        n_val = max(1, round(len(self) * fraction))
        if n_val >= len(self):
            raise DataError(f"cannot hold out {fraction:.0%} of {len(self)} images and still train")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        pick = lambda idx: ([self.images[i].numpy() for i in idx] if self.crop
                            else self.images[sorted(idx)].numpy())
        return (ImageSet(pick(order[n_val:]), self.crop, self.flip),
                ImageSet(pick(order[:n_val]), self.crop, flip=False))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The image order of one epoch: a pure function of (seed, epoch), so resuming needs only the step."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
