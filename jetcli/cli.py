"""The `jet` command line: parse, call into the library, print. User errors are one line, exit 2."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from jetcli import __version__
from jetcli.checkpoints import CheckpointError
from jetcli.config import PRESETS, JetConfig, preset
from jetcli.data import DataError
from jetcli.images import ImageError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Jet normalizing flow: bits/dim, samples and lossless latents from the command line.")
err = Console(stderr=True)
STATE = {"debug": False}

# Errors that are the user's input, not our bug: reported as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, ImageError, DataError, OSError)


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
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


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


def resolve_device(spec: str) -> torch.device:
    """auto = the first CUDA device when there is one, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    return device


def progress_bar(*fields: str) -> Progress:
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}")]
    columns += [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
    return Progress(*columns, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=err, transient=False)


# --------------------------------------------------------------------------- train
@app.command()
@user_errors
def train(
    data: str = typer.Argument(..., help="Images: a folder (recursive), a .npy/.npz of uint8 (N,H,W,3), "
                                         "or FILE.npz:KEY."),
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
    batch_size: int = typer.Option(64, help="Global batch size (images per step)."),
    grad_accum: int = typer.Option(1, help="Split each batch into this many micro-batches."),
    lr: float = typer.Option(3e-4, help="Peak learning rate."),
    weight_decay: float = typer.Option(1e-5, help="Decoupled weight decay, big_vision semantics."),
    warmup: float = typer.Option(0.1, help="Warmup as a fraction of the steps; cosine decay after."),
    clip: float = typer.Option(1.0, help="Gradient clipping (global norm)."),
    ema: Optional[float] = typer.Option(None, help="Keep an EMA of the weights with this decay (e.g. 0.999)."),
    precision: str = typer.Option("fp32", help="fp32, or fast (bf16 autocast on the ViTs)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    seed: int = typer.Option(0, help="Seed for init, data order, crops, flips and noise."),
    eval_every: int = typer.Option(500, help="Validate every N steps."),
    ckpt_every: int = typer.Option(500, help="Checkpoint every N steps (and on Ctrl-C/SIGTERM)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
):
    """Train a Jet on images by maximum likelihood.

    Example: `jet train ../shared/data/cifar10_lossless_subset.npz:train_images --val
    ../shared/data/cifar10_lossless_subset.npz:test_images --steps 5000 -o runs/cifar`
    """
    from jetcli import train as training
    from jetcli.data import ImageSet, load_images
    from jetcli.images import grid, save_png
    from jetcli.sampling import sample

    train_set = ImageSet(load_images(data), crop=crop)
    if val is not None:
        val_set = ImageSet(load_images(val), crop=crop, flip=False)
    elif val_fraction > 0:
        train_set, val_set = train_set.split(val_fraction, seed)
    else:
        val_set = None
    overrides = {k: v for k, v in dict(couplings=couplings, block_depth=block_depth, width=width, heads=heads,
                                       patch_size=patch_size).items() if v is not None}
    if kinds:
        overrides["kinds"] = tuple(k.strip() for k in kinds.split(","))
    try:
        config = preset(preset_name).replace(image_size=train_set.image_size, **overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if val_set is not None and val_set.image_size != config.image_size:
        raise UsageError(f"validation images are {val_set.image_size}, training images {config.image_size}")
    if (out / training.STATE_NAME).exists() and not resume:
        raise UsageError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    opts = training.TrainOptions(
        out=out, steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay,
        warmup=warmup, clip=clip, ema=ema, precision=precision, seed=seed, eval_every=eval_every,
        ckpt_every=ckpt_every, device=str(resolve_device(device)), compile=compile,
        extra={"data": data, "val": val, "crop": crop, "command": " ".join(sys.argv)})
    trainer = training.Trainer(config, train_set, val_set, opts)
    if resume:
        trainer.resume()
    err.print(f"Jet {trainer.model.num_params() / 1e6:.2f}M params, {config.couplings} couplings, "
              f"{len(train_set)} training images of {config.image_size[0]}x{config.image_size[1]}"
              + (f", {len(val_set)} validation" if val_set is not None else "") + f", device {opts.device}")

    with progress_bar("bpd", "val", "lr", "img_s") as bar:
        task = bar.add_task("train", total=steps, completed=trainer.step, bpd="-", val="-", lr="-", img_s="-")
        def show(r):
            fields = {"bpd": f"{r['bpd']:.4f}", "lr": f"{r['lr']:.2e}"}
            if "img_per_s" in r:
                fields["img_s"] = f"{r['img_per_s']:.1f}"
            if "val_bpd" in r:
                fields["val"] = f"{r['val_bpd']:.4f}"
            bar.update(task, completed=r["step"], **fields)
        trainer.run(progress=show)

    records = training.read_metrics(out)
    training.plot_curves(records, out / "curves.png")
    if trainer.step >= steps:
        samples = sample(trainer.model, 64, temperature=1.0, generator=torch.Generator().manual_seed(seed))
        save_png(grid(samples), out / "samples.png")
    vals = [r["val_bpd"] for r in records if "val_bpd" in r]
    err.print(f"step {trainer.step}/{steps}; weights in {out}" + (f"; val bpd {vals[-1]:.4f}" if vals else ""))
    if trainer.stop_requested:
        raise typer.Exit(130)
