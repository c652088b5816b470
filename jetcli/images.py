"""Image files in and out: 8-bit RGB arrays (H, W, 3), with clear errors for anything else.

Which files are read, and how (the same policy for every command):

- RGB: as stored. Greyscale (L) and bilevel (1) images are copied to all three channels; palette (P)
  images take their palette colours. These conversions are exact: nothing is rounded.
- Alpha (RGBA, LA, PA, or a tRNS colour key): read only when every pixel is fully opaque, and the alpha
  channel is then dropped. Transparent pixels are refused: the model has no alpha channel, the colour
  stored under a transparent pixel is arbitrary, and `jet decode` could not give the image back.
- Refused: 16-bit and float images (Pillow would cut them to 8 bits; how to round is the user's choice),
  CMYK, YCbCr, LAB and HSV (Pillow's conversions ignore colour profiles, so the pixels would not be the
  picture the user sees), and animations or multi-page files (which frame?).
- Pixels are read as stored: EXIF orientation and ICC profiles are not applied (a file whose EXIF
  orientation asks viewers to rotate or flip it gets a warning).
- Decompression bombs: images with more than `MAX_PIXELS` pixels (Pillow's limit, about 89
  megapixels) are refused from their header, before any pixel is decoded.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from jetcli.fileio import atomic_write, one_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
EXACT_MODES = {"RGB", "RGBA", "L", "LA", "1", "P", "PA"}
ORIENTATION_TAG = 0x0112  # EXIF: 1 is upright; 2-8 ask for a flip and/or a rotation


class ImageError(ValueError):
    """An image file that cannot be used."""


class ImageWarning(UserWarning):
    """A readable image file that Pillow found damaged (metadata it skipped)."""


def read_rgb(source: str | Path | bytes, name: str | None = None) -> np.ndarray:
    """Decode an image file (a path, or its bytes) to uint8 RGB (H, W, 3) under the policy above."""
    name = name or _name(source)
    with _open(source, name) as im:
        with _named_warnings(name):
            try:
                im.load()
                rgba = np.asarray(im.convert("RGBA")) if "A" in im.mode or "transparency" in im.info else None
                rgb = None if rgba is not None else np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
            # Pillow's parsers meet malformed files with many exception types (OSError, ValueError,
            # SyntaxError, but also TypeError, KeyError, IndexError, struct.error... from deep inside a
            # plugin): on untrusted bytes, any of them means "not a readable image".
            except Exception as e:
                raise ImageError(f"{name}: cannot decode the image ({one_line(e)})") from None
        _warn_of_orientation(im, name)
        if rgba is not None:
            transparent = int((rgba[..., 3] != 255).sum())
            if transparent:
                raise ImageError(f"{name}: {transparent} pixel(s) not fully opaque; jet reads RGB only "
                                 "(flatten the image onto a background first)")
            return np.ascontiguousarray(rgba[..., :3])
        return np.array(rgb, dtype=np.uint8)


def _warn_of_orientation(im: Image.Image, name: str) -> None:
    orientation = 1
    with contextlib.suppress(Exception):  # damaged EXIF: nothing to say about it
        orientation = im.getexif().get(ORIENTATION_TAG, 1)
    if orientation not in (1, None):
        _warn_once(f"{name}: its EXIF orientation ({orientation}) asks viewers to rotate or flip it; jet reads the "
                   "pixels as stored (save it upright first for the picture viewers show)")


def probe(source: str | Path | bytes, name: str | None = None) -> tuple[int, int]:
    """(height, width) from the header alone, after the same checks as `read_rgb` makes before decoding."""
    with _open(source, name or _name(source)) as im:
        return im.height, im.width


def _open(source: str | Path | bytes, name: str) -> Image.Image:
    """Open lazily (header only) and refuse what the policy refuses."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with _named_warnings(name):
            im = Image.open(fp)
            try:
                _check_mode(im, name)
            except BaseException:
                im.close()
                raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: refused as a possible decompression bomb (its header declares more "
                         f"than {MAX_PIXELS:,} pixels)") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (or a format Pillow cannot read)") from None
    except ImageError:  # the policy's refusals
        raise
    except Exception as e:  # counting frames parses further into the file (any type: see read_rgb)
        raise ImageError(f"{name}: not a readable image ({one_line(e)})") from None
    return im


@contextlib.contextmanager
def _named_warnings(name: str):
    """Pillow warns about damaged metadata it skips (a TIFF tag past the end of the file, ...), once per
    tag and pointing into its own source: pass the first on as an ImageWarning that names the file. Pillow
    only warns between MAX_PIXELS and twice that about bombs: there, the whole range is an error."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield
    if caught:
        _warn_once(f"{name}: {one_line(caught[0].message)}")


@functools.cache  # a file is opened more than once (header, then pixels): say it once
def _warn_once(message: str) -> None:
    warnings.warn(message, ImageWarning, stacklevel=2)


def _check_mode(im: Image.Image, name: str) -> None:
    if im.mode not in EXACT_MODES:
        why = ("16-bit or float pixels are not read" if im.mode.startswith(("I", "F")) else
               f"{im.mode} images are not read (Pillow's conversion to RGB ignores colour profiles)")
        raise ImageError(f"{name}: {why}; convert it to 8-bit RGB first")
    rawmodes = [t.args if isinstance(t.args, str) else (t.args or ("",))[0] for t in im.tile]
    if any(str(raw).startswith(f"{im.mode};16") for raw in rawmodes):
        raise ImageError(f"{name}: 16-bit pixels are not read; convert it to 8-bit RGB first")
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        raise ImageError(f"{name}: has {frames} frames; jet reads single images")


def tiles(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Non-overlapping (h, w) tiles of an (H, W, C) image, row-major, as (n, h, w, C).

    The strips at the bottom and right that do not fill a whole tile are dropped; `covered(...)` is the
    part that remains. An image smaller than one tile gives no tiles.
    """
    h, w = size
    rows, cols, c = image.shape[0] // h, image.shape[1] // w, image.shape[2]
    kept = covered(image, size)
    return kept.reshape(rows, h, cols, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, h, w, c)


def pad_to_tiles(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W, C) image extended at the bottom and right to whole (h, w) tiles by repeating its last
    row and column (edge padding: smooth, so the model codes the padding cheaply, and deterministic, so
    decoding needs only the original H and W to cut it off again)."""
    h, w = size
    pad_h, pad_w = -image.shape[0] % h, -image.shape[1] % w
    if not pad_h and not pad_w:
        return image
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def covered(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The top-left part of an image that whole (h, w) tiles cover."""
    h, w = size
    return image[:image.shape[0] // h * h, :image.shape[1] // w * w]


def grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (N, H, W, 3) into a near-square grid with `pad` white pixels between them; a
    grid of one is the bare image."""
    n, h, w, c = images.shape
    if n == 1:
        return images[0]
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = im
    return out


def zoom(images: np.ndarray, factor: int) -> np.ndarray:
    """Images (N, H, W, C) enlarged `factor` times by repeating pixels (nearest neighbour: no new values)."""
    return images.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else images


def png_bytes(array: np.ndarray, optimize: bool = False) -> bytes:
    """An 8-bit RGB array as PNG bytes; optimize=True is Pillow's smallest (zlib level 9, tuned)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=optimize)
    return buffer.getvalue()


def save_png(array: np.ndarray, path: str | Path) -> None:
    atomic_write(Path(path), lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _name(source: str | Path | bytes) -> str:
    return "<bytes>" if isinstance(source, bytes) else str(source)

