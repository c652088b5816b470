#!/usr/bin/env python
"""The GPU check: everything a first CUDA machine should confirm, in one go, into one JSON file.

    python benchmarks/gpu_check.py --out gpu_check.json     # on a CUDA machine: under 8 minutes
    python benchmarks/gpu_check.py --smoke --out smoke.json # the same parts on the CPU, tiny (tests the script)

Parts, each in a process of its own under its own time limit, so that a part that fails, crashes the
CUDA context or runs over is recorded as such in the JSON and the others still run:

  tests           pytest tests/test_cuda.py: the CUDA-only tests
  codec           a model on the GPU encodes the same latent bytes as on the CPU (library, and `jet
                  encode --device cuda` vs `--device cpu`, whole files); `jet decode --device cuda` of
                  that latent gives the image back
  nccl            a Trainer in a one-process nccl group (DDP, its statistics and stop flag all_reduced
                  over nccl, the barrier and teardown of the finish) against the plain Trainer
  train           bf16 ("fast") training of the ablation-64 preset at batch 256, timed on the Trainer's
                  own train_step (with its statistics read as `run` reads them); matmul FLOP/s per
                  second against the bf16 matmul rate measured here: the MFU (target >= 0.5)
  train-compiled  the same with --compile (torch.compile), in whatever time is left

The whole run keeps to BUDGET_S; each part gets at most its LIMITS_S (`--limit PART=SECONDS` to change
one). The JSON is rewritten after every part, so a run cut short still leaves what it measured. Exit
status: 0 when every part passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# jetcli is imported inside each part: a broken import is then that part's recorded failure.
REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 450  # the whole check, parts and their start-up: 8 minutes with room to spare
LIMITS_S = {"tests": 150, "codec": 90, "nccl": 60, "train": 150, "train-compiled": 180}
PARTS = tuple(LIMITS_S)
SMOKE_PARTS = ("tests", "codec", "nccl", "train")  # torch.compile takes minutes on a CPU
MFU_TARGET = 0.5
MIN_PART_S = 10  # a part is not started with less time than this left


# =========================================================================== the driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="run the parts on the CPU with a tiny model")
    parser.add_argument("--parts", default=None, help=f"comma-separated, from {', '.join(PARTS)} (default all)")
    parser.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS",
                        help="another time limit for one part (repeatable)")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return run_here(args.part, args.smoke, args.result)
    try:
        parts = parse_parts(args.parts, args.smoke)
        limits = {**LIMITS_S, **parse_limits(args.limit)}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = check(parts, limits, args.smoke, args.out)
    return 0 if report["passed"] else 1


def parse_parts(spec: str | None, smoke: bool) -> list[str]:
    parts = [p.strip() for p in spec.split(",")] if spec else list(SMOKE_PARTS if smoke else PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"--parts: unknown {', '.join(unknown)} (choose from {', '.join(PARTS)})")
    return parts


def parse_limits(specs: list[str]) -> dict[str, float]:
    limits = {}
    for spec in specs:
        name, _, seconds = spec.partition("=")
        try:
            limits[name] = float(seconds)
        except ValueError:
            raise ValueError(f"--limit {spec}: expected PART=SECONDS") from None
        if name not in PARTS or not limits[name] > 0:
            raise ValueError(f"--limit {spec}: expected a part ({', '.join(PARTS)}) and a positive number")
    return limits


def check(parts: list[str], limits: dict[str, float], smoke: bool, out: Path) -> dict:
    """Run the parts one after another, each in its own process; the report after each part goes to `out`."""
    start = time.monotonic()
    report = {"script": "benchmarks/gpu_check.py", "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "smoke": smoke, "budget_s": BUDGET_S, "environment": environment(), "parts": {}}
    for name in parts:
        left = BUDGET_S - (time.monotonic() - start)
        if left < MIN_PART_S:
            report["parts"][name] = {"status": "skipped", "reason": f"{left:.0f} s of the {BUDGET_S} s budget left"}
        else:
            report["parts"][name] = run_part(name, min(limits[name], left), smoke)
        print(f"{name}: {report['parts'][name]['status']}", file=sys.stderr, flush=True)
        report["seconds"] = round(time.monotonic() - start, 1)
        report["passed"] = all(p["status"] == "passed" for p in report["parts"].values())
        write_json(out, report)
    return report


def run_part(name: str, limit: float, smoke: bool) -> dict:
    """One part in a child process (its own session, so that a timeout ends its children too)."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        result_file = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--part", name, "--result", str(result_file)] + (["--smoke"] if smoke else [])
        started = time.monotonic()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                 start_new_session=True)
        try:
            output, _ = child.communicate(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            output, _ = child.communicate()
            timed_out = True
        seconds = round(time.monotonic() - started, 1)
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
    if timed_out:
        status = "timeout"
    elif child.returncode != 0 or "passed" not in result:
        status = "error"
    else:
        status = "passed" if result["passed"] else "failed"
    record = {"status": status, "seconds": seconds, "limit_s": round(limit, 1), **result}
    if status != "passed":
        record["output_tail"] = output[-3000:]
    return record


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "machine": platform.machine(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpus=torch.cuda.device_count(), gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return info


# =========================================================================== in the child process
def run_here(name: str, smoke: bool, result_file: Path) -> int:
    """Run one part and write its result; an exception is written down too, with the traceback's end."""
    try:
        result = PART_FUNCTIONS[name](smoke)
    except Exception as e:
        result = {"passed": False, "exception": f"{type(e).__name__}: {e}"[:2000],
                  "traceback_tail": traceback.format_exc()[-3000:]}
    write_json(result_file, result)
    return 0


def device_for(smoke: bool):
    return torch.device("cpu" if smoke else "cuda")


def part_tests(smoke: bool) -> dict:
    """pytest tests/test_cuda.py; on the CPU (smoke) every test skips."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
                               f"--junitxml={junit}"], capture_output=True, text=True, cwd=REPO)
        suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('name')}: {(problem.get('message') or '')[:300]}" for case in suite.iter("testcase")
              for problem in list(case.findall("failure")) + list(case.findall("error"))]
    ran_all = smoke or counts["skipped"] == 0  # on a GPU, a skipped CUDA test is a finding too
    return {"passed": done.returncode == 0 and ran_all, **counts, "failed": failed,
            "pytest_tail": done.stdout[-1500:]}


def part_codec(smoke: bool) -> dict:
    """The codec computes on the CPU whatever device holds the model: the latent of a GPU model, and
    the latent file of `jet encode --device cuda`, must be the CPU's, byte for byte."""
    from PIL import Image

    from jetcli import JetConfig, checkpoints, codec
    from jetcli.testing import random_jet

    device = device_for(smoke)
    config = JetConfig(image_size=(16, 16), couplings=4, block_depth=1, width=32, heads=2)
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)  # 2x3 tiles
    library = {name: codec.encode(random_jet(config, seed=1, device=d), pixels).latent
               for name, d in (("cpu", "cpu"), ("device", device))}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoints.save(random_jet(config, seed=1), tmp / "model")
        Image.fromarray(pixels).save(tmp / "image.png")

        def jet(*args, data: bytes | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "jetcli", *map(str, args), "-m", tmp / "model"], input=data,
                                  capture_output=True, cwd=tmp)

        files = {d: jet("encode", tmp / "image.png", "--device", d) for d in ("cpu", device.type)}
        back = jet("decode", "-", "--device", device.type, data=files[device.type].stdout)
    errors = [p.stderr.decode()[-500:] for p in (*files.values(), back) if p.returncode != 0]
    decoded = np.asarray(Image.open(io.BytesIO(back.stdout))) if not errors else None
    same_library = library["cpu"].dtype == library["device"].dtype and \
        library["cpu"].tobytes() == library["device"].tobytes()
    same_files = not errors and files["cpu"].stdout == files[device.type].stdout
    round_trip = decoded is not None and np.array_equal(decoded, pixels)
    return {"passed": same_library and same_files and round_trip, "library_latents_identical": same_library,
            "latent_dtype": str(library["cpu"].dtype), "cli_latent_files_identical": same_files,
            "cli_decode_on_device_exact": round_trip, "cli_errors": errors}


