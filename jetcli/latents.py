"""Latent files: what `jet encode` writes and `jet decode` reads, never unpickled.

A latent file is an uncompressed .npz archive (numpy's own container for several arrays) of two members:

- `latent`: float32 or float64 (H', W', 3), the latent of the image padded to whole tiles (jetcli.codec);
- `header`: a 0-d unicode array holding a JSON object: `format` ("jetcli-latent"), `version` (1),
  `height` and `width` of the image itself, `tile` (the model's input size), `padding` ("edge"),
  `model_sha256` (of the weights file, as `jet info` shows it) and `model` (its name, for messages),
  `verified` and `margin` (the round trip checked at encode, and its worst pixel error), and `encoded_with`
  (jetcli and torch versions, the device the codec computed on, the CPU architecture).

numpy reads it without jetcli, and without pickles:

    with np.load("photo.npz", allow_pickle=False) as f:
        z, header = f["latent"], json.loads(f["header"][()])

np.load reads by content, so a latent piped into a file named .npy (`jet encode img.png > latent.npy`)
opens the same way. Writing is deterministic: the same image and model give the same bytes.

`read` refuses, with one line, what is not such a file (checked by its first bytes, before any parsing),
a damaged archive, a header of another format or a newer version, and arrays whose .npy header declares
more data than the file holds (no allocation is made from a lying header). Bare .npy latents written by
jetcli 0.1.0 are still read: they carry no header, so their shape is the image's (whole tiles) and the
model that wrote them cannot be checked (`LatentFile.header` is None).
"""

from __future__ import annotations

import io
import json
import math
import platform
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from jetcli import __version__, codec
from jetcli.codec import CodecError
from jetcli.fileio import one_line

FORMAT = "jetcli-latent"
VERSION = 1
SUFFIX = ".npz"
MEMBERS = ("latent.npy", "header.npy")
ZIP_MAGIC = b"PK\x03\x04"
NPY_MAGIC = b"\x93NUMPY"
MAX_HEADER_BYTES = 1 << 16
NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # every member's timestamp: the same input gives the same bytes
OTHER_FILES = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
               b"BM": "a BMP image", b"II*\x00": "a TIFF image", b"MM\x00*": "a TIFF image"}


@dataclass(frozen=True)
class LatentFile:
    latent: np.ndarray  # (H', W', 3) float32/float64, native byte order
    header: dict | None  # None for a bare .npy of jetcli 0.1.0

    @property
    def size(self) -> tuple[int, int]:
        """The image's own (height, width)."""
        if self.header is None:  # the codec checks the shape
            return tuple(self.latent.shape[:2])
        return self.header["height"], self.header["width"]

    def check_model(self, sha256: str, name: str) -> None:
        """Refuse a latent that another model encoded (by the sha256 of its weights)."""
        if self.header is not None and self.header["model_sha256"] != sha256:
            raise CodecError(f"encoded with another model ({self.header['model']}, sha256 "
                             f"{self.header['model_sha256'][:12]}...), not {name} (sha256 {sha256[:12]}...): "
                             f"decode it with the model that encoded it (--model)")


def to_bytes(encoded: codec.Encoded, model_sha256: str, model_name: str, tile: tuple[int, int]) -> bytes:
    """The latent file of an encode by the model whose weights have this sha256."""
    header = {"format": FORMAT, "version": VERSION, "height": encoded.size[0], "width": encoded.size[1],
              "tile": list(tile), "padding": "edge", "model_sha256": model_sha256, "model": model_name,
              "verified": not math.isnan(encoded.margin),
              "margin": None if math.isnan(encoded.margin) else encoded.margin,
              "encoded_with": {"jetcli": __version__, "torch": torch.__version__, "device": str(codec.DEVICE),
                               "machine": platform.machine()}}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for member, array in zip(MEMBERS, (encoded.latent, np.array(json.dumps(header)))):
            archive.writestr(zipfile.ZipInfo(member, ZIP_EPOCH), _npy_bytes(array))
    return buffer.getvalue()


