"""Writing files safely: through a temporary file in the same folder, then an atomic rename; and the
one-line reasons jet's errors give when a file cannot be used."""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable


_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it) ...
os.umask(_UMASK)  # ... and put straight back


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(tmp_path)`, then rename over `path`: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the user's usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
