"""`jet sample`: draw images from the model (jetcli.sampling) into one grid or one PNG each."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Iterator

import numpy as np
import torch
import typer

from jetcli.cli.errors import EXIT_INTERRUPTED, UsageError, user_errors
from jetcli.cli.files import check_outputs, write_output
from jetcli.cli.options import (DeviceOption, ForceOption, ModelOption, Precision, PrecisionOption, SeedOption,
                                open_model)
from jetcli.cli.output import progress_bar, say
from jetcli.cli.root import app
from jetcli.devices import device_of
from jetcli.fileio import WriteError
from jetcli.images import grid, png_bytes
from jetcli.images import zoom as zoom_in
from jetcli.precision import resolve
from jetcli.sampling import sample_batches


@app.command()
@user_errors
def sample(
    num: Annotated[int, typer.Option("-n", "--num", min=1, help="How many images.")] = 64,
    temp: Annotated[float, typer.Option("--temp", "-t", min=0.0,
                                        help="Temperature: the latents' standard deviation.")] = 1.0,
    output: Annotated[str, typer.Option("--out", "-o", help="A .png for one near-square grid (a grid of one is "
                                        "the bare image), or a folder (existing, or ending in /) for one PNG per "
                                        "sample, written as they are drawn.")] = "samples.png",
    zoom: Annotated[int, typer.Option("--zoom", "-z", min=1, help="Enlarge every sample K times (nearest "
                                      "neighbour), for images small enough to squint at.")] = 1,
    seed: SeedOption = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per inverse pass.")] = 64,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.auto,
    force: ForceOption = False,
):
    """Draw images from the model: latents z ~ N(0, temp²) through the inverse flow.

    The noise comes from a CPU generator seeded with `--seed`, so a seed gives the same latents on every
    device, and the same images run to run on one device. Lower temperatures give smoother, less varied
    images. Into a folder, each batch is written as soon as it is drawn: Ctrl-C keeps the samples done.

    **Examples**

        jet sample -n 64 --temp 0.9 -o grid.png --zoom 2
        jet sample -n 500 --seed 1 -o samples/ --batch-size 100 --device cuda
    """
    if not math.isfinite(temp):
        raise UsageError(f"--temp {temp}: must be a finite number")
    dests = destinations(output, num)
    check_outputs(dests, [], force)
    loaded = open_model(model, device)
    run_precision = resolve(precision.value, device_of(loaded.model))
    batches = sample_batches(loaded.model, num, temp, torch.Generator().manual_seed(seed), batch_size, run_precision)
    with progress_bar() as bar:
        task = bar.add_task("sample", total=num)
        if len(dests) == 1:
            write_output(dests[0], png_bytes(grid(zoom_in(drawn(batches, bar, task), zoom))))
        else:
            write_each(batches, dests, zoom, lambda n: bar.advance(task, n))
    say(f"wrote {num} samples (seed {seed}, temperature {temp:g}, {run_precision}) to {output}")


def drawn(batches: Iterator[np.ndarray], bar, task) -> np.ndarray:
    """All the samples, for a grid."""
    images = []
    for batch in batches:
        images.append(batch)
        bar.advance(task, len(batch))
    return np.concatenate(images)


def write_each(batches: Iterator[np.ndarray], dests: list[Path], zoom: int, advance) -> None:
    """One PNG per sample, each batch written as it is drawn: after Ctrl-C or a failed write, the samples
    written are complete and the line says how many."""
    written = 0
    try:
        for batch in batches:
            for image in zoom_in(batch, zoom):
                write_output(dests[written], png_bytes(image))
                written += 1
            advance(len(batch))
    except KeyboardInterrupt:
        say(f"interrupted: {written} of {len(dests)} samples written to {dests[0].parent}, each complete")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except WriteError as e:
        if not written:
            raise
        raise UsageError(f"{e}; the {written} samples written before it are complete") from None


def destinations(output: str, num: int) -> list[Path]:
    """One .png for a grid, or a numbered PNG per sample in a folder (one that exists or ends in /)."""
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        digits = max(3, len(str(num - 1)))
        return [Path(output) / f"sample_{i:0{digits}d}.png" for i in range(num)]
    if Path(output).suffix.lower() == ".png":
        return [Path(output)]
    raise UsageError(f"-o {output}: give a .png file for a grid, or a folder (ending in /) for one PNG each")
