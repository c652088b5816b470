"""Writing files safely: through a temporary file in the same folder, then an atomic rename; a write that
fails (a full disk, a folder gone, a permission lost) as one WriteError naming the file; and the
one-line reasons jet's errors give when a file cannot be used."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable


_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it) ...
os.umask(_UMASK)  # ... and put straight back


class WriteError(OSError):
    """A file that could not be written, and why, on one line: "PATH: cannot be written (reason)". What
    was there before is unchanged (atomic_write)."""

    def __init__(self, path: str | os.PathLike, error: OSError):
        super().__init__(error.errno, f"{path}: cannot be written ({error.strerror or one_line(error)})")
        self.path = Path(path)

    def __str__(self) -> str:
        return self.strerror


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)`, then rename over `path`: readers never see a half-written file. A failure
    to write (OSError, from `write` too) is a WriteError; `path` is then as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the user's usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):  # the folder itself may be gone
                Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from e
        raise
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Refuse (WriteError) a file that could not be created: a temporary file is made and removed in the
    nearest folder that exists, so that a command fails before its work, not after."""
    path = Path(path).absolute()
    folder = next(p for p in path.parents if p.exists())
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise WriteError(path if folder == path.parent else folder, e) from None


def os_error(message: str) -> OSError:
    """The OSError a library wrapped in its own exception's message, e.g. safetensors'
    "I/O error: No space left on device (os error 28)"; errno None when the message names none."""
    code = re.search(r"os error (\d+)", message)
    return OSError(int(code[1]), os.strerror(int(code[1]))) if code else OSError(None, message)


def remove_partial_writes(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Delete what `atomic_write` calls for `names` in `folder` left behind when their process was killed
    (SIGKILL, power loss): only their temporary files, never the files themselves. Call it only where
    no other process may be writing those names."""
    for name in names:
        for tmp in Path(folder).glob(f".{glob.escape(name)}.*.tmp"):
            tmp.unlink(missing_ok=True)


def one_line(error: BaseException, limit: int | None = 300) -> str:
    """An exception's message folded onto one line, cut at `limit` characters (None: whole)."""
    text = " ".join(str(error).split())
    return text if limit is None else text[:limit]
