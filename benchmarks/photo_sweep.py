"""A small sweep for the photo model at equal CPU time: input shape, couplings, ViT depth and width.

    python benchmarks/photo_sweep.py --photos ../shared/data/photos --work /work/runs/sweep \
        --cpu-minutes 10 --parallel 2 --out benchmarks/results/photo_sweep

1. Splits `photos/` by whole photo: every 20th photo (sorted paths) is validation, the rest training
   (symlinked into WORK/train and WORK/val). Random crops with horizontal flips (--flip), as the final run.
2. For each configuration, times a few fast-mode training steps on one thread (CPU seconds per step) and
   gives it the number of steps that fills `--cpu-minutes` of CPU time, so the learning-rate schedule
   runs to its end in every run.
3. Trains each with `jet train` (random crops, batch 64, one thread per run, `--parallel` runs at once,
   each pinned to its own core) and records the CPU time it really used.
4. Scores every final model on the validation photos, each photo coded whole: the top-left part that
   64x64 tiles cover (the same pixels for every input shape), cut into the model's tiles, bits summed
   over tiles / subpixels, one dequantisation draw with a fixed seed.

Writes sweep.json (every figure) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from jetcli import checkpoints
from run import machine
from stats import summary
from jetcli.config import JetConfig, preset
from jetcli.images import IMAGE_SUFFIXES, read_rgb, tiles
from jetcli.likelihood import bits_per_dim, dequantize
from jetcli.model import Jet
from jetcli.precision import compute_context

COMMON = 64  # every validation photo is cut to a multiple of this, the largest tile swept

# name: (crop, overrides of jet train). All 4 channel : 1 spatial couplings (the paper's best ratio).
CONFIGS = {
    "64px-p4-c12-d1-w192": (64, dict(patch_size=4, couplings=12, block_depth=1, width=192, heads=4)),
    "64px-p4-c24-d1-w128": (64, dict(patch_size=4, couplings=24, block_depth=1, width=128, heads=4)),
    "64px-p4-c12-d2-w128": (64, dict(patch_size=4, couplings=12, block_depth=2, width=128, heads=4)),
    "32px-p4-c12-d1-w192": (32, dict(patch_size=4, couplings=12, block_depth=1, width=192, heads=4)),
    "32px-p4-c24-d1-w128": (32, dict(patch_size=4, couplings=24, block_depth=1, width=128, heads=4)),
}


def split_photos(photos: Path, work: Path, every: int = 20) -> tuple[Path, Path]:
    files = sorted(p for p in photos.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    train, val = work / "train", work / "val"
    for folder in (train, val):
        folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        link = (val if i % every == 0 else train) / f"{f.parent.name}__{f.name}"
        if not link.exists():
            link.symlink_to(f.resolve())
    return train, val


def config_of(crop: int, overrides: dict) -> JetConfig:
    return preset("small-32").replace(image_size=(crop, crop), **overrides)


def cpu_seconds_per_step(cfg: JetConfig, batch: int, steps: int = 3) -> float:
    """Process CPU time of one fast-mode training step (forward, backward, AdamW) on one thread."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Jet(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = dequantize(torch.randint(0, 256, (batch, *cfg.image_size, 3), dtype=torch.uint8))
    times = []
    for i in range(steps + 2):
        start = time.process_time()
        with compute_context("cpu", "fast"):
            z, logdet = model(x)
        bits_per_dim(z, logdet).bpd.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.process_time() - start)
    return float(np.median(times))


