#!/usr/bin/env python
"""The training data path at ImageNet scale: memory and speed of jetcli.data on a .npy larger than memory.

    nice -n 19 taskset -c 1 python benchmarks/loader.py            # writes benchmarks/results/loader.json

1. A 40 GB uint8 (N, 64, 64, 3) .npy is made in /tmp as a sparse file (np.lib.format.open_memmap: no
   disk is used; its pixels read as zeros), and deleted at the end.
2. Loader throughput on one thread, for batches of 256 64x64 images: `Stream.batch` (epoch order,
   gather, crop, flip, hashed dequantisation noise, float32 out) of whole images at random positions of
   the 40 GB file and of 64x64 crops with flips of photos in memory; and the trainer's own path
   (uint8 items, then `dequantize(pixels, uniform(keys))` as Trainer.model_input does on the CPU).
   Rates per second of the thread's CPU time (what one core delivers; on a shared machine the wall-clock
   rate also counts the time other processes held the core) and per wall-clock second. The sparse
   file's pages cost no disk reads: this measures the CPU's work, not a disk.
3. Peak resident memory of `jet train` on the 40 GB file (a tiny model, so that data dominates), and of
   the same command on a 2,000-image .npy, the baseline of the process itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from jetcli.data import ImageSet, Stream, dequantize, map_npy, uniform

REPO = Path(__file__).resolve().parents[1]
SIDE = 64


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            return line.split(":", 1)[1].strip() + (" with AMX" if "amx_tile" in flags else "")
    return platform.processor()


def sparse_npy(path: Path, gigabytes: float) -> int:
    count = int(gigabytes * 1e9) // (SIDE * SIDE * 3)
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, SIDE, SIDE, 3)).flush()
    return count


def trainer_path(stream: Stream):
    """What the trainer does on the CPU: uint8 items from its data thread, then dequantize(uniform(keys))
    in the step (Trainer.batch_at and Trainer.model_input)."""
    def make(positions: torch.Tensor) -> torch.Tensor:
        pixels = stream.pixels(positions)
        return dequantize(pixels, uniform(stream.keys(positions), pixels[0].numel()).view(pixels.shape))
    return make


def images_per_second(make_batch, batch: int, batches: int) -> dict:
    """Rates of `batches` consecutive batches of `batch` stream positions (after one warm-up batch)."""
    make_batch(torch.arange(batch))
    wall, cpu = [], []
    for k in range(1, batches + 1):
        start, start_cpu = time.perf_counter(), time.thread_time()
        make_batch(torch.arange(k * batch, (k + 1) * batch))
        wall.append(batch / (time.perf_counter() - start))
        cpu.append(batch / (time.thread_time() - start_cpu))
    return {"batch": batch, "batches": batches,
            "per_cpu_second": {"median": statistics.median(cpu), "best": max(cpu), "worst": min(cpu)},
            "per_wall_second": {"median": statistics.median(wall), "best": max(wall), "worst": min(wall)}}


def peak_rss_of_training(data: Path, steps: int, batch: int) -> dict:
    """`jet train` on `data` in a child process: its peak resident set (wait4's rusage of that child)."""
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryFile() as log:
        command = [sys.executable, "-m", "jetcli", "train", str(data), "--preset", "tiny-16", "--steps", str(steps),
                   "--batch-size", str(batch), "--val-fraction", "0.001", "--eval-every", str(steps),
                   "--ckpt-every", str(steps), "--device", "cpu", "--precision", "fp32", "-o", out]
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=log, stderr=log)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        if status:
            log.seek(0)
            raise SystemExit(f"jet train failed:\n{log.read().decode()[-3000:]}")
    return {"steps": steps, "batch": batch, "images_read": steps * batch, "seconds": seconds,
            "peak_rss_gib": usage.ru_maxrss / 2**20, "command": " ".join(command[1:])}  # ru_maxrss: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gigabytes", type=float, default=40.0)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--train-steps", type=int, default=100, help="0: no jet train runs")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loader.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {"machine": {"cpu": cpu_name(), "cpus_usable": len(os.sched_getaffinity(0)),
                          "load_average_before": os.getloadavg(), "torch": torch.__version__,
                          "numpy": np.__version__}}
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        data = Path(folder) / "sparse.npy"
        count = sparse_npy(data, args.gigabytes)
        result["file"] = {"images": count, "bytes": data.stat().st_size,
                          "bytes_on_disk": data.stat().st_blocks * 512}
        whole = Stream(ImageSet(map_npy(data)), seed=0)
        result["whole_64_from_npy"] = images_per_second(whole.batch, 256, args.batches)
        result["whole_64_from_npy_trainer_path"] = images_per_second(trainer_path(whole), 256, args.batches)
        photos = [np.random.default_rng(i).integers(0, 256, (321, 481, 3), dtype=np.uint8) for i in range(64)]
        crops = Stream(ImageSet(photos, crop=SIDE, flip=True), seed=0)
        result["crop_64_flip_from_photos"] = images_per_second(crops.batch, 256, args.batches)
        del whole
        if args.train_steps:
            result["jet_train_peak_rss"] = peak_rss_of_training(data, args.train_steps, 64)
            small = Path(folder) / "small.npy"
            np.save(small, np.zeros((2000, SIDE, SIDE, 3), np.uint8))
            result["jet_train_peak_rss_baseline_2000_images"] = peak_rss_of_training(small, args.train_steps, 64)
    result["machine"]["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
