"""`jet prepare`: a folder of images (an ImageNet-style tree) to one uint8 (N, S, S, 3) .npy that training
memory-maps (jetcli.data), downsampled as the paper's data are.

Protocol: each image is decoded under jet's image policy (jetcli.images.read_rgb) and resized to S×S
by area averaging: every output pixel is the mean of the source area it covers, pixels cut by its
edges weighted by the part inside, computed in float64 and rounded once (what TensorFlow's
`resize(method="area")` computes; the downsampled ImageNet of Chrabaszcz et al. and van den Oord et
al. is box-resized too). A non-square image is squashed to
S×S whole, its aspect ratio not kept, as big_vision's `resize` does; `center_crop` takes its central
square instead. Images are stored in the sorted order of their paths.

Work is spread over processes. It goes into hidden files beside the output: the pixels
(`.NAME.partial`, an .npy filled in place) and a status per image (`.NAME.status`, 0 to do, 1 done,
2 unreadable) saved every few seconds after the pixels are flushed, so a run that is stopped or killed
continues where it was when started again with the same sources and settings (other sources or settings
start over). Unreadable images are skipped and counted; the output, written last, holds the others.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Callable

import numpy as np

from jetcli.data import DataError
from jetcli.fileio import atomic_write
from jetcli.images import IMAGE_SUFFIXES, ImageError, ImageWarning, read_rgb

TODO, DONE, UNREADABLE = 0, 1, 2
SAVE_EVERY = 5.0  # seconds between saves of the status
COPY_ROWS = 4096  # images per copy when unreadable ones are left out
WINDOW = 1 << 14  # images handed to the workers at a time


@dataclass
class Prepared:
    images: int  # in the output
    unreadable: list[str]  # sources skipped (relative paths)
    resumed: int  # images found done from an earlier run


def image_files(source: Path) -> list[str]:
    """The image files under `source`, searched recursively, as sorted paths relative to it (strings:
    ImageNet-21k has 13 million)."""
    if not source.is_dir():
        raise DataError(f"{source}: not a folder")
    names = sorted(os.path.relpath(os.path.join(folder, name), source)
                   for folder, _, files in os.walk(source) for name in files
                   if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES)
    if not names:
        raise DataError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return names


def area_weights(source: int, target: int) -> np.ndarray:
    """(target, source): the share of each source pixel in the area of each target pixel (rows sum to 1)."""
    scale = source / target
    edges = np.arange(target + 1) * scale
    pixel = np.arange(source)[None]
    overlap = np.minimum(edges[1:, None], pixel + 1) - np.maximum(edges[:-1, None], pixel)
    return np.clip(overlap, 0, None) / scale


def downsample(image: np.ndarray, size: int, center_crop: bool = False) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3) by area averaging, in float64 and rounded once; the image
    squashed whole, or its central square."""
    h, w = image.shape[:2]
    if center_crop:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image, h, w = image[top:top + side, left:left + side], side, side
    rows = (area_weights(h, size) @ image.reshape(h, -1).astype(np.float64)).reshape(size, w, 3)
    return np.rint(area_weights(w, size) @ rows).clip(0, 255).astype(np.uint8)


def _work(job: tuple[int, str, int, bool]) -> tuple[int, np.ndarray | None]:
    """In a worker: (index, pixels), or (index, None) for a file that cannot be read."""
    index, path, size, center_crop = job
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImageWarning)  # damaged metadata, EXIF orientation: pixels as stored
            return index, downsample(read_rgb(path), size, center_crop)
    except (ImageError, OSError, ValueError):
        return index, None


def prepare(source: Path, out: Path, size: int, center_crop: bool = False, workers: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> Prepared:
    """Write the images under `source` to `out` as uint8 (N, size, size, 3); see the module's docstring.
    `progress(done, total)` is called as images finish."""
    if size < 1:
        raise DataError(f"the size must be positive, got {size}")
    names = image_files(source)
    partial, status_path = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.status")
    digest = hashlib.sha256(f"{size} {center_crop}".encode())
    for name in names:
        digest.update(name.encode() + b"\0")
    fingerprint = digest.hexdigest()
    status = _earlier_status(partial, status_path, fingerprint, len(names))
    if status is None:
        status = np.zeros(len(names), np.uint8)
        pixels = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(names), size, size, 3))
    else:
        pixels = np.lib.format.open_memmap(partial, mode="r+")
    resumed = int((status != TODO).sum())
    todo = np.flatnonzero(status == TODO)
    done, saved = resumed, time.monotonic()
    if progress is not None:
        progress(done, len(names))
    try:
        with Pool(workers or os.cpu_count()) as pool:
            for start in range(0, len(todo), WINDOW):  # a window at a time: the task queue stays small
                jobs = [(int(i), str(source / names[i]), size, center_crop) for i in todo[start:start + WINDOW]]
                for index, image in pool.imap_unordered(_work, jobs, chunksize=16):
                    if image is not None:
                        pixels[index] = image
                    status[index] = DONE if image is not None else UNREADABLE
                    done += 1
                    if progress is not None:
                        progress(done, len(names))
                    if time.monotonic() - saved > SAVE_EVERY:
                        _save_status(pixels, status, status_path, fingerprint)
                        saved = time.monotonic()
    finally:  # stopped (Ctrl-C, an error): what was done is kept for the next run
        _save_status(pixels, status, status_path, fingerprint)
    keep = np.flatnonzero(status == DONE)
    _write_output(pixels, keep, partial, out)
    del pixels
    partial.unlink(missing_ok=True)
    status_path.unlink(missing_ok=True)
    return Prepared(len(keep), [names[i] for i in np.flatnonzero(status == UNREADABLE)], resumed)


def _earlier_status(partial: Path, status_path: Path, fingerprint: str, count: int) -> np.ndarray | None:
    """The status of an earlier run on the same sources and settings, or None to start over."""
    try:
        with np.load(status_path, allow_pickle=False) as saved:
            status, their_fingerprint = saved["status"], saved["fingerprint"].tobytes().decode()
        header = np.load(partial, mmap_mode="r")
    except (OSError, ValueError, KeyError, UnicodeDecodeError):
        return None
    if their_fingerprint != fingerprint or status.shape != (count,) or len(header) != count:
        return None
    return status


def _save_status(pixels: np.memmap, status: np.ndarray, path: Path, fingerprint: str) -> None:
    pixels.flush()  # the pixels reach the file before the status says they are there

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, status=status, fingerprint=np.frombuffer(fingerprint.encode(), np.uint8))

    atomic_write(path, write)


def _write_output(pixels: np.memmap, keep: np.ndarray, partial: Path, out: Path) -> None:
    """The finished array at `out`, atomically: the partial file itself when every image was read, else a
    copy of the readable ones."""
    if len(keep) == len(pixels):
        pixels.flush()
        os.replace(partial, out)
        return

    def copy(tmp: str) -> None:
        target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(keep), *pixels.shape[1:]))
        for start in range(0, len(keep), COPY_ROWS):
            target[start:start + COPY_ROWS] = pixels[keep[start:start + COPY_ROWS]]
        target.flush()

    atomic_write(out, copy)
