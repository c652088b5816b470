"""`jet encode`: images of any size to exact Jet latents (jetcli.codec), one latent file each (jetcli.latents)."""

from __future__ import annotations

from typing import Annotated, Optional

import numpy as np
import typer

from jetcli import codec, latents
from jetcli.cli.errors import user_errors
from jetcli.cli.files import convert_each
from jetcli.cli.options import CodecDeviceOption, ForceOption, InputsArgument, ModelOption
from jetcli.cli.root import app
from jetcli.images import read_rgb


@app.command()
@user_errors
def encode(
    inputs: InputsArgument = None,
    output: Annotated[Optional[str], typer.Option("--out", "-o", show_default=False, help=(
        "The .npz (or .npy) to write, or a folder for one NAME.npz per image; - or omitted: stdout."))] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help=(
        "Decode the latent here and check that every pixel comes back; exit 2 if not."))] = True,
    model: ModelOption = None,
    device: CodecDeviceOption = "auto",
    force: ForceOption = False,
):
    """Encode 8-bit RGB images of any size to Jet latents, losslessly: `jet decode` gives back the exact
    pixels and size.

    The image is padded at the bottom and right to whole tiles of the model's input (by repeating its
    last row and column) and coded tile by tile. Each pixel is encoded at the centre of its 8-bit bin,
    deterministically, in IEEE float32 on the CPU (float64 where float32 cannot guarantee the round trip),
    so a latent decodes to the same pixels on any machine. By default the latent is decoded again and
    every pixel checked; if the round trip would not be exact, nothing is written for that image and the
    exit status is 2.

    The latent file is an .npz archive (numpy's own format, no pickles) of `latent`, the padded image's
    latent, and `header`, JSON with the image's height and width, the sha256 of the model's weights (`jet
    decode` refuses a latent of another model) and how it was encoded. With numpy alone:
    `f = np.load("photo.npz"); z = f["latent"]; header = json.loads(f["header"][()])`.
    np.load reads by content, so a latent saved as .npy opens the same way.

    **Examples**

        jet encode photo.png > photo.npz
        jet encode a.png b.png c.png -o latents/
        jet encode - < photo.png | jet decode - -o same.png
    """

    def encode_one(loaded, data: bytes, name: str, progress) -> tuple[bytes, str]:
        pixels = read_rgb(data, name=name)
        result = codec.encode(loaded.model, pixels, verify=verify, progress=progress)
        file = latents.to_bytes(result, loaded.sha256(), loaded.name, loaded.model.config.image_size)
        padded = result.latent.shape[:2] != pixels.shape[:2]
        return file, (f"{pixels.shape[0]}x{pixels.shape[1]}"
                      + (f" (padded to {result.latent.shape[0]}x{result.latent.shape[1]})" if padded else "")
                      + f", {result.latent.dtype} latent, " + verification(result, verify))

    convert_each(inputs, output, (latents.SUFFIX, ".npy"), force, model, device, "encode", encode_one)


def verification(result: codec.Encoded, verified: bool) -> str:
    check = ("not verified (--no-verify)" if not verified else
             f"round trip verified, worst pixel error {result.margin:.2g} px before rounding")
    if result.latent.dtype == np.float64:
        check += f" (float32 missed by {result.float32_margin:.2g} px)"
    return check
