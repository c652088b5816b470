"""Where the commands write: results on stdout, everything else (progress, summaries, warnings) on stderr."""

from __future__ import annotations

import contextlib
import io
import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from jetcli.fileio import WriteError

err = Console(stderr=True)
out = Console()


def progress_bar(*fields: str, disable: bool = False, transient: bool = False) -> Progress:
    """A bar on stderr with done/total (whole numbers), the named task fields, elapsed time and ETA;
    `transient` ones are cleared at the end (the lines printed meanwhile stay)."""
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
    return Progress(*columns, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=err, transient=transient, disable=disable)


def say(message: str) -> None:
    """A line on stderr, as written (no markup highlighting, no wrapping)."""
    err.print(message, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """A `warning:` line on stderr, like Python's warnings in jet (jetcli.cli.errors)."""
    err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def writing_stdout():
    """Results printed inside: a full disk or a closed pipe behind stdout is one WriteError, not a
    traceback (nor another one when Python flushes stdout at exit)."""
    try:
        yield
        sys.stdout.flush()
    except OSError as e:
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):  # what is unwritten is lost
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise WriteError("<stdout>", e) from None


def write_stdout(text: str) -> None:
    """Text on stdout, flushed now."""
    with writing_stdout():
        sys.stdout.write(text)
