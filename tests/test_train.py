"""`jet train`: big_vision's optimiser semantics, accumulation, EMA, precision, bit-identical resume,
signals, the CLI's resume rules, plots and the Hub upload (without a network)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import on_cpu
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from jetcli import checkpoints, precision, publish
from jetcli.config import preset
from jetcli.data import ImageSet
from jetcli.model import Jet
from jetcli.precision import compute_context, resolve
from jetcli.train import (STATE_NAME, RunSettings, Trainer, TrainOptions, lr_factor, make_optimizer, read_metrics,
                          saved_run, start_run)

CONFIG = preset("tiny-16").replace(couplings=2)
PIXELS = np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)


def make_trainer(out, steps=6, **options) -> Trainer:
    opts = TrainOptions(out=out, steps=steps, batch_size=8, eval_every=3, ckpt_every=100, log_every=2,
                        **options)
    return Trainer(CONFIG, ImageSet(PIXELS[:18]), ImageSet(PIXELS[18:], flip=False), opts)


def train_step(trainer: Trainer) -> dict:
    """One step and its record, read at once (the loop reads many steps' together)."""
    stats = trainer.train_step()
    return trainer.read_stats([trainer.step], [stats])[0][0]


def state_tensors(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / STATE_NAME))


# --------------------------------------------------------------------------- optimisation
def big_vision_schedule(step: int, total: int, warmup_percent: float) -> float:
    """big_vision.utils.create_learning_rate_schedule(decay_type='cosine', warmup_percent=...), base 1."""
    x = warmup_percent * total
    warmup = max(1, round(x)) if x else 0  # big_vision.utils.steps' to_integer
    progress = float(np.clip((step - warmup) / float(total - warmup), 0.0, 1.0))
    lr = 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * min(1.0, step / warmup) if warmup else lr


def test_schedule_is_warmup_then_cosine_as_in_big_vision():
    assert [lr_factor(s, 100, 0.1) for s in (0, 5, 10, 55, 100)] == pytest.approx([0, 0.5, 1, 0.5, 0], abs=1e-12)
    for total, warmup in ((100, 0.1), (37, 0.1), (10, 0.05), (50, 0.0)):
        ours = [lr_factor(s, total, warmup) for s in range(total + 1)]
        theirs = [big_vision_schedule(s, total, warmup) for s in range(total + 1)]
        assert ours == pytest.approx(theirs, abs=1e-12)
    assert lr_factor(0, 50, 0.0) == 1.0  # no warmup: the first update has the full lr


@pytest.mark.parametrize("lr", [3e-4, 0.1])
def test_weight_decay_is_wd_times_schedule_times_param_independent_of_lr(tmp_path, lr):
    """With zero gradients Adam's direction is 0, so one step moves each parameter by exactly
    sched(t) * wd * param, as optax.add_decayed_weights followed by scale_by_schedule does."""
    torch.manual_seed(0)
    model = Jet(CONFIG)
    wd, step, total = 1e-2, 55, 100
    opts = TrainOptions(out=tmp_path, steps=total, lr=lr, weight_decay=wd)
    optimizer = make_optimizer(model, opts)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))  # all decay
    factor = lr_factor(step, total, opts.warmup)
    assert factor == pytest.approx(0.5)
    for group in optimizer.param_groups:
        group["lr"] = lr * factor
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    orders = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("split.order")}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] * (1 - factor * wd), rtol=1e-6, atol=0)
        torch.testing.assert_close(before[name] - p.detach(), factor * wd * before[name], rtol=1e-4, atol=1e-12)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in orders.items())  # projections frozen


