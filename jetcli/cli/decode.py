"""`jet decode`: latents written by `jet encode` back to the exact PNG pixels (jetcli.codec)."""

from __future__ import annotations

import io
from typing import Annotated, Optional

import numpy as np
import typer

from jetcli import codec
from jetcli.cli.errors import user_errors
from jetcli.cli.files import convert_each
from jetcli.cli.options import DeviceOption, ForceOption, InputsArgument, ModelOption
from jetcli.cli.root import app
from jetcli.codec import CodecError
from jetcli.fileio import one_line
from jetcli.images import png_bytes


@app.command()
@user_errors
def decode(
    inputs: InputsArgument = None,
    output: Annotated[Optional[str], typer.Option("--out", "-o", show_default=False, help=(
        "The .png to write, or a folder for one NAME.png per latent; - or omitted: stdout."))] = None,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    force: ForceOption = False,
):
    """Decode latents written by `jet encode` back to the exact PNG pixels.

    Use the model that encoded them. A latent that does not land on the 8-bit grid (another model, an
    altered or damaged file) is refused with exit status 2, never decoded to a different image; so are
    latents of the wrong shape or dtype, or holding NaN/Inf. Files are read without unpickling.

    **Examples**

        jet decode photo.npy -o photo.png
        jet decode latents/*.npy -o decoded/
        jet encode - < photo.png | jet decode - -o same.png
    """

    def decode_one(model, data: bytes, name: str) -> tuple[bytes, str]:
        result = codec.decode(model, read_latent(data))
        return png_bytes(result.pixels), (f"{result.pixels.shape[0]}x{result.pixels.shape[1]} image (decoded "
                                          f"values within {result.margin:.2g} px of the 8-bit grid)")

    convert_each(inputs, output, ".png", force, model, device, "decode", decode_one)


def read_latent(data: bytes) -> np.ndarray:
    """A .npy array, never unpickled; its shape, dtype and values are checked by the codec."""
    try:
        latent = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # damaged bytes raise ValueError, SyntaxError, tokenize.TokenError, MemoryError...
        raise CodecError(f"not a .npy latent ({one_line(e, 200)})") from None
    if not isinstance(latent, np.ndarray):
        raise CodecError("an .npz archive, not a .npy latent written by jet encode")
    if latent.dtype.kind == "f" and not latent.dtype.isnative:  # e.g. written on a big-endian machine
        latent = latent.astype(latent.dtype.newbyteorder("="))  # exact: the same values, native byte order
    return latent
