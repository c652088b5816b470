"""A run's metrics (metrics.jsonl, one JSON record per step) and the pictures drawn from it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from jetcli.fileio import atomic_write
from jetcli.images import grid, save_png
from jetcli.model import Jet
from jetcli.sampling import sample

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
SAMPLES_NAME = "samples.png"


def read_metrics(out: Path) -> list[dict]:
    """The records of metrics.jsonl; a last line cut short by a crash is skipped."""
    path = Path(out) / METRICS_NAME
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def truncate_metrics(out: Path, step: int) -> None:
    """Drop the records past `step`: a run resumed there writes those steps again."""
    records = [r for r in read_metrics(out) if r["step"] <= step]
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(Path(out) / METRICS_NAME, lambda tmp: Path(tmp).write_text(text))


def save_samples(model: Jet, path: Path, seed: int, n: int = 64) -> None:
    """A grid of `n` samples, enlarged (nearest neighbour) so that small images stay visible."""
    samples = sample(model, n, generator=torch.Generator().manual_seed(seed))
    zoom = max(1, 64 // model.config.image_size[0])
    save_png(grid(samples.repeat(zoom, axis=1).repeat(zoom, axis=2)), path)


def plot_curves(records: list[dict], path: Path, size: tuple[int, int] = (640, 400)) -> None:
    """A PNG of train bpd (grey) and val bpd (blue) against step, drawn with PIL."""
    from PIL import Image, ImageDraw

    train = [(r["step"], r["bpd"]) for r in records if "bpd" in r]
    val = [(r["step"], r["val_bpd"]) for r in records if "val_bpd" in r]
    img = Image.new("RGB", size, "white")
    if train:
        _draw_curves(ImageDraw.Draw(img), train, val, size)
    save_png(np.asarray(img), path)


def _draw_curves(draw, train: list[tuple], val: list[tuple], size: tuple[int, int]) -> None:
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
