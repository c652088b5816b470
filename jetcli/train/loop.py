"""The training loop: one Trainer, on one process or under DDP (jetcli.train.distributed).

Precision: "fast" is bf16 autocast on the ViTs; splitting, merging, the affine update, logdet and the
loss are float32 either way (see jetcli.precision).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist

from jetcli.config import JetConfig
from jetcli.data import ImageSet, Stream
from jetcli.likelihood import bits_per_dim
from jetcli.model import Jet
from jetcli.precision import compute_context
from jetcli.train.distributed import Distributed
from jetcli.train.metrics import METRICS_NAME
from jetcli.train.options import TrainOptions, check_options
from jetcli.train.schedule import lr_factor, make_optimizer
from jetcli.train.state import restore_run, save_run, tidy_run_folder


class Trainer:
    def __init__(self, config: JetConfig, train: ImageSet, val: ImageSet | None, opts: TrainOptions,
                 processes: Distributed = Distributed()):
        check_options(opts, processes.world)
        self.config, self.train_set, self.val_set, self.opts = config, train, val, opts
        self.train_stream = Stream(train, opts.seed)
        # Each validation image keeps its crop and noise, whatever the run: evaluations are comparable.
        self.val_stream = Stream(val, 0, "val", shuffle=False) if val is not None else None
        self.processes = processes
        self.device = torch.device(opts.device)
        torch.manual_seed(opts.seed)  # the same initial weights in every process
        self.model = Jet(config).to(self.device)
        self.optimizer = make_optimizer(self.model, opts)
        self.ema = self.fresh_ema() if opts.ema else None
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

    def fresh_ema(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ data
    def batch_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Dequantised images (B, H, W, 3) in [-1, 1], on the CPU, for these stream positions (see
        jetcli.data.Stream for uint8 pixels and noise made on a device instead)."""
        return self.train_stream.batch(positions)

    def micro_batches(self, step: int) -> list[torch.Tensor]:
        """This process's contiguous share of global batch `step`, as `grad_accum` micro-batches."""
        share = self.opts.batch_size // self.processes.world
        first = step * self.opts.batch_size + self.processes.rank * share
        return [self.batch_at(part) for part in torch.arange(first, first + share).tensor_split(self.opts.grad_accum)]

    def _take_micro_batches(self) -> list[torch.Tensor]:
        """This step's micro-batches (prepared in the background during the previous step), and start on
        the next step's: the data are a pure function of the step, so preparing them early changes nothing."""
        ready = self._prefetch.pop(self.step, None)
        batches = ready.result() if ready is not None else self.micro_batches(self.step)
        if self.step + 1 < self.opts.steps:
            self._prefetch = {self.step + 1: self._loader.submit(self.micro_batches, self.step + 1)}
        return batches

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One optimiser step on the global batch; returns its mean bits/dim and friends."""
        self.model.train()
        lr = self.opts.lr * lr_factor(self.step, self.opts.steps, self.opts.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self._take_micro_batches()
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
            for draw in range(self.opts.val_samples):
                x = self.val_stream.batch(indices, draw).to(self.device)
                with compute_context(self.device, self.opts.precision):
                    z, logdet = self.model(x)
                totals[0] += bits_per_dim(z.float(), logdet.float()).bpd.double().sum()
                totals[1] += len(indices)
        if self.ddp is not None:
            dist.all_reduce(totals)
        return (totals[0] / totals[1]).item()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Rank 0 writes the weights (and EMA) and the resumable state (jetcli.train.state)."""
        self.saved_step = self.step
        if self.processes.main:
            save_run(self)

    def resume(self) -> None:
        """Continue from the state of the run in `opts.out`: weights, Adam state, EMA and step."""
        self.step = self.saved_step = restore_run(self)
        if self.processes.main:
            tidy_run_folder(self.opts.out, self.step)

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
