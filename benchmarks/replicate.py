"""The paper's coupling-type ablation (appendix table e), scaled down to a CPU, trained with `jet train`.

    python benchmarks/replicate.py --work /work/runs/replicate --out benchmarks/results/replicate

Every cell trains the same small Jet on CIFAR-10 (the 8,068 bit-exact training images of
../shared/data/cifar10_lossless_subset.npz) with the reference recipe (AdamW 0.9/0.95, lr 3e-4, 10%
warmup then cosine, weight decay 1e-5, clipping 1.0, no flips) for the same number of steps, and is
validated on the 1,017 held-out test images. Only the couplings' kinds and spatial patterns change:

    all-spatial (mixed)   every coupling spatial, the six patterns cycled
    1:1 (mixed)           channel, spatial, ...
    4:1 (mixed)           four channel couplings per spatial one (the paper's default), patterns interleaved
    4:1 (checkerboard)    the same, every spatial coupling checkerboard / checkerboard-inv
    all-channel           every coupling channel-wise

Two seeds per cell (init, data order and noise all follow the seed). Runs go one per core of `--cores`,
one thread each, pinned to it; a folder that already holds a finished run is scored, not
retrained, so the study resumes after a stop. Writes replicate.json and replicate.md (the table beside
the paper's numbers, the seed spread, and each of the paper's orderings checked).
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

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_lossless_subset.npz"
SPATIAL = "checkerboard,checkerboard-inv,vstripes,vstripes-inv,hstripes,hstripes-inv"
# The same six with a new kind in each successive spatial coupling: a 4:1 model of 10 couplings has two
# spatial couplings, and SPATIAL's first two (checkerboard, checkerboard-inv) would make it the
# checkerboard-only cell exactly.
INTERLEAVED = "checkerboard,vstripes,hstripes,checkerboard-inv,vstripes-inv,hstripes-inv"
CELLS = {  # name: (kinds, spatial patterns, the paper's ImageNet 64x64 bpd from table e)
    "all-spatial (mixed)": ("spatial", SPATIAL, 3.787),
    "1:1 (mixed)": ("channels,spatial", SPATIAL, 3.737),
    "4:1 (mixed)": ("channels,channels,channels,channels,spatial", INTERLEAVED, 3.719),
    "4:1 (checkerboard)": ("channels,channels,channels,channels,spatial", "checkerboard,checkerboard-inv", 3.724),
    "all-channel": ("channels", SPATIAL, 3.742),
}
ORDERINGS = [  # (better, worse): the paper's findings, each to be checked at this scale
    ("4:1 (mixed)", "all-spatial (mixed)"),
    ("1:1 (mixed)", "all-spatial (mixed)"),
    ("4:1 (mixed)", "1:1 (mixed)"),
    ("4:1 (mixed)", "all-channel"),
    ("4:1 (mixed)", "4:1 (checkerboard)"),
    ("1:1 (mixed)", "all-channel"),
]
MODEL = ["--preset", "small-32", "--patch-size", "4", "--couplings", "10", "--block-depth", "1",
         "--width", "128", "--heads", "4"]


def folder_name(cell: str, seed: int) -> str:
    return "".join(c if c.isalnum() else "-" for c in cell).strip("-") + f"-seed{seed}"


def command(cell: str, seed: int, steps: int, run: Path, data: Path = DATA) -> list[str]:
    kinds, patterns, _ = CELLS[cell]
    return [sys.executable, "-m", "jetcli", "train", f"{data}:train_images", "--val", f"{data}:test_images",
            *MODEL, "--kinds", kinds, "--spatial-patterns", patterns, "--steps", str(steps),
            "--batch-size", "64", "--eval-every", str(steps), "--ckpt-every", str(max(steps // 5, 1)),
            "--precision", "fast", "--seed", str(seed), "--device", "cpu", "-o", str(run)]


def final_val_bpd(run: Path, steps: int) -> float | None:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    done = [r for r in records if r.get("step") == steps and "val_bpd" in r]
    return done[-1]["val_bpd"] if done else None


def train_all(jobs: list[tuple[str, int]], steps: int, work: Path, cores: list[int], data: Path = DATA) -> dict:
    """Runs every unfinished job (resuming a stopped one); returns {folder: CPU seconds} of this call."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pending = [(c, s) for c, s in jobs if final_val_bpd(work / folder_name(c, s), steps) is None]
    running, cpu = {}, {}
    while pending or running:
        while pending and len(running) < len(cores):
            cell, seed = pending.pop(0)
            run = work / folder_name(cell, seed)
            cmd = command(cell, seed, steps, run, data)
            if (run / "state.safetensors").is_file():
                cmd = [sys.executable, "-m", "jetcli", "train", "--resume", "--device", "cpu", "-o", str(run)]
            core = sorted(set(cores) - set(running.values()))[0]
            log = open(work / f"{run.name}.log", "a")
            proc = subprocess.Popen(["taskset", "-c", str(core % os.cpu_count()), *cmd], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            running[proc.pid] = core
            print(f"started {run.name} on core {core}", flush=True)
        pid, status, usage = os.wait4(-1, 0)
        running.pop(pid, None)
        cpu[pid] = usage.ru_utime + usage.ru_stime
        print(f"finished a run (exit {os.waitstatus_to_exitcode(status)}, {cpu[pid] / 60:.1f} CPU min)", flush=True)
    return cpu


def report(steps: int, seeds: list[int], work: Path, data: Path = DATA) -> dict:
    cells = {}
    for cell, (kinds, patterns, paper) in CELLS.items():
        values = [final_val_bpd(work / folder_name(cell, s), steps) for s in seeds]
        values = [v for v in values if v is not None]
        cells[cell] = dict(kinds=kinds, spatial_patterns=patterns, paper_bpd=paper, val_bpd=values,
                           mean=float(np.mean(values)) if values else None,
                           spread=float(np.ptp(values)) if len(values) > 1 else None)
    spread = max((c["spread"] for c in cells.values() if c["spread"] is not None), default=None)
    orderings = []
    for better, worse in ORDERINGS:
        a, b = cells[better]["mean"], cells[worse]["mean"]
        if a is None or b is None:
            continue
        gap = b - a
        verdict = ("holds" if gap > 0 else "reversed") + (" (within the seed spread)" if spread is not None and
                                                          abs(gap) <= spread else "")
        orderings.append(dict(better=better, worse=worse, paper_gap=CELLS[worse][2] - CELLS[better][2],
                              gap=gap, verdict=verdict))
    return dict(steps=steps, seeds=seeds, model=" ".join(MODEL), data=str(data), cells=cells,
                largest_seed_spread=spread, orderings=orderings)


def markdown(result: dict) -> str:
    seeds = ", ".join(map(str, result["seeds"]))
    lines = [f"| coupling types | paper (ImageNet 64×64) | here: held-out CIFAR-10 bpd, mean of seeds {seeds} | "
             "seed spread |", "|---|---|---|---|"]
    for cell, c in result["cells"].items():
        here = f"{c['mean']:.4f}" if c["mean"] is not None else "not run"
        spread = f"{c['spread']:.4f}" if c["spread"] is not None else "—"
        lines.append(f"| {cell} | {c['paper_bpd']:.3f} | {here} | {spread} |")
    lines += ["", "| the paper's finding | paper gap | gap here | at this scale |", "|---|---|---|---|"]
    for o in result["orderings"]:
        lines.append(f"| {o['better']} < {o['worse']} | {o['paper_gap']:+.3f} | {o['gap']:+.4f} | {o['verdict']} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="Run folders (outside the repository).")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "replicate")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--cores", default="0,1", help="Cores to run on, one run per core at a time.")
    ap.add_argument("--only", default="", help="Comma-separated cell names (default: all).")
    ap.add_argument("--data", type=Path, default=DATA, help="The CIFAR-10 .npz (train_images, test_images).")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = [c for c in CELLS if not args.only or c in args.only.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data = args.data.resolve()
    cores = [int(c) for c in args.cores.split(",")]
    cpu = train_all([(c, s) for c in cells for s in seeds], args.steps, args.work, cores, data)
    result = report(args.steps, seeds, args.work, data)
    result.update(wall_s_this_call=time.time() - start, cpu_s_this_call=sum(cpu.values()),
                  command=" ".join(sys.argv))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replicate.json").write_text(json.dumps(result, indent=1))
    (args.out / "replicate.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
