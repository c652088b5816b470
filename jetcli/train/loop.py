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
from typing import NamedTuple

import torch
import torch.distributed as dist

from jetcli.config import JetConfig
from jetcli.data import ImageSet, Stream, dequantize, uniform
from jetcli.likelihood import bits_per_dim
from jetcli.model import Jet
from jetcli.precision import compute_context
from jetcli.train.distributed import Distributed, data_parallel, in_process_group
from jetcli.train.metrics import METRICS_NAME
from jetcli.train.options import TrainOptions, check_options
from jetcli.train.schedule import lr_factor, make_optimizer
from jetcli.train.sharding import Sharded, shard, whole
from jetcli.train.state import restore_run, save_run, tidy_run_folder


class MicroBatch(NamedTuple):
    positions: torch.Tensor  # stream positions (B,): they fix each item's image, crop and noise
    pixels: torch.Tensor  # uint8 (B, H, W, 3)


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
        if opts.shard:  # before the optimiser and the EMA are made: they hold shards too
            shard(self.model)
        self.optimizer = make_optimizer(self.model, opts)
        self.ema = self.fresh_ema() if opts.ema else None
        self.ddp = ((Sharded(self.model) if opts.shard else data_parallel(self.model, self.device))
                    if in_process_group() else None)
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
    def batch_at(self, positions: torch.Tensor) -> MicroBatch:
        """The uint8 items at these stream positions, page-locked when training on a GPU (so that their
        copy runs asynchronously); `model_input` dequantises them on the device."""
        return MicroBatch(positions, self.train_stream.pixels(positions, pin=self.device.type == "cuda"))

    def micro_batches(self, step: int) -> list[MicroBatch]:
        """This process's contiguous share of global batch `step`, as `grad_accum` micro-batches."""
        share = self.opts.batch_size // self.processes.world
        first = step * self.opts.batch_size + self.processes.rank * share
        return [self.batch_at(part) for part in torch.arange(first, first + share).tensor_split(self.opts.grad_accum)]

    def _take_micro_batches(self) -> list[MicroBatch]:
        """This step's micro-batches (prepared in the background during the previous step), and start on
        the next step's: the data are a pure function of the step, so preparing them early changes nothing."""
        ready = self._prefetch.pop(self.step, None)
        batches = ready.result() if ready is not None else self.micro_batches(self.step)
        if self.step + 1 < self.opts.steps:
            self._prefetch = {self.step + 1: self._loader.submit(self.micro_batches, self.step + 1)}
        return batches

    # ------------------------------------------------------------------ one step
    def model_input(self, batch: MicroBatch) -> torch.Tensor:
        """A micro-batch as the model takes it, dequantised on the device: uint8 pixels cross (a quarter of
        float32's bytes) and the noise is made there, hashed from each item's key (jetcli.data: the same
        values as on the CPU). The copies are asynchronous: nothing waits for the device."""
        keys = self.train_stream.keys(batch.positions).to(self.device, non_blocking=True)
        pixels = batch.pixels.to(self.device, non_blocking=True)
        return dequantize(pixels, uniform(keys, pixels[0].numel()).view(pixels.shape))

    def train_step(self) -> torch.Tensor:
        """One optimiser step on the global batch. Returns its STATS on the device, unread: nothing here
        waits for the device, and `read_stats` reads the statistics of many steps at once."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        batches = self._take_micro_batches()
        sums = torch.zeros(3, device=self.device)  # bpd, nll and logdet summed over this process's images
        for k, batch in enumerate(batches):
            last = k == len(batches) - 1
            with contextlib.nullcontext() if self.ddp is None or last else self.ddp.no_sync():
                with compute_context(self.device, self.opts.precision):
                    z, logdet = self.forward(self.model_input(batch))
                bits = bits_per_dim(z.float(), logdet.float())
                # DDP averages gradients over processes: scale so the sum is the global batch mean.
                (bits.bpd.sum() * self.processes.world / self.opts.batch_size).backward()
            sums += torch.stack([bits.bpd.sum(), bits.nll.sum(), bits.logdet.sum()]).detach()
        grad_norm = whole(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.update_ema()
        self.step += 1
        return torch.cat([sums, grad_norm.detach().reshape(1).to(sums.dtype)])

    def lr_at(self, step: int) -> float:
        return self.opts.lr * lr_factor(step, self.opts.steps, self.opts.warmup)

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- ema + (1 - decay) (weights - ema), one multi-tensor kernel for all the tensors."""
        if self.ema is None:
            return
        weights = {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}
        torch._foreach_lerp_([self.ema[k] for k in weights], list(weights.values()), 1 - self.opts.ema)

    def read_stats(self, steps: list[int], stats: list[torch.Tensor]) -> tuple[list[dict], bool]:
        """The metric records of these steps from their STATS (train_step), and whether any process was
        asked to stop: one all_reduce over the processes and one wait for the device, for all of them."""
        stacked = torch.stack(stats)
        sums, grad_norms = stacked[:, :3], stacked[:, 3]
        if self.ddp is not None:  # the stop flags ride along: any process's signal stops them all
            shared = torch.cat([sums.flatten(), sums.new_tensor([float(self.stop_signal is not None)])])
            dist.all_reduce(shared)
            sums, stop_votes = shared[:-1].view_as(sums), shared[-1:]
        else:
            stop_votes = sums.new_tensor([float(self.stop_signal is not None)])
        means = sums / self.opts.batch_size
        values = torch.cat([means, grad_norms[:, None], stop_votes.expand(len(steps), 1)], dim=1).tolist()
        records = [{"step": step, "bpd": bpd, "nll": nll, "logdet": logdet, "grad_norm": grad_norm,
                    "lr": self.lr_at(step - 1)} for step, (bpd, nll, logdet, grad_norm, _) in zip(steps, values)]
        return records, values[-1][-1] > 0

    @torch.no_grad()
    def evaluate(self, precision: str | None = None) -> float:
        """Mean val bpd, in `precision` (default: the run's). Each image has fixed noise (and crop), so
        evaluations are comparable over steps, runs and process counts; the processes split the images
        and sum their totals."""
        self.model.eval()
        mine = torch.arange(self.processes.rank, len(self.val_set), self.processes.world)
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)
        # As many batches in every process: a sharded model's forward is a collective.
        batches = -(-len(self.val_set) // (self.processes.world * self.opts.batch_size))
        for indices in mine.tensor_split(batches):
            for draw in range(self.opts.val_samples):
                x = self.val_stream.batch(indices, draw).to(self.device)
                with compute_context(self.device, precision or self.opts.precision):
                    z, logdet = self.model(x)
                totals[0] += bits_per_dim(z.float(), logdet.float()).bpd.double().sum()
                totals[1] += len(indices)
        if self.ddp is not None:
            dist.all_reduce(totals)
        return (totals[0] / totals[1]).item()

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        """Rank 0 writes the weights (and EMA) and the resumable state (jetcli.train.state); every
        process takes part, to gather the shards of a sharded model."""
        self.saved_step = self.step
        save_run(self)

    def resume(self) -> None:
        """Continue from the state of the run in `opts.out`: weights, Adam state, EMA and step."""
        self.step = self.saved_step = restore_run(self)
        if self.processes.main:
            tidy_run_folder(self.opts.out, self.step)

    # ------------------------------------------------------------------ the loop
    def run(self, progress=None) -> list[dict]:
        """Train to `opts.steps`, checkpointing every `ckpt_every` steps and when SIGINT/SIGTERM asks to
        stop (a second signal gets the default behaviour). Returns this session's metric records.

        The device runs ahead of the host: the statistics of the steps are read together (`read_stats`)
        every `log_every` steps and before an evaluation, a checkpoint or the end, and processes agree
        on a stop there too; a single process also stops at the first step after the signal."""
        out, main = self.opts.out, self.processes.main
        if main:
            out.mkdir(parents=True, exist_ok=True)
        history: list[dict] = []
        self._handlers = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        # A fresh run replaces the metrics of one that was killed before its first checkpoint.
        metrics = open(out / METRICS_NAME, "a" if self.step else "w") if main else None
        tick, pending = time.perf_counter(), []

        def report(evaluate: bool) -> bool:
            """Read the pending steps' statistics, evaluate if asked, write the records; returns whether
            the processes agree to stop."""
            nonlocal pending
            steps = list(range(self.step - len(pending) + 1, self.step + 1))
            records, stop = self.read_stats(steps, pending)
            records[-1]["img_per_s"] = len(pending) * self.opts.batch_size / (time.perf_counter() - tick)
            pending = []
            if evaluate:
                records[-1]["val_bpd"] = self.evaluate()
            history.extend(records)
            if main:
                metrics.write("".join(json.dumps(r) + "\n" for r in records))
                metrics.flush()
                for record in records if progress is not None else ():
                    progress(record)
            return stop

        try:
            stop = False
            # One process stops at the first step boundary after a signal; several agree in `report`.
            while self.step < self.opts.steps and not stop and not (self.ddp is None and self.stop_signal is not None):
                pending.append(self.train_step())
                step = self.step
                evaluate = self.val_set is not None and (step % self.opts.eval_every == 0 or step == self.opts.steps)
                checkpoint = step % self.opts.ckpt_every == 0
                if evaluate or checkpoint or step % self.opts.log_every == 0 or step == self.opts.steps:
                    stop = report(evaluate)
                    if checkpoint:
                        self.save()  # after the records of its steps: a resumed run never lacks one
                    tick = time.perf_counter()  # the rate counts training, not evaluation or checkpoints
            if pending:  # a single process stopped between reports
                report(evaluate=False)
            if self.saved_step != self.step:
                self.save()
        finally:
            if metrics is not None:
                metrics.close()
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)
        return history

    def _request_stop(self, signum, frame):
        self.stop_signal = signum
        signal.signal(signum, self._handlers[signum])
