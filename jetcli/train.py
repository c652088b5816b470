"""Training Jet by maximum likelihood, as the paper and big_vision's Jet trainer do.

Optimisation follows big_vision (configs/proj/jet/imagenet64.py, big_vision/optax.py): Adam with
betas (0.9, 0.95) and eps 1e-8, lr 3e-4, clipping at global norm 1.0, decoupled weight decay 1e-5 on
every parameter (wd_mults (('.*', 1.0),)), linear warmup over 10% of the steps, then cosine decay to 0.
The optax chain is clip -> scale_by_adam -> scale(lr) -> add_decayed_weights(wd) -> scale_by_schedule
-> scale(-1), so one update is

    param <- param - sched(t) * (lr * adam_direction + wd * param):

the decay, wd * sched(t) * param, does not depend on lr. torch's AdamW decays by lr(t) * weight_decay *
param; with lr(t) = lr * sched(t) we pass weight_decay = wd / lr and get the same update. The split
orders are buffers, never trained (big_vision freezes its projections). One difference: big_vision
keeps Adam's first moment in bfloat16, we keep it in float32.

Precision: "auto" is bf16 autocast on the ViTs on CUDA ("fast") and float32 on CPU; splitting, merging,
the affine update, logdet and the loss are float32 either way (see jetcli.precision).

Distributed: under torchrun every process builds the same model from the same seed and takes its
contiguous share of each global batch; DistributedDataParallel averages the gradients. Only rank 0
writes checkpoints, metrics and progress. The data order, crops, flips and noise are pure functions of
(seed, stream position) (jetcli.data), so N processes at global batch B follow one process at batch B.
Every process reads the run folder to resume, so on several machines it must be on shared storage.

`state.safetensors` holds all a run needs to continue: weights (model.*), Adam moments and step counts
(optim.{i}.*), the EMA (ema.*), and as metadata the step, the config and the options. A run that is
stopped and resumed ends bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from jetcli import checkpoints
from jetcli.config import JetConfig
from jetcli.data import ImageSet, image_indices, sample_generator
from jetcli.fileio import atomic_write, remove_partial_writes
from jetcli.likelihood import bits_per_dim, dequantize
from jetcli.model import Jet
from jetcli.precision import compute_context

STATE_NAME = "state.safetensors"
METRICS_NAME = "metrics.jsonl"
EMA_DIR = "ema"


@dataclass
class TrainOptions:
    out: Path
    steps: int
    batch_size: int = 64  # global: images per optimiser step, over all processes and micro-batches
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 1e-5  # big_vision semantics (see the module docstring)
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
    extra: dict = field(default_factory=dict)  # data sources and command, for resuming and the model card


def warmup_steps(total: int, warmup: float) -> int:
    """big_vision's rounding of warmup_percent: to the nearest step, at least 1 unless it is 0."""
    return max(1, round(warmup * total)) if warmup else 0


def lr_factor(step: int, total: int, warmup: float) -> float:
    """big_vision's schedule at optimiser step `step` (0 = the first update): linear warmup from 0, then
    cosine decay to 0 at `total`."""
    warm = warmup_steps(total, warmup)
    progress = min(1.0, max(0.0, (step - warm) / max(1, total - warm)))
    factor = 0.5 * (1 + math.cos(math.pi * progress))
    return factor * min(1.0, step / warm) if warm else factor


def make_optimizer(model: Jet, opts: TrainOptions) -> torch.optim.AdamW:
    params = list(model.parameters())
    settings = dict(lr=opts.lr, betas=opts.betas, eps=1e-8, weight_decay=opts.weight_decay / opts.lr)
    try:  # one fused kernel over all tensors: 2-3x faster than the per-tensor loop torch defaults to on CPU
        return torch.optim.AdamW(params, fused=True, **settings)
    except RuntimeError:  # torch < 2.4 has no fused AdamW on the CPU
        return torch.optim.AdamW(params, **settings)


# --------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join torchrun's process group when there is one: nccl with one GPU per local rank on CUDA, gloo
    on CPU. The rendezvous (MASTER_ADDR/PORT, RANK, WORLD_SIZE) comes from torchrun's environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size()), device


