#!/usr/bin/env python
"""jetcli against jet-pytorch 0.0.2 on the same weights: speed, memory and hardware efficiency.

    python benchmarks/run.py speed                                  # preset cpu-32, batch 64
    python benchmarks/run.py speed --preset imagenet64-ablation --batch 4 --pairs 3
    python benchmarks/run.py speed --device cuda --preset imagenet64-ablation --batch 256 --micro-batch 64
    python benchmarks/run.py speed --json > speed.json              # for scripts
    python benchmarks/run.py curve                                  # float32 vs fast training curves

`speed` times, for each contender, one training step (forward, backward, grad-norm clip, AdamW step),
bits/dim evaluation, sampling (inverse of N(0,1) * temperature), encode (forward) and decode (inverse).
The contenders run alternately in one process (jetcli fp32, jetcli fast, jet-pytorch, then again), so
every round gives a ratio measured under the same machine conditions; we report each round's ratio and
their median. See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from jetcli import Jet, JetConfig, checkpoints, preset
from jetcli.codec import exact_arithmetic
from jetcli.data import ImageSet
from jetcli.kernels import TunedLinear as Linear
from jetcli.likelihood import bits_per_dim, dequantize
from jetcli.model import patchify
from jetcli.precision import compute_context
from jetcli.testing import port_of, random_jet
from jetcli.train import Trainer, TrainOptions

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PORT_NUMERICS = dict(ln_eps=1e-5, gelu="exact")  # jet-pytorch 0.0.2 uses torch's LayerNorm eps and exact GELU
TASKS = ("train", "bpd", "sample", "encode", "decode")
LOSSLESS = ("encode", "decode")  # never in bf16
# Adam as jetcli.train uses it (big_vision's betas and eps); the same for both libraries.
ADAM = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-5 / 3e-4)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
err = Console(stderr=True)


@app.callback()
def main():
    """jetcli benchmarks: `speed` (side by side with jet-pytorch) and `curve` (fp32 vs fast training)."""


# =========================================================================== FLOPs and peak rates
def matmul_flops_per_image(cfg: JetConfig) -> float:
    """Matrix-multiply FLOPs (2 per multiply-add) of one forward pass of one image.

    With N tokens, ViT width W, MLP ratio r and h = patch_dim / 2 numbers per token entering a ViT,
    each coupling costs

        init_proj 2·N·h·W  +  depth · (qkv 6·N·W² + attention 4·N²·W + out 2·N·W² + MLP 4·r·N·W²)
        +  final_proj 2·N·W·2h.

    Attention is q·kᵀ and softmax·v (2·N²·W each). The splits are gathers, not products, and norms,
    softmax and the elementwise ops are not counted. A training step costs 3x this (the backward pass
    takes one product for the input gradient and one for the weight gradient; the first coupling's
    input gradient, skipped by autograd, is counted anyway: under 0.1%). bpd, sampling, encode and
    decode cost 1x.
    """
    n, w, h = cfg.num_patches, cfg.width, cfg.patch_dim // 2
    block = 6 * n * w * w + 4 * n * n * w + 2 * n * w * w + 4 * cfg.mlp_ratio * n * w * w
    return cfg.couplings * (2 * n * h * w + cfg.block_depth * block + 2 * n * w * 2 * h)


def task_flops(cfg: JetConfig, task: str) -> float:
    return matmul_flops_per_image(cfg) * (3 if task == "train" else 1)


def matmul_rates(cfg: JetConfig, batch: int, device: torch.device, seconds: float) -> dict:
    """GFLOP/s of this machine for the model's largest product (the MLP's first layer at this batch),
    in float32 and bf16, through torch's own F.linear and through jetcli's Linear (oneDNN on CPU).
    `peak` is the best of them: the rate the model's matmuls could reach on this machine."""
    w, hidden = cfg.width, cfg.mlp_ratio * cfg.width
    x = torch.randn(batch, cfg.num_patches, w, device=device)
    layer = Linear(w, hidden).to(device)
    flops = 2 * x.shape[0] * x.shape[1] * w * hidden
    rates = {}
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        xd, ld = x.to(dtype), layer.to(dtype)
        with torch.inference_mode():
            for route, fn in (("F.linear", lambda: F.linear(xd, ld.weight, ld.bias)), ("jetcli Linear", lambda: ld(xd))):
                rates[f"{name} {route}"] = _best_rate(fn, flops, device, seconds)
        rates[f"{name} peak"] = max(v for k, v in rates.items() if k.startswith(name))
    return rates


