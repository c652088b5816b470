"""CUDA-only checks (skipped without a GPU; `benchmarks/gpu_check.py` runs them): a training step that
never waits on the GPU, the GPU loop against the CPU loop, a CPU run resumed on the GPU, an exact restore
on the GPU, the codec's latents with a GPU model, the device and precision a GPU gets, bpd on the GPU.

Tolerances between CPU and GPU numbers are bounds chosen before any GPU ran (float32 on both, no TF32),
not measurements; gpu_check.py's JSON holds the measured differences.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import on_cpu
from PIL import Image
from test_train import CONFIG, PIXELS, make_trainer, train_step
from typer.testing import CliRunner

from jetcli import checkpoints, codec
from jetcli.cli import app
from jetcli.precision import native_bf16, resolve
from jetcli.testing import random_jet
from jetcli.train import STATE_NAME, read_metrics
from jetcli.train.distributed import process_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CROSS_DEVICE = 1e-4  # relative: CPU vs GPU float32 of the same computation (a bound, see above)


def jet(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_the_training_step_never_waits_for_the_gpu(tmp_path):
    """Once warm (the first step fills per-device caches), train_step queues its work and returns: any
    synchronising call (an .item(), a blocking copy) raises under the sync debug mode."""
    trainer = make_trainer(tmp_path, device="cuda", precision=resolve("auto", "cuda"), ema=0.9)
    assert trainer.batch_at(torch.arange(8)).pixels.is_pinned()
    stats = [trainer.train_step()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats += [trainer.train_step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    records, stop = trainer.read_stats([1, 2, 3, 4], stats)
    assert not stop and all(np.isfinite(r["bpd"]) and np.isfinite(r["grad_norm"]) for r in records)


def test_gpu_training_follows_the_cpu_loop(tmp_path):
    cpu, gpu = make_trainer(tmp_path / "cpu"), make_trainer(tmp_path / "gpu", device="cuda")
    for _ in range(2):
        a, b = train_step(cpu), train_step(gpu)
        for key in ("bpd", "nll", "logdet", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=CROSS_DEVICE), key
    for p, q in zip(cpu.model.parameters(), gpu.model.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=CROSS_DEVICE, atol=1e-6)


def test_a_cpu_run_resumes_on_the_gpu_with_the_precision_of_the_gpu(tmp_path):
    data = tmp_path / "pixels.npy"
    np.save(data, PIXELS)
    out = tmp_path / "run"
    common = ["--preset", "tiny-16", "--couplings", "2", "--batch-size", "8", "--ckpt-every", "2"]
    result = jet(*on_cpu(["train", data, *common, "--steps", "2", "-o", out]))
    assert result.exit_code == 0, result.output
    result = jet("train", "--resume", "-o", out, "--steps", "4", "--device", "cuda")
    assert result.exit_code == 0, result.output
    options = json.loads(checkpoints.read_metadata(out / STATE_NAME)["options"])
    assert options["device"].startswith("cuda") and options["precision"] == resolve("auto", "cuda")
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_resume_on_the_gpu_restores_the_saved_state_exactly(tmp_path):
    trainer = make_trainer(tmp_path, device="cuda", ema=0.9)
    for _ in range(2):
        trainer.train_step()
    trainer.save()
    resumed = make_trainer(tmp_path, device="cuda", ema=0.9)
    resumed.resume()
    assert resumed.step == 2
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    assert all(torch.equal(v, trainer.ema[k]) and v.is_cuda for k, v in resumed.ema.items())
    saved, restored = trainer.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(saved[i][name], restored[i][name].to(saved[i][name].device))
               for i in saved for name in saved[i])
    assert np.isfinite(train_step(resumed)["bpd"])


def test_a_gpu_model_encodes_the_latent_the_cpu_encodes():
    model = random_jet(CONFIG)
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    on_cpu_ = codec.encode(model, pixels).latent
    on_gpu = codec.encode(random_jet(CONFIG, device="cuda"), pixels).latent
    assert on_gpu.dtype == on_cpu_.dtype and on_gpu.tobytes() == on_cpu_.tobytes()


def test_the_device_and_the_precision_a_gpu_gets(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert process_device(torch.device("cuda")) == torch.device("cuda", 0)
    native = torch.cuda.get_device_capability(0)[0] >= 8
    assert native_bf16("cuda") == native and resolve("auto", "cuda") == ("fast" if native else "fp32")


def test_bpd_on_the_gpu_agrees_with_the_cpu(tmp_path):
    checkpoints.save(random_jet(CONFIG), tmp_path / "model")
    Image.fromarray(PIXELS[0]).save(tmp_path / "image.png")
    means = {}
    for device in ("cpu", "cuda"):
        result = jet("bpd", tmp_path / "image.png", "-m", tmp_path / "model", "--device", device, "--json")
        assert result.exit_code == 0, result.output
        means[device] = json.loads(result.stdout)["mean_bpd"]
    assert means["cuda"] == pytest.approx(means["cpu"], rel=CROSS_DEVICE)
