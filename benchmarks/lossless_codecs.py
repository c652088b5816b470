"""Sizes of an 8-bit RGB image under the classical lossless codecs, in bits per subpixel (bits / (H·W·3)).

    optimised PNG     Pillow, optimize=True (zlib level 9, tuned filters)
    lossless WebP     Pillow (libwebp), lossless=True, quality=100, method=6 (its slowest, smallest)
    lossless JPEG-XL  cjxl -d 0 at effort 7 (its default) and 9 (`apt-get install libjxl-tools`)

Each image is coded whole, as its own file, as a user would store it.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from jetcli.images import png_bytes

CODECS = ("png", "webp", "jxl-e7", "jxl-e9")


def png_bits(image: np.ndarray) -> int:
    return 8 * len(png_bytes(image, optimize=True))


def webp_bits(image: np.ndarray) -> int:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="WEBP", lossless=True, quality=100, method=6)
    return 8 * len(buffer.getvalue())


def jxl_bits(image: np.ndarray, effort: int) -> int:
    if shutil.which("cjxl") is None:
        raise RuntimeError("cjxl not found: apt-get install libjxl-tools")
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "in.png", Path(tmp) / "out.jxl"
        source.write_bytes(png_bytes(image))
        subprocess.run(["cjxl", str(source), str(target), "-d", "0", "-e", str(effort)], check=True,
                       capture_output=True)
        return 8 * target.stat().st_size


def codec_bits_per_subpixel(image: np.ndarray) -> dict[str, float]:
    """{codec: bits per subpixel} for every codec in CODECS."""
    bits = {"png": png_bits(image), "webp": webp_bits(image), "jxl-e7": jxl_bits(image, 7),
            "jxl-e9": jxl_bits(image, 9)}
    return {name: value / image.size for name, value in bits.items()}


def jxl_version() -> str:
    try:
        out = subprocess.run(["cjxl", "--version"], capture_output=True, text=True)
        return (out.stdout or out.stderr).splitlines()[0]
    except (OSError, IndexError):
        return "not installed"