def finish_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, config: JetConfig, train: ImageSet, val: ImageSet | None, opts: TrainOptions,
                 processes: Distributed = Distributed()):
        self.config, self.train_set, self.val_set, self.opts = config, train, val, opts
        self.processes = processes
        self.device = torch.device(opts.device)
        small = [f"--{k.replace('_', '-')}" for k in ("steps", "batch_size", "grad_accum", "eval_every", "ckpt_every",
                                                      "log_every", "val_samples") if getattr(opts, k) < 1]
        small += [name for name, value in (("--lr", opts.lr), ("--clip", opts.clip)) if not 0 < value < math.inf]
        if small:
            raise ValueError(f"{', '.join(small)} must be positive and finite")
        if not 0 <= opts.warmup < 1 or (opts.ema is not None and not 0 < opts.ema < 1):
            raise ValueError("--warmup must be in [0, 1) and --ema in (0, 1)")
        if opts.batch_size % processes.world:
            raise ValueError(f"batch size {opts.batch_size} is not divisible by {processes.world} processes")
        if opts.batch_size // processes.world < opts.grad_accum:
            raise ValueError(f"batch size {opts.batch_size} over {processes.world} process(es) is smaller "
                             f"than --grad-accum {opts.grad_accum}")
        torch.manual_seed(opts.seed)  # the same initial weights in every process
        self.model = Jet(config).to(self.device)
        self.optimizer = make_optimizer(self.model, opts)
        self.ema = self._fresh_ema() if opts.ema else None
        self.ddp = (torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
            if processes.world > 1 else None)
        network = self.ddp or self.model
        self.forward = torch.compile(network) if opts.compile else network
        self.step = 0
        self.saved_step = -1
        self.stop_signal: int | None = None  # set by SIGINT/SIGTERM in this process
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="jet-data")
        self._prefetch: dict[int, Future] = {}

    def _fresh_ema(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ one step
    def inputs(self, positions: torch.Tensor) -> torch.Tensor:
        """Dequantised images (B, H, W, 3) in [-1, 1], on the CPU, for these stream positions."""
        first, n = int(positions[0]), len(positions)
        generators = [sample_generator(self.opts.seed, int(p)) for p in positions]
        pixels = self.train_set.batch(image_indices(len(self.train_set), self.opts.seed, first, n), generators)
        return torch.stack([dequantize(p, g) for p, g in zip(pixels, generators)])

    def step_inputs(self, step: int) -> list[torch.Tensor]:
        """This process's contiguous share of global batch `step`, as `grad_accum` micro-batches."""
        share = self.opts.batch_size // self.processes.world
        first = step * self.opts.batch_size + self.processes.rank * share
        return [self.inputs(part) for part in torch.arange(first, first + share).tensor_split(self.opts.grad_accum)]

    def _inputs_of_this_step(self) -> list[torch.Tensor]:
        """This step's inputs (prepared in the background during the previous step), and start on the
        next step's: the data are a pure function of the step, so preparing them early changes nothing."""
        ready = self._prefetch.pop(self.step, None)
        batches = ready.result() if ready is not None else self.step_inputs(self.step)
        if self.step + 1 < self.opts.steps:
            self._prefetch = {self.step + 1: self._loader.submit(self.step_inputs, self.step + 1)}
        return batches

    def train_step(self) -> dict:
        """One optimiser step on the global batch; returns its mean bits/dim and friends."""
        self.model.train()
        lr = self.opts.lr * lr_factor(self.step, self.opts.steps, self.opts.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self._inputs_of_this_step()
        totals = torch.zeros(3, device=self.device)  # bpd, nll and logdet summed over this process's images
        for k, x in enumerate(batches):
            last = k == len(batches) - 1
            with contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                with compute_context(self.device, self.opts.precision):
                    z, logdet = self.forward(x.to(self.device))
                bits = bits_per_dim(z.float(), logdet.float())
                # DDP averages gradients over processes: scale so the sum is the global batch mean.
                (bits.bpd.sum() * self.processes.world / self.opts.batch_size).backward()
            totals += torch.stack([bits.bpd.sum(), bits.nll.sum(), bits.logdet.sum()]).detach()
        if self.ddp is not None:
            dist.all_reduce(totals)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    if v.is_floating_point():
                        self.ema[k].lerp_(v, 1 - self.opts.ema)
        self.step += 1
        bpd, nll, logdet = (totals / self.opts.batch_size).tolist()
        return {"bpd": bpd, "nll": nll, "logdet": logdet, "grad_norm": grad_norm.item(), "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean val bpd. Each image has fixed noise (and crop), so evaluations are comparable over steps,
        runs and process counts; the processes split the images and sum their totals."""
        self.model.eval()
        mine = torch.arange(self.processes.rank, len(self.val_set), self.processes.world)
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)
        for indices in mine.split(self.opts.batch_size):
            generators = [sample_generator(0, int(i), "val") for i in indices]
            pixels = self.val_set.batch(indices, generators)
            for _ in range(self.opts.val_samples):
                x = torch.stack([dequantize(p, g) for p, g in zip(pixels, generators)]).to(self.device)
                with compute_context(self.device, self.opts.precision):
                    z, logdet = self.model(x)
                totals[0] += bits_per_dim(z.float(), logdet.float()).bpd.double().sum()
                totals[1] += len(indices)
        if self.ddp is not None:
            dist.all_reduce(totals)
        return (totals[0] / totals[1]).item()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Rank 0 writes the weights (and EMA) in the format every command loads, then the resumable state.

        The state goes last: it is what --resume continues from, so a run killed in between has weights
        one step ahead of its state (which resuming recomputes identically), never weights left behind."""
        self.saved_step = self.step
        if not self.processes.main:
            return
        out = self.opts.out
        extra = {"step": str(self.step), "train": json.dumps(self.opts.extra, default=str)}
        checkpoints.save(self.model, out, extra_metadata=extra)
        if self.ema is not None:
            ema_model = checkpoints.unfilled(self.config)  # no random init: the EMA fills every tensor
            ema_model.load_state_dict(self.ema)
            checkpoints.save(ema_model, out / EMA_DIR, extra_metadata=extra)
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.items()})
        for i, state in self.optimizer.state_dict()["state"].items():
            tensors.update({f"optim.{i}.{k}": v for k, v in state.items()})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"step": str(self.step), "config": self.config.to_json(),
                "options": json.dumps(asdict(self.opts), default=str)}
        atomic_write(out / STATE_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))

    def resume(self) -> None:
        """Continue from `state.safetensors` in the run folder: weights, Adam state, EMA and step. The
        schedule and the data position follow from the step. (States written before the data randomness
        was keyed by position also hold rng.* tensors; they are not needed.)"""
        path, meta, config = run_state(self.opts.out)
        try:
            step = int(meta["step"])
        except (KeyError, ValueError, TypeError) as e:
            raise checkpoints.CheckpointError(f"{path}: not a jet train state ({e})") from None
        tensors = checkpoints.load_state(path)
        if step < 0:
            raise checkpoints.CheckpointError(f"{path}: not a jet train state (step {step})")
        if config != self.config:
            raise checkpoints.CheckpointError(f"{path}: was trained with another model config")
        group = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        checkpoints.fill(self.model, group("model."), str(path))  # refuses missing, misshapen or NaN weights
        try:
            optim = self.optimizer.state_dict()
            optim["state"] = {}
            for key, value in group("optim.").items():
                index, name = key.split(".", 1)
                optim["state"].setdefault(int(index), {})[name] = value
            _check_adam_state(optim["state"], [p.shape for p in self.model.parameters()], step)
            self.optimizer.load_state_dict(optim)
        except (RuntimeError, ValueError, KeyError) as e:
            raise checkpoints.CheckpointError(f"{path}: does not match the model ({str(e).splitlines()[0]})") from None
        if self.ema is not None:  # a run that had no EMA starts one from the current weights
            saved = group("ema.")
            self.ema = {k: v.to(self.device) for k, v in saved.items()} if saved else self._fresh_ema()
        self.step = self.saved_step = step
        if self.processes.main:
            self._truncate_metrics()
            # A killed run leaves the temporary files of the writes it was making; nothing reads them.
            written = (STATE_NAME, METRICS_NAME, checkpoints.WEIGHTS_NAME, checkpoints.CONFIG_NAME, "curves.png",
                       "samples.png")
            for folder in (self.opts.out, self.opts.out / EMA_DIR):
                remove_partial_writes(folder, written)

    def _truncate_metrics(self) -> None:
        """Drop metric records past the checkpoint: the resumed run writes those steps again."""
        records = [r for r in read_metrics(self.opts.out) if r["step"] <= self.step]
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(self.opts.out / METRICS_NAME, lambda tmp: Path(tmp).write_text(text))

    # ------------------------------------------------------------------ the loop
    def run(self, progress=None) -> list[dict]:
        """Train to `opts.steps`, checkpointing every `ckpt_every` steps and when SIGINT/SIGTERM asks to
        stop (a second signal gets the default behaviour). Returns this session's metric records."""
        out, main = self.opts.out, self.processes.main
        if main:
            out.mkdir(parents=True, exist_ok=True)
        history: list[dict] = []
        self._handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        # A fresh run replaces the metrics of one that was killed before its first checkpoint.
        metrics = open(out / METRICS_NAME, "a" if self.step else "w") if main else None
        try:
            tick, seen = time.perf_counter(), 0
            while self.step < self.opts.steps and not self.stop_agreed():
                stats = self.train_step()
                record = {"step": self.step, **stats}
                seen += self.opts.batch_size
                if self.step % self.opts.log_every == 0 or self.step == self.opts.steps:
                    now = time.perf_counter()
                    record["img_per_s"] = seen / (now - tick)
                    tick, seen = now, 0
                if self.val_set is not None and (self.step % self.opts.eval_every == 0
                                                 or self.step == self.opts.steps):
                    record["val_bpd"] = self.evaluate()
                history.append(record)
                if main:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    if progress is not None:
                        progress(record)
                if self.step % self.opts.ckpt_every == 0:
                    self.save()
            if self.saved_step != self.step:
                self.save()
        finally:
            if metrics is not None:
                metrics.close()
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)
        return history

    def stop_agreed(self) -> bool:
        """Whether any process was asked to stop: all must leave the loop at the same step."""
        flag = torch.tensor([float(self.stop_signal is not None)], device=self.device)
        if self.ddp is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _request_stop(self, signum, frame):
        self.stop_signal = signum
        signal.signal(signum, self._handlers[signum])


