"""`jet sample`: draw images from the model (jetcli.sampling) into one grid or one PNG each."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated

import torch
import typer

from jetcli.cli.errors import UsageError, user_errors
from jetcli.cli.files import check_output, write_output
from jetcli.cli.options import (DeviceOption, ForceOption, ModelOption, Precision, PrecisionOption, SeedOption,
                                open_model)
from jetcli.cli.output import progress_bar, say
from jetcli.cli.root import app
from jetcli.devices import device_of
from jetcli.images import grid, png_bytes
from jetcli.precision import resolve
from jetcli.sampling import sample as draw


@app.command()
@user_errors
def sample(
    num: Annotated[int, typer.Option("-n", "--num", min=1, help="How many images.")] = 64,
    temp: Annotated[float, typer.Option("--temp", "-t", min=0.0,
                                        help="Temperature: the latents' standard deviation.")] = 1.0,
    output: Annotated[str, typer.Option("--out", "-o", help="A .png for one near-square grid, or a folder "
                                        "(existing, or ending in /) for one PNG per sample.")] = "samples.png",
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
    images.

    **Examples**

        jet sample -n 64 --temp 0.9 -o grid.png
        jet sample -n 500 --seed 1 -o samples/ --batch-size 100 --device cuda
    """
    if not math.isfinite(temp):
        raise UsageError(f"--temp {temp}: must be a finite number")
    dests = destinations(output, num)
    for dest in dests:
        check_output(dest, [], force)
    loaded = open_model(model, device)
    run_precision = resolve(precision.value, device_of(loaded.model))
    with progress_bar() as bar:
        task = bar.add_task("sample", total=num)
        images = draw(loaded.model, num, temperature=temp, generator=torch.Generator().manual_seed(seed),
                      batch_size=batch_size, precision=run_precision, on_batch=lambda b: bar.advance(task, b))
    arrays = [grid(images)] if len(dests) == 1 else list(images)
    for dest, array in zip(dests, arrays):
        write_output(dest, png_bytes(array))
    say(f"wrote {num} samples (seed {seed}, temperature {temp:g}, {run_precision}) to {output}")


def destinations(output: str, num: int) -> list[Path]:
    """One .png for a grid, or a numbered PNG per sample in a folder (one that exists or ends in /)."""
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        digits = max(3, len(str(num - 1)))
        return [Path(output) / f"sample_{i:0{digits}d}.png" for i in range(num)]
    if Path(output).suffix.lower() == ".png":
        return [Path(output)]
    raise UsageError(f"-o {output}: give a .png file for a grid, or a folder (ending in /) for one PNG each")