def _best_rate(fn, flops: float, device: torch.device, seconds: float) -> float:
    """Best GFLOP/s over a few short windows (the least disturbed one on a shared machine)."""
    fn()
    best = 0.0
    for _ in range(5):
        sync(device)
        start, calls = time.perf_counter(), 0
        while calls == 0 or time.perf_counter() - start < seconds / 5:
            fn()
            calls += 1
            sync(device)
        best = max(best, flops * calls / (time.perf_counter() - start) / 1e9)
    return best


# =========================================================================== the contenders
@dataclass
class Contender:
    """One library at one precision. jetcli's fp32 and fast contenders share one model."""

    name: str
    model: torch.nn.Module
    precision: str  # "fp32" or "fast"
    port: bool  # jet-pytorch: takes and returns patchified latents, (B, 1) logdets
    optimizer: torch.optim.Optimizer
    seconds: dict[str, list[float]] = field(default_factory=dict)
    cpu_seconds: dict[str, list[float]] = field(default_factory=dict)
    peak_bytes: dict[str, int] = field(default_factory=dict)

    def context(self, device: torch.device):
        return contextlib.nullcontext() if self.port else compute_context(device, self.precision)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, logdet = self.model(x)
        return z, logdet.reshape(-1)


def image_batch(cfg: JetConfig, n: int, seed: int) -> torch.Tensor:
    """uint8 (n, H, W, C): CIFAR-10 test images for 32x32 RGB when ../shared/data has them, else noise."""
    path = SHARED / "cifar10_lossless_subset.npz"
    if tuple(cfg.image_size) == (32, 32) and cfg.channels == 3 and path.is_file():
        images = np.load(path)["test_images"]
        return torch.from_numpy(images[np.arange(n) % len(images)].copy())
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *cfg.image_size, cfg.channels), generator=g, dtype=torch.uint8)


# =========================================================================== one call of each task
def make_call(c: Contender, task: str, pixels: torch.Tensor, micro_batch: int, temperature: float,
              device: torch.device):
    """A function that runs the task once on the batch: what is timed."""
    model, batch = c.model, len(pixels)
    if task in ("train", "bpd"):
        x = dequantize(pixels, torch.Generator().manual_seed(1)).to(device)
    if task == "train":
        def call():
            model.train()
            for part in x.split(micro_batch):
                with c.context(device):
                    z, logdet = c.forward(part)
                (bits_per_dim(z.float(), logdet.float()).bpd.sum() / batch).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            c.optimizer.step()
            c.optimizer.zero_grad(set_to_none=True)
        return call
    model.eval()
    if task == "bpd":
        def call():
            with torch.inference_mode(), c.context(device):
                z, logdet = c.forward(x)
                return bits_per_dim(z.float(), logdet.float()).bpd
        return call
    if task == "sample":
        noise, shape = torch.Generator(device=device).manual_seed(2), latent_shape(c, batch)

        def call():
            with torch.inference_mode(), c.context(device):
                return model.inverse(torch.randn(shape, generator=noise, device=device) * temperature)[0]
        return call
    # encode/decode: jetcli under its codec's exact arithmetic; jet-pytorch has no codec: plain float32.
    lossless = (lambda: contextlib.nullcontext()) if c.port else (lambda: exact_arithmetic(device))
    centres = (pixels.to(device).float() + 0.5) / 127.5 - 1  # the codec encodes bin centres
    if task == "encode":
        def call():
            with torch.inference_mode(), lossless():
                return model(centres)[0]
        return call
    with torch.inference_mode(), lossless():
        latents = model(centres)[0]

    def call():
        with torch.inference_mode(), lossless():
            return model.inverse(latents)[0]
    return call


def latent_shape(c: Contender, batch: int) -> tuple[int, ...]:
    if c.port:  # the port's inverse takes patchified latents
        return (batch, c.model.blocks[0].dnn.pos_emb.shape[1], c.model.blocks[0].dnn.final_proj.out_features)
    cfg = c.model.config
    return (batch, *cfg.image_size, cfg.channels)


# =========================================================================== measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