def _check_adam_state(state: dict[int, dict[str, torch.Tensor]], shapes: list[torch.Size], step: int) -> None:
    """torch loads optimiser state without checking it; a damaged one would fail (or train on NaN) later."""
    for index, moments in state.items():
        if not 0 <= index < len(shapes):
            raise ValueError(f"optimiser state for parameter {index}, the model has {len(shapes)}")
        for name, value in moments.items():
            if name != "step" and value.shape != shapes[index]:
                raise ValueError(f"optim.{index}.{name} has shape {tuple(value.shape)}, the parameter "
                                 f"{tuple(shapes[index])}")
            if not torch.isfinite(value).all():
                raise ValueError(f"optim.{index}.{name} holds NaN or Inf")
    if step and len(state) != len(shapes):
        raise ValueError(f"optimiser state for {len(state)} of the {len(shapes)} parameters at step {step}")


# --------------------------------------------------------------------------- resuming from the CLI
# Options that fix what a run computes: a resumed run keeps them. The others are restored from the run
# unless given again (a longer --steps, another --precision or --grad-accum on another machine).
KEPT_ON_RESUME = ("data", "val", "val_fraction", "crop", "batch_size", "lr", "weight_decay", "warmup",
                  "clip", "ema", "seed")
RESUMABLE = KEPT_ON_RESUME + ("steps", "grad_accum", "eval_every", "ckpt_every", "precision", "compile")
DATA_KEYS = ("data", "val", "val_fraction", "crop")


