"""Bits per dim of image files under a model, tile by tile, beside their size as optimised PNG.

Images larger than the model's input are cut into its tiles (`jetcli.images.tiles`: row-major, the
right and bottom strips that fill no whole tile dropped); every number counts only the tiled pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from jetcli.devices import device_of
from jetcli.images import ImageError, covered, png_bytes, probe, read_rgb, tiles
from jetcli.likelihood import image_bits
from jetcli.precision import compute_context


@dataclass
class ImageScore:
    path: str
    bpd: float  # the mean over the image's tiles
    png_bpd: float
    tiles: int


@dataclass
class Scores:
    images: list[ImageScore]
    mean_bpd: float  # over all tiles of all images: the dims-weighted mean, as all tiles have the same dims
    sem: float | None  # its standard error, tiles counted as independent draws; None for a single tile
    tiles: int
    png_bpd: float  # all tiled pixels as PNG, in bits per dim


def tile_count(path: Path, image_size: tuple[int, int], tile: tuple[int, int]) -> int:
    rows, cols = image_size[0] // tile[0], image_size[1] // tile[1]
    if not rows or not cols:
        raise ImageError(f"{path}: {image_size[0]}x{image_size[1]} (height x width) is smaller than the "
                         f"model's {tile[0]}x{tile[1]} input")
    return rows * cols


def tile_counts(files: list[Path], tile: tuple[int, int]) -> list[int]:
    """Each file's number of tiles, from its header alone: refuses a file before any work is done."""
    return [tile_count(path, probe(path), tile) for path in files]


def score_images(model, files: list[Path], counts: list[int], samples: int = 1, seed: int = 0,
                 batch_size: int = 64, precision: str = "fp32",
                 on_tiles: Callable[[int], None] | None = None) -> Scores:
    """Score each file (its tiles in batches of `batch_size`, `samples` noise draws each, the noise from
    one CPU generator seeded with `seed`); `on_tiles(n)` after each batch."""
    generator = torch.Generator().manual_seed(seed)
    images, tile_bpds, png_bits, png_dims = [], [], 0, 0
    for path, count in zip(files, counts):
        image = read_rgb(path)
        kept = covered(image, model.config.image_size)
        bits = []
        for batch in np.array_split(tiles(image, model.config.image_size), math.ceil(count / batch_size)):
            bits.append(tile_bits(model, batch, samples, generator, precision))
            if on_tiles is not None:
                on_tiles(len(batch))
        bits = np.concatenate(bits)
        png = 8 * len(png_bytes(kept, optimize=True))
        images.append(ImageScore(str(path), float(bits.mean()), png / kept.size, count))
        tile_bpds.append(bits)
        png_bits, png_dims = png_bits + png, png_dims + kept.size
    everything = np.concatenate(tile_bpds)
    sem = float(everything.std(ddof=1) / math.sqrt(len(everything))) if len(everything) > 1 else None
    return Scores(images, float(everything.mean()), sem, len(everything), png_bits / png_dims)


@torch.inference_mode()
def tile_bits(model, batch: np.ndarray, samples: int, generator: torch.Generator, precision: str) -> np.ndarray:
    """Per-tile bpd of uint8 tiles (n, h, w, 3)."""
    device = device_of(model)
    with compute_context(device, precision):
        bits = image_bits(model, torch.from_numpy(np.ascontiguousarray(batch)).to(device), samples, generator)
    return bits.bpd.double().cpu().numpy()
