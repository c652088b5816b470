"""`jet bpd`: bits per dimension of images under the model (jetcli.scoring), as a table, JSON or CSV."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from jetcli import scoring
from jetcli.cli.errors import UsageError, user_errors
from jetcli.cli.files import gather_images
from jetcli.cli.options import DeviceOption, ModelOption, Precision, PrecisionOption, SeedOption, open_model
from jetcli.cli.output import out, progress_bar
from jetcli.cli.root import app
from jetcli.devices import device_of
from jetcli.precision import resolve


@app.command()
@user_errors
def bpd(
    paths: Annotated[list[str], typer.Argument(
        help="Image files, folders (searched recursively for images) or - for a list of paths on stdin, "
             "one per line.", show_default=False)],
    model: ModelOption = None,
    samples: Annotated[int, typer.Option(min=1, help="Dequantisation noise draws per tile; the bpd is their mean.")] = 1,
    seed: SeedOption = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Tiles per forward pass.")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV rows path,tiles,bpd,png_bpd instead.")] = False,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.fp32,
):
    """Bits per dimension of images under the model, beside their size as optimised PNG.

    The bpd is the reference's: the negative log-likelihood of the uniformly dequantised image in bits,
    divided by the number of dimensions (height x width x 3), averaged over `--samples` noise draws.
    **png_bpd** is the size of the same pixels as an optimised PNG (Pillow, zlib level 9) in bits per dim.

    **Tiles.** Images larger than the model's input are cut into non-overlapping tiles of the input size,
    row by row from the top-left corner. The strips at the right and bottom edges that do not fill a whole
    tile are dropped, and every number, PNG included, counts only the tiled pixels. Images smaller than
    one tile are refused. An image's bpd is the mean over its tiles; **mean_bpd** is the mean over all
    tiles of all images (all tiles have the same dims, so this is the dims-weighted mean), and **sem** its
    standard error (tiles counted as independent draws; null for a single tile).

    **Precision.** float32 unless asked: these are the reference's numbers. `--precision fast` (or auto on
    bf16 hardware) runs the ViTs' bodies in bf16, about 1.7x faster on such CPUs; the mean bpd moves by
    about 0.001, single images by up to about 0.01 (see BENCHMARKS.md).

    `--json` prints `{"model", "precision", "images": [{"path", "bpd", "png_bpd", "tiles"}], "mean_bpd", "sem"}`.

    **Examples**

        jet bpd photo.png
        jet bpd ../shared/data/cbsd68 --samples 4 --json > cbsd68.json
        find shots -name '*.png' | jet bpd - --csv --model owner/jet-model@main
    """
    if as_json and as_csv:
        raise UsageError("--json and --csv: choose one")
    files = gather_images(paths)
    loaded = open_model(model, device)
    run_precision = resolve(precision.value, device_of(loaded.model))
    counts = scoring.tile_counts(files, loaded.model.config.image_size)  # headers only: refuse before working
    with progress_bar() as bar:
        task = bar.add_task("bpd", total=sum(counts))
        scores = scoring.score_images(loaded.model, files, counts, samples, seed, batch_size, run_precision,
                                      on_tiles=lambda n: bar.advance(task, n))
    if as_json:
        typer.echo(json.dumps({"model": loaded.name, "precision": run_precision,
                               "images": [asdict(image) for image in scores.images],
                               "mean_bpd": scores.mean_bpd, "sem": scores.sem}, indent=2))
    elif as_csv:
        print_csv(scores)
    else:
        print_table(scores, loaded.name, run_precision)


def print_csv(scores: scoring.Scores) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["path", "tiles", "bpd", "png_bpd"])
    writer.writerows([r.path, r.tiles, f"{r.bpd:.6f}", f"{r.png_bpd:.6f}"] for r in scores.images)


def print_table(scores: scoring.Scores, model_name: str, precision: str) -> None:
    table = Table(title=f"bits per dim under {escape(model_name)}, {precision}")
    table.add_column("image", overflow="fold")
    for name in ("tiles", "bpd", "PNG bpd"):
        table.add_column(name, justify="right")
    for r in scores.images:
        table.add_row(escape(r.path), str(r.tiles), f"{r.bpd:.4f}", f"{r.png_bpd:.4f}")
    out.print(table)
    n = len(scores.images)
    sem = "n/a" if scores.sem is None else f"{scores.sem:.4f}"
    out.print(f"mean {scores.mean_bpd:.4f} ± {sem} bpd (standard error) over {scores.tiles} tiles of {n} "
              f"image{'s' * (n > 1)}; PNG {scores.png_bpd:.4f}", highlight=False, soft_wrap=True)
