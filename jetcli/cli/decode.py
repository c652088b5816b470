"""`jet decode`: latent files written by `jet encode` (jetcli.latents) back to the exact PNG (jetcli.codec)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from jetcli import codec, latents
from jetcli.cli.errors import user_errors
from jetcli.cli.files import convert_each
from jetcli.cli.options import CodecDeviceOption, ForceOption, InputsArgument, ModelOption
from jetcli.cli.output import warn
from jetcli.cli.root import app
from jetcli.images import png_bytes


@app.command()
@user_errors
def decode(
    inputs: InputsArgument = None,
    output: Annotated[Optional[str], typer.Option("--out", "-o", show_default=False, help=(
        "The .png to write, or a folder for one NAME.png per latent; - or omitted: stdout."))] = None,
    model: ModelOption = None,
    device: CodecDeviceOption = "auto",
    force: ForceOption = False,
):
    """Decode latents written by `jet encode` back to the exact PNG pixels, at the image's own size.

    Use the model that encoded them: a latent records the sha256 of its model's weights, and one of
    another model is refused (exit status 2). So is a latent that does not land on the 8-bit grid (an
    altered or damaged file), never decoded to a different image, and a file that is not a latent (told
    by its first bytes), of the wrong shape or dtype, or holding NaN/Inf. Files are read without
    unpickling. Bare .npy latents of jetcli 0.1.0 (whole tiles, no header) still decode, with a warning
    that their model cannot be checked.

    **Examples**

        jet decode photo.npz -o photo.png
        jet decode latents/*.npz -o decoded/
        jet encode - < photo.png | jet decode - -o same.png
    """

    def decode_one(loaded, data: bytes, name: str, progress) -> tuple[bytes, str]:
        file = latents.read(data)
        if file.header is None:
            warn(f"{name}: a bare .npy latent (jetcli 0.1.0): it records no model, so {loaded.name} is assumed "
                 "to be the one that encoded it")
        file.check_model(loaded.sha256(), loaded.name)
        result = codec.decode(loaded.model, file.latent, file.size, progress=progress)
        return png_bytes(result.pixels), (f"{result.pixels.shape[0]}x{result.pixels.shape[1]} image (decoded "
                                          f"values within {result.margin:.2g} px of the 8-bit grid)")

    convert_each(inputs, output, (".png",), force, model, device, "decode", decode_one)
