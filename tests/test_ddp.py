"""`jet train` under torchrun: 2 CPU processes on gloo (a real process group) follow one process at the
same global batch, and only rank 0 writes; in this process: the GPU each process takes, and the Trainer
in a process group of one (DDP without buffer broadcasts, the stop agreed where statistics are read)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_train import make_trainer, train_step
from typer.testing import CliRunner

from jetcli.devices import process_gpu
from jetcli.errors import SettingError
from jetcli.train import STATE_NAME, read_metrics
from jetcli.train.distributed import process_device

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_gloo
def test_two_gloo_processes_match_one_process(tmp_path):
    pytest.importorskip("torch.distributed.run")
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


# --------------------------------------------------------------------------- in this process
def test_each_process_takes_its_own_gpu(monkeypatch):
    """cuda:LOCAL_RANK where the process sees that many GPUs (torchrun on one machine); the one GPU it sees
    where a launcher gave each process its own (SLURM --gpus-per-task=1: LOCAL_RANK is no ordinal there);
    one clear refusal otherwise. Faked device counts: no GPU is needed."""
    assert [process_gpu(rank, 4) for rank in range(4)] == [0, 1, 2, 3]
    assert [process_gpu(rank, 1) for rank in range(4)] == [0, 0, 0, 0]
    with pytest.raises(SettingError, match="local rank 3, but this process sees 2 CUDA devices"):
        process_gpu(3, 2)
    monkeypatch.setenv("LOCAL_RANK", "5")
    for visible, expected in ((8, 5), (1, 0)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda n=visible: n)
        for asked in ("cuda", "cuda:0"):
            assert process_device(torch.device(asked)) == torch.device("cuda", expected)
    assert process_device(torch.device("cpu")) == torch.device("cpu")


@contextlib.contextmanager
def one_process_group():
    """A real gloo process group of this one process, left again afterwards."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_ddp_trains_as_one_process_without_broadcasting_buffers(tmp_path, monkeypatch):
    """In a process group the Trainer wraps the model in DDP; its constant buffers (the splits' orders) are
    not sent again at every forward, and over one process it computes what the plain loop computes."""
    plain = make_trainer(tmp_path / "plain", ema=0.9)
    with one_process_group():
        parallel = make_trainer(tmp_path / "ddp", ema=0.9)
        assert plain.ddp is None and parallel.ddp is not None
        broadcasts = []
        broadcast = dist._broadcast_coalesced
        monkeypatch.setattr(dist, "_broadcast_coalesced", lambda *args: broadcasts.append(args) or broadcast(*args))
        for _ in range(2):
            assert train_step(parallel) == train_step(plain)
    assert broadcasts == []
    assert all(torch.equal(p, q) for p, q in zip(parallel.model.parameters(), plain.model.parameters()))
    assert all(torch.equal(parallel.ema[k], plain.ema[k]) for k in plain.ema)


@needs_gloo
def test_processes_agree_to_stop_where_they_report(tmp_path):
    """Under DDP the stop signal is shared with the statistics every log_every steps (no collective and no
    wait of its own at every step); a single process stops before its next step."""
    with one_process_group():
        parallel = make_trainer(tmp_path / "ddp")  # log_every 2
        parallel.stop_signal = signal.SIGTERM
        parallel.run()
    assert parallel.step == parallel.saved_step == 2 and [r["step"] for r in read_metrics(tmp_path / "ddp")] == [1, 2]
    plain = make_trainer(tmp_path / "plain")
    plain.stop_signal = signal.SIGTERM
    plain.run()
    assert plain.step == plain.saved_step == 0
