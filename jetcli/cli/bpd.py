"""`jet bpd`: bits per dimension of images under the model (jetcli.scoring), as a table, JSON or CSV."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from jetcli import __version__, scoring
from jetcli.cli.errors import EXIT_INTERRUPTED, EXIT_SKIPPED, UsageError, user_errors
from jetcli.cli.files import gather_images
from jetcli.cli.options import DeviceOption, ModelOption, Precision, PrecisionOption, SeedOption, open_model
from jetcli.cli.output import out, progress_bar, say, warn, write_stdout, writing_stdout
from jetcli.cli.root import app
from jetcli.devices import device_of
from jetcli.hub import LoadedModel
from jetcli.images import ImageError
from jetcli.precision import resolve

CSV_FIELDS = ("path", "height", "width", "tiles", "padded_pixels", "bpd", "png_bpd", "model", "model_sha256",
              "precision", "seed", "samples", "jetcli_version")


@app.command()
@user_errors
def bpd(  # long only by its options and help: the body is plan, score each, report
    paths: Annotated[list[str], typer.Argument(
        help="Image files, folders (searched recursively for images) or - for a list of paths on stdin, "
             "one per line.", show_default=False)],
    model: ModelOption = None,
    samples: Annotated[int, typer.Option(min=1, help="Dequantisation noise draws per tile; the bpd is their mean.")] = 1,
    seed: SeedOption = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Tiles per forward pass.")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV instead, a row per image as it is "
                                                       "scored.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first file that cannot be read "
                                                          "(exit 2), instead of skipping it.")] = False,
    device: DeviceOption = "auto",
    precision: PrecisionOption = Precision.fp32,
):
    """Bits per dimension of images of any size under the model, beside their size as optimised PNG.

    **Definition.** An image is padded at the bottom and right to whole tiles of the model's input size
    (edge padding: its last row and column repeated) and every tile is scored. Its bits are the bits to
    code the padded image with the model: each tile's negative log-likelihood of its uniformly
    dequantised pixels, in bits, averaged over `--samples` noise draws. Its **bpd** is those bits divided
    by the image's own dims, height x width x 3. As the padding follows from the image, this is an upper
    bound on the image's lossless code length, counting every pixel however much padding it took.
    **png_bpd** is the image (unpadded) as an optimised PNG (Pillow, zlib level 9) in bits per dim.
    **mean_bpd** is all images' bits over all their dims, **sem** its standard error with images as
    independent draws (null for one image). The output gives each image's tiles and padded pixels.

    **Noise.** Each tile's noise comes from `--seed` and the image's content (its pixels' sha256), so an
    image scores the same alone or beside others, in any folder or order.

    **Bad files.** Given one file, it is scored or refused (exit 2). Among several, a file that cannot be
    read (not an image, damaged, refused by jet's reading policy) gets a warning line and is skipped;
    they are listed again at the end. `--strict` stops at the first instead. Exit status: 0 all scored,
    2 refused (bad options, `--strict`, or nothing could be scored), 3 scored with files skipped, 130
    interrupted: Ctrl-C prints the results finished so far, marked incomplete.

    **Precision.** float32 unless asked: these are the reference's numbers. `--precision fast` (or auto on
    bf16 hardware) runs the ViTs' bodies in bf16, about 1.7x faster on such CPUs; the mean bpd moves by
    about 0.001, single images by up to about 0.01 (see BENCHMARKS.md).

    `--json` prints `{"model", "model_sha256", "jetcli_version", "precision", "device", "seed", "samples",
    "batch_size", "complete", "images": [{"path", "height", "width", "tiles", "padded_pixels", "bpd",
    "png_bpd"}], "skipped": [{"path", "reason"}], "mean_bpd", "sem", "png_bpd", "tiles", "pixels",
    "padded_pixels"}`. `--csv` prints the header `path,height,width,tiles,padded_pixels,bpd,png_bpd,model,
    model_sha256,precision,seed,samples,jetcli_version`, then a row per image as it is scored, and a last
    line `# incomplete: ...` if interrupted.

    **Examples**

        jet bpd photo.png
        jet bpd ../shared/data/cbsd68 --samples 4 --json > cbsd68.json
        find shots -name '*.png' | jet bpd - --csv --model owner/jet-model@main
    """
    if as_json and as_csv:
        raise UsageError("--json and --csv: choose one")
    files = gather_images(paths)
    strict = strict or len(files) == 1
    loaded = open_model(model, device)
    run = Run(loaded, resolve(precision.value, device_of(loaded.model)), seed, samples, batch_size)
    planned, run.skipped = scoring.plan(files, loaded.model.config.image_size, strict)
    for skipped in run.skipped:
        warn(f"{skipped.reason}; skipped")
    if as_csv:
        write_stdout(csv_line(CSV_FIELDS))
    try:
        with progress_bar() as bar:
            tiles = sum(p.tiles for p in planned)
            task = bar.add_task("bpd", total=tiles)
            for result in scoring.score_each(loaded.model, planned, samples, seed, batch_size, run.precision,
                                             strict, on_tiles=lambda n: bar.advance(task, n)):
                if isinstance(result, scoring.Skipped):
                    warn(f"{result.reason}; skipped")
                    tiles -= result.tiles
                    bar.update(task, total=tiles)
                    run.skipped.append(result)
                    continue
                run.scores.append(result)
                if as_csv:
                    write_stdout(csv_line(run.csv_row(result)))
    except KeyboardInterrupt:
        run.interrupted = f"interrupted after {len(run.scores)} of {len(files)} images"
    report(run, len(files), as_json, as_csv)


@dataclass
class Run:
    """What a `jet bpd` run was asked, and what it has so far."""

    loaded: LoadedModel
    precision: str
    seed: int
    samples: int
    batch_size: int
    scores: list[scoring.ImageScore] = field(default_factory=list)
    skipped: list[scoring.Skipped] = field(default_factory=list)
    interrupted: str | None = None  # why the run is incomplete

    def settings(self) -> dict:
        return {"model": self.loaded.name, "model_sha256": self.loaded.sha256(), "jetcli_version": __version__,
                "precision": self.precision, "device": str(device_of(self.loaded.model)), "seed": self.seed,
                "samples": self.samples, "batch_size": self.batch_size}

    def csv_row(self, score: scoring.ImageScore) -> list:
        settings = self.settings()
        return [score.path, score.height, score.width, score.tiles, score.padded_pixels, f"{score.bpd:.6f}",
                f"{score.png_bpd:.6f}", *(settings[k] for k in CSV_FIELDS[7:])]


def report(run: Run, files: int, as_json: bool, as_csv: bool) -> None:
    """Print the results (complete or not), list the skipped files, and exit with the status that says
    which (see the command's help)."""
    if not run.scores and not run.interrupted:
        raise ImageError(f"none of the {files} files could be scored ({len(run.skipped)} skipped)")
    summary = scoring.summarize(run.scores) if run.scores else None
    if as_json:
        write_stdout(json.dumps({**run.settings(), "complete": run.interrupted is None,
                                 "images": [asdict(s) for s in run.scores],
                                 "skipped": [{"path": s.path, "reason": s.reason} for s in run.skipped],
                                 **summary_fields(summary)}, indent=2) + "\n")
    elif as_csv:
        if run.interrupted:
            write_stdout(f"# incomplete: {run.interrupted}\n")
    elif summary is not None:
        with writing_stdout():
            print_table(run, summary)
    if run.skipped:
        say(f"skipped {len(run.skipped)} of {files} files:")
        for skipped in run.skipped:
            say(f"  {skipped.reason}")
    if run.interrupted:
        say(f"{run.interrupted}: the results above are incomplete")
        raise typer.Exit(EXIT_INTERRUPTED)
    if run.skipped:
        raise typer.Exit(EXIT_SKIPPED)


def summary_fields(summary: scoring.Summary | None) -> dict:
    if summary is None:
        return {"mean_bpd": None, "sem": None, "png_bpd": None, "tiles": 0, "pixels": 0, "padded_pixels": 0}
    return {"mean_bpd": summary.mean_bpd, "sem": summary.sem, "png_bpd": summary.png_bpd, "tiles": summary.tiles,
            "pixels": summary.pixels, "padded_pixels": summary.padded_pixels}


def csv_line(values) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def print_table(run: Run, summary: scoring.Summary) -> None:
    title = f"bits per dim under {escape(run.loaded.name)}, {run.precision}"
    table = Table(title=title + (f" ({run.interrupted}: incomplete)" if run.interrupted else ""))
    table.add_column("image", overflow="fold")
    for name in ("size", "tiles", "padding", "bpd", "PNG bpd"):
        table.add_column(name, justify="right")
    for s in run.scores:
        table.add_row(escape(s.path), f"{s.height}x{s.width}", str(s.tiles), padding(s.padded_pixels, s.height * s.width),
                      f"{s.bpd:.4f}", f"{s.png_bpd:.4f}")
    out.print(table)
    n = summary.images
    sem = "n/a" if summary.sem is None else f"{summary.sem:.4f}"
    out.print(f"mean {summary.mean_bpd:.4f} ± {sem} bpd (standard error) over {n} image{'s' * (n > 1)} "
              f"({summary.tiles} tiles, {padding(summary.padded_pixels, summary.pixels)} padding); "
              f"PNG {summary.png_bpd:.4f}", highlight=False, soft_wrap=True)


def padding(padded: int, pixels: int) -> str:
    """Padding pixels, as a share of the image's own."""
    return f"{100 * padded / pixels:.1f}%"
