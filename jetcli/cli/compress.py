"""`jet compress` / `jet decompress`: images to bits-back coded .jetz files about as small as their bpd,
and back to the exact pixels (jetcli.compress)."""

from __future__ import annotations

import functools
from typing import Annotated, Optional

import typer

from jetcli import compress as bitsback
from jetcli.cli.errors import user_errors
from jetcli.cli.files import convert_each
from jetcli.cli.options import CodecDeviceOption, ForceOption, InputsArgument, ModelOption
from jetcli.cli.root import app
from jetcli.images import png_bytes, read_rgb


@app.command()
@user_errors
def compress(
    inputs: InputsArgument = None,
    output: Annotated[Optional[str], typer.Option("--out", "-o", show_default=False, help=(
        f"The {bitsback.SUFFIX} file to write, or a folder for one NAME{bitsback.SUFFIX} per image; - or "
        "omitted: stdout."))] = None,
    model: ModelOption = None,
    device: CodecDeviceOption = "auto",
    force: ForceOption = False,
):
    """Compress 8-bit RGB images of any size losslessly, to files about as small as `jet bpd` says.

    Bits-back coding with the flow on an ANS stack: the dequantisation noise is decoded from the stream,
    each coupling's change of volume is paid where it happens, and the latent is coded under the
    Gaussian prior, so the file takes the bits `jet bpd` reports for the image, give or take a small
    start-up cost (the first tiles are coded directly, until there are bits to take back; on the
    held-out photos well under 1% of the file), plus a 92-byte header. The image is padded to whole
    tiles of the model's input (edge padding) and coded on the CPU, in exact arithmetic. Every file is
    decompressed and compared with the image before it is written; if it would not come back exactly,
    nothing is written and the exit status is 2.

    `jet decompress` needs the same model (the header records its sha256) and a machine that computes it
    the same way (the header records a fingerprint of the numerics); otherwise it refuses.

    **Examples**

        jet compress photo.png -o photo.jetz
        jet compress shots/*.png -o packed/
        jet compress - < photo.png | jet decompress - -o same.png
    """

    sha256 = weights_sha256()

    def compress_one(loaded, data: bytes, name: str, progress) -> tuple[bytes, str]:
        pixels = read_rgb(data, name=name)
        result = bitsback.compress(loaded.model, pixels, sha256(loaded), progress=progress)
        return result.data, (f"{pixels.shape[0]}x{pixels.shape[1]}, {len(result.data):,} bytes, "
                              f"{8 * len(result.data) / pixels.size:.3f} bits per subpixel, round trip verified")

    convert_each(inputs, output, (bitsback.SUFFIX,), force, model, device, "compress", compress_one)


@app.command()
@user_errors
def decompress(
    inputs: InputsArgument = None,
    output: Annotated[Optional[str], typer.Option("--out", "-o", show_default=False, help=(
        f"The .png to write, or a folder for one NAME.png per {bitsback.SUFFIX} file; - or omitted: stdout."))] = None,
    model: ModelOption = None,
    device: CodecDeviceOption = "auto",
    force: ForceOption = False,
):
    """Decompress files written by `jet compress` back to the exact pixels, as PNG.

    Refused with exit status 2, never decoded to a different image: a file of another model, one written
    by a newer jetcli (or in the older format 1), a truncated or damaged file (it carries a checksum),
    and a file made on a machine that computes the model differently from this one (its numerics
    fingerprint differs).

    **Examples**

        jet decompress photo.jetz -o photo.png
        jet decompress packed/*.jetz -o photos/
    """

    sha256 = weights_sha256()

    def decompress_one(loaded, data: bytes, name: str, progress) -> tuple[bytes, str]:
        pixels = bitsback.decompress(loaded.model, data, sha256(loaded), progress=progress)
        return png_bytes(pixels), f"{pixels.shape[0]}x{pixels.shape[1]} image, pixel checksum verified"

    convert_each(inputs, output, (".png",), force, model, device, "decompress", decompress_one)


def weights_sha256():
    """loaded -> the sha256 of its weights file, read once however many files are coded."""
    return functools.lru_cache(maxsize=1)(lambda loaded: loaded.sha256())
