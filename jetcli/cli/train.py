"""`jet train`: train a Jet on images (jetcli.train does the work; this parses and reports)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Optional

import typer

from jetcli import publish
from jetcli.cli.errors import UsageError, user_errors
from jetcli.cli.output import err, progress_bar
from jetcli.cli.root import app
from jetcli.config import ALIASES, PRESETS, describe_preset
from jetcli.fileio import WriteError
from jetcli.train import Run, RunSettings, finish_distributed, start_run, write_pictures
from jetcli.train.state import checkpoint_step

DEFAULT = RunSettings(data=None)


@app.command()
@user_errors
def train(  # long only by its options: the body is parse, start_run, report
    ctx: typer.Context,
    data: Optional[str] = typer.Argument(
        None, help="Training images: a folder (image files, searched recursively; or CIFAR-10 / downsampled "
                   "ImageNet batches), a .npy/.npz of uint8 (N,H,W,3) or FILE.npz:KEY, or a CIFAR-10 batch "
                   "file. With --resume: the run's data."),
    out: Path = typer.Option(DEFAULT.out, "--out", "-o", help="Run folder: checkpoints, metrics, plots."),
    preset_name: str = typer.Option(DEFAULT.preset_name, "--preset", help=(
        "Model preset: " + "; ".join(map(describe_preset, PRESETS)) + ". Old names: "
        + ", ".join(f"{old} = {new}" for old, new in ALIASES.items()) + ". The paper's presets (imagenet*, "
        "ablation-64, jet-pytorch-imagenet64) keep 256 patches at other image sizes (e.g. patch 2 on 32x32).")),
    couplings: Optional[int] = typer.Option(None, help="Number of couplings (overrides the preset)."),
    block_depth: Optional[int] = typer.Option(None, help="ViT blocks per coupling."),
    width: Optional[int] = typer.Option(None, help="ViT width."),
    heads: Optional[int] = typer.Option(None, help="Attention heads."),
    patch_size: Optional[int] = typer.Option(None, help="Patch size in pixels."),
    kinds: Optional[str] = typer.Option(None, help="Coupling pattern, e.g. channels,channels,spatial."),
    spatial_patterns: Optional[str] = typer.Option(None, help="Spatial couplings' patterns, cycled, e.g. "
                                                   "checkerboard,checkerboard-inv (default: the paper's six). "
                                                   "PATTERN-shift pairs each token with its other neighbour."),
    crop: Optional[int] = typer.Option(None, help="Train on random SxS crops of larger images."),
    flip: bool = typer.Option(False, "--flip", help="Mirror training images at random (half of them). Off by "
                              "default: the paper trains with no data augmentation."),
    val: Optional[str] = typer.Option(None, help="Validation images (same forms as DATA)."),
    val_fraction: float = typer.Option(DEFAULT.val_fraction,
                                       help="Hold out this fraction of whole images for validation."),
    steps: int = typer.Option(DEFAULT.steps, help="Optimiser steps."),
    epochs: Optional[float] = typer.Option(None, help="Instead of --steps: passes over the training images "
                                           "(steps = epochs x images / batch size, rounded; the paper: 200 on "
                                           "ImageNet-1k, 50 on ImageNet-21k)."),
    batch_size: int = typer.Option(DEFAULT.batch_size, help="Global batch size (images per step, over all processes)."),
    grad_accum: int = typer.Option(DEFAULT.grad_accum, help="Split each batch into this many micro-batches."),
    lr: float = typer.Option(DEFAULT.lr, help="Peak learning rate."),
    weight_decay: float = typer.Option(DEFAULT.weight_decay, help="Decoupled weight decay with big_vision "
                                       "semantics: param -= wd * schedule * param, independent of lr."),
    warmup: float = typer.Option(DEFAULT.warmup, help="Warmup as a fraction of the steps; cosine decay after."),
    clip: float = typer.Option(DEFAULT.clip, help="Gradient clipping (global norm)."),
    ema: Optional[float] = typer.Option(None, help="Keep an EMA of the weights with this decay (e.g. 0.999), "
                                                   "saved in OUT/ema."),
    precision: str = typer.Option(DEFAULT.precision, help="auto (fast where bf16 runs natively: CUDA GPUs from "
                                  "Ampere on, CPUs with AVX512-BF16 or AMX; fp32 elsewhere), fp32, or fast (bf16 "
                                  "autocast on the ViTs; splits, logdet and loss stay float32)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    shard: bool = typer.Option(False, "--shard", help="Under torchrun: shard weights, gradients and Adam state "
                               "over the processes (FSDP, a coupling per unit) instead of copying the model to "
                               "each (DDP), for models larger than one device. Checkpoints are the same."),
    seed: int = typer.Option(DEFAULT.seed, help="Seed for init, data order, crops, flips and noise."),
    eval_every: int = typer.Option(DEFAULT.eval_every, help="Validate every N steps."),
    ckpt_every: int = typer.Option(DEFAULT.ckpt_every, help="Checkpoint every N steps (and on Ctrl-C/SIGTERM)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint; "
                                                        "options not given again are the run's."),
    device: str = typer.Option(DEFAULT.device, help="auto, cpu, cuda or cuda:N (under torchrun: each process "
                                                    "its own GPU, that of its local rank, or the one it sees)."),
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
    settings = RunSettings(**ctx.params)
    # Compared by name: typer may bring its own copy of click's ParameterSource.
    given = {k for k in ctx.params if getattr(ctx.get_parameter_source(k), "name", None) == "COMMANDLINE"}
    if push_to_hub:
        publish.check_destination(push_to_hub)
    if not resume and data is None:
        raise UsageError("missing DATA: the training images (or --resume to continue the run in --out)")
    run = start_run(settings, given, command=" ".join(["jet", *sys.argv[1:]]))
    if run.processes.main:
        err.print(describe(run))
    with progress_reports(run) as report, write_faults_reported(run):
        run.trainer.run(progress=report)
    finish_distributed(run.trainer.device)  # all together, before rank 0's pictures and upload
    if run.processes.main:
        finish(run, push_to_hub)
    if not run.finished:
        raise typer.Exit(128 + (run.trainer.stop_signal or 15))


@contextlib.contextmanager
def write_faults_reported(run: Run):
    """A write that fails mid-run (a full disk, the folder gone, a permission lost) as one line: what
    failed, which checkpoint is intact, and how to continue."""
    try:
        yield
    except OSError as e:
        out = run.trainer.opts.out
        saved = checkpoint_step(out)
        intact = (f"the checkpoint of step {saved} in {out} is intact" if saved is not None else
                  "no checkpoint was saved yet")
        reason = str(e) if isinstance(e, WriteError) else f"cannot write in {out} ({e.strerror or e})"
        raise UsageError(f"training stopped at step {run.trainer.step}: {reason}; {intact}: make room (or fix "
                         f"the folder) and continue with jet train --resume -o {out}") from None


def describe(run: Run) -> str:
    trainer, config, opts = run.trainer, run.trainer.config, run.trainer.opts
    return (f"Jet {trainer.model.num_params() / 1e6:.2f}M params, {config.couplings} couplings, "
            f"{len(run.train_set)} training images of {config.image_size[0]}x{config.image_size[1]}"
            + (f", {len(run.val_set)} validation" if run.val_set is not None else "")
            + f", {opts.device}, {opts.precision}"
            + (f", {run.processes.world} processes" if run.processes.world > 1 else "")
            + (f"; resuming at step {trainer.step}" if run.resumed else ""))


@contextlib.contextmanager
def progress_reports(run: Run):
    """A progress bar on rank 0 and the function that updates it from a step's record; None elsewhere."""
    if not run.processes.main:
        yield None
        return
    with progress_bar("bpd", "val", "lr", "img_s") as bar:
        task = bar.add_task("train", total=run.trainer.opts.steps, completed=run.trainer.step, bpd="-", val="-",
                            lr="-", img_s="-")

        def report(record: dict) -> None:
            fields = {"bpd": f"{record['bpd']:.4f}", "lr": f"{record['lr']:.2e}"}
            if "img_per_s" in record:
                fields["img_s"] = f"{record['img_per_s']:.1f}"
            if "val_bpd" in record:
                fields["val"] = f"{record['val_bpd']:.4f}"
            bar.update(task, completed=record["step"], **fields)

        yield report


def finish(run: Run, push_to_hub: str | None) -> None:
    """Rank 0, after the loop: pictures, a summary line, and the upload of a finished run."""
    out, steps = run.trainer.opts.out, run.trainer.opts.steps
    val = write_pictures(run)
    err.print(f"step {run.trainer.step}/{steps}; weights in {out}" + (f"; val bpd {val:.4f}" if val is not None else "")
              + ("" if run.finished else "; stopped: continue with --resume"))
    if run.finished and push_to_hub:
        try:
            url = publish.push(out, push_to_hub)
        except Exception as e:  # network, auth, quota...: the run is safe on disk, say how to retry
            raise UsageError(f"upload to {push_to_hub} failed ({e}); retry with: jet train --resume -o {out} "
                             f"--push-to-hub {push_to_hub}") from None
        err.print(f"uploaded to {url}")
