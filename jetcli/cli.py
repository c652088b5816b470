"""The `jet` command line: parse, call into the library, print. User errors are one line, exit 2."""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from typer.core import TyperGroup

from jetcli import __version__, checkpoints
from jetcli.checkpoints import CheckpointError
from jetcli.codec import CodecError
from jetcli.config import PRESETS, JetConfig, preset
from jetcli.data import DataError
from jetcli.fileio import atomic_write, one_line
from jetcli.hub import HubError, LoadedModel
from jetcli.images import IMAGE_SUFFIXES, ImageError
from jetcli.precision import CHOICES, compute_context, resolve

err = Console(stderr=True)
out = Console()
STATE = {"debug": False}


# click's own exception base: typer >= 0.2x vendors its own click, older ones use click's.
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class OneLineUsageErrors(TyperGroup):
    """click reports its own errors (an unknown option, a value that does not parse or is out of range)
    as a box under the usage text; jet reports them like every other user error: one line, exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # an Exit's code, else None
        except CLICK_ERROR as e:
            if type(e).__name__ != "NoArgsIsHelpError":  # `jet` alone: the help is printed already
                ctx = getattr(e, "ctx", None)
                hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
                err.print(f"[bold red]error:[/] {escape(e.format_message())}{hint}", highlight=False,
                          soft_wrap=True)
            sys.exit(e.exit_code)
        except typer.Abort:  # end of input at a prompt
            err.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Jet normalizing flow: bits/dim, samples and lossless latents from the command line.")

# Errors that are the user's input, not our bug: reported as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, HubError, ImageError, CodecError, DataError,
                                                  OSError)


class UsageError(ValueError):
    """A bad combination of options or arguments."""


def user_errors(fn):
    """Report user errors as one red line and exit 2; `jet --debug ...` shows the traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS + (UsageError,) as e:
            if STATE["debug"]:
                raise
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings (a damaged image's skipped metadata, ...) as one line each, without source excerpts."""
    err.print(f"[yellow]warning:[/] {escape(one_line(message, None))}", highlight=False, soft_wrap=True)


def version_callback(value: bool):
    if value:
        typer.echo(f"jet {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=version_callback, is_eager=True,
                                           help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
):
    STATE["debug"] = debug
    if not debug:
        warnings.showwarning = one_line_warning


def resolve_device(spec: str) -> torch.device:
    """auto = the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return device


def progress_bar(*fields: str, disable: bool = False) -> Progress:
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}")]
    columns += [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
    return Progress(*columns, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=err, transient=False, disable=disable)


# --------------------------------------------------------------------------- train
MODEL_FLAGS = ("preset_name", "couplings", "block_depth", "width", "heads", "patch_size", "kinds")


@app.command()
@user_errors
def train(
    ctx: typer.Context,
    data: Optional[str] = typer.Argument(
        None, help="Training images: a folder (image files, searched recursively; or CIFAR-10 / downsampled "
                   "ImageNet batches), a .npy/.npz of uint8 (N,H,W,3) or FILE.npz:KEY, or a CIFAR-10 batch "
                   "file. With --resume: the run's data."),
    out: Path = typer.Option(Path("runs/jet"), "--out", "-o", help="Run folder: checkpoints, metrics, plots."),
    preset_name: str = typer.Option("small-32", "--preset", help=f"Model preset: {', '.join(PRESETS)}."),
    couplings: Optional[int] = typer.Option(None, help="Number of couplings (overrides the preset)."),
    block_depth: Optional[int] = typer.Option(None, help="ViT blocks per coupling."),
    width: Optional[int] = typer.Option(None, help="ViT width."),
    heads: Optional[int] = typer.Option(None, help="Attention heads."),
    patch_size: Optional[int] = typer.Option(None, help="Patch size in pixels."),
    kinds: Optional[str] = typer.Option(None, help="Coupling pattern, e.g. channels,channels,spatial."),
    crop: Optional[int] = typer.Option(None, help="Train on random SxS crops (with flips) of larger images."),
    val: Optional[str] = typer.Option(None, help="Validation images (same forms as DATA)."),
    val_fraction: float = typer.Option(0.0, help="Hold out this fraction of whole images for validation."),
    steps: int = typer.Option(1000, help="Optimiser steps."),
    batch_size: int = typer.Option(64, help="Global batch size (images per step, over all processes)."),
    grad_accum: int = typer.Option(1, help="Split each batch into this many micro-batches."),
    lr: float = typer.Option(3e-4, help="Peak learning rate."),
    weight_decay: float = typer.Option(1e-5, help="Decoupled weight decay with big_vision semantics: "
                                                  "param -= wd * schedule * param, independent of lr."),
    warmup: float = typer.Option(0.1, help="Warmup as a fraction of the steps; cosine decay after."),
    clip: float = typer.Option(1.0, help="Gradient clipping (global norm)."),
    ema: Optional[float] = typer.Option(None, help="Keep an EMA of the weights with this decay (e.g. 0.999), "
                                                   "saved in OUT/ema."),
    precision: str = typer.Option("auto", help="auto (fast where bf16 runs natively: CUDA GPUs from Ampere on, CPUs "
                                               "with AVX512-BF16 or AMX; fp32 elsewhere), fp32, or fast (bf16 "
                                               "autocast on the ViTs; splits, logdet and loss stay float32)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    seed: int = typer.Option(0, help="Seed for init, data order, crops, flips and noise."),
    eval_every: int = typer.Option(500, help="Validate every N steps."),
    ckpt_every: int = typer.Option(500, help="Checkpoint every N steps (and on Ctrl-C/SIGTERM)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint; "
                                                        "options not given again are the run's."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N (under torchrun: one GPU per process)."),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="OWNER/NAME",
                                              help="At the end, upload weights, config.json and a model card "
                                                   "to this Hugging Face repo."),
):
    """Train a Jet on images by maximum likelihood, with big_vision's recipe.

    Ctrl-C or SIGTERM saves a checkpoint and stops; `--resume` continues exactly where it stopped.
    Under `torchrun --nproc_per_node=N` it trains with DistributedDataParallel (nccl on GPUs, gloo on CPU).

    Example: `jet train ../shared/data/cifar10_lossless_subset.npz:train_images --val
    ../shared/data/cifar10_lossless_subset.npz:test_images --steps 5000 -o runs/cifar`
    """
    import contextlib

    from jetcli import train as training
    from jetcli.data import load_datasets
    from jetcli.images import grid, save_png
    from jetcli.sampling import sample

    args = dict(ctx.params)
    # Compared by name: typer may bring its own copy of click's ParameterSource.
    given = {k for k in args if getattr(ctx.get_parameter_source(k), "name", None) == "COMMANDLINE"}
    if push_to_hub:
        from jetcli import publish
        try:
            publish.check_destination(push_to_hub)
        except ValueError as e:
            raise UsageError(str(e)) from None
    saved_config = None
    if resume:
        try:
            saved_config, args = training.resume_arguments(out, args, given)
        except ValueError as e:  # a changed setting, or a state that cannot be read
            raise UsageError(str(e)) from None
    elif data is None:
        raise UsageError("missing DATA: the training images (or --resume to continue the run in --out)")
    elif (out / training.STATE_NAME).exists():
        raise UsageError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    elif out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder")
    elif taken := [name for name in (checkpoints.WEIGHTS_NAME, checkpoints.CONFIG_NAME, training.EMA_DIR,
                                     "curves.png", "samples.png") if (out / name).exists()]:
        raise UsageError(f"{out} holds {', '.join(taken)}, which training would overwrite: choose another --out")
    if args["precision"] not in CHOICES:
        raise UsageError(f"--precision {args['precision']!r}: expected {', '.join(CHOICES)}")

    train_set, val_set = load_datasets(args["data"], args["val"], args["val_fraction"], args["crop"], args["seed"])
    overrides = {k: args[k] for k in ("couplings", "block_depth", "width", "heads", "patch_size")
                 if args[k] is not None}
    if args["kinds"]:
        overrides["kinds"] = tuple(k.strip() for k in args["kinds"].split(","))
    try:
        config = preset(args["preset_name"]).replace(image_size=train_set.image_size, **overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if saved_config is not None:
        if given & set(MODEL_FLAGS) and config != saved_config:
            raise UsageError("a resumed run keeps its model: drop the model options, or choose another --out")
        if saved_config.image_size != train_set.image_size:
            raise UsageError(f"the run trained on {saved_config.image_size} images, the data gives "
                             f"{train_set.image_size}")
        config = saved_config

    processes, run_device = training.init_distributed(resolve_device(args["device"]))
    opts = training.TrainOptions(
        out=out, steps=args["steps"], batch_size=args["batch_size"], grad_accum=args["grad_accum"], lr=args["lr"],
        weight_decay=args["weight_decay"], warmup=args["warmup"], clip=args["clip"], ema=args["ema"],
        precision=resolve(args["precision"], run_device), seed=args["seed"],
        eval_every=args["eval_every"], ckpt_every=args["ckpt_every"], device=str(run_device),
        compile=args["compile"],
        extra={**{k: args[k] for k in training.DATA_KEYS}, "train_images": len(train_set),
               "val_images": len(val_set) if val_set is not None else 0, "command": " ".join(["jet", *sys.argv[1:]])})
    try:
        trainer = training.Trainer(config, train_set, val_set, opts, processes)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if resume:
        trainer.resume()
    if processes.main:
        err.print(f"Jet {trainer.model.num_params() / 1e6:.2f}M params, {config.couplings} couplings, "
                  f"{len(train_set)} training images of {config.image_size[0]}x{config.image_size[1]}"
                  + (f", {len(val_set)} validation" if val_set is not None else "")
                  + f", {opts.device}, {opts.precision}"
                  + (f", {processes.world} processes" if processes.world > 1 else "")
                  + (f"; resuming at step {trainer.step}" if resume else ""))

    show = None
    bar = progress_bar("bpd", "val", "lr", "img_s") if processes.main else contextlib.nullcontext()
    with bar:
        if processes.main:
            task = bar.add_task("train", total=opts.steps, completed=trainer.step, bpd="-", val="-", lr="-",
                                img_s="-")

            def show(r):
                fields = {"bpd": f"{r['bpd']:.4f}", "lr": f"{r['lr']:.2e}"}
                if "img_per_s" in r:
                    fields["img_s"] = f"{r['img_per_s']:.1f}"
                if "val_bpd" in r:
                    fields["val"] = f"{r['val_bpd']:.4f}"
                bar.update(task, completed=r["step"], **fields)
        trainer.run(progress=show)

    finished = trainer.step >= opts.steps
    if processes.main:
        records = training.read_metrics(out)
        training.plot_curves(records, out / "curves.png")
        if finished:
            samples = sample(trainer.model, 64, generator=torch.Generator().manual_seed(opts.seed))
            zoom = max(1, 64 // config.image_size[0])  # nearest-neighbour: small images stay visible
            save_png(grid(samples.repeat(zoom, axis=1).repeat(zoom, axis=2)), out / "samples.png")
        vals = [r["val_bpd"] for r in records if "val_bpd" in r]
        err.print(f"step {trainer.step}/{opts.steps}; weights in {out}" + (f"; val bpd {vals[-1]:.4f}" if vals else "")
                  + ("" if finished else "; stopped: continue with --resume"))
        if finished and push_to_hub:
            try:
                url = publish.push(out, push_to_hub)
            except Exception as e:  # network, auth, quota...: the run is safe on disk, say how to retry
                raise UsageError(f"upload to {push_to_hub} failed ({e}); retry with: jet train --resume -o {out} "
                                 f"--push-to-hub {push_to_hub}") from None
            err.print(f"uploaded to {url}")
    training.finish_distributed()
    if not finished:
        raise typer.Exit(128 + (trainer.stop_signal or 15))


# --------------------------------------------------------------------------- shared by the commands below
ModelOption = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="PATH|OWNER/NAME[@REV]", show_default=False,
    help="A checkpoint folder or file (jetcli, jet-pytorch .safetensors, big_vision .npz) or a Hugging Face "
         "Hub repo owner/name[@revision] (cached; honours HF_HOME, HF_TOKEN, HF_HUB_OFFLINE). "
         "Default: the model shipped with jetcli.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")]
Precision = Enum("Precision", {p: p for p in CHOICES}, type=str)
PrecisionOption = Annotated[Precision, typer.Option(
    "--precision",
    help="fp32; fast: the couplings' ViTs under bf16 autocast (faster, slightly different numbers); auto: fast "
         "where bf16 runs natively (CUDA GPUs from Ampere on, CPUs with AVX512-BF16 or AMX), else fp32.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the random draws: same seed, options and "
                                                        "device give the same result.")]
ForceOption = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs (never an input).")]


def open_model(spec: str | None, device_spec: str) -> LoadedModel:
    """Resolve --device and --model, move the model there and say what runs where."""
    from jetcli.hub import load_model

    device = resolve_device(device_spec)
    loaded = load_model(spec)
    config = loaded.model.config
    if config.channels != 3:
        raise UsageError(f"{loaded.name}: a {config.channels}-channel model; jet reads and writes RGB images")
    loaded.model.to(device)
    err.print(f"model {loaded.name} ({loaded.format}, {loaded.model.num_params() / 1e6:.2f}M params, "
              f"{config.image_size[0]}x{config.image_size[1]} input) on {device}", highlight=False, soft_wrap=True)
    return loaded


def read_input(source: str) -> bytes:
    """The bytes of a file, or of stdin for "-"."""
    if source == "-":
        stream = typer.get_binary_stream("stdin")
        if stream.isatty():
            raise UsageError("stdin is a terminal: pass a file, or pipe one in")
        return stream.read()
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"{source}: " + ("is a folder, not a file" if path.is_dir() else "no such file"))
    return path.read_bytes()


def plan_outputs(inputs: list[str], out: str | None, suffix: str, force: bool) -> list[tuple[str, Path | None]]:
    """(input, output) pairs, None meaning stdout, checked before any work so that a refusal leaves
    everything as it was: several inputs need a folder, stdout must not be a terminal, an input is
    never overwritten and an existing output only with --force."""
    if inputs.count("-") > 1:
        raise UsageError("stdin (-) can be read only once")
    if out is None or out == "-":
        if len(inputs) > 1:
            raise UsageError(f"{len(inputs)} inputs: pass -o DIR to write one {suffix} file for each")
        if typer.get_binary_stream("stdout").isatty():
            raise UsageError("refusing to write binary data to a terminal: redirect it (> FILE) or pass -o FILE")
        return [(inputs[0], None)]
    folder = Path(out)
    if len(inputs) > 1 or folder.is_dir() or out.endswith(("/", os.sep)):
        if "-" in inputs:
            raise UsageError("an input from stdin has no name: pass -o FILE to write it")
        pairs = [(source, folder / (Path(source).stem + suffix)) for source in inputs]
        seen = {}
        for source, dest in pairs:
            if dest in seen:
                raise UsageError(f"{seen[dest]} and {source} would both write {dest}")
            seen[dest] = source
    else:
        if folder.suffix.lower() != suffix:
            raise UsageError(f"-o {out}: the output is a {suffix} file; name it so (or pass a folder)")
        pairs = [(inputs[0], folder)]
    for _, dest in pairs:
        check_output(dest, inputs, force)
    return pairs


def check_output(dest: Path, inputs: list[str], force: bool) -> None:
    if any(source != "-" and Path(source).exists() and dest.exists() and dest.samefile(source)
           for source in inputs):
        raise UsageError(f"{dest}: is an input; refusing to overwrite it")
    if dest.is_dir():
        raise UsageError(f"{dest}: is a folder")
    folder = next(p for p in dest.absolute().parents if p.exists())
    if not folder.is_dir():
        raise UsageError(f"{dest}: cannot be written, {folder} is a file, not a folder")
    if dest.exists() and not force:
        raise UsageError(f"{dest}: exists; pass --force to overwrite it")


def write_output(dest: Path | None, data: bytes) -> str:
    """Write atomically to a file, or to stdout for None; returns where, in words."""
    if dest is None:
        stream = typer.get_binary_stream("stdout")
        stream.write(data)
        stream.flush()
        return "stdout"
    try:
        atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))
    except OSError as e:
        raise UsageError(f"{dest}: cannot be written ({e.strerror or e})") from None
    return str(dest)


def source_name(source: str) -> str:
    return "<stdin>" if source == "-" else source


# --------------------------------------------------------------------------- bpd
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
    from jetcli.images import covered, png_bytes, probe, read_rgb, tiles

    if as_json and as_csv:
        raise UsageError("--json and --csv: choose one")
    files = gather_images(paths)
    loaded = open_model(model, device)
    run_precision = resolve(precision.value, next(loaded.model.parameters()).device)
    size = loaded.model.config.image_size
    counts = [tile_count(path, probe(path), size) for path in files]  # headers only: refuse before working
    generator = torch.Generator().manual_seed(seed)
    rows, tile_bpds, png_bits, png_dims = [], [], 0, 0
    with progress_bar() as bar:
        task = bar.add_task("bpd", total=sum(counts))
        for path, count in zip(files, counts):
            image = read_rgb(path)
            kept = covered(image, size)
            bits = []
            for batch in np.array_split(tiles(image, size), math.ceil(count / batch_size)):
                bits.append(tile_bits(loaded.model, batch, samples, generator, run_precision))
                bar.advance(task, len(batch))
            bits = np.concatenate(bits)
            png = 8 * len(png_bytes(kept, optimize=True))
            rows.append({"path": str(path), "bpd": float(bits.mean()), "png_bpd": png / kept.size, "tiles": count})
            tile_bpds.append(bits)
            png_bits, png_dims = png_bits + png, png_dims + kept.size
    everything = np.concatenate(tile_bpds)
    sem = float(everything.std(ddof=1) / math.sqrt(len(everything))) if len(everything) > 1 else None
    result = {"model": loaded.name, "precision": run_precision, "images": rows,
              "mean_bpd": float(everything.mean()), "sem": sem}
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    elif as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["path", "tiles", "bpd", "png_bpd"])
        writer.writerows([r["path"], r["tiles"], f"{r['bpd']:.6f}", f"{r['png_bpd']:.6f}"] for r in rows)
    else:
        table = Table(title=f"bits per dim under {escape(loaded.name)}, {run_precision}")
        table.add_column("image", overflow="fold")
        for name in ("tiles", "bpd", "PNG bpd"):
            table.add_column(name, justify="right")
        for r in rows:
            table.add_row(escape(r["path"]), str(r["tiles"]), f"{r['bpd']:.4f}", f"{r['png_bpd']:.4f}")
        out.print(table)
        out.print(f"mean {result['mean_bpd']:.4f} ± {'n/a' if sem is None else f'{sem:.4f}'} bpd (standard "
                  f"error) over {len(everything)} tiles of {len(rows)} image{'s' * (len(rows) > 1)}; PNG "
                  f"{png_bits / png_dims:.4f}", highlight=False, soft_wrap=True)


def gather_images(paths: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for image suffixes, "-" read as a list of paths."""
    if paths.count("-") > 1:
        raise UsageError("stdin (-) can be read only once")
    found = []
    for spec in paths:
        if spec == "-":
            found += gather_images([line.strip() for line in os.fsdecode(read_input("-")).splitlines() if line.strip()])
        elif Path(spec).is_dir():
            images = sorted(p for p in Path(spec).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not images:
                raise ImageError(f"{spec}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            found += images
        else:
            found.append(Path(spec))
    if not found:
        raise UsageError("no images given")
    return found


def tile_count(path: Path, image_size: tuple[int, int], tile: tuple[int, int]) -> int:
    rows, cols = image_size[0] // tile[0], image_size[1] // tile[1]
    if not rows or not cols:
        raise ImageError(f"{path}: {image_size[0]}x{image_size[1]} (height x width) is smaller than the "
                         f"model's {tile[0]}x{tile[1]} input")
    return rows * cols


@torch.inference_mode()
def tile_bits(model, batch: np.ndarray, samples: int, generator: torch.Generator, precision: str) -> np.ndarray:
    """Per-tile bpd of uint8 tiles (n, h, w, 3)."""
    from jetcli.likelihood import image_bits

    device = next(model.parameters()).device
    with compute_context(device, precision):
        bits = image_bits(model, torch.from_numpy(np.ascontiguousarray(batch)).to(device), samples, generator)
    return bits.bpd.double().cpu().numpy()


# --------------------------------------------------------------------------- sample
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
    from jetcli.images import grid, png_bytes
    from jetcli.sampling import sample as draw

    if not math.isfinite(temp):
        raise UsageError(f"--temp {temp}: must be a finite number")
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        digits = max(3, len(str(num - 1)))
        dests = [Path(output) / f"sample_{i:0{digits}d}.png" for i in range(num)]
    elif Path(output).suffix.lower() == ".png":
        dests = [Path(output)]
    else:
        raise UsageError(f"-o {output}: give a .png file for a grid, or a folder (ending in /) for one PNG each")
    for dest in dests:
        check_output(dest, [], force)
    loaded = open_model(model, device)
    run_precision = resolve(precision.value, next(loaded.model.parameters()).device)
    with progress_bar() as bar:
        task = bar.add_task("sample", total=num)
        images = draw(loaded.model, num, temperature=temp, generator=torch.Generator().manual_seed(seed),
                      batch_size=batch_size, precision=run_precision, on_batch=lambda b: bar.advance(task, b))
    arrays = [grid(images)] if len(dests) == 1 else list(images)
    for dest, array in zip(dests, arrays):
        write_output(dest, png_bytes(array))
    err.print(f"wrote {num} samples (seed {seed}, temperature {temp:g}, {run_precision}) to {output}",
              highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------- encode / decode
InputsArgument = Annotated[Optional[list[str]], typer.Argument(show_default=False, help=(
    "Input files; - or nothing reads one from stdin."))]


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
    from jetcli import codec
    from jetcli.images import read_rgb

    def encode_one(model, data: bytes, name: str) -> tuple[bytes, str]:
        pixels = read_rgb(data, name=name)
        result = codec.encode(model, pixels, verify=verify)
        buffer = io.BytesIO()
        np.save(buffer, result.latent, allow_pickle=False)
        check = ("not verified (--no-verify)" if not verify else
                 f"round trip verified, worst pixel error {result.margin:.2g} px before rounding")
        if result.latent.dtype == np.float64:
            check += f" (float32 missed by {result.float32_margin:.2g} px)"
        return buffer.getvalue(), f"{pixels.shape[0]}x{pixels.shape[1]}, {result.latent.dtype} latent, {check}"

    convert_each(inputs, output, ".npy", force, model, device, "encode", encode_one)


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
    from jetcli import codec
    from jetcli.images import png_bytes

    def decode_one(model, data: bytes, name: str) -> tuple[bytes, str]:
        result = codec.decode(model, read_latent(data))
        return png_bytes(result.pixels), (f"{result.pixels.shape[0]}x{result.pixels.shape[1]} image (decoded "
                                          f"values within {result.margin:.2g} px of the 8-bit grid)")

    convert_each(inputs, output, ".png", force, model, device, "decode", decode_one)


def convert_each(inputs: list[str] | None, output: str | None, suffix: str, force: bool, model: str | None,
                 device: str, what: str, convert) -> None:
    """encode's and decode's loop: every input (stdin when none) through `convert(model, bytes, name) ->
    (output bytes, summary)` to its output file, a line on stderr for each. The outputs are all checked
    before any work; the codec's refusals name the input."""
    inputs = inputs or ["-"]
    pairs = plan_outputs(inputs, output, suffix, force)
    loaded = open_model(model, device)
    with progress_bar(disable=len(pairs) == 1) as bar:
        for source, dest in bar.track(pairs, description=what):
            name = source_name(source)
            try:
                data, summary = convert(loaded.model, read_input(source), name)
            except CodecError as e:
                raise CodecError(f"{name}: {e}") from None
            where = write_output(dest, data)
            err.print(f"{name} -> {where}: {summary}", highlight=False, soft_wrap=True)


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


# --------------------------------------------------------------------------- info
@app.command()
@user_errors
def info(
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
):
    """Describe a model: config, parameter count, input size, where its weights came from, their sha256.

    The model is resolved exactly as the other commands resolve `--model`; the sha256 is that of the
    weights file itself, so copies can be compared with `sha256sum`.

    **Examples**

        jet info
        jet info --model runs/cifar --json
        jet info --model btrude/jet_imagenet64x64_200m
    """
    from jetcli.hub import load_model

    loaded = load_model(model)
    config = loaded.model.config
    h, w = config.image_size
    result = {"model": loaded.name, "origin": loaded.origin, "format": loaded.format,
              "weights": str(loaded.weights), "sha256": loaded.sha256(), "parameters": loaded.model.num_params(),
              "input_size": [h, w, config.channels], "dims": config.dims, "config": config.to_dict()}
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    lines = {"model": loaded.name, "from": loaded.origin, "format": loaded.format, "weights": loaded.weights,
             "sha256": result["sha256"], "parameters": f"{result['parameters']:,}",
             "input": f"{h}x{w}x{config.channels} ({config.dims} dims)"}
    lines.update({f"  {k}": ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in result["config"].items()})
    for key, value in lines.items():
        out.print(f"[bold]{key:<15}[/] {escape(str(value))}", highlight=False, soft_wrap=True)
