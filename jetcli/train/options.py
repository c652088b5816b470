"""The options of one training session, and the checks that they can run."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from jetcli.errors import SettingError


@dataclass
class TrainOptions:
    out: Path
    steps: int
    batch_size: int = 64  # global: images per optimiser step, over all processes and micro-batches
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 1e-5  # big_vision semantics (see jetcli.train.schedule)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: float = 0.1  # fraction of the steps
    clip: float = 1.0
    ema: float | None = None  # e.g. 0.999; saved beside the weights in ema/
    precision: str = "fp32"  # "fp32" or "fast"; see jetcli.precision
    seed: int = 0
    eval_every: int = 500
    ckpt_every: int = 500
    log_every: int = 10
    val_samples: int = 1
    device: str = "cpu"
    compile: bool = False
    shard: bool = False  # FSDP over the processes instead of DDP (jetcli.train.sharding)
    extra: dict = field(default_factory=dict)  # data sources and command, for resuming and the model card


def check_options(opts: TrainOptions, world: int) -> None:
    """Refuse options that cannot train, over `world` processes."""
    counts = ("steps", "batch_size", "grad_accum", "eval_every", "ckpt_every", "log_every", "val_samples")
    small = [name for name in counts if getattr(opts, name) < 1]
    small += [name for name in ("lr", "clip") if not 0 < getattr(opts, name) < math.inf]
    if small:
        raise SettingError(", ".join(f"{{{name}}}" for name in small) + " must be positive and finite")
    if not 0 <= opts.warmup < 1 or (opts.ema is not None and not 0 < opts.ema < 1):
        raise SettingError("{warmup} must be in [0, 1) and {ema} in (0, 1)")
    if opts.shard and world < 2:
        raise SettingError("{shard} divides the model over several processes: run under torchrun")
    if opts.batch_size % world:
        raise SettingError("batch size {batch} is not divisible by {world} processes", batch=opts.batch_size,
                           world=world)
    if opts.batch_size // world < opts.grad_accum:
        raise SettingError("batch size {batch} over {world} process(es) is smaller than {grad_accum} {accum}",
                           batch=opts.batch_size, world=world, accum=opts.grad_accum)


def absolute_source(spec: str | None) -> str | None:
    """A data source (a path, or FILE.npz:KEY) with its path made absolute, so that a run resumed from
    another folder finds it; a path that does not exist is left as given (its loader words the error)."""
    if spec is None:
        return None
    path, key = spec, ""
    if not Path(spec).exists() and ":" in spec:  # FILE.npz:KEY
        path, _, key = spec.rpartition(":")
    if not Path(path).exists():
        return spec
    return os.path.abspath(path) + (f":{key}" if key else "")


@dataclass
class RunSettings:
    """What a training run is asked for, by field (`jet train`'s options): the model, the data, the
    optimisation and where it all goes. `jetcli.train.session.start_run` turns them into a Trainer."""

    data: str | None  # training images (jetcli.data.load_images); None when resuming: the run's
    out: Path = Path("runs/jet")
    preset_name: str = "small-32"
    couplings: int | None = None  # these six override the preset
    block_depth: int | None = None
    width: int | None = None
    heads: int | None = None
    patch_size: int | None = None
    kinds: str | None = None  # comma-separated, e.g. "channels,channels,spatial"
    spatial_patterns: str | None = None  # comma-separated, e.g. "checkerboard,checkerboard-inv"
    crop: int | None = None
    flip: bool | None = False  # random horizontal flips (None: a run saved before they were a setting)
    val: str | None = None
    val_fraction: float = 0.0
    steps: int = 1000
    epochs: float | None = None  # instead of steps: this many passes over the training images
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 1e-5
    warmup: float = 0.1
    clip: float = 1.0
    ema: float | None = None
    precision: str = "auto"  # jetcli.precision.CHOICES
    compile: bool = False
    shard: bool = False
    seed: int = 0
    eval_every: int = 500
    ckpt_every: int = 500
    resume: bool = False
    device: str = "auto"
    push_to_hub: str | None = None
