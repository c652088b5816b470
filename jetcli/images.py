"""Image files in and out: 8-bit RGB arrays (H, W, 3), with clear errors for anything else."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from jetcli.fileio import atomic_write

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}


class ImageError(ValueError):
    """An image file that cannot be used."""


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: not a readable image ({e})") from None


def grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (N, H, W, 3) into a near-square grid with `pad` white pixels between them."""
    n, h, w, c = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = im
    return out


def save_png(array: np.ndarray, path: str | Path) -> None:
    atomic_write(Path(path), lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))
