"""Training Jet by maximum likelihood, as the paper and big_vision's trainer do.

Optimiser: AdamW, betas (0.9, 0.95), lr 3e-4, 10% linear warmup then cosine decay to 0, gradient clipping
at global norm 1.0. Weight decay follows big_vision (optax): the decay step is `wd * schedule(t) * param`,
independent of the base lr. PyTorch's AdamW multiplies its decay by the current lr, so we pass
`weight_decay = wd / lr`: lr(t) * wd / lr = wd * schedule(t). The split orders are buffers, never trained.

Everything a run needs to continue is in `state.safetensors` (weights, optimiser moments, EMA, RNG
states, step) plus JSON metadata, so a stopped run resumes bit-identically on CPU: the data order of an
epoch is a pure function of (seed, epoch), and the crop/flip/noise generator state is saved.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from jetcli import checkpoints
from jetcli.config import JetConfig
from jetcli.data import ImageSet, epoch_order
from jetcli.fileio import atomic_write
from jetcli.likelihood import bits_per_dim, dequantize
from jetcli.model import Jet
from jetcli.precision import compute_context

STATE_NAME = "state.safetensors"
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainOptions:
    out: Path
    steps: int
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 1e-5  # big_vision semantics (see module docstring)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: float = 0.1  # fraction of steps
    clip: float = 1.0
    ema: float | None = None  # e.g. 0.999; saved beside the weights as ema.safetensors
    precision: str = "fp32"
    seed: int = 0
    eval_every: int = 500
    ckpt_every: int = 500
    log_every: int = 10
    val_samples: int = 1
    device: str = "cpu"
    compile: bool = False
    extra: dict = field(default_factory=dict)  # recorded in the checkpoint metadata (data paths, command)


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warmup from 0 over `warmup * total` steps, then cosine decay to 0."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return step / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: Jet, opts: TrainOptions) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=opts.betas,
                             weight_decay=opts.weight_decay / opts.lr)


class Trainer:
    def __init__(self, config: JetConfig, train: ImageSet, val: ImageSet | None, opts: TrainOptions):
        self.config, self.train_set, self.val_set, self.opts = config, train, val, opts
        self.device = torch.device(opts.device)
        torch.manual_seed(opts.seed)
        self.model = Jet(config).to(self.device)
        self.optimizer = make_optimizer(self.model, opts)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, opts.steps, opts.warmup))
        self.ema = ({k: v.detach().clone() for k, v in self.model.state_dict().items()}
                    if opts.ema else None)
        self.generator = torch.Generator().manual_seed(opts.seed)  # crops, flips, dequantisation noise
        self.step = 0
        self.forward = torch.compile(self.model) if opts.compile else self.model
        self.stop_requested = False

    # ------------------------------------------------------------------ one step
    def next_batch(self) -> torch.Tensor:
        """The global batch for `self.step`: a slice of this epoch's seeded order."""
        n, b = len(self.train_set), self.opts.batch_size
        first = self.step * b
        idx = torch.cat([epoch_order(n, self.opts.seed, e)[max(0, first - e * n):first + b - e * n]
                         for e in range(first // n, (first + b - 1) // n + 1)])
        return self.train_set.batch(idx, self.generator)

    def loss(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x = dequantize(pixels, self.generator).to(self.device)
        with compute_context(self.device, self.opts.precision):
            z, logdet = self.forward(x)
        bits = bits_per_dim(z.float(), logdet.float())
        return bits.bpd.mean(), {"bpd": bits.bpd.mean().item(), "nll": bits.nll.mean().item(),
                                 "logdet": bits.logdet.mean().item()}

    def train_step(self) -> dict:
        self.model.train()
        pixels = self.next_batch()
        parts = pixels.chunk(self.opts.grad_accum)
        stats = {"bpd": 0.0, "nll": 0.0, "logdet": 0.0}
        for part in parts:
            loss, s = self.loss(part)
            (loss * len(part) / len(pixels)).backward()
            for k in stats:
                stats[k] += s[k] * len(part) / len(pixels)
        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.clip).item()
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        if self.ema is not None:
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    if v.is_floating_point():
                        self.ema[k].lerp_(v, 1 - self.opts.ema)
        self.step += 1
        return stats

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean val bpd with fixed noise and crops, so successive evaluations are comparable."""
        self.model.eval()
        generator = torch.Generator().manual_seed(12345)
        total, count = 0.0, 0
        for start in range(0, len(self.val_set), self.opts.batch_size):
            idx = torch.arange(start, min(start + self.opts.batch_size, len(self.val_set)))
            pixels = self.val_set.batch(idx, generator)
            for _ in range(self.opts.val_samples):
                x = dequantize(pixels, generator).to(self.device)
                with compute_context(self.device, self.opts.precision):
                    z, logdet = self.model(x)
                total += bits_per_dim(z.float(), logdet.float()).bpd.sum().item()
                count += len(idx)
        return total / count

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        out = self.opts.out
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.items()})
        optim = self.optimizer.state_dict()
        for i, s in optim["state"].items():
            tensors.update({f"optim.{i}.{k}": v for k, v in s.items()})
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"step": str(self.step), "config": self.config.to_json(),
                "options": json.dumps(asdict(self.opts), default=str)}
        atomic_write(out / STATE_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))
        extra = {"step": str(self.step), "train": json.dumps(self.opts.extra, default=str)}
        checkpoints.save(self.model, out, extra_metadata=extra)
        if self.ema is not None:
            ema_model = Jet(self.config)
            ema_model.load_state_dict(self.ema)
            checkpoints.save(ema_model, out / "ema", extra_metadata=extra)

    def resume(self) -> None:
        path = self.opts.out / STATE_NAME
        tensors = load_file(str(path))
        meta = checkpoints.read_metadata(path)
        if JetConfig.from_json(meta["config"]) != self.config:
            raise checkpoints.CheckpointError(f"{path}: was trained with another model config")
        group = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        self.model.load_state_dict(group("model."))
        if self.ema is not None:
            self.ema = {k: v.to(self.device) for k, v in group("ema.").items()} or self.ema
        optim = self.optimizer.state_dict()
        state: dict[int, dict] = {}
        for k, v in group("optim.").items():
            i, name = k.split(".", 1)
            state.setdefault(int(i), {})[name] = v.to(self.device) if name != "step" else v
        optim["state"] = state
        self.optimizer.load_state_dict(optim)
        self.step = int(meta["step"])
        self.schedule.last_epoch = self.step
        for group_ in self.optimizer.param_groups:
            group_["lr"] = self.opts.lr * lr_factor(self.step, self.opts.steps, self.opts.warmup)
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])

    # ------------------------------------------------------------------ the loop
    def run(self, progress=None) -> list[dict]:
        """Train to `opts.steps`, checkpointing every `ckpt_every` steps and on SIGINT/SIGTERM."""
        out = self.opts.out
        out.mkdir(parents=True, exist_ok=True)
        history: list[dict] = []
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        metrics = open(out / METRICS_NAME, "a")
        try:
            tick, seen = time.perf_counter(), 0
            while self.step < self.opts.steps and not self.stop_requested:
                stats = self.train_step()
                seen += self.opts.batch_size
                record = {"step": self.step, **stats}
                if self.step % self.opts.log_every == 0 or self.step == self.opts.steps:
                    now = time.perf_counter()
                    record["img_per_s"] = seen / (now - tick)
                    tick, seen = now, 0
                if self.val_set is not None and (self.step % self.opts.eval_every == 0
                                                 or self.step == self.opts.steps):
                    record["val_bpd"] = self.evaluate()
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                history.append(record)
                if progress is not None:
                    progress(record)
                if self.step % self.opts.ckpt_every == 0:
                    self.save()
            self.save()
        finally:
            metrics.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return history

    def _request_stop(self, signum, frame):
        self.stop_requested = True


def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / METRICS_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


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
