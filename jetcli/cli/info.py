"""`jet info`: what a model is and where its weights came from (jetcli.hub)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape

from jetcli.cli.errors import user_errors
from jetcli.cli.options import ModelOption
from jetcli.cli.output import out
from jetcli.cli.root import app
from jetcli.hub import DEFAULT_MODEL, LoadedModel, embedded_models, load_model


@app.command()
@user_errors
def info(
    model: ModelOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
):
    """Describe a model: config, parameter count, input size, where its weights came from, their sha256;
    and list the models embedded in jetcli (usable as `--model NAME`).

    The model is resolved exactly as the other commands resolve `--model`; the sha256 is that of the
    weights file itself, so copies can be compared with `sha256sum`.

    **Examples**

        jet info
        jet info --model cifar10
        jet info --model runs/cifar --json
        jet info --model btrude/jet_imagenet64x64_200m
    """
    loaded = load_model(model)
    result = description(loaded)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    h, w, channels = result["input_size"]
    lines = {"model": loaded.name, "from": loaded.origin, "format": loaded.format, "weights": loaded.weights,
             "sha256": result["sha256"], "parameters": f"{result['parameters']:,}",
             "input": f"{h}x{w}x{channels} ({result['dims']} dims)", "embedded": ", ".join(result["embedded"])}
    lines.update({f"  {k}": ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in result["config"].items()})
    for key, value in lines.items():
        out.print(f"[bold]{key:<15}[/] {escape(str(value))}", highlight=False, soft_wrap=True)


def description(loaded: LoadedModel) -> dict:
    config = loaded.model.config
    h, w = config.image_size
    return {"model": loaded.name, "origin": loaded.origin, "format": loaded.format,
            "weights": str(loaded.weights), "sha256": loaded.sha256(), "parameters": loaded.model.num_params(),
            "input_size": [h, w, config.channels], "dims": config.dims, "config": config.to_dict(),
            "embedded": [f"{name} (default)" if name == DEFAULT_MODEL else name for name in embedded_models()]}
