"""Held-out photos, each coded whole: Jet models beside optimised PNG, lossless WebP and lossless JPEG-XL.

    python benchmarks/photo_model.py --model photo=weights/photo --model cifar10=weights/cifar10 \
        --data ../shared/data --out benchmarks/results/photo_model

A Jet model's bits for a photo are the bits to code the photo, edge-padded to whole tiles of the
model's input size (jetcli.images.pad_to_tiles), with the model: the sum over tiles of D·bpd (uniform
dequantisation, `--samples` draws averaged, seeded by the photo's content), divided by the photo's own
H·W·3 subpixels. That is an upper bound on a lossless code length for the photo (the padding is paid
for, not dropped). The codecs code the same photo as one file each (lossless_codecs.py).

Writes photo_model.json (per photo and summaries) and photo_model.md (the table).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

import lossless_codecs
from run import machine
from stats import summary
from jetcli.hub import load_model
from jetcli.images import grid, pad_to_tiles, read_rgb, save_png, tiles
from jetcli.likelihood import image_bits
from jetcli.sampling import sample

SETS = ("cbsd68", "mcmaster")
TEMPERATURES = (0.7, 0.9, 1.0)


def jet_bits_per_subpixel(model, photo: np.ndarray, samples: int, batch: int = 64) -> float:
    size = model.config.image_size
    padded = torch.from_numpy(tiles(pad_to_tiles(photo, size), size))
    seed = int.from_bytes(hashlib.sha256(photo.tobytes()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        bpd = torch.cat([image_bits(model, part, samples, generator).bpd for part in padded.split(batch)])
    return float(bpd.double().sum()) * model.config.dims / photo.size


def seam_ratio(images: np.ndarray, patch: int) -> float:
    """How much more neighbouring pixels differ across patch borders than inside patches: the mean
    absolute difference between horizontal and vertical neighbours that straddle a border of the
    patch grid, over the same for neighbours inside a patch. About 1 for photos; a visible patch grid
    (a mosaic of blocks with seams) gives clearly more."""
    dx, dy, border, inside = _neighbour_differences(images, patch)
    across = np.concatenate([dx[:, :, border(dx.shape[2])].ravel(), dy[:, border(dy.shape[1])].ravel()])
    return float(across.mean() / inside)


def seam_ratios_by_pair(images: np.ndarray, patch: int) -> dict[str, float]:
    """The seam ratio of four kinds of border apart: between columns of tokens 2j | 2j+1 (the pairs the
    paper's checkerboard and vstripes couplings put in one ViT token) and 2j+1 | 2j+2 (never paired
    there), and the same between rows (hstripes' pairs). Each over the differences inside patches."""
    dx, dy, border, inside = _neighbour_differences(images, patch)
    paired = lambda n: border(n) & ((np.arange(n) + 1) // patch % 2 == 1)  # noqa: E731  (token 2j | 2j+1)
    unpaired = lambda n: border(n) & ((np.arange(n) + 1) // patch % 2 == 0)  # noqa: E731
    return {"columns_paired": float(dx[:, :, paired(dx.shape[2])].mean() / inside),
            "columns_unpaired": float(dx[:, :, unpaired(dx.shape[2])].mean() / inside),
            "rows_paired": float(dy[:, paired(dy.shape[1])].mean() / inside),
            "rows_unpaired": float(dy[:, unpaired(dy.shape[1])].mean() / inside)}


def _neighbour_differences(images: np.ndarray, patch: int):
    """|differences| of horizontal and vertical neighbours ((.., j) and (.., j + 1)), which j are the
    last pixel of a patch (j + 1 starts a new one), and the mean difference inside patches."""
    x = images.astype(np.float64)
    dx, dy = np.abs(np.diff(x, axis=2)), np.abs(np.diff(x, axis=1))
    border = lambda n: (np.arange(n) + 1) % patch == 0  # noqa: E731
    inside = np.concatenate([dx[:, :, ~border(dx.shape[2])].ravel(), dy[:, ~border(dy.shape[1])].ravel()]).mean()
    return dx, dy, border, inside


def patch_sizes(models: dict) -> list[int]:
    return sorted({4, *(m["model"].config.patch_size for m in models.values())})


def measure_photos(files: list[Path], models: dict, samples: int, earlier: dict) -> tuple[list[dict], dict]:
    """Per photo: each model's bits per subpixel, the codecs' and the photo's own seam ratio; and each
    model's seconds. What `earlier` (a photo_model.json) holds for the same model and photo is reused."""
    reusable = [n for n, m in earlier["models"].items() if n in models and m["sha256"] == models[n]["sha256"]
                and earlier.get("samples") == samples]
    before = {(r["set"], r["file"]): r for r in earlier["per_photo"] if "file" in r}
    rows, seconds = [], {name: earlier["models"][name]["seconds"] if name in reusable else 0.0 for name in models}
    for f in track(files, description="photos"):
        photo = read_rgb(f)
        old = before.get((f.parent.name, f.name), {})
        row = {"set": f.parent.name, "file": f.name, "height": photo.shape[0], "width": photo.shape[1]}
        for name, m in models.items():
            if name in reusable and name in old:
                row[name] = old[name]
                continue
            start = time.perf_counter()
            row[name] = jet_bits_per_subpixel(m["model"], photo, samples)
            seconds[name] += time.perf_counter() - start
        if all(c in old for c in lossless_codecs.CODECS):
            row.update({c: old[c] for c in lossless_codecs.CODECS})
        else:
            row.update(lossless_codecs.codec_bits_per_subpixel(photo))
        for patch in patch_sizes(models):  # the same measure on the photo itself, at each model's grid
            row[f"seam_ratio_p{patch}"] = seam_ratio(photo[None], patch)
        rows.append(row)
    return rows, seconds


def markdown_table(summaries: dict, columns: list[str], models: dict) -> list[str]:
    """The held-out table: a row per model and codec, mean ± sem per photo set."""
    lines = ["| held-out photos, each coded whole (bits per subpixel) | " +
             " | ".join(f"{s} ({summaries[s][columns[0]]['n']})" for s in ("all", *SETS)) + " |",
             "|---|" + "---|" * (1 + len(SETS))]
    labels = {"png": "optimised PNG", "webp": "lossless WebP (method 6)", "jxl-e7": "lossless JPEG-XL (effort 7)",
              "jxl-e9": "lossless JPEG-XL (effort 9)"}
    for c in columns:
        label = f"**Jet `{c}`**" if c in models else labels[c]
        lines.append(f"| {label} | " + " | ".join(
            f"{summaries[s][c]['mean']:.3f} ± {summaries[s][c]['sem']:.3f}" for s in ("all", *SETS)) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="NAME=SPEC (any --model of jet).")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--samples", type=int, default=2, help="Dequantisation draws averaged per photo.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reuse", type=Path, help="An earlier photo_model.json: its codec sizes and the bits of "
                                               "models of the same name and sha256 are taken, not recomputed.")
    ap.add_argument("--seams-only", action="store_true", help="Only measure the patch grid in samples.")
    ap.add_argument("--sample-grids", type=Path, help="Also write 64 samples (seed 0, 2x zoom) at temperatures "
                                                      "0.7, 0.9 and 1.0 of each model to DIR/NAME/.")
    args = ap.parse_args()
    models = {}
    for item in args.model:
        name, _, spec = item.partition("=")
        if name in ("set", "file", "height", "width", *lossless_codecs.CODECS) or name.startswith("seam_ratio_p"):
            ap.error(f"--model {item}: {name!r} names a column of the table already; choose another name")
        loaded = load_model(spec)
        models[name] = dict(model=loaded.model.eval(), sha256=loaded.sha256(), spec=spec,
                            config=loaded.model.config.to_dict(), params=loaded.model.num_params())
    if args.sample_grids:
        for name, m in models.items():
            for temperature in TEMPERATURES:
                images = sample(m["model"], 64, temperature, torch.Generator().manual_seed(0))
                zoomed = images.repeat(2, axis=1).repeat(2, axis=2)
                save_png(grid(zoomed), args.sample_grids / name / f"samples_t{temperature}.png")
    for name, m in models.items():  # the patch grid in 256 samples at each temperature, measured
        for temperature in TEMPERATURES:
            images = sample(m["model"], 256, temperature, torch.Generator().manual_seed(1))
            m[f"sample_seam_ratio_t{temperature}"] = seam_ratio(images, m["model"].config.patch_size)
            m[f"sample_seams_by_pair_t{temperature}"] = seam_ratios_by_pair(images, m["model"].config.patch_size)
    if args.seams_only:
        args.out.mkdir(parents=True, exist_ok=True)
        seams = {n: {k: v for k, v in m.items() if k == "spec" or k.startswith("sample_seam")} for n, m in models.items()}
        (args.out / "seams.json").write_text(json.dumps(seams, indent=1))
        print(json.dumps(seams, indent=1))
        return
    files = [f for s in SETS for f in sorted((args.data / s).glob("*.png"))]
    earlier = json.loads(args.reuse.read_text()) if args.reuse else {"per_photo": [], "models": {}}
    rows, seconds = measure_photos(files, models, args.samples, earlier)
    columns = [*models, *lossless_codecs.CODECS]
    summaries = {s: {c: summary([r[c] for r in rows if s in ("all", r["set"])]) for c in columns}
                 for s in ("all", *SETS)}
    best = min(lossless_codecs.CODECS, key=lambda c: summaries["all"][c]["mean"])
    wins = {name: {c: int(sum(r[name] < r[c] for r in rows)) for c in lossless_codecs.CODECS} for name in models}
    result = dict(command=" ".join(["python", "benchmarks/photo_model.py", *[f"--model {m}" for m in args.model],
                                    f"--samples {args.samples}"]),
                  machine=machine(torch.device("cpu")), torch=torch.__version__, cjxl=lossless_codecs.jxl_version(),
                  models={n: {k: v for k, v in m.items() if k != "model"} | {"seconds": seconds[n]}
                          for n, m in models.items()},
                  samples=args.samples, summaries=summaries,
                  **{f"photo_seam_ratio_p{p}": summary([r[f"seam_ratio_p{p}"] for r in rows]) for p in patch_sizes(models)},
                  photos_won_against=wins, per_photo=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "photo_model.json").write_text(json.dumps(result, indent=1))
    lines = markdown_table(summaries, columns, models)
    (args.out / "photo_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    photos = ", ".join(f"{result[f'photo_seam_ratio_p{p}']['mean']:.3f} (patch {p})" for p in patch_sizes(models))
    print(f"patch-grid seam ratio, photos: {photos}; samples at T = " +
          "/".join(map(str, TEMPERATURES)) + ": " + ", ".join(
              f"{n} " + "/".join(f"{m[f'sample_seam_ratio_t{t}']:.3f}" for t in TEMPERATURES) for n, m in models.items()))
    for name in models:
        gap = summaries["all"][name]["mean"] - summaries["all"][best]["mean"]
        print(f"{name}: {gap:+.3f} bits/subpixel against the best codec ({best}); photos won: {wins[name]}")


if __name__ == "__main__":
    main()
