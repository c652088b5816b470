"""Options that several commands share, as `Annotated` aliases, and what `--model`/`--device` resolve to."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from jetcli.cli.errors import UsageError
from jetcli.cli.output import say
from jetcli.devices import resolve_device
from jetcli.hub import LoadedModel, load_model
from jetcli.precision import CHOICES

ModelOption = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="NAME|PATH|OWNER/NAME[@REV]", show_default=False,
    help="An embedded model by name (`jet info` lists them), a checkpoint folder or file (jetcli, "
         "jet-pytorch .safetensors, big_vision .npz) or a Hugging Face Hub repo owner/name[@revision] "
         "(cached; honours HF_HOME, HF_TOKEN, HF_HUB_OFFLINE). Default: the embedded default model.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")]
# encode and decode compute on the CPU (jetcli.codec: portable latents); --device is still accepted, hidden.
CodecDeviceOption = Annotated[str, typer.Option("--device", hidden=True, help="Ignored: the codec runs on the CPU.")]
Precision = Enum("Precision", {p: p for p in CHOICES}, type=str)
PrecisionOption = Annotated[Precision, typer.Option(
    "--precision",
    help="fp32; fast: the couplings' ViTs under bf16 autocast (faster, slightly different numbers); auto: fast "
         "where bf16 runs natively (CUDA GPUs from Ampere on, CPUs with AVX512-BF16 or AMX), else fp32.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the random draws: same seed, options and "
                                                        "device give the same result.")]
ForceOption = Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs (never an input).")]
InputsArgument = Annotated[Optional[list[str]], typer.Argument(show_default=False, help=(
    "Input files; - or nothing reads one from stdin."))]


def open_model(spec: str | None, device_spec: str) -> LoadedModel:
    """Resolve --device and --model, move the model there and say what runs where."""
    device = resolve_device(device_spec)
    loaded = load_model(spec)
    config = loaded.model.config
    if config.channels != 3:
        raise UsageError(f"{loaded.name}: a {config.channels}-channel model; jet reads and writes RGB images")
    loaded.model.to(device)
    say(f"model {loaded.name} ({loaded.format}, {loaded.model.num_params() / 1e6:.2f}M params, "
        f"{config.image_size[0]}x{config.image_size[1]} input) on {device}")
    return loaded