def test_one_update_is_the_optax_chain(tmp_path):
    """First update with gradient g: param - sched * (lr * g / (|g| + eps) + wd * param)."""
    torch.manual_seed(0)
    model = Jet(CONFIG)
    opts = TrainOptions(out=tmp_path, steps=10, lr=1e-3, weight_decay=1e-2, warmup=0.0)
    optimizer = make_optimizer(model, opts)
    factor = lr_factor(3, 10, 0.0)
    for group in optimizer.param_groups:
        group["lr"] = opts.lr * factor
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()
    optimizer.step()
    for name, p in model.named_parameters():
        g = grads[name]
        expected = before[name] - factor * (opts.lr * g / (g.abs() + 1e-8) + opts.weight_decay * before[name])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-8)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    full, accumulated = make_trainer(tmp_path / "a"), make_trainer(tmp_path / "b", grad_accum=4)
    for _ in range(3):
        a, b = train_step(full), train_step(accumulated)
        assert b["bpd"] == pytest.approx(a["bpd"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for (name, p), q in zip(full.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=name)


def test_batches_cross_as_uint8_and_are_dequantised_where_the_model_runs(tmp_path):
    trainer = make_trainer(tmp_path)
    positions = torch.arange(5, 13)
    batch = trainer.batch_at(positions)
    assert batch.pixels.dtype == torch.uint8 and torch.equal(batch.positions, positions)
    assert torch.equal(trainer.model_input(batch), trainer.train_stream.batch(positions))  # the stream's noise


def test_ema_is_kept_and_saved_beside(tmp_path):
    trainer = make_trainer(tmp_path, steps=3, ema=0.9)
    expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for _ in range(3):
        trainer.train_step()
        for k, v in trainer.model.state_dict().items():
            if v.is_floating_point():
                expected[k] = 0.9 * expected[k] + 0.1 * v
    for k, v in expected.items():
        torch.testing.assert_close(trainer.ema[k], v, rtol=1e-5, atol=1e-7)
    assert not torch.equal(trainer.ema["couplings.0.vit.final_proj.weight"],
                           trainer.model.state_dict()["couplings.0.vit.final_proj.weight"])
    trainer.save()
    ema = checkpoints.load_own(tmp_path / "ema")
    assert all(torch.equal(ema.state_dict()[k], trainer.ema[k]) for k in expected)


def test_precision_auto_is_fast_only_where_bf16_is_native(monkeypatch):
    for avx512_bf16, amx, expected in ((True, False, "fast"), (False, True, "fast"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert resolve("auto", torch.device("cpu")) == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in (((8, 0), "fast"), ((9, 0), "fast"), ((7, 5), "fp32")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve("auto", "cuda") == expected
    assert resolve("fp32", "cuda") == "fp32"
    with pytest.warns(UserWarning, match="precision fast on cuda: bf16 is emulated"):  # a V100 or a T4
        assert resolve("fast", "cuda") == "fast"
    with pytest.warns(UserWarning, match="precision fast on cpu: bf16 is emulated"):
        assert resolve("fast", "cpu") == "fast"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native: no warning
        assert resolve("fast", "cuda") == "fast"
    with pytest.raises(ValueError, match="precision"):
        resolve("bf16", "cpu")


def test_fast_keeps_loss_in_float32(tmp_path):
    x = torch.rand(4, 16, 16, 3) * 2 - 1
    model = make_trainer(tmp_path).model
    with torch.no_grad():
        model.couplings[0].vit.final_proj.weight.normal_(std=0.1)
        with compute_context("cpu", "fast"):
            z_fast, logdet_fast = model(x)
        z, logdet = model(x)
    assert z_fast.dtype == logdet_fast.dtype == torch.float32
    assert (z_fast - z).abs().max() < 0.05 and not torch.equal(z_fast, z)  # bf16 ViT, float32 flow
    stats = train_step(make_trainer(tmp_path / "fast", precision="fast"))
    assert math.isfinite(stats["bpd"]) and math.isfinite(stats["grad_norm"])


@pytest.mark.skipif(not os.environ.get("JETCLI_SLOW_TESTS"),
                    reason="torch.compile of a 2-coupling tiny Jet took 480 s for its first step on this 2-core CPU; "
                           "set JETCLI_SLOW_TESTS=1 to run")
def test_compiled_training_matches_eager(tmp_path):
    eager, compiled = make_trainer(tmp_path / "a", steps=2), make_trainer(tmp_path / "b", steps=2, compile=True)
    for _ in range(2):
        assert train_step(compiled)["bpd"] == pytest.approx(train_step(eager)["bpd"], abs=1e-4)


# --------------------------------------------------------------------------- checkpoints and resume
def test_stopped_and_resumed_run_is_bit_identical(tmp_path):
    straight = make_trainer(tmp_path / "straight", ema=0.9)
    straight.run()

    def interrupt(record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal path: the handler asks the loop to stop

    stopped = make_trainer(tmp_path / "resumed", ema=0.9)
    stopped.run(progress=interrupt)
    assert stopped.step == 3 and stopped.stop_signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored after the run
    resumed = make_trainer(tmp_path / "resumed", ema=0.9)  # a fresh process would build exactly this
    resumed.resume()
    assert resumed.step == 3
    resumed.run()

    a, b = state_tensors(tmp_path / "straight"), state_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a) and any(".exp_avg_sq" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    for name in ("model.safetensors", "ema/model.safetensors"):
        assert load_file(str(tmp_path / "straight" / name)).keys() == load_file(str(tmp_path / "resumed" / name)).keys()
        assert all(torch.equal(v, load_file(str(tmp_path / "resumed" / name))[k])
                   for k, v in load_file(str(tmp_path / "straight" / name)).items())
    strip = lambda records: [{k: v for k, v in r.items() if k != "img_per_s"} for r in records]
    assert strip(read_metrics(tmp_path / "straight")) == strip(read_metrics(tmp_path / "resumed"))
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]
    assert checkpoints.load(tmp_path / "resumed").config == CONFIG  # the export every command loads


def test_resume_reads_states_written_before_rng_was_keyed_by_position(tmp_path):
    """States of the first trainer (the long default-model run) also hold rng.* and older options."""
    trainer = make_trainer(tmp_path, steps=6)
    trainer.train_step(), trainer.train_step()
    trainer.save()
    tensors = state_tensors(tmp_path)
    tensors["rng.generator"] = torch.Generator().get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    old_options = {"out": str(tmp_path), "steps": 6, "batch_size": 8, "grad_accum": 1, "lr": 3e-4,
                   "weight_decay": 1e-5, "betas": [0.9, 0.95], "warmup": 0.1, "clip": 1.0, "ema": None,
                   "precision": "fast", "seed": 0, "eval_every": 3, "ckpt_every": 100, "log_every": 2,
                   "val_samples": 1, "device": "cpu", "compile": False,
                   "extra": {"data": "train.npz:train_images", "val": "train.npz:test_images", "crop": None,
                             "command": "jet train ..."}}
    save_file(tensors, str(tmp_path / STATE_NAME),
              metadata={"step": "2", "config": CONFIG.to_json(), "options": json.dumps(old_options)})
    resumed = make_trainer(tmp_path, steps=6)
    resumed.resume()
    assert resumed.step == 2
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    config, options = saved_run(tmp_path)
    assert config == CONFIG
    assert options["data"] == "train.npz:train_images" and options["val_fraction"] == 0.0
    assert options["precision"] == "fast" and options["steps"] == 6


def test_resume_refuses_another_model(tmp_path):
    make_trainer(tmp_path).save()
    opts = TrainOptions(out=tmp_path, steps=6, batch_size=8)
    other = Trainer(CONFIG.replace(width=64), ImageSet(PIXELS), None, opts)
    with pytest.raises(checkpoints.CheckpointError, match="another model config"):
        other.resume()


# --------------------------------------------------------------------------- the command line
def run_cli(*args):
    from jetcli.cli import app
    return CliRunner().invoke(app, on_cpu(args))


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "pixels.npz"
    np.savez(path, train_images=PIXELS[:18], test_images=PIXELS[18:])
    return path


def test_cli_train_then_resume_with_the_runs_own_options(tmp_path, data_file):
    out = tmp_path / "run"
    common = ["--preset", "tiny-16", "--couplings", "2", "--batch-size", "8", "--eval-every", "2",
              "--ckpt-every", "2"]
    result = run_cli("train", f"{data_file}:train_images", "--val", f"{data_file}:test_images", *common,
                     "--steps", "2", "--lr", "1e-3", "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "curves.png").exists() and (out / "samples.png").exists()
    assert checkpoints.load(out).config.couplings == 2
    assert saved_run(out)[1]["precision"] == "auto"  # as asked: each session resolves it for its device
    assert json.loads(checkpoints.read_metadata(out / STATE_NAME)["options"])["precision"] == resolve("auto", "cpu")

    result = run_cli("train", "--resume", "-o", out, "--lr", "3e-4")
    assert result.exit_code == 2 and "--lr 0.0003 (the run has 0.001)" in result.output
    result = run_cli("train", "--resume", "-o", out, "--width", "64")
    assert result.exit_code == 2 and "keeps its model" in result.output
    result = run_cli("train", f"{data_file}:train_images", "-o", out)
    assert result.exit_code == 2 and "--resume" in result.output

    result = run_cli("train", "--resume", "-o", out, "--steps", "4")  # data, lr, model: the run's
    assert result.exit_code == 0, result.output
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["lr"] == pytest.approx(1e-3 * lr_factor(3, 4, 0.1))  # the run's lr, the new length
    assert "val_bpd" in records[-1] and saved_run(out)[1]["lr"] == 1e-3


def test_cli_coupling_kinds_and_spatial_patterns(tmp_path, data_file):
    """--kinds and --spatial-patterns set the plan (what the ablations of benchmarks/replicate.py vary)."""
    out = tmp_path / "run"
    result = run_cli("train", f"{data_file}:train_images", "--preset", "tiny-16", "--couplings", "4",
                     "--kinds", "channels,spatial", "--spatial-patterns", "checkerboard,checkerboard-inv",
                     "--batch-size", "4", "--steps", "1", "-o", out)
    assert result.exit_code == 0, result.output
    assert checkpoints.load(out).config.plan() == [("channels", "random"), ("spatial", "checkerboard"),
                                                   ("channels", "random"), ("spatial", "checkerboard-inv")]
    result = run_cli("train", f"{data_file}:train_images", "--preset", "tiny-16", "--spatial-patterns", "diagonal",
                     "--steps", "1", "-o", tmp_path / "bad")
    assert result.exit_code == 2 and "spatial_projs must be drawn from" in result.output


def test_resume_resolves_auto_precision_for_its_own_device(tmp_path, data_file, monkeypatch):
    """auto started where bf16 is emulated trains fp32; resumed where it is native (a GPU), fast. A
    precision given explicitly stays, and so does the resolved precision of runs saved before the asked
    one was kept."""
    first = RunSettings(data=f"{data_file}:train_images", out=tmp_path / "run", preset_name="tiny-16", couplings=2,
                        batch_size=8, steps=2, device="cpu")
    resumed = lambda **given: start_run(replace(first, data=None, resume=True, **given), given=set(given)).trainer
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    trainer = start_run(first).trainer
    assert trainer.opts.precision == "fp32"
    trainer.save()
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert resumed().opts.precision == "fast"
    trainer = resumed(precision="fp32")
    assert trainer.opts.precision == "fp32"
    trainer.save()
    assert resumed().opts.precision == "fp32"  # fp32 was asked for last

    state = tmp_path / "run" / STATE_NAME
    meta = checkpoints.read_metadata(state)
    options = json.loads(meta["options"])
    options["extra"] = {k: v for k, v in options["extra"].items() if k != "asked_precision"}
    options["precision"] = "fp32"
    save_file(load_file(str(state)), str(state), metadata={**meta, "options": json.dumps(options)})
    assert resumed().opts.precision == "fp32"  # saved before the asked precision was kept: as it was


def test_processes_leave_the_group_before_rank_0_draws_and_uploads(tmp_path, data_file, monkeypatch):
    """Every process leaves the process group as training ends; rank 0's pictures, samples and upload
    come after, so no process waits on them (nor, when an upload fails, until torchrun kills it)."""
    from jetcli.cli import train as command
    order = []
    monkeypatch.setattr(command, "finish_distributed", lambda device: order.append(f"leave group on {device}"))
    monkeypatch.setattr(command, "write_pictures", lambda run: order.append("pictures"))
    result = run_cli("train", f"{data_file}:train_images", "--preset", "tiny-16", "--couplings", "2",
                     "--batch-size", "8", "--steps", "1", "-o", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert order == ["leave group on cpu", "pictures"]


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path, data_file):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "jetcli", "train", f"{data_file}:train_images", "--preset", "tiny-16",
               "--couplings", "2", "--batch-size", "4", "--steps", "100000", "--ckpt-every", "100000",
               "--device", "cpu", "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while len(read_metrics(out)) < 3:  # training is under way
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, stderr.decode()
    assert "continue with --resume" in stderr.decode()
    step = int(checkpoints.read_metadata(out / STATE_NAME)["step"])
    assert 3 <= step < 100000 and read_metrics(out)[-1]["step"] == step
    model = checkpoints.load(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not list(out.glob(".*.tmp"))  # no half-written files left behind
    resumed = Trainer(CONFIG, ImageSet(PIXELS[:18]), None, TrainOptions(out=out, steps=100000, batch_size=4))
    resumed.resume()
    assert resumed.step == step


# --------------------------------------------------------------------------- outputs
def test_curves_png_shows_train_and_val(tmp_path):
    trainer = make_trainer(tmp_path, steps=9)
    trainer.run()
    from jetcli.train import plot_curves
    plot_curves(read_metrics(tmp_path), tmp_path / "curves.png")
    pixels = np.asarray(Image.open(tmp_path / "curves.png"))
    assert pixels.shape == (400, 640, 3)
    blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 60)
    grey = (pixels[..., 0] == 150) & (pixels[..., 1] == 150) & (pixels[..., 2] == 150)
    assert blue.sum() > 50 and grey.sum() > 50  # three val points joined by a line, and the train curve


def test_push_to_hub_uploads_weights_config_and_card(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    trainer = make_trainer(run, steps=3, ema=0.99)
    trainer.opts.extra = {"data": "pixels.npz:train_images", "val": "pixels.npz:test_images", "crop": None,
                          "train_images": 18, "val_images": 6, "command": "jet train pixels.npz ..."}
    trainer.run()
    calls = []
    monkeypatch.setattr(publish.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("repo", repo_id)))

    def create_commit(self, repo_id, operations, commit_message, **kw):
        calls.append(("commit", repo_id, {op.path_in_repo: op for op in operations}))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(publish.HfApi, "create_commit", create_commit)
    assert publish.push(run, "someone/tiny-jet") == "https://huggingface.co/someone/tiny-jet/commit/abc"
    assert calls[0] == ("repo", "someone/tiny-jet") and calls[1][1] == "someone/tiny-jet"
    files = calls[1][2]
    assert set(files) == {"model.safetensors", "config.json", "ema/model.safetensors", "ema/config.json",
                          "metrics.jsonl", "README.md"}
    assert open(files["model.safetensors"].path_or_fileobj, "rb").read() == (run / "model.safetensors").read_bytes()
    card = files["README.md"].path_or_fileobj.decode()
    val_bpd = read_metrics(run)[-1]["val_bpd"]
    assert f"{val_bpd:.4f} bits/dim on `pixels.npz:test_images` (6 images), measured at step 3" in card
    assert "| steps | 3 of 3, global batch 8 |" in card and "`pixels.npz:train_images` (18 images of 16x16)" in card
    assert json.loads(card.split("```json\n")[1].split("```")[0]) == CONFIG.to_dict()
    assert card.startswith("---\nlibrary_name: jetcli\n")


def test_push_to_hub_checks_its_destination_before_training(monkeypatch):
    monkeypatch.setattr(publish, "get_token", lambda: "hf_test")
    publish.check_destination("someone/tiny-jet")
    for bad in ("no-owner", "a/b/c", "bad name/x"):
        with pytest.raises(ValueError, match="push_to_hub"):
            publish.check_destination(bad)
    monkeypatch.setattr(publish, "get_token", lambda: None)
    with pytest.raises(ValueError, match="token"):
        publish.check_destination("someone/tiny-jet")
