"""The `jet` command line: one module per command, each parsing its options, making one call into the
library and printing the result. Shared options live in `options`, file inputs and outputs in `files`,
consoles and progress in `output`, and the wording of every error in `errors`.

A new command is a module NAME.py whose function is decorated `@app.command()`, imported below.
"""

from jetcli.cli.root import app

# Importing a command module registers its command; `jet --help` lists them in this order.
from jetcli.cli import train, prepare, bpd, sample, encode, decode, compress, info  # noqa: E402,F401

__all__ = ["app"]
