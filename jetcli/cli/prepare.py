"""`jet prepare`: a folder of images to one uint8 .npy that `jet train` memory-maps (jetcli.prepare)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from jetcli.cli.errors import UsageError, user_errors
from jetcli.cli.files import check_output
from jetcli.cli.options import ForceOption
from jetcli.cli.output import progress_bar, say
from jetcli.cli.root import app
from jetcli.prepare import prepare as prepare_images


@app.command()
@user_errors
def prepare(
    source: Annotated[Path, typer.Argument(help="A folder of images, searched recursively (e.g. ImageNet's "
                                           "train/ with one folder per class).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .npy to write.", show_default=False)],
    size: Annotated[int, typer.Option("--size", "-s", min=1, help="Side S of the square images.",
                                      show_default=False)],
    center_crop: Annotated[bool, typer.Option("--center-crop", help="Take each image's central square "
                                              "instead of squashing the whole image to SxS.")] = False,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Processes (default: one per core).")] = None,
    force: ForceOption = False,
):
    """Downsample a folder of images into one uint8 (N, S, S, 3) .npy, the form `jet train` memory-maps.

    Each image is resized to SxS by area averaging (each output pixel the mean of the area it covers, as
    TensorFlow's AREA resize and the downsampled ImageNet datasets): squashed whole, its aspect ratio not
    kept (the paper's protocol), or its central square with `--center-crop`. Images are stored in sorted
    path order; files that cannot be read are skipped and counted. Stopped (Ctrl-C, killed), it continues
    where it was when run again with the same arguments.

    **Examples**

        jet prepare imagenet/train -o imagenet64-train.npy --size 64
        jet train imagenet64-train.npy --val imagenet64-val.npy --preset imagenet1k-64 --epochs 200
    """
    if out.suffix != ".npy":
        raise UsageError(f"-o {out}: give a .npy file")
    check_output(out, [], force)
    try:
        with progress_bar() as bar:
            task = bar.add_task("prepare", total=None)
            result = prepare_images(source, out, size, center_crop, workers,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
    except KeyboardInterrupt:
        say(f"stopped: run the same command again to continue (the work so far is kept beside {out})")
        raise typer.Exit(130) from None
    unreadable = result.unreadable
    say(f"wrote {result.images} images of {size}x{size} to {out}"
        + (f" ({result.resumed} done by an earlier run)" if result.resumed else "")
        + (f"; skipped {len(unreadable)} unreadable: {', '.join(unreadable[:5])}"
           + (", ..." if len(unreadable) > 5 else "") if unreadable else ""))
