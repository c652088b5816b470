"""benchmarks/gpu_check.py on the CPU (--smoke: a tiny model): a part that runs over its time limit is
recorded as such and the next part still runs; the JSON holds every part; bad options are one line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_part_over_its_limit_is_recorded_and_the_next_one_runs(tmp_path):
    out = tmp_path / "check.json"
    done = gpu_check("--smoke", "--parts", "tests,train", "--limit", "tests=0.5", "--out", str(out))
    assert done.returncode == 1, done.stderr  # not every part passed
    report = json.loads(out.read_text())
    assert report["smoke"] is True and not report["passed"] and list(report["parts"]) == ["tests", "train"]
    tests, train = report["parts"]["tests"], report["parts"]["train"]
    assert tests["status"] == "timeout" and tests["limit_s"] == 0.5
    assert train["status"] == "passed", train
    assert train["preset"] == "tiny-16" and train["images_per_s"] > 0 and 0 < train["mfu"]
    assert train["achieved_tflop_per_s"] == pytest.approx(train["images_per_s"] * train["matmul_tflop_per_image"])


def test_bad_options_are_one_line(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for args, message in ((["--parts", "tests,bogus"], "--parts: unknown bogus"),
                          (["--limit", "train=soon"], "--limit train=soon: expected PART=SECONDS")):
        assert script.main([*args, "--out", str(tmp_path / "x.json")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
        assert not (tmp_path / "x.json").exists()
