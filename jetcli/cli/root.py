"""The `jet` app itself: its help, `--version` and `--debug`. Each command lives in its own module."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import typer
from typer.core import TyperOption

from jetcli import __version__
from jetcli.cli.errors import DEBUG, OneLineUsageErrors, one_line_warning

app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Jet normalizing flow: bits/dim, samples and lossless latents from the command line.")


def _flags_take_no_value(display_type_rich):
    """typer (0.2x) shows every flag in help with a type, `--json <bool>`, as if it took a value."""

    def display(self, ctx):
        return None if self.is_flag else display_type_rich(self, ctx)

    return display


if hasattr(TyperOption, "display_type_rich"):  # older typers show no type for flags
    TyperOption.display_type_rich = _flags_take_no_value(TyperOption.display_type_rich)


def version_callback(value: bool):
    if value:
        typer.echo(f"jet {__version__} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def main(
    version: Optional[bool] = typer.Option(None, "--version", callback=version_callback, is_eager=True,
                                           help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (also taken after the "
                                                      "command: jet bpd x.png --debug)."),
):
    DEBUG["on"] = debug
    if not debug:
        warnings.showwarning = one_line_warning