def read(data: bytes) -> LatentFile:
    """A latent file's latent and header (see the module docstring); CodecError for anything else."""
    if data.startswith(NPY_MAGIC):
        return LatentFile(_native(_array(data, "not a readable .npy latent")), None)
    if not data.startswith(ZIP_MAGIC):
        raise CodecError(f"not a latent written by jet encode: {_what(data)}")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
            if not set(MEMBERS) <= names:
                raise CodecError(f"an .npz archive of {', '.join(sorted(names)) or 'nothing'}, not a latent file "
                                 f"(it needs {' and '.join(MEMBERS)})")
            header = _header(_member(archive, "header.npy", MAX_HEADER_BYTES))
            latent = _array(_member(archive, "latent.npy", _latent_bytes(header)),
                            "a damaged latent file: its latent is not a readable .npy array")
    except CodecError:
        raise
    except Exception as e:  # damaged archives raise BadZipFile, zlib.error, EOFError, NotImplementedError...
        raise CodecError(f"a damaged latent file ({one_line(e, 200)})") from None
    return LatentFile(_native(latent), header)


def _header(data: bytes) -> dict:
    text = _array(data, "a damaged latent file: its header is not a readable .npy array")
    header = json.loads(str(text[()])) if text.dtype.kind == "U" and text.ndim == 0 else None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CodecError("an .npz archive whose header is not a jetcli latent header")
    if header.get("version") != VERSION:
        raise CodecError(f"a latent file of format version {header.get('version')!r}; this jetcli reads "
                         f"version {VERSION} (a newer jetcli wrote it?)")
    sizes = [header.get(k) for k in ("height", "width")] + list(header.get("tile") or [None, None])
    if len(sizes) != 4 or not all(type(v) is int and v > 0 for v in sizes) or not isinstance(
            header.get("model_sha256"), str) or not isinstance(header.get("model"), str):
        raise CodecError("a latent header without a valid height, width, tile and model sha256")
    return header


def _latent_bytes(header: dict) -> int:
    """The most bytes the latent of this header's image can take: float64 over its padded shape, and a
    .npy header."""
    (h, w), (th, tw) = (header["height"], header["width"]), header["tile"]
    return -(-h // th) * th * -(-w // tw) * tw * 3 * 8 + 4096


def _member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A member's bytes, refused when it declares more than `limit` (a small archive can inflate to
    gigabytes)."""
    if archive.getinfo(name).file_size > limit:
        raise CodecError(f"a latent file whose {name} is larger than its header allows")
    return archive.read(name)


def _array(data: bytes, what: str) -> np.ndarray:
    """A .npy's array without pickles, after checking that the data its header declares is there;
    CodecError "{what} (why not)" otherwise."""
    try:
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        if version not in NPY_HEADERS:
            raise ValueError(f".npy format version {version}")
        shape, _, dtype = NPY_HEADERS[version](stream)
        if dtype.hasobject:
            raise ValueError("it holds pickled Python objects, which are never loaded")
        declared, held = math.prod(shape) * dtype.itemsize, len(data) - stream.tell()
        if declared > held:
            raise ValueError(f"its header declares {declared:,} bytes of data, the file holds {held:,}")
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # damaged bytes raise ValueError, SyntaxError, tokenize.TokenError...
        raise CodecError(f"{what} ({one_line(e, 200)})") from None


def _native(latent: np.ndarray) -> np.ndarray:
    """Floats in native byte order (a file written on a big-endian machine): exact, the same values."""
    if latent.dtype.kind == "f" and not latent.dtype.isnative:
        return latent.astype(latent.dtype.newbyteorder("="))
    return latent


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _what(data: bytes) -> str:
    """What the first bytes say a file is instead, in words."""
    if not data:
        return "the file is empty"
    for magic, kind in OTHER_FILES.items():
        if data.startswith(magic):
            return f"it is {kind} (jet encode turns images into latents)"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "it is a WebP image (jet encode turns images into latents)"
    return f"its first bytes {data[:8]!r} are neither an .npz archive nor a .npy array"