class PeakMemory:
    """Extra memory at the peak of a block: CUDA's allocator statistics, or on CPU the resident set's
    high-water mark (Linux /proc, reset through clear_refs) above what was resident before."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed blocks, so the base is honest
            self.base = _proc_status_kib("VmRSS")
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None and (peak := _proc_status_kib("VmHWM")) is not None:
            self.bytes = (peak - self.base) * 1024


def _proc_status_kib(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def busy_processes() -> list[str]:
    """Other processes that are probably computing: `jet train` runs and test suites."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) in (os.getpid(), os.getppid()):
            continue
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if "jet train" in cmd or "pytest" in cmd:
                found.append(f"{proc.name} {cmd[:120]}")
    return found


MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def machine(device: torch.device) -> dict:
    """The machine a result was measured on: CPU model and the flags that decide its matmul kernels."""
    cpu, flags = platform.processor() or platform.machine(), []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = [f for f in MATMUL_FLAGS if f in line.split(":", 1)[1].split()]
                break
    info = {"cpu": cpu, "cpu_flags": flags, "vendor": "AMD" if "amd" in cpu.lower() else
            "Intel" if "intel" in cpu.lower() else "unknown", "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# =========================================================================== speed
@app.command()
def speed(
    preset_name: str = typer.Option("cpu-32", "--preset", help="jetcli preset to build (random weights)."),
    weights: Path = typer.Option(None, help="Use this checkpoint instead of random weights (any format "
                                            "jetcli.checkpoints.load reads)."),
    numerics: str = typer.Option("port", help="'port': LayerNorm eps 1e-5 and exact GELU, jet-pytorch's, so "
                                              "both compute the same function; 'preset': the preset's own."),
    batch: int = typer.Option(64, help="Images per call."),
    micro_batch: int = typer.Option(0, help="Training micro-batch (gradient accumulation); 0 = the batch."),
    pairs: int = typer.Option(5, help="Rounds of alternation per task (each gives one ratio)."),
    tasks: str = typer.Option(",".join(TASKS), help="Comma-separated subset of " + ",".join(TASKS) + "."),
    modes: str = typer.Option("fp32,fast", help="jetcli precisions to time: fp32, fast or both."),
    port: bool = typer.Option(True, help="Time jet-pytorch too (skipped with a note if not installed)."),
    temperature: float = typer.Option(1.0, help="Sampling temperature."),
    device_name: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    threads: int = typer.Option(0, help="torch threads (0 = torch's default)."),
    matmul_seconds: float = typer.Option(2.0, help="Time spent measuring each matmul rate."),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    out: Path = typer.Option(None, help="Also write the JSON result to this file."),
):
    """Time jetcli and jet-pytorch alternately on the same weights."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available() else
                          "cpu" if device_name == "auto" else device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("--device cuda: no CUDA device here")
    task_list = [t for t in TASKS if t in tasks.split(",")]  # bpd ... decode first: train changes the weights
    task_list = [t for t in task_list if t != "train"] + (["train"] if "train" in task_list else [])
    mode_list = [m for m in ("fp32", "fast") if m in modes.split(",")]
    if not task_list or not mode_list or numerics not in ("port", "preset"):
        raise typer.BadParameter("need at least one known task and mode, and numerics 'port' or 'preset'")
    micro_batch = micro_batch or batch
    busy_before = busy_processes()
    load_before = os.getloadavg()

    try:
        loaded = checkpoints.load(weights) if weights is not None else None
        cfg = loaded.config if loaded is not None else preset(preset_name)
    except ValueError as e:  # CheckpointError is one
        raise typer.BadParameter(str(e)) from None
    cfg = cfg.replace(**PORT_NUMERICS) if numerics == "port" else cfg
    if loaded is None:
        model = random_jet(cfg, seed, device=device).train()  # the mode the old loop timed in
    else:
        model = Jet(cfg).to(device)
        model.load_state_dict(loaded.state_dict())
    contenders, note = make_contenders(model, mode_list, port)
    pixels = image_batch(cfg, batch, seed)
    agreement = check_agreement(contenders, pixels, device)

    rates = matmul_rates(cfg, batch, device, matmul_seconds)
    with Progress(console=err, transient=True, disable=as_json) as progress:
        bar = progress.add_task("timing", total=len(task_list) * (pairs + 1))
        for task in task_list:
            time_task(contenders, task, pixels, micro_batch, temperature, device, pairs, lambda: progress.advance(bar))
    rates_after = matmul_rates(cfg, batch, device, matmul_seconds)
    rates = {k: max(v, rates_after[k]) for k, v in rates.items()}

    result = summarise(cfg, contenders, task_list, batch, rates, agreement, device)
    result.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine(device),
                  command=" ".join(sys.argv), preset=None if weights else preset_name,
                  weights=str(weights) if weights else None, numerics=numerics, batch=batch,
                  micro_batch=micro_batch, pairs=pairs, temperature=temperature,
                  load_average={"before": load_before, "after": os.getloadavg()},
                  busy_processes={"before": busy_before, "after": busy_processes()}, note=note)
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if as_json:
        print(text)
    else:
        show(result)


def make_contenders(model: Jet, mode_list: list[str], port: bool) -> tuple[list[Contender], str | None]:
    """jetcli in each precision on `model`, and jet-pytorch on a copy of its weights when asked and
    installed; the note says why jet-pytorch is missing, if it is."""
    contenders = [Contender(f"jetcli {m}", model, m, False, torch.optim.AdamW(model.parameters(), **ADAM))
                  for m in mode_list]
    if len(contenders) == 2:  # fp32 and fast train the same weights: one optimiser
        contenders[1].optimizer = contenders[0].optimizer
    if not port:
        return contenders, None
    try:
        reference = port_of(model)
    except ImportError as e:
        return contenders, f"jet-pytorch not timed: {e}"
    contenders.append(Contender("jet-pytorch", reference, "fp32", True, torch.optim.AdamW(reference.parameters(), **ADAM)))
    return contenders, None


def time_task(contenders: list[Contender], task: str, pixels: torch.Tensor, micro_batch: int, temperature: float,
              device: torch.device, pairs: int, advance) -> None:
    """One warm-up call each, then `pairs` rounds in which the contenders take turns (each round gives
    a ratio under the same machine conditions), then one call each under the peak-memory probe."""
    runners = [c for c in contenders if not (task in LOSSLESS and c.precision == "fast")]
    calls = [make_call(c, task, pixels, micro_batch, temperature, device) for c in runners]
    for call in calls:  # warm-up: first-call allocations, kernel selection, optimiser state
        call()
    advance()
    for _ in range(pairs):
        for c, call in zip(runners, calls):
            wall, cpu = timed(call, device)
            c.seconds.setdefault(task, []).append(wall)
            c.cpu_seconds.setdefault(task, []).append(cpu)
        advance()
    for c, call in zip(runners, calls):
        with PeakMemory(device) as memory:
            call()
        c.peak_bytes[task] = memory.bytes


def check_agreement(contenders: list[Contender], pixels: torch.Tensor, device: torch.device) -> dict:
    """Per-image bpd of every contender on the same images and noise, against jetcli fp32's; and the
    port's latents against jetcli's (relative error), to show they hold the same function."""
    x = dequantize(pixels, torch.Generator().manual_seed(3)).to(device)
    bpd, latents = {}, {}
    for c in contenders:
        c.model.eval()
        with torch.inference_mode(), c.context(device):
            z, logdet = c.forward(x)
            bpd[c.name] = bits_per_dim(z.float(), logdet.float()).bpd.double()
            latents[c.name] = z.float().flatten(1)
    base = contenders[0].name
    out = {"images": len(x), "reference": base, "mean_bpd": {k: v.mean().item() for k, v in bpd.items()},
           "max_abs_bpd_diff": {k: (v - bpd[base]).abs().max().item() for k, v in bpd.items() if k != base}}
    if "jet-pytorch" in latents and base == "jetcli fp32":  # the port's latents are patchified
        cfg = contenders[0].model.config
        ours = patchify(latents[base].reshape(len(x), *cfg.image_size, -1), cfg.patch_size).flatten(1)
        theirs = latents["jet-pytorch"]
        out["latent_relative_error"] = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    return out


def summarise(cfg: JetConfig, contenders: list[Contender], task_list: list[str], batch: int, rates: dict,
              agreement: dict, device: torch.device) -> dict:
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    port = next((c for c in contenders if c.port), None)
    rows = []
    for task in task_list:
        for c in contenders:
            if task not in c.seconds:
                continue
            secs = c.seconds[task]
            ips = [batch / s for s in secs]
            flops = task_flops(cfg, task)
            peak = rates["bf16 peak" if c.precision == "fast" else "fp32 peak"]
            row = {"task": task, "contender": c.name, "images_per_s": statistics.median(ips),
                   "images_per_s_rounds": ips, "seconds_rounds": secs,
                   "cpu_utilisation": statistics.median(cpu / (s * threads) for cpu, s in
                                                        zip(c.cpu_seconds[task], secs)) if device.type == "cpu" else None,
                   "gflop_per_s": statistics.median(ips) * flops / 1e9,
                   "fraction_of_peak": statistics.median(ips) * flops / 1e9 / peak,
                   "peak_basis": "bf16 peak" if c.precision == "fast" else "fp32 peak",
                   # against torch's default path for this precision (MKL for float32 on CPU)
                   "fraction_of_f_linear": statistics.median(ips) * flops / 1e9 / rates[
                       "bf16 F.linear" if c.precision == "fast" else "fp32 F.linear"],
                   "peak_memory_mib": None if c.peak_bytes.get(task) is None else c.peak_bytes[task] / 2**20}
            if port is not None and c is not port and task in port.seconds:
                ratios = [theirs / ours for ours, theirs in zip(secs, port.seconds[task])]
                row.update(ratio_vs_port_rounds=ratios, ratio_vs_port=statistics.median(ratios))
                if device.type == "cpu":  # by process CPU time: less sensitive to being descheduled
                    cpu = [theirs / ours for ours, theirs in zip(c.cpu_seconds[task], port.cpu_seconds[task])]
                    row.update(cpu_time_ratio_vs_port=statistics.median(cpu))
            rows.append(row)
    return {"config": cfg.to_dict(), "matmul_gflop_per_image": matmul_flops_per_image(cfg),
            "matmul_rates_gflop_per_s": rates, "agreement": agreement, "results": rows}


def show(result: dict) -> None:
    console = Console(width=max(150, Console().width))
    m = result["machine"]
    console.print(f"[bold]{result['date']}[/]  {m['cpu']} ({m['cores']} cores, {m['threads']} threads, "
                  f"{m['cpu_capability']}), torch {m['torch']}, {m['device']}")
    cfg = result["config"]
    console.print(f"config {result['preset'] or result['weights']} ({result['numerics']} numerics): "
                  f"{cfg['image_size'][0]}x{cfg['image_size'][1]}, patch {cfg['patch_size']}, {cfg['couplings']} "
                  f"couplings, depth {cfg['block_depth']}, width {cfg['width']}, {cfg['heads']} heads; batch "
                  f"{result['batch']}, {result['pairs']} alternating rounds; "
                  f"{result['matmul_gflop_per_image'] / 1e9:.3g} GFLOP/image forward (matmuls)")
    rates = result["matmul_rates_gflop_per_s"]
    console.print("matmul GFLOP/s at the MLP's shape: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
    table = Table(title="images/s (median of rounds); ratio = jet-pytorch time / jetcli time, per round")
    for col in ("task", "contender", "images/s", "GFLOP/s", "of peak", "peak MiB", "ratio (median)", "rounds",
                "CPU-time ratio"):
        table.add_column(col, justify="left" if col in ("task", "contender", "rounds") else "right")
    for r in result["results"]:
        rounds = " ".join(f"{x:.2f}" for x in r.get("ratio_vs_port_rounds", []))
        ratio = f"{r['ratio_vs_port']:.2f}x" if "ratio_vs_port" in r else ""
        mem = "" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        table.add_row(r["task"], r["contender"], f"{r['images_per_s']:.2f}", f"{r['gflop_per_s']:.0f}",
                      f"{r['fraction_of_peak']:.0%} {r['peak_basis'].split()[0]}", mem, ratio, rounds,
                      f"{r['cpu_time_ratio_vs_port']:.2f}x" if "cpu_time_ratio_vs_port" in r else "")
    console.print(table)
    a = result["agreement"]
    console.print(f"same images and noise ({a['images']}): mean bpd " +
                  ", ".join(f"{k} {v:.5f}" for k, v in a["mean_bpd"].items()) +
                  "; max |bpd - fp32| per image " + ", ".join(f"{k} {v:.2e}" for k, v in a["max_abs_bpd_diff"].items()) +
                  (f"; latents vs jet-pytorch: relative error {a['latent_relative_error']:.1e}"
                   if "latent_relative_error" in a else ""))
    busy = result["busy_processes"]["before"] + result["busy_processes"]["after"]
    load = result["load_average"]
    if busy:
        console.print(f"[yellow]other work was running (load {load['before'][0]:.1f} -> {load['after'][0]:.1f}); "
                      f"absolute rates are contaminated, the alternating ratios less so:[/]")
        for line in sorted(set(busy)):
            console.print(f"  {line}")
    if result["note"]:
        console.print(f"[yellow]{result['note']}[/]")


# =========================================================================== curve
@app.command()
def curve(
    preset_name: str = typer.Option("cpu-32", "--preset", help="jetcli preset to train (its own numerics)."),
    data: Path = typer.Option(SHARED / "cifar10_lossless_subset.npz", help=".npz with train_images and "
                                                                          "test_images (uint8 N,H,W,C)."),
    steps: int = typer.Option(300),
    batch: int = typer.Option(32),
    eval_every: int = typer.Option(50),
    eval_images: int = typer.Option(256),
    seed: int = typer.Option(0, help="Seed of the fp32 and fast runs; seed+1 gives the noise reference."),
    threads: int = typer.Option(0, help="torch threads (0 = torch's default)."),
    out: Path = typer.Option(REPO / "benchmarks" / "results" / "curve", help="Folder for curve.json/png."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Train the same model with jetcli's Trainer in float32 and in fast mode (same seed, data order and
    noise), and in float32 with another seed as the yardstick for noise; compare the curves and the
    final bpd, and evaluate each run's final weights both ways."""
    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = preset(preset_name)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    with np.load(data) as f:
        train_set = ImageSet(f["train_images"])
        val_set = ImageSet(f["test_images"][:eval_images])
    cfg = cfg.replace(image_size=train_set.image_size)
    runs = {"fp32": ("fp32", seed), "fast": ("fast", seed), f"fp32 seed {seed + 1}": ("fp32", seed + 1)}
    records = {}
    with tempfile.TemporaryDirectory() as folders, Progress(console=err, transient=True, disable=as_json) as bars:
        for name, (precision, run_seed) in runs.items():
            opts = TrainOptions(out=Path(folders) / name, steps=steps, batch_size=batch, precision=precision,
                                seed=run_seed, eval_every=eval_every, ckpt_every=steps, device="cpu")
            bar = bars.add_task(name, total=steps)
            records[name] = trainer_run(Trainer(cfg, train_set, val_set, opts), lambda r: bars.advance(bar))
    summary = compare_runs(records, seed, steps)
    summary.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine(torch.device("cpu")),
                   command=" ".join(sys.argv), preset=preset_name, batch=batch, steps=steps,
                   eval_images=len(val_set), busy_processes=busy_processes())
    out.mkdir(parents=True, exist_ok=True)
    (out / "curve.json").write_text(json.dumps({"summary": summary, "runs": records}, indent=1) + "\n")
    plot_runs(records, out / "curve.png", f"{preset_name}, batch {batch}, CIFAR-10 subset")
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        Console().print_json(json.dumps(summary))
        Console().print(f"wrote {out / 'curve.json'} and {out / 'curve.png'}")


