"""`jet train` under torchrun: 2 CPU processes on gloo (a real process group) follow one process at the
same global batch, and only rank 0 writes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from jetcli.train import STATE_NAME, read_metrics

pytest.importorskip("torch.distributed.run")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    # 20x20 photos cut into 16x16 crops with flips: every random draw must agree across processes.
    np.save(tmp_path / "photos.npy", np.random.default_rng(1).integers(0, 256, (24, 20, 20, 3), dtype=np.uint8))
    args = ["train", str(tmp_path / "photos.npy"), "--crop", "16", "--val-fraction", "0.25", "--preset", "tiny-16",
            "--couplings", "2", "--batch-size", "8", "--steps", "4", "--warmup", "0", "--lr", "1e-3",
            "--eval-every", "2", "--ckpt-every", "2", "--ema", "0.9", "--device", "cpu", "--precision", "fp32"]

    single = CliRunner().invoke(__import__("jetcli.cli", fromlist=["app"]).app, args + ["-o", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "jetcli",
               *args, "--grad-accum", "2", "-o", str(tmp_path / "two")]  # accumulation under no_sync too
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr and done.stderr.count("Jet ") == 1  # rank 0 alone reports

    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # one writer: no duplicated records
    for a, b in zip(one, two):
        for key in ("bpd", "nll", "logdet", "grad_norm", "val_bpd"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    a, b = load_file(str(tmp_path / "one" / STATE_NAME)), load_file(str(tmp_path / "two" / STATE_NAME))
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    assert not any(p.name.startswith(".") for p in (tmp_path / "two").iterdir())  # no stray temporary files
