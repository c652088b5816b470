"""`--shard`: FSDP2 over 2 gloo processes on the CPU trains as DDP does (to float tolerance), resumes
bit-identically, and saves the one model.safetensors every command loads."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from jetcli import checkpoints
from jetcli.config import preset
from jetcli.data import ImageSet
from jetcli.train import STATE_NAME, Trainer, TrainOptions, read_metrics
from jetcli.train.distributed import Distributed

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

CONFIG = preset("tiny-16").replace(couplings=2)
PIXELS = np.random.default_rng(0).integers(0, 256, (27, 16, 16, 3), dtype=np.uint8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer(out, shard: bool, rank: int) -> Trainer:
    opts = TrainOptions(out=Path(out), steps=4, batch_size=8, grad_accum=2, lr=1e-3, warmup=0.0, ema=0.9, eval_every=2,
                        ckpt_every=100, log_every=1, shard=shard, precision="fp32")
    return Trainer(CONFIG, ImageSet(PIXELS[:24]), ImageSet(PIXELS[24:]), opts, Distributed(rank, 2))


def worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        trainer(f"{folder}/ddp", False, rank).run()
        trainer(f"{folder}/fsdp", True, rank).run()

        def stop_at_two(record):
            if record["step"] == 2:
                stopped.stop_signal = signal.SIGTERM

        stopped = trainer(f"{folder}/resumed", True, rank)
        stopped.run(progress=stop_at_two if rank == 0 else None)  # all stop where they agree to
        assert 2 <= stopped.step < 4
        dist.barrier()  # rank 0 has written the state: a new torchrun would start only now
        resumed = trainer(f"{folder}/resumed", True, rank)
        resumed.resume()
        assert resumed.step == stopped.step
        resumed.run()
    finally:
        dist.destroy_process_group()


def test_fsdp_matches_ddp_and_resumes_bit_identically(tmp_path):
    mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    ddp, fsdp, resumed = (load_file(str(tmp_path / name / STATE_NAME)) for name in ("ddp", "fsdp", "resumed"))
    assert ddp.keys() == fsdp.keys() == resumed.keys() and any(".exp_avg_sq" in k for k in ddp)
    assert any(k.startswith("ema.") for k in ddp)
    worst = max((ddp[k].double() - fsdp[k].double()).abs().max().item() for k in ddp)
    assert worst < 1e-5, worst
    assert all(torch.equal(fsdp[k], resumed[k]) for k in fsdp), [k for k in fsdp if not torch.equal(fsdp[k], resumed[k])]
    one, two = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "fsdp")
    assert [r["step"] for r in two] == [1, 2, 3, 4] and "val_bpd" in two[1]
    for a, b in zip(one, two):
        for key in ("bpd", "grad_norm", "val_bpd"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    strip = lambda records: [{k: v for k, v in r.items() if k != "img_per_s"} for r in records]
    assert strip(read_metrics(tmp_path / "resumed")) == strip(two)
    model = checkpoints.load(tmp_path / "fsdp")  # one plain model.safetensors, whole tensors
    assert all(torch.equal(v, fsdp[f"model.{k}"]) for k, v in model.state_dict().items())
    assert checkpoints.load(tmp_path / "fsdp" / "ema").config == CONFIG