def trainer_run(trainer: Trainer, progress) -> dict:
    """One run of the shipped training loop (jetcli.train.Trainer: its optimiser, schedule, data stream
    and noise), as curves: the training bpd of every step, the val bpd every `eval_every` steps in the
    run's own precision, and the final weights evaluated in float32 and in fast mode."""
    history = trainer.run(progress)
    opts = trainer.opts
    final = {mode: trainer.evaluate(mode) for mode in ("fp32", "fast")}
    timed = [r for r in history if "img_per_s" in r]  # one per report, over the steps since the last one
    seconds = sum((r["step"] - prev["step"]) * opts.batch_size / r["img_per_s"]
                  for prev, r in zip([{"step": 0}] + timed, timed))
    evals = [r for r in history if "val_bpd" in r]
    return {"precision": opts.precision, "seed": opts.seed, "step": [r["step"] for r in history],
            "train_bpd": [r["bpd"] for r in history], "eval_step": [r["step"] for r in evals],
            "val_bpd": [r["val_bpd"] for r in evals], "final_val_bpd": final,
            "train_images_per_s": history[-1]["step"] * opts.batch_size / seconds}


def compare_runs(records: dict, seed: int, steps: int) -> dict:
    """How far fast is from fp32 (same seed), next to how far fp32 is from fp32 with another seed."""
    base, fast, other = records["fp32"], records["fast"], records[f"fp32 seed {seed + 1}"]
    tail = max(1, steps // 5)  # the last fifth of training

    def tail_mean(r):
        return statistics.fmean(r["train_bpd"][-tail:])

    def val_gap(r):
        return max(abs(a - b) for a, b in zip(r["val_bpd"], base["val_bpd"]))

    return {
        "final_val_bpd": {name: r["final_val_bpd"] for name, r in records.items()},
        "train_bpd_last_fifth": {name: tail_mean(r) for name, r in records.items()},
        "fast_minus_fp32_train_last_fifth": tail_mean(fast) - tail_mean(base),
        "seed_minus_seed_train_last_fifth": tail_mean(other) - tail_mean(base),
        "max_val_gap_fast_run_vs_fp32_run": val_gap(fast),
        "max_val_gap_other_seed_vs_fp32_run": val_gap(other),
        # The same weights evaluated both ways: what fast mode changes in a bpd, without training effects.
        "max_fast_eval_minus_fp32_eval_same_weights": max(
            abs(r["final_val_bpd"]["fast"] - r["final_val_bpd"]["fp32"]) for r in records.values()),
        "train_images_per_s": {name: r["train_images_per_s"] for name, r in records.items()},
    }


def plot_runs(records: dict, path: Path, title: str) -> None:
    """Two panels: training bpd (mean over 10 steps) with val bpd dots, and each run's gap to fp32."""
    from PIL import Image, ImageDraw

    colours = {"fp32": (31, 119, 180), "fast": (214, 39, 40)}
    other = next(k for k in records if k not in colours)
    colours[other] = (120, 120, 120)
    width, height, margin = 960, 720, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 10), f"Jet training, float32 vs fast (bf16 ViT): {title}", fill="black")

    def smooth(values, k=10):
        return [statistics.fmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]

    base = smooth(records["fp32"]["train_bpd"])
    panels = [
        ("train bpd (10-step mean); dots: val bpd (each run's precision)", 40, 400,
         {n: (r["step"], smooth(r["train_bpd"])) for n, r in records.items()},
         {n: (r["eval_step"], r["val_bpd"]) for n, r in records.items()}),
        ("difference to the fp32 run: fast (red), fp32 with another seed (grey)", 440, 680,
         {n: (r["step"], [a - b for a, b in zip(smooth(r["train_bpd"]), base)]) for n, r in records.items()
          if n != "fp32"}, {}),
    ]
    for label, top, bottom, lines, dots in panels:
        xs = [x for s, _ in lines.values() for x in s]
        ys = [y for _, v in list(lines.values()) + list(dots.values()) for y in v]
        skip = len(ys) // 20 if top == 40 else 0  # the first steps' bpd is far above the rest
        ys_sorted = sorted(ys)
        lo, hi = ys_sorted[0], ys_sorted[-1 - skip]
        lo, hi = (lo - 0.05 * (hi - lo + 1e-9), hi + 0.05 * (hi - lo + 1e-9))
        x0, x1 = min(xs), max(xs)

        def at(x, y):
            y = min(max(y, lo), hi)
            return (margin + (x - x0) / max(1, x1 - x0) * (width - 2 * margin),
                    bottom - (y - lo) / (hi - lo) * (bottom - top - 20))

        draw.rectangle([margin, top + 20, width - margin, bottom], outline="black")
        draw.text((margin, top + 4), label, fill="black")
        for i in range(5):
            y = lo + (hi - lo) * i / 4
            draw.text((4, at(x0, y)[1] - 6), f"{y:.3f}", fill="black")
            x = x0 + (x1 - x0) * i / 4
            draw.text((at(x, lo)[0] - 10, bottom + 4), f"{x:.0f}", fill="black")
        if lo < 0 < hi:
            draw.line([at(x0, 0), at(x1, 0)], fill=(200, 200, 200))
        for name, (sx, sy) in sorted(lines.items(), key=lambda kv: kv[0] != other):  # the yardstick first
            draw.line([at(x, y) for x, y in zip(sx, sy)], fill=colours[name], width=3 if name == "fp32" else 1)
        for name, (sx, sy) in dots.items():
            for x, y in zip(sx, sy):
                cx, cy = at(x, y)
                draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], outline=colours[name], width=2)
    for i, name in enumerate(records):
        y = 70 + 16 * i
        draw.line([(width - margin - 170, y + 6), (width - margin - 140, y + 6)], fill=colours[name], width=3)
        draw.text((width - margin - 132, y), name, fill="black")
    image.save(path)


if __name__ == "__main__":
    app()
