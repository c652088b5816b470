"""`jet compress` on held-out photos: file sizes against the model's bpd and the classical lossless codecs.

    python benchmarks/compress.py                                  # cbsd68 + mcmaster, default model
    python benchmarks/compress.py --limit 3 --json out.json        # a quick look
    python benchmarks/compress.py --merge a.json b.json --json all.json   # runs of parts, as one table

For every image (read as 8-bit RGB, any size):

- **bpd**: what `jet bpd --samples N` reports for the image (`scoring.score_image`, float32): the
  model's bits for the image padded to whole tiles (edge padding, as `jet compress` codes it), the
  dequantised likelihood averaged over N uniform noise draws per tile, divided by the *original* H·W·3;
  the same denominator as every size below.
- **jet**: the compressed file (header and ANS words) in bits per subpixel; *payload* leaves out the
  HEADER_SIZE-byte header; *steady* is what the tiles cost coded on top of a stack already full of bits
  (`compress.steady_bits`), so payload - steady is the fixed start-up (initial bits) cost of a file.
- every file is decompressed and compared with the pixels (`exact` counts the bit-exact round trips);
  encode and decode speeds are megapixels (original H·W) per second of wall time, and per second of
  the process's CPU time (which time spent descheduled by other work on a shared machine does not
  inflate; with `--threads 1` it is the single-core speed).
- PNG (optimised), lossless WebP (method 6) and lossless JPEG-XL (cjxl -d 0, effort 7 and 9) of the same
  pixels, from `lossless_codecs.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lossless_codecs import CODECS, codec_bits_per_subpixel, jxl_version  # noqa: E402
from run import machine  # noqa: E402

from jetcli import compress as jc  # noqa: E402
from jetcli.hub import load_model  # noqa: E402
from jetcli.images import IMAGE_SUFFIXES, read_rgb  # noqa: E402
from jetcli.scoring import score_image  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def measure(model, sha: str, path: Path, samples: int, codecs: dict | None = None) -> dict:
    pixels = read_rgb(path)
    subpixels = pixels.size
    megapixels = pixels.shape[0] * pixels.shape[1] / 1e6
    start, cpu = time.perf_counter(), time.process_time()
    result = jc.compress(model, pixels, sha, verify=False)
    encode_s, encode_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    decoded = jc.decompress(model, result.data, sha)
    decode_s, decode_cpu = time.perf_counter() - start, time.process_time() - cpu
    steady = jc.steady_bits(model, pixels)
    reference = score_image(model, pixels, str(path), samples=samples).bpd * subpixels
    row = {"image": path.name, "height": pixels.shape[0], "width": pixels.shape[1], "tiles": result.tiles,
           "exact": bool(np.array_equal(decoded, pixels)),
           "bpd": reference / subpixels, "jet": 8 * len(result.data) / subpixels,
           "payload": result.payload_bits / subpixels, "steady": steady / subpixels,
           "overhead_bits": result.payload_bits - steady, "header_bits": 8 * result.header_bytes,
           "encode_mp_s": megapixels / encode_s, "decode_mp_s": megapixels / decode_s,
           "encode_mp_cpu_s": megapixels / encode_cpu, "decode_mp_cpu_s": megapixels / decode_cpu}
    row.update(codecs or codec_bits_per_subpixel(pixels))
    return row


def summary(rows: list[dict]) -> dict:
    mean = {key: float(np.mean([r[key] for r in rows])) for key in
            ("bpd", "jet", "payload", "steady", "overhead_bits", "header_bits", "encode_mp_s", "decode_mp_s",
             "encode_mp_cpu_s", "decode_mp_cpu_s", *CODECS)}
    mean["images"] = len(rows)
    mean["exact"] = sum(r["exact"] for r in rows)
    mean["jet_over_bpd"] = mean["jet"] / mean["bpd"]
    mean["steady_over_bpd"] = mean["steady"] / mean["bpd"]
    ratios = [r["jet"] / r["bpd"] for r in rows]
    mean["jet_over_bpd_max"] = float(max(ratios))
    return mean


def table(results: dict[str, dict]) -> str:
    lines = ["| data | images | exact | model bpd | jet file | file/bpd | steady/bpd | start-up overhead | "
             "PNG | WebP | JXL e7 | JXL e9 | encode MP/s (per CPU s) | decode MP/s (per CPU s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['images']} | {m['exact']}/{m['images']} | {m['bpd']:.4f} | {m['jet']:.4f} | "
            f"{m['jet_over_bpd']:.4f} (max {m['jet_over_bpd_max']:.4f}) | {m['steady_over_bpd']:.4f} | "
            f"{m['overhead_bits'] / 8:.0f} B + {m['header_bits'] / 8:.0f} B header | {m['png']:.4f} | "
            f"{m['webp']:.4f} | {m['jxl-e7']:.4f} | {m['jxl-e9']:.4f} | {m['encode_mp_s']:.3f} "
            f"({m['encode_mp_cpu_s']:.3f}) | {m['decode_mp_s']:.3f} ({m['decode_mp_cpu_s']:.3f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, default=[DATA / "cbsd68", DATA / "mcmaster"])
    parser.add_argument("--model", default=None, help="a checkpoint or Hub id (default: the shipped model)")
    parser.add_argument("--samples", type=int, default=1,
                        help="noise draws per tile for the bpd (as jet bpd --samples; its default is 1)")
    parser.add_argument("--start", type=int, default=0, help="skip this many images of each folder (sorted)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images per folder")
    parser.add_argument("--json", type=Path, default=None, help="write every row and the summary here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--codecs", type=Path, default=None,
                        help="a photo_model.json of the same photos: take the codecs' sizes from it (by folder "
                             "and file name) instead of coding every photo again (JPEG-XL effort 9 is slow)")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="measure nothing: join the rows of these --json files (parts of the photos, run as "
                             "separate processes with the same model) into one summary and table")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    loaded = load_model(args.model)
    model, sha = loaded.model.eval(), loaded.sha256()
    results, rows_by_set = {}, {}
    out = {"model": loaded.name, "sha256": sha, "quantization": dataclasses.asdict(jc.DEFAULT_QUANTIZATION),
           "samples": args.samples, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": machine(torch.device("cpu")), "cjxl": jxl_version(), "summary": results,
           "rows": rows_by_set}
    known = {}
    if args.codecs:
        known = {(r["set"], r["file"]): {c: r[c] for c in CODECS} for r in json.loads(args.codecs.read_text())["per_photo"]}
        out["codecs_from"] = str(args.codecs)
    for folder in args.folders:
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths = paths[args.start:][:args.limit]
        rows = rows_by_set[folder.name] = []
        for path in paths:
            row = measure(model, sha, path, args.samples, known.get((folder.name, path.name)))
            rows.append(row)
            results[folder.name] = summary(rows)
            print(f"{folder.name}/{row['image']}: bpd {row['bpd']:.4f} jet {row['jet']:.4f} "
                  f"({row['jet'] / row['bpd']:.4f}x) overhead {row['overhead_bits']} bits, exact {row['exact']}, "
                  f"{row['encode_mp_s']:.3f}/{row['decode_mp_s']:.3f} MP/s ({row['encode_mp_cpu_s']:.3f}/"
                  f"{row['decode_mp_cpu_s']:.3f} per CPU s)", file=sys.stderr, flush=True)
            out["load_average_before_now"] = [load_before, os.getloadavg()]
            if args.json:  # after every image: a long run stopped early keeps what it measured
                args.json.write_text(json.dumps(out, indent=2))
    print(table(results))
    return out


def merge(parts: list[Path], path: Path | None) -> dict:
    """One result from the --json files of runs over parts of the photos: rows joined per folder (in
    the order given), summaries per folder and over all rows."""
    runs = [json.loads(p.read_text()) for p in parts]
    if len({r["sha256"] for r in runs}) != 1 or len({json.dumps(r["quantization"]) for r in runs}) != 1:
        raise SystemExit("--merge: the runs used different models or quantizations")
    rows: dict[str, list] = {}
    for run in runs:
        for name, part in run["rows"].items():
            rows.setdefault(name, []).extend(part)
    out = {k: v for k, v in runs[0].items() if k not in ("rows", "summary", "load_average_before_now")}
    out.update(merged_from=[str(p) for p in parts],
               load_averages=[r.get("load_average_before_now") for r in runs],
               summary={**{name: summary(r) for name, r in rows.items()}, "all": summary(sum(rows.values(), []))},
               rows=rows)
    if path:
        path.write_text(json.dumps(out, indent=2))
    print(table(out["summary"]))
    return out


if __name__ == "__main__":
    main()
