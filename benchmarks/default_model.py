"""Measure the default model for its model card: held-out bpd beside PNG and lossless WebP.

    python benchmarks/default_model.py --model weights/cifar10 --data ../shared/data --out weights/cifar10

Writes `eval.json` (all figures) and sample grids (64 samples, seed 0, shown at 2x) at temperatures 0.7,
0.9 and 1.0 into --out.
Codecs get each image as its own file (as `jet bpd` reports png_bpd), so the comparison is per image.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lossless_codecs import png_bits, webp_bits  # benchmarks/, beside this script
from stats import summary
from jetcli import checkpoints
from jetcli.images import grid, read_rgb, save_png, tiles
from jetcli.likelihood import image_bits
from jetcli.sampling import sample


def codec_bpd(image: np.ndarray, fmt: str) -> float:
    return {"PNG": png_bits, "WEBP": webp_bits}[fmt](image) / image.size


def model_bpd(model, images: np.ndarray, samples: int, batch: int = 256) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(image_bits(model, torch.from_numpy(images[i:i + batch]), samples, generator).bpd.numpy())
    return np.concatenate(out)


def photo_tiles(folder: Path, size: int) -> np.ndarray:
    """Every whole size×size tile of every photo in `folder` (the strips that do not fill one dropped)."""
    return np.concatenate([tiles(read_rgb(f), (size, size)) for f in sorted(folder.glob("*.png"))])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="weights/cifar10")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--out", default="weights/cifar10")
    ap.add_argument("--samples", type=int, default=4, help="dequantisation draws per image")
    args = ap.parse_args()
    data, out = Path(args.data), Path(args.out)
    model = checkpoints.load_own(Path(args.model))
    size = model.config.image_size[0]
    report: dict = {"model": args.model, "dequantisation_draws": args.samples, "torch": torch.__version__}

    test = np.load(data / "cifar10_lossless_subset.npz")["test_images"]
    t0 = time.perf_counter()
    bpd = model_bpd(model, test, args.samples)
    report["cifar10_test"] = {
        "images": len(test),
        "jet_bpd": summary(bpd),
        "png_bpd": summary([codec_bpd(x, "PNG") for x in test]),
        "webp_lossless_bpd": summary([codec_bpd(x, "WEBP") for x in test]),
        "jet_seconds": time.perf_counter() - t0,
    }
    photo_crops = photo_tiles(data / "cbsd68", size)
    report["cbsd68_tiles"] = {
        "tiles": len(photo_crops), "tile": size,
        "jet_bpd": summary(model_bpd(model, photo_crops, 1)),
        "png_bpd": summary([codec_bpd(x, "PNG") for x in photo_crops]),
        "webp_lossless_bpd": summary([codec_bpd(x, "WEBP") for x in photo_crops]),
    }
    for temp in (0.7, 0.9, 1.0):
        t0 = time.perf_counter()
        images = sample(model, 64, temperature=temp, generator=torch.Generator().manual_seed(0))
        report[f"sample_64_seconds_temp_{temp}"] = time.perf_counter() - t0
        save_png(grid(images.repeat(2, axis=1).repeat(2, axis=2)), out / f"samples_t{temp}.png")  # 2x zoom
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