def run_state(out: Path) -> tuple[Path, dict[str, str], JetConfig]:
    """The state file of the run in `out`, its metadata and the config stored there."""
    path = Path(out) / STATE_NAME
    if not path.exists():
        raise checkpoints.CheckpointError(f"{path}: no such file: nothing to resume")
    meta = checkpoints.read_metadata(path)
    try:
        return path, meta, JetConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise checkpoints.CheckpointError(f"{path}: not a jet train state ({e})") from None


def saved_run(out: Path) -> tuple[JetConfig, dict]:
    """The config and the options (flat: data sources included) of the run in `out`."""
    path, meta, config = run_state(out)
    try:
        options = json.loads(meta["options"])
    except (KeyError, ValueError, TypeError) as e:
        raise checkpoints.CheckpointError(f"{path}: not a jet train state ({e})") from None
    if not isinstance(options, dict) or not isinstance(options.get("extra") or {}, dict):
        raise checkpoints.CheckpointError(f"{path}: not a jet train state (its options are not a JSON object)")
    # The run's model is built from this config: a damaged one must not allocate a huge model first.
    shapes = checkpoints.read_shapes(path)
    checkpoints.check_size(config, {k[len("model."):]: v for k, v in shapes.items() if k.startswith("model.")},
                           str(path))
    extra = options.get("extra") or {}
    flat = {k: options[k] for k in RESUMABLE if k in options}
    flat.update({k: extra.get(k) for k in DATA_KEYS})
    flat["val_fraction"] = flat["val_fraction"] or 0.0
    return config, flat


