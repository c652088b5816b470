"""The files the commands read and write: inputs from paths or stdin, outputs planned and checked before
any work (a refusal leaves everything as it was), written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import typer

from jetcli.cli.errors import EXIT_INTERRUPTED, UsageError
from jetcli.cli.options import open_model
from jetcli.cli.output import progress_bar, say, writing_stdout
from jetcli.codec import CodecError
from jetcli.fileio import WriteError, atomic_write, check_writable
from jetcli.hub import LoadedModel
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


def plan_outputs(inputs: list[str], out: str | None, suffixes: tuple[str, ...], force: bool
                 ) -> list[tuple[str, Path | None]]:
    """(input, output) pairs, None meaning stdout, checked before any work so that a refusal leaves
    everything as it was: several inputs need a folder (where each gets NAME + suffixes[0]), a file
    named -o must end in one of `suffixes`, stdout must not be a terminal, an input is never
    overwritten, an existing output only with --force, and where an output goes must be writable."""
    if inputs.count("-") > 1:
        raise UsageError("stdin (-) can be read only once")
    if out is None or out == "-":
        if len(inputs) > 1:
            raise UsageError(f"{len(inputs)} inputs: pass -o DIR to write one {suffixes[0]} file for each")
        if typer.get_binary_stream("stdout").isatty():
            raise UsageError("refusing to write binary data to a terminal: redirect it (> FILE) or pass -o FILE")
        return [(inputs[0], None)]
    folder = Path(out)
    if len(inputs) > 1 or folder.is_dir() or out.endswith(("/", os.sep)):
        if "-" in inputs:
            raise UsageError("an input from stdin has no name: pass -o FILE to write it")
        pairs = [(source, folder / (Path(source).stem + suffixes[0])) for source in inputs]
        seen = {}
        for source, dest in pairs:
            if dest in seen:
                raise UsageError(f"{seen[dest]} and {source} would both write {dest}")
            seen[dest] = source
    else:
        if folder.suffix.lower() not in suffixes:
            raise UsageError(f"-o {out}: the output is a {' or '.join(suffixes)} file; name it so (or pass a folder)")
        pairs = [(inputs[0], folder)]
    check_outputs([dest for _, dest in pairs], inputs, force)
    return pairs


def check_outputs(dests: list[Path], inputs: list[str], force: bool) -> None:
    """`check_output` for each, then a file made and removed once in each folder they go to: a read-only
    or vanished place is refused before any work is done."""
    for dest in dests:
        check_output(dest, inputs, force)
    for dest in {dest.parent: dest for dest in dests}.values():
        check_writable(dest)


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
    """Write atomically to a file, or to stdout for None; returns where, in words. A failure is a
    WriteError naming the file."""
    if dest is None:
        with writing_stdout():
            stream = typer.get_binary_stream("stdout")
            stream.write(data)
            stream.flush()
        return "stdout"
    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))
    return str(dest)


Convert = Callable[[LoadedModel, bytes, str, Callable[[int, int], None]], tuple[bytes, str]]


def convert_each(inputs: list[str] | None, output: str | None, suffixes: tuple[str, ...], force: bool,
                 model: str | None, device: str, what: str, convert: Convert) -> None:
    """encode's and decode's loop: every input (stdin when none) through `convert(loaded model, bytes,
    name, progress(done, total)) -> (output bytes, summary)` to its output file, a line on stderr for
    each, a progress bar over the tiles of each. The outputs are all checked before any work; the
    codec's refusals name the input. Every output written is complete: after a failure or Ctrl-C, the
    line says how many were."""
    inputs = inputs or ["-"]
    pairs = plan_outputs(inputs, output, suffixes, force)
    if device not in ("auto", "cpu"):
        say(f"note: --device {device} is ignored: the codec computes on the CPU, so that a latent decodes to the "
            "same pixels on every machine")
    loaded = open_model(model, "cpu")
    done = 0
    try:
        with progress_bar(transient=True) as bar:
            files = bar.add_task(what, total=len(pairs), visible=len(pairs) > 1)
            for source, dest in pairs:
                name = source_name(source)
                tiles = bar.add_task(f"{what} {name}", total=None)
                try:
                    data, summary = convert(loaded, read_input(source), name,
                                            lambda n, total: bar.update(tiles, completed=n, total=total))
                except CodecError as e:
                    raise CodecError(f"{name}: {e}") from None
                where = write_output(dest, data)
                done += 1
                bar.remove_task(tiles)
                bar.advance(files)
                say(f"{name} -> {where}: {summary}")
    except WriteError as e:
        if done:
            raise UsageError(f"{e}; the {done} output(s) written before it are complete") from None
        raise
    except KeyboardInterrupt:
        say(f"interrupted: {done} of {len(pairs)} written, each complete")
        raise typer.Exit(EXIT_INTERRUPTED) from None
