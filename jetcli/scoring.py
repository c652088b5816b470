"""Bits per dim of image files under a model, beside their size as optimised PNG.

Any size counts every pixel. An image is padded at the bottom and right to whole tiles of the model's
input (`images.pad_to_tiles`, edge padding) and every tile is scored; the image's bits are the bits to
code the padded image with the model, and its bpd is those bits divided by the image's own H·W·3. The
padding is a function of the image, so a decoder that knows H and W gets the image back from the padded
one: the bpd is an upper bound on the image's lossless code length (give or take the few bytes that
store H and W), however much padding it took, and comparable with PNG's bits over the same pixels.

Noise. The dequantisation noise of tile i of an image comes from a CPU generator seeded with (seed, the
sha256 of the image's shape and pixels, i), drawn once per noise sample: an image gets the same bpd alone
or beside others, in any order, folder or batch size (within float rounding for another batch size), on
any device for a given precision.

A set of images: `mean_bpd` is all their bits over all their dims (the dims-weighted mean), and `sem`
its standard error with the images as independent draws (the ratio estimator's; None for one image).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from jetcli.devices import device_of
from jetcli.images import ImageError, pad_to_tiles, png_bytes, probe, read_rgb, tiles
from jetcli.likelihood import bits_per_dim, dequantize
from jetcli.precision import compute_context


@dataclass(frozen=True)
class ImageScore:
    path: str
    height: int
    width: int
    tiles: int
    padded_pixels: int  # pixels of padding added to reach whole tiles
    bpd: float  # the padded image's bits over the image's own dims
    png_bpd: float  # the image (unpadded) as an optimised PNG, in bits over the same dims

    @property
    def dims(self) -> int:
        return self.height * self.width * 3


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str  # one line, naming the file
    tiles: int  # the work it would have been (0 when its header could not be read)


@dataclass(frozen=True)
class Planned:
    """A file whose header was read: it is scored next."""

    path: Path
    height: int
    width: int
    tiles: int


@dataclass(frozen=True)
class Summary:
    images: int
    tiles: int
    pixels: int  # the images' own pixels
    padded_pixels: int
    mean_bpd: float  # all bits over all dims
    sem: float | None  # standard error of mean_bpd, images as independent draws; None for fewer than two
    png_bpd: float  # the same over the images' PNG sizes


def tile_count(size: tuple[int, int], tile: tuple[int, int]) -> int:
    """Tiles of an image of `size` padded to whole tiles."""
    return math.ceil(size[0] / tile[0]) * math.ceil(size[1] / tile[1])


def plan(files: list[Path], tile: tuple[int, int], strict: bool = False) -> tuple[list[Planned], list[Skipped]]:
    """Each file's size and tiles from its header alone, before any work: a file that cannot be read is
    skipped, or with `strict` refused (ImageError)."""
    planned, skipped = [], []
    for path in files:
        try:
            size = probe(path)
        except ImageError as e:
            if strict:
                raise
            skipped.append(Skipped(str(path), str(e), 0))
            continue
        planned.append(Planned(path, *size, tile_count(size, tile)))
    return planned, skipped


def score_each(model, planned: list[Planned], samples: int = 1, seed: int = 0, batch_size: int = 64,
               precision: str = "fp32", strict: bool = False,
               on_tiles: Callable[[int], None] | None = None) -> Iterator[ImageScore | Skipped]:
    """Score the planned files one by one, yielding each result as it is done: an ImageScore, or a
    Skipped for a file whose pixels cannot be read after all (with `strict`: ImageError).
    `on_tiles(n)` is called after each batch of n tiles."""
    for item in planned:
        try:
            image = read_rgb(item.path)
        except ImageError as e:
            if strict:
                raise
            yield Skipped(str(item.path), str(e), item.tiles)
            continue
        yield score_image(model, image, str(item.path), samples, seed, batch_size, precision, on_tiles)


def score_image(model, image: np.ndarray, path: str = "<array>", samples: int = 1, seed: int = 0,
                batch_size: int = 64, precision: str = "fp32",
                on_tiles: Callable[[int], None] | None = None) -> ImageScore:
    """The score of one uint8 image (H, W, 3) of any size (see the module docstring)."""
    tile = model.config.image_size
    padded = tiles(pad_to_tiles(image, tile), tile)
    generators = tile_generators(image, seed, len(padded))
    bits = 0.0
    for start in range(0, len(padded), batch_size):
        batch = padded[start:start + batch_size]
        bits += float(tile_bits(model, batch, generators[start:start + batch_size], samples, precision).sum())
        if on_tiles is not None:
            on_tiles(len(batch))
    dims = image.size
    png = 8 * len(png_bytes(image, optimize=True))
    padding = len(padded) * tile[0] * tile[1] - image.shape[0] * image.shape[1]
    return ImageScore(path, image.shape[0], image.shape[1], len(padded), padding, bits / dims, png / dims)


def tile_generators(image: np.ndarray, seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per tile, seeded by (seed, the image's content, the tile's index)."""
    content = hashlib.sha256(repr(image.shape).encode() + np.ascontiguousarray(image).tobytes()).digest()
    keys = (hashlib.sha256(content + f"{seed}:{i}".encode()).digest() for i in range(count))
    return [torch.Generator().manual_seed(int.from_bytes(key[:8], "little")) for key in keys]


@torch.inference_mode()
def tile_bits(model, batch: np.ndarray, generators: list[torch.Generator], samples: int,
              precision: str) -> np.ndarray:
    """Bits (not per dim) of each uint8 tile (n, h, w, 3), averaged over `samples` noise draws; tile k
    draws its noise from generators[k]."""
    device = device_of(model)
    pixels = torch.from_numpy(np.ascontiguousarray(batch))
    total = torch.zeros(len(batch), dtype=torch.float64)
    with compute_context(device, precision):
        for _ in range(samples):
            x = torch.stack([dequantize(p, g) for p, g in zip(pixels, generators)]).to(device)
            z, logdet = model(x)
            total += bits_per_dim(z, logdet).bpd.double().cpu()
    return (total / samples * (batch[0].size)).numpy()


def summarize(scores: list[ImageScore]) -> Summary:
    """The totals and means of a set of scores (at least one)."""
    bits = np.array([s.bpd * s.dims for s in scores])
    dims = np.array([s.dims for s in scores], dtype=np.float64)
    mean = bits.sum() / dims.sum()
    n = len(scores)
    # The ratio estimator's standard error; with equal dims it is the usual std / sqrt(n).
    sem = float(math.sqrt(n / (n - 1) * np.sum((bits - mean * dims) ** 2)) / dims.sum()) if n > 1 else None
    png = sum(s.png_bpd * s.dims for s in scores)
    return Summary(n, sum(s.tiles for s in scores), sum(s.height * s.width for s in scores),
                   sum(s.padded_pixels for s in scores), float(mean), sem, float(png / dims.sum()))
