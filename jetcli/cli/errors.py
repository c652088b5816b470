"""The one place that words errors for the terminal: user errors as one red line and exit 2, settings
named as flags, click's own errors and Python warnings one line each. `jet --debug` shows tracebacks."""

from __future__ import annotations

import functools
import sys

import typer
from rich.markup import escape
from typer.core import TyperGroup

from jetcli.checkpoints import CheckpointError
from jetcli.codec import CodecError
from jetcli.data import DataError
from jetcli.errors import SettingError, SettingWarning
from jetcli.fileio import one_line
from jetcli.hub import HubError
from jetcli.images import ImageError
from jetcli.cli.output import err

DEBUG = {"on": False}  # set by `jet --debug`

# Exit statuses besides 0 and click's own: a user error; a command that finished but skipped some inputs
# (`jet bpd` on a folder with unreadable files); Ctrl-C (128 + SIGINT, what shells report).
EXIT_USER_ERROR = 2
EXIT_SKIPPED = 3
EXIT_INTERRUPTED = 130

# Fields whose flag is not --field-name.
FLAGS = {"preset_name": "--preset"}

# Errors that are the user's input, not our bug: reported as one line.
USER_ERRORS: tuple[type[BaseException], ...] = (CheckpointError, HubError, ImageError, CodecError, DataError,
                                                  SettingError, OSError)

# click's own exception base: typer >= 0.2x vendors its own click, older ones use click's.
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class UsageError(ValueError):
    """A bad combination of options or arguments."""


def flag(field: str) -> str:
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def user_errors(fn):
    """Report user errors as one red line and exit 2; `jet --debug ...` shows the traceback instead."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS + (UsageError,) as e:
            if DEBUG["on"]:
                raise
            message = e.worded(flag) if isinstance(e, SettingError) else str(e)
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper


def one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings (a damaged image's skipped metadata, ...) as one line each, without source excerpts;
    settings named as flags."""
    text = message.worded(flag) if isinstance(message, SettingWarning) else one_line(message, None)
    err.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


def debug_first(args: list[str]) -> list[str]:
    """`--debug` is an option of `jet` itself, but is also taken after the command (`jet bpd x --debug`):
    it is moved to the front. After `--`, arguments are never options."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:end]:
        return args
    return ["--debug"] + [a for i, a in enumerate(args) if a != "--debug" or i > end]


class OneLineUsageErrors(TyperGroup):
    """click reports its own errors (an unknown option, a value that does not parse or is out of range)
    as a box under the usage text; jet reports them like every other user error: one line, exit 2."""

    def main(self, args=None, *rest, standalone_mode: bool = True, **kwargs):
        args = debug_first(sys.argv[1:] if args is None else list(args))
        if not standalone_mode:
            return super().main(args, *rest, standalone_mode=False, **kwargs)
        try:
            code = super().main(args, *rest, standalone_mode=False, **kwargs)  # an Exit's code, else None
        except CLICK_ERROR as e:
            if type(e).__name__ != "NoArgsIsHelpError":  # `jet` alone: the help is printed already
                ctx = getattr(e, "ctx", None)
                hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
                err.print(f"[bold red]error:[/] {escape(e.format_message())}{hint}", highlight=False,
                          soft_wrap=True)
            sys.exit(e.exit_code)
        except typer.Abort as e:  # Ctrl-C, or the end of input at a prompt
            if isinstance(e.__cause__, KeyboardInterrupt):
                err.print("interrupted")
                sys.exit(EXIT_INTERRUPTED)
            err.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