def train_command(name: str, crop: int, overrides: dict, steps: int, train: Path, val: Path, run: Path) -> list:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
    return [sys.executable, "-m", "jetcli", "train", str(train), "--val", str(val), "--crop", str(crop),
            "--preset", "small-32", *flags, "--steps", str(steps), "--batch-size", "64",
            "--eval-every", str(max(steps // 4, 1)), "--ckpt-every", str(max(steps // 4, 1)),
            "--precision", "fast", "--flip", "--seed", "0", "-o", str(run)]


def whole_photo_bits(model: Jet, photos: list[np.ndarray]) -> list[float]:
    """Bits per subpixel of each photo's COMMON-multiple part, coded as the model's tiles."""
    size = model.config.image_size
    generator = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for photo in photos:
            part = photo[:photo.shape[0] // COMMON * COMMON, :photo.shape[1] // COMMON * COMMON]
            t = torch.from_numpy(tiles(part, size))
            bits = sum(float((bits_per_dim(*model(dequantize(chunk, generator))).bpd).sum())
                       for chunk in t.split(256)) * model.config.dims
            out.append(bits / part.size)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/photos")
    ap.add_argument("--work", type=Path, required=True, help="Folder for the split and the runs (outside the repo).")
    ap.add_argument("--cpu-minutes", type=float, default=10.0)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--only", default="", help="Comma-separated config names (default: all).")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "photo_sweep")
    args = ap.parse_args()
    names = [n for n in CONFIGS if not args.only or n in args.only.split(",")]
    train, val = split_photos(args.photos, args.work)
    plans = {}
    for name in names:
        crop, overrides = CONFIGS[name]
        cfg = config_of(crop, overrides)
        per_step = cpu_seconds_per_step(cfg, 64)
        steps = max(int(args.cpu_minutes * 60 / per_step), 10)
        plans[name] = dict(crop=crop, overrides=overrides, params=Jet(cfg).num_params(),
                           probe_cpu_s_per_step=per_step, steps=steps)
        print(f"{name}: {plans[name]['params']:,} params, {per_step:.2f} CPU s/step -> {steps} steps", flush=True)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in names:  # runs finished by an earlier invocation: keep their measurements, train nothing
        record = args.work / name / "sweep-run.json"
        if record.is_file():
            plans[name] = json.loads(record.read_text())
    pending, running = [n for n in names if "cpu_s" not in plans[n]], {}
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            p = plans[name]
            core = sorted(set(range(args.parallel)) - {c for _, c, _ in running.values()})[0]
            cmd = ["taskset", "-c", str(core), *train_command(name, p["crop"], p["overrides"], p["steps"],
                                                              train, val, args.work / name)]
            p["command"] = " ".join(cmd)
            log = open(args.work / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), core,
                             time.time())
        pid, status, usage = os.wait4(-1, 0)
        name = next(n for n, (proc, _, _) in running.items() if proc.pid == pid)
        _, _, started = running.pop(name)
        plans[name].update(exit=os.waitstatus_to_exitcode(status), wall_s=time.time() - started,
                           cpu_s=usage.ru_utime + usage.ru_stime)
        print(f"{name}: done, exit {plans[name]['exit']}, {plans[name]['cpu_s'] / 60:.1f} CPU min", flush=True)
        (args.work / name / "sweep-run.json").write_text(json.dumps(plans[name], indent=1))

    photos = [read_rgb(f) for f in sorted(val.iterdir())]
    for name in names:
        model = checkpoints.load(args.work / name)
        per_photo = whole_photo_bits(model.eval(), photos)
        val = summary(per_photo)
        plans[name].update(val_photos=len(photos), val_bits_per_subpixel=val["mean"], val_sem=val["sem"],
                           per_photo=per_photo)
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(machine=machine(torch.device("cpu")), torch=torch.__version__, cpu_minutes_budget=args.cpu_minutes,
                  split=dict(train=len(list(train.iterdir())), val=len(photos)), runs=plans)
    (args.out / "sweep.json").write_text(json.dumps(result, indent=1))
    print("| config | params | steps | CPU min | val bits/subpixel |\n|---|---|---|---|---|")
    for name in names:
        p = plans[name]
        print(f"| {name} | {p['params']:,} | {p['steps']} | {p['cpu_s'] / 60:.1f} | "
              f"{p['val_bits_per_subpixel']:.4f} ± {p['val_sem']:.4f} |")


if __name__ == "__main__":
    main()