def resume_arguments(out: Path, args: dict, given: set[str]) -> tuple[JetConfig, dict]:
    """The saved run's config and options, with the options given on the command line applied where a
    resumed run may change them. Raises ValueError for an attempt to change the others."""
    config, saved = saved_run(out)
    changed = [f"--{k.replace('_', '-')} {args[k]!r} (the run has {saved[k]!r})"
               for k in KEPT_ON_RESUME if k in given and args[k] != saved[k]]
    if changed:
        raise ValueError("a resumed run keeps its data and optimisation settings: " + ", ".join(changed))
    merged = {**args, **{k: v for k, v in saved.items() if k not in given}}
    return config, merged


# --------------------------------------------------------------------------- outputs
def read_metrics(out: Path) -> list[dict]:
    """The records of metrics.jsonl; a last line cut short by a crash is skipped."""
    path = Path(out) / METRICS_NAME
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def plot_curves(records: list[dict], path: Path, size: tuple[int, int] = (640, 400)) -> None:
    """A PNG of train bpd (grey) and val bpd (blue) against step, drawn with PIL."""
    from PIL import Image, ImageDraw

    from jetcli.images import save_png

    train = [(r["step"], r["bpd"]) for r in records if "bpd" in r]
    val = [(r["step"], r["val_bpd"]) for r in records if "val_bpd" in r]
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    if train:
        ys = [y for _, y in train[len(train) // 20:] + val]  # skip the first 5%: init bpd is off-scale
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1
        x_max = max(s for s, _ in train)
        left, top, right, bottom = 60, 20, size[0] - 20, size[1] - 40
        fx = lambda s: left + (right - left) * s / max(1, x_max)
        fy = lambda y: bottom - (bottom - top) * (min(max(y, lo), hi) - lo) / (hi - lo)
        draw.rectangle([left, top, right, bottom], outline="black")
        for frac in (0, 0.5, 1):
            y = lo + frac * (hi - lo)
            draw.text((5, fy(y) - 6), f"{y:.3f}", fill="black")
        draw.text((left, bottom + 8), "step 0", fill="black")
        draw.text((right - 80, bottom + 8), f"step {x_max}", fill="black")
        draw.text((left + 10, top + 5), "bits/dim: train (grey), val (blue)", fill="black")
        draw.line([(fx(s), fy(y)) for s, y in train], fill=(150, 150, 150), width=1)
        if len(val) > 1:
            draw.line([(fx(s), fy(y)) for s, y in val], fill=(30, 90, 220), width=3)
        for s, y in val:
            draw.ellipse([fx(s) - 3, fy(y) - 3, fx(s) + 3, fy(y) + 3], fill=(30, 90, 220))
    save_png(np.asarray(img), path)
