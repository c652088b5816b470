"""`jet encode`: images to exact Jet latents (jetcli.codec), one .npy each."""

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
from jetcli.images import read_rgb


@app.command()
@user_errors
def encode(
    inputs: InputsArgument = None,
    output: Annotated[Optional[str], typer.Option("--out", "-o", show_default=False, help=(
        "The .npy to write, or a folder for one NAME.npy per image; - or omitted: stdout."))] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help=(
        "Decode the latent here and check that every pixel comes back; exit 2 if not."))] = True,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    force: ForceOption = False,
):
    """Encode 8-bit RGB images to Jet latents, losslessly: `jet decode` gives back the exact pixels.

    Each pixel is encoded at the centre of its 8-bit bin, deterministically, in IEEE float32 (float64
    where float32 cannot guarantee the round trip; the latent's dtype records which). The latent .npy
    has the image's own shape (H, W, 3); images must be whole multiples of the model's input size
    (they are coded tile by tile). By default the latent is decoded again and every pixel checked; if
    the round trip would not be exact, nothing is written for that image and the exit status is 2.

    **Examples**

        jet encode photo.png > photo.npy
        jet encode a.png b.png c.png -o latents/
        jet encode - < photo.png | jet decode - -o same.png
    """

    def encode_one(model, data: bytes, name: str) -> tuple[bytes, str]:
        pixels = read_rgb(data, name=name)
        result = codec.encode(model, pixels, verify=verify)
        buffer = io.BytesIO()
        np.save(buffer, result.latent, allow_pickle=False)
        return buffer.getvalue(), f"{pixels.shape[0]}x{pixels.shape[1]}, {result.latent.dtype} latent, " + \
            verification(result, verify)

    convert_each(inputs, output, ".npy", force, model, device, "encode", encode_one)


def verification(result: codec.Encoded, verified: bool) -> str:
    check = ("not verified (--no-verify)" if not verified else
             f"round trip verified, worst pixel error {result.margin:.2g} px before rounding")
    if result.latent.dtype == np.float64:
        check += f" (float32 missed by {result.float32_margin:.2g} px)"
    return check
