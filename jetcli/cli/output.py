"""Where the commands write: results on stdout, everything else (progress, summaries) on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True)
out = Console()


def progress_bar(*fields: str, disable: bool = False) -> Progress:
    """A bar on stderr with done/total, the named task fields, elapsed time and ETA."""
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}")]
    columns += [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
    return Progress(*columns, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=err, transient=False, disable=disable)


def say(message: str) -> None:
    """A line on stderr, as written (no markup highlighting, no wrapping)."""
    err.print(message, highlight=False, soft_wrap=True)
