"""The files the commands read and write: inputs from paths or stdin, outputs planned and checked before
any work (a refusal leaves everything as it was), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from jetcli.cli.errors import UsageError
from jetcli.cli.options import open_model
from jetcli.cli.output import progress_bar, say
from jetcli.codec import CodecError
from jetcli.fileio import atomic_write
from jetcli.images import IMAGE_SUFFIXES, ImageError


def read_input(source: str) -> bytes:
    """The bytes of a file, or of stdin for "-"."""
    if source == "-":
        stream = typer.get_binary_stream("stdin")
        if stream.isatty():
            raise UsageError("stdin is a terminal: pass a file, or pipe one in")
        return stream.read()
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"{source}: " + ("is a folder, not a file" if path.is_dir() else "no such file"))
    return path.read_bytes()


def source_name(source: str) -> str:
    return "<stdin>" if source == "-" else source


def gather_images(paths: list[str]) -> list[Path]:
    """Files as given, folders searched recursively for image suffixes, "-" read as a list of paths."""
    if paths.count("-") > 1:
        raise UsageError("stdin (-) can be read only once")
    found = []
    for spec in paths:
        if spec == "-":
            found += gather_images([line.strip() for line in os.fsdecode(read_input("-")).splitlines() if line.strip()])
        elif Path(spec).is_dir():
            images = sorted(p for p in Path(spec).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not images:
                raise ImageError(f"{spec}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            found += images
        else:
            found.append(Path(spec))
    if not found:
        raise UsageError("no images given")
    return found


def plan_outputs(inputs: list[str], out: str | None, suffix: str, force: bool) -> list[tuple[str, Path | None]]:
    """(input, output) pairs, None meaning stdout, checked before any work so that a refusal leaves
    everything as it was: several inputs need a folder, stdout must not be a terminal, an input is
    never overwritten and an existing output only with --force."""
    if inputs.count("-") > 1:
        raise UsageError("stdin (-) can be read only once")
    if out is None or out == "-":
        if len(inputs) > 1:
            raise UsageError(f"{len(inputs)} inputs: pass -o DIR to write one {suffix} file for each")
        if typer.get_binary_stream("stdout").isatty():
            raise UsageError("refusing to write binary data to a terminal: redirect it (> FILE) or pass -o FILE")
        return [(inputs[0], None)]
    folder = Path(out)
    if len(inputs) > 1 or folder.is_dir() or out.endswith(("/", os.sep)):
        if "-" in inputs:
            raise UsageError("an input from stdin has no name: pass -o FILE to write it")
        pairs = [(source, folder / (Path(source).stem + suffix)) for source in inputs]
        seen = {}
        for source, dest in pairs:
            if dest in seen:
                raise UsageError(f"{seen[dest]} and {source} would both write {dest}")
            seen[dest] = source
    else:
        if folder.suffix.lower() != suffix:
            raise UsageError(f"-o {out}: the output is a {suffix} file; name it so (or pass a folder)")
        pairs = [(inputs[0], folder)]
    for _, dest in pairs:
        check_output(dest, inputs, force)
    return pairs


def check_output(dest: Path, inputs: list[str], force: bool) -> None:
    """Refuse to write over an input, a folder, into a file's "folder", or over a file without --force."""
    if any(source != "-" and Path(source).exists() and dest.exists() and dest.samefile(source)
           for source in inputs):
        raise UsageError(f"{dest}: is an input; refusing to overwrite it")
    if dest.is_dir():
        raise UsageError(f"{dest}: is a folder")
    folder = next(p for p in dest.absolute().parents if p.exists())
    if not folder.is_dir():
        raise UsageError(f"{dest}: cannot be written, {folder} is a file, not a folder")
    if dest.exists() and not force:
        raise UsageError(f"{dest}: exists; pass --force to overwrite it")


def write_output(dest: Path | None, data: bytes) -> str:
    """Write atomically to a file, or to stdout for None; returns where, in words."""
    if dest is None:
        stream = typer.get_binary_stream("stdout")
        stream.write(data)
        stream.flush()
        return "stdout"
    try:
        atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))
    except OSError as e:
        raise UsageError(f"{dest}: cannot be written ({e.strerror or e})") from None
    return str(dest)


def convert_each(inputs: list[str] | None, output: str | None, suffix: str, force: bool, model: str | None,
                 device: str, what: str, convert) -> None:
    """encode's and decode's loop: every input (stdin when none) through `convert(model, bytes, name) ->
    (output bytes, summary)` to its output file, a line on stderr for each. The outputs are all checked
    before any work; the codec's refusals name the input."""
    inputs = inputs or ["-"]
    pairs = plan_outputs(inputs, output, suffix, force)
    loaded = open_model(model, device)
    with progress_bar(disable=len(pairs) == 1) as bar:
        for source, dest in bar.track(pairs, description=what):
            name = source_name(source)
            try:
                data, summary = convert(loaded.model, read_input(source), name)
            except CodecError as e:
                raise CodecError(f"{name}: {e}") from None
            where = write_output(dest, data)
            say(f"{name} -> {where}: {summary}")