def part_nccl(smoke: bool) -> dict:
    """DDP over a real one-process group (nccl on the GPU; gloo in the smoke run) against the plain loop."""
    import torch.distributed as dist

    from jetcli.config import preset
    from jetcli.data import ImageSet
    from jetcli.train import Trainer, TrainOptions, finish_distributed, init_distributed

    device = device_for(smoke)
    config = preset("tiny-16").replace(couplings=2)
    images = ImageSet(np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        options = lambda name: TrainOptions(out=Path(tmp) / name, steps=4, batch_size=8, log_every=2, ckpt_every=2,
                                            ema=0.9, device=str(device))
        plain = Trainer(config, images, images, options("plain"))
        plain_records = plain.run()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        backend = "gloo" if smoke else "nccl"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        processes, ddp_device = init_distributed(device)  # the group is there: this process's device
        parallel = Trainer(config, images, images, replace(options("ddp"), device=str(ddp_device)), processes)
        parallel_records = parallel.run()
        wrapped = parallel.ddp is not None
        finish_distributed(ddp_device)
        left_group = not dist.is_initialized()
    worst = {key: max(abs(a[key] - b[key]) for a, b in zip(plain_records, parallel_records))
             for key in ("bpd", "grad_norm")}
    weights = max((p.detach() - q.detach()).abs().max().item()
                  for p, q in zip(plain.model.parameters(), parallel.model.parameters()))
    finite = all(math.isfinite(r["bpd"]) for r in parallel_records)
    steps_equal = [r["step"] for r in plain_records] == [r["step"] for r in parallel_records]
    # The same GPU and kernels: any difference is kernel nondeterminism, far below this bound.
    close = weights < 1e-4 and worst["bpd"] < 1e-4
    return {"passed": wrapped and left_group and finite and steps_equal and close, "backend": backend,
            "device": str(ddp_device), "ddp_wrapped": wrapped, "left_group": left_group,
            "max_abs_diff": {**worst, "weights": weights}, "bit_identical": weights == 0.0,
            "val_bpd": [parallel_records[-1].get("val_bpd"), plain_records[-1].get("val_bpd")]}


def part_train(smoke: bool, compile: bool = False) -> dict:
    """bf16 training throughput and MFU of the ablation preset at batch 256 (micro-batches if it does
    not fit), timed on Trainer.train_step itself."""
    from jetcli.config import PRESETS, preset
    from jetcli.data import ImageSet
    from jetcli.train import Trainer, TrainOptions

    device = device_for(smoke)
    name = "tiny-16" if smoke else ("ablation-64" if "ablation-64" in PRESETS else "imagenet64-ablation")
    config, batch = preset(name), 8 if smoke else 256
    warmup, timed_steps = (1, 2) if smoke else (3, 12)
    images = ImageSet(np.random.default_rng(0).integers(0, 256, (max(64, 2 * batch), *config.image_size, 3),
                                                         dtype=np.uint8))
    flops_per_image = 3 * load_benchmarks().matmul_flops_per_image(config)  # forward + backward
    tries = []
    with tempfile.TemporaryDirectory() as tmp:
        for grad_accum in (2**k for k in range(int(math.log2(batch)) + 1)):
            opts = TrainOptions(out=Path(tmp), steps=10**6, batch_size=batch, grad_accum=grad_accum, precision="fast",
                                device=str(device), compile=compile)
            try:
                records, warm_s, seconds = timed_training(Trainer(config, images, None, opts), warmup, timed_steps)
                break
            except torch.cuda.OutOfMemoryError:
                tries.append(f"grad_accum {grad_accum}: out of memory")
            torch.cuda.empty_cache()  # after the handler: the failed attempt's tensors are gone
        else:
            raise RuntimeError(f"out of memory even one image per micro-batch: {tries}")
    memory = peak_memory_gib(device)  # of the timed steps, before the matmul rates below
    images_per_s = batch * timed_steps / seconds
    achieved = images_per_s * flops_per_image
    # The model's largest product (the MLP's first layer over a micro-batch's tokens) sets the peak, as
    # in benchmarks/run.py; a large square product's rate is recorded beside it.
    width = config.width
    peak = bf16_matmul_rate(batch // grad_accum * config.num_patches, width, config.mlp_ratio * width, device)
    square = bf16_matmul_rate(*(512 if smoke else 8192,) * 3, device)
    mfu = achieved / peak
    finite = all(math.isfinite(r["bpd"]) and math.isfinite(r["grad_norm"]) for r in records)
    return {"passed": finite and (smoke or mfu >= MFU_TARGET), "preset": name, "batch": batch,
            "grad_accum": grad_accum, "micro_batch": batch // grad_accum, "precision": "fast (bf16 autocast)",
            "compile": compile, "warmup_steps": warmup, "warmup_s": round(warm_s, 2), "timed_steps": timed_steps,
            "step_s": seconds / timed_steps, "images_per_s": images_per_s,
            "matmul_tflop_per_image": flops_per_image / 1e12, "achieved_tflop_per_s": achieved / 1e12,
            "bf16_matmul_tflop_per_s": peak / 1e12, "mfu": mfu, "mfu_target": MFU_TARGET,
            "bf16_square_matmul_tflop_per_s": square / 1e12, "mfu_vs_square_matmul": achieved / square,
            "peak_memory_gib": memory, "out_of_memory_tries": tries,
            "last_bpd": records[-1]["bpd"]}


def timed_training(trainer, warmup: int, steps: int) -> tuple[list[dict], float, float]:
    """`warmup` steps, then `steps` timed ones, each batch of steps ended by one read of their statistics
    (which waits for the device), as Trainer.run reads them: (records, warm-up s, timed s)."""
    started = time.perf_counter()
    trainer.read_stats(list(range(1, warmup + 1)), [trainer.train_step() for _ in range(warmup)])
    warm_s = time.perf_counter() - started
    reset_peak_memory(trainer.device)
    started = time.perf_counter()
    stats = [trainer.train_step() for _ in range(steps)]
    records, _ = trainer.read_stats(list(range(warmup + 1, warmup + steps + 1)), stats)
    return records, warm_s, time.perf_counter() - started


def part_train_compiled(smoke: bool) -> dict:
    return part_train(smoke, compile=True)


def bf16_matmul_rate(rows: int, inner: int, cols: int, device: torch.device) -> float:
    """FLOP/s of a bf16 product (rows, inner) x (inner, cols), back to back with one wait per window; the
    best of five windows."""
    x = torch.randn(rows, inner, device=device, dtype=torch.bfloat16)
    weight = torch.randn(cols, inner, device=device, dtype=torch.bfloat16)
    flops, best = 2 * rows * inner * cols, 0.0
    with torch.inference_mode():
        F.linear(x, weight)
        for _ in range(5):
            synchronize(device)
            started, calls = time.perf_counter(), 0
            while calls < 3 or time.perf_counter() - started < 0.2:
                for _ in range(10):
                    F.linear(x, weight)
                calls += 10
                synchronize(device)
            best = max(best, flops * calls / (time.perf_counter() - started))
    return best


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def load_benchmarks():
    """benchmarks/run.py, for its FLOP formula (tested against torch's FLOP counter there)."""
    spec = importlib.util.spec_from_file_location("benchmarks_run", Path(__file__).with_name("run.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


PART_FUNCTIONS = {"tests": part_tests, "codec": part_codec, "nccl": part_nccl, "train": part_train,
                  "train-compiled": part_train_compiled}

if __name__ == "__main__":
    sys.exit(main())
