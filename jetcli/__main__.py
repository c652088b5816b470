"""`python -m jetcli` is the `jet` command."""

from jetcli.cli import app

app(prog_name="jet")
