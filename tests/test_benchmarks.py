"""benchmarks/run.py: its FLOP formula, and both commands end to end on a tiny config (no timing is
checked here: timings belong in BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from jetcli import Jet, preset

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("benchmarks_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (its folder on sys.path while it loads, for its sibling imports)."""
    folder = str(REPO_ROOT / "benchmarks")
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO_ROOT)


@pytest.mark.parametrize("name", ["tiny-16", "cpu-32"])
def test_flop_formula_matches_torch_flop_counter(name):
    bench = load_script()
    cfg = preset(name)
    model = Jet(cfg).eval()
    x = torch.rand(2, *cfg.image_size, cfg.channels)
    # The math SDPA kernel is made of bmm's, which the counter sees; the flash kernel is not counted.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() == 2 * bench.matmul_flops_per_image(cfg)


def test_speed_runs_on_a_tiny_config(tmp_path):
    result = run_script("speed", "--device", "cpu", "--preset", "tiny-16", "--batch", "4", "--pairs", "2",
                        "--matmul-seconds", "0.05", "--json", "--out", str(tmp_path / "speed.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert json.loads((tmp_path / "speed.json").read_text()) == data
    rows = {(r["task"], r["contender"]): r for r in data["results"]}
    tasks = ("train", "bpd", "sample", "encode", "decode")
    port = importlib.util.find_spec("jet_pytorch") is not None
    expected = {(t, "jetcli fp32") for t in tasks} | {(t, "jetcli fast") for t in ("train", "bpd", "sample")}
    expected |= {(t, "jet-pytorch") for t in tasks} if port else set()
    assert set(rows) == expected  # in particular: never bf16 on the lossless encode/decode path
    for row in rows.values():
        assert len(row["images_per_s_rounds"]) == 2 and row["images_per_s"] > 0 and row["gflop_per_s"] > 0
        assert ("ratio_vs_port" in row) == (port and row["contender"] != "jet-pytorch")
    rates = data["matmul_rates_gflop_per_s"]
    assert rates["fp32 peak"] > 0 and rates["bf16 peak"] > 0
    agreement = data["agreement"]
    assert agreement["max_abs_bpd_diff"]["jetcli fast"] < 0.05
    if port:  # the same weights: the port computes the same function
        assert agreement["latent_relative_error"] < 1e-5
        assert agreement["max_abs_bpd_diff"]["jet-pytorch"] < 1e-4


def test_curve_runs_on_a_tiny_config(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "images.npz"
    np.savez(data, train_images=rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8),
             test_images=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    result = run_script("curve", "--preset", "tiny-16", "--data", str(data), "--steps", "4", "--batch", "4",
                        "--eval-every", "2", "--eval-images", "8", "--out", str(tmp_path / "curve"), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    saved = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert saved["summary"] == summary
    assert set(saved["runs"]) == {"fp32", "fast", "fp32 seed 1"}
    fp32, fast = saved["runs"]["fp32"], saved["runs"]["fast"]
    assert fp32["eval_step"] == [2, 4] and len(fp32["train_bpd"]) == 4
    # Same seed, data and noise: the first step's loss differs only by the ViTs' bf16 rounding.
    assert fp32["train_bpd"][0] != saved["runs"]["fp32 seed 1"]["train_bpd"][0]
    assert abs(fp32["train_bpd"][0] - fast["train_bpd"][0]) < 1e-2
    # The same final weights evaluated both ways differ by bf16 rounding only.
    assert abs(fp32["final_val_bpd"]["fp32"] - fp32["final_val_bpd"]["fast"]) < 1e-2
    assert fp32["val_bpd"][-1] == fp32["final_val_bpd"]["fp32"]  # the Trainer's own evaluation
    assert (tmp_path / "curve" / "curve.png").stat().st_size > 1000


def test_replicate_reports_orderings_against_the_seed_spread(tmp_path):
    """benchmarks/replicate.py's verdicts: an ordering holds, is reversed, or lies within the seed spread."""
    replicate = load_benchmark("replicate")
    results = {"4:1 (mixed)": (4.00, 4.02), "all-spatial (mixed)": (4.30, 4.31), "1:1 (mixed)": (4.02, 4.03),
               "all-channel": (3.99, 3.98)}
    for cell, values in results.items():
        for seed, value in enumerate(values):
            run = tmp_path / replicate.folder_name(cell, seed)
            run.mkdir()
            (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "bpd": 9.0}) + "\n" +
                                               json.dumps({"step": 5, "val_bpd": value}) + "\n")
    result = replicate.report(5, [0, 1], tmp_path)
    verdicts = {(o["better"], o["worse"]): o["verdict"] for o in result["orderings"]}
    assert result["largest_seed_spread"] == pytest.approx(0.02)
    assert verdicts[("4:1 (mixed)", "all-spatial (mixed)")] == "holds"
    assert verdicts[("4:1 (mixed)", "all-channel")] == "reversed"
    assert verdicts[("4:1 (mixed)", "1:1 (mixed)")] == "holds (within the seed spread)"
    assert ("4:1 (mixed)", "4:1 (checkerboard)") not in verdicts  # a cell not run is not judged
    assert "not run" in replicate.markdown(result)


def test_seam_ratio_tells_a_patch_grid_from_a_photo():
    """benchmarks/photo_model.py's measure of the patch grid: about 1 on smooth content, well above 1 when
    every 4x4 block carries its own offset (a mosaic with seams), whatever the texture inside."""
    photo_model = load_benchmark("photo_model")
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(32.0), np.arange(32.0))[None, :, :, None] * 2 + rng.normal(0, 3, (8, 32, 32, 3))
    offsets = rng.normal(0, 30, (8, 8, 8, 3)).repeat(4, axis=1).repeat(4, axis=2)
    assert 0.9 < photo_model.seam_ratio(ramp, 4) < 1.1
    assert photo_model.seam_ratio(ramp + offsets, 4) > 3
    assert photo_model.seam_ratio(ramp + offsets, 3) < 1.5  # a grid of other blocks is not this one
    # Offsets shared by the token pairs 2j, 2j+1 of each row (bricks two tokens wide): seams only between
    # columns 2j+1 | 2j+2, and between every row of tokens.
    bricks = rng.normal(0, 30, (8, 8, 4, 3)).repeat(8, axis=2).repeat(4, axis=1)
    split = photo_model.seam_ratios_by_pair(ramp + bricks, 4)
    assert split["columns_paired"] < 1.1 < 3 < split["columns_unpaired"]
    assert split["rows_paired"] > 3 and split["rows_unpaired"] > 3


def test_compress_merge_joins_parts_into_one_table(tmp_path):
    """benchmarks/compress.py --merge: rows of runs over parts of the photos, summarised as one run."""
    compress = load_benchmark("compress")
    keys = ("bpd", "jet", "payload", "steady", "overhead_bits", "header_bits", "encode_mp_s", "decode_mp_s",
            "encode_mp_cpu_s", "decode_mp_cpu_s", "png", "webp", "jxl-e7", "jxl-e9")
    parts = []
    for i, (folder, jet) in enumerate((("a", 3.0), ("a", 3.3), ("b", 4.0))):
        row = {**dict.fromkeys(keys, 1.0), "image": f"{i}.png", "exact": True, "bpd": 3.0, "jet": jet}
        parts.append(tmp_path / f"{i}.json")
        parts[-1].write_text(json.dumps({"model": "m", "sha256": "s", "quantization": {"noise_bits": 5},
                                         "rows": {folder: [row]}, "summary": {}}))
    out = compress.merge(parts, tmp_path / "all.json")
    assert [len(out["rows"][f]) for f in ("a", "b")] == [2, 1]
    assert out["summary"]["a"]["jet_over_bpd"] == pytest.approx(1.05) and out["summary"]["all"]["images"] == 3
    assert json.loads((tmp_path / "all.json").read_text())["summary"] == out["summary"]
    parts[2].write_text(parts[2].read_text().replace('"sha256": "s"', '"sha256": "other"'))
    with pytest.raises(SystemExit, match="different models"):
        compress.merge(parts, None)
