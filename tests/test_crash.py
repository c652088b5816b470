"""Crash safety of `jet train` (issue 8): SIGKILL at random moments never costs more than the last step.

A tiny run that checkpoints every step (state, weights, config and EMA: several atomic writes per step)
is killed with SIGKILL four times, each 1 to 3 steps (at random) after the previous resume got going:
twice after a further random delay of up to 50 ms (inside a step or a write), and twice the moment a
checkpoint's temporary file appears (inside a write). After every kill the latest checkpoint loads
(model.safetensors and the EMA through checkpoints.load, and state.safetensors), and the next
`jet train --resume` starts from it and gets further. The last resume finishes the run, which must end
bit-identical to an uninterrupted run of the same command, with one metrics record per step and no
half-written temporary files left behind.

Readers of a run that is still writing are safe too: a checkpoint replaced while it is read (`jet bpd -m
RUN` during training) loads whole, old or new, never a mix of the two.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jetcli import JetConfig, checkpoints
from jetcli.checkpoints import CheckpointError
from jetcli.model import Jet
from jetcli.train import STATE_NAME, read_metrics

STEPS = 40
OPTIONS = ["--preset", "tiny-16", "--couplings", "2", "--width", "16", "--heads", "2", "--batch-size", "4",
           "--steps", str(STEPS), "--ckpt-every", "1", "--eval-every", "1000", "--ema", "0.9",
           "--device", "cpu"]  # bit-identical to the uninterrupted run: the CPU's guarantee
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
KILLS = ("random", "write", "random", "write")


def start(out: Path, *args) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "jetcli", "train", *args, "-o", str(out)],
                            stdout=log, stderr=log, env=ENV)


def log_of(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text(errors="replace")


def state_step(out: Path) -> int:
    """The step of the latest complete state.safetensors; -1 before the first."""
    try:
        return int(checkpoints.read_metadata(out / STATE_NAME)["step"])
    except CheckpointError:
        return -1


def partial_writes(out: Path) -> list[str]:
    return sorted(p.name for folder in (out, out / "ema") if folder.is_dir()
                  for p in folder.iterdir() if p.name.endswith(".tmp"))


def kill(process: subprocess.Popen, out: Path, after: int, how: str, rng: random.Random) -> None:
    """SIGKILL once the run has checkpointed 1 to 3 (at random) steps past `after`: then after a random
    delay of up to 50 ms, or the moment a checkpoint's temporary file exists."""
    deadline, target = time.monotonic() + 120, after + rng.randint(1, 3)
    while state_step(out) < target:
        assert process.poll() is None, f"the run ended before it could be killed:\n{log_of(out)}"
        assert time.monotonic() < deadline, log_of(out)
        time.sleep(0.005)
    if how == "write":
        until = time.monotonic() + 10
        while not partial_writes(out) and time.monotonic() < until:
            pass
    else:
        time.sleep(rng.uniform(0, 0.05))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, log_of(out)


def test_sigkill_at_random_moments_never_breaks_the_run(tmp_path):
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    data = tmp_path / "pixels.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    reference = start(tmp_path / "reference", data, *OPTIONS)  # uninterrupted, alongside
    out = tmp_path / "run"
    process, step, hits = start(out, data, *OPTIONS), 0, 0
    try:
        for round_, how in enumerate(KILLS):
            kill(process, out, step, how, rng)
            context = f"seed {seed}, kill {round_} ({how}):\n{log_of(out)}"
            hits += bool(partial_writes(out))  # SIGKILL left the temporary file of a write in progress
            latest = state_step(out)
            assert latest > step, context  # the resumed run got further before it died
            if round_:
                assert f"resuming at step {step}" in log_of(out).replace("\n", " "), context
            # What every command reads. It is written before the state, so it is never behind the state,
            # and at most the step being saved ahead (--resume recomputes that step identically).
            for weights in (out, out / "ema"):
                model = checkpoints.load(weights)
                assert all(torch.isfinite(p).all() for p in model.parameters()), context
                saved_at = int(checkpoints.read_metadata(weights / "model.safetensors")["step"])
                assert saved_at in (latest, latest + 1), context
            groups = {k.split(".")[0] for k in checkpoints.load_state(out / STATE_NAME)}
            assert groups == {"model", "optim", "ema"}, context
            step = latest
            process = start(out, "--resume")
        assert process.wait(timeout=300) == 0, log_of(out)
        assert reference.wait(timeout=300) == 0, log_of(tmp_path / "reference")
    finally:  # a failed assertion must not leave runs behind
        for left in (process, reference):
            if left.poll() is None:
                left.kill()

    context = f"seed {seed}:\n{log_of(out)}"
    assert state_step(out) == STEPS, context
    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1)), context
    assert partial_writes(out) == [], context  # --resume removed what the kills left half-written
    final, uninterrupted = (checkpoints.load_state(o / STATE_NAME) for o in (out, tmp_path / "reference"))
    assert final.keys() == uninterrupted.keys()
    assert [k for k in final if not torch.equal(final[k], uninterrupted[k])] == [], context
    assert hits >= 1, f"no kill landed inside a checkpoint write (seed {seed})"
    print(f"{len(KILLS)} SIGKILLs (seed {seed}), {hits} inside a checkpoint write; resumed each time and "
          "ended bit-identical to the uninterrupted run")


def rewrite_forever(folder: Path, model: Jet, stop) -> None:
    """Save the same weights again and again, with metadata of varying length (as the step grows)."""
    torch.set_num_threads(1)
    step = 0
    while not stop.is_set():
        step += 1
        checkpoints.save(model, folder, extra_metadata={"step": str(step), "note": "x" * (step % 257)})


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork to be cheap")
def test_a_checkpoint_replaced_while_it_is_read_loads_whole(tmp_path):
    """safetensors' default mmap backend maps the file by its path a second time after reading the
    header: a file replaced in between failed with a RuntimeError or, worse, gave tensors read at the
    old offsets of the new file (seen as "split.order is not a permutation"; a float weight would just
    be wrong). jetcli reads through the open file handle instead."""
    torch.manual_seed(0)
    model = Jet(JetConfig(image_size=(8, 8), patch_size=4, couplings=1, block_depth=1, width=8, heads=2))
    weights = checkpoints.save(model, tmp_path)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    context = multiprocessing.get_context("fork")
    stop = context.Event()
    writer = context.Process(target=rewrite_forever, args=(tmp_path, model, stop))
    writer.start()
    reads, deadline = 0, time.monotonic() + 1.5
    try:
        while time.monotonic() < deadline:
            assert checkpoints.read_metadata(weights)["format"] == "jetcli"
            state = checkpoints.load_state(weights)
            assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
            reads += 1
    finally:
        stop.set()
        writer.join(timeout=30)
    assert writer.exitcode == 0 and reads > 100
    assert int(checkpoints.read_metadata(weights)["step"]) > 10  # it was really being replaced meanwhile
