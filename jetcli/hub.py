"""Finding the model a command runs: a local checkpoint, a Hugging Face Hub repo, or the default model.

`--model` takes

- a local folder or file in any format `checkpoints.load` reads (jetcli's own, a jet-pytorch
  .safetensors, a big_vision .npz); a path that exists always wins over a Hub id spelled the same;
- a Hub repo id `owner/name` or `owner/name@revision` (branch, tag or commit). huggingface_hub
  downloads it into its cache with a progress bar and reuses the cache afterwards; it reads HF_HOME
  (or HF_HUB_CACHE), HF_TOKEN for private or gated repos, and HF_HUB_OFFLINE=1 to use the cache only.
  The repo must hold jetcli's layout (model.safetensors + config.json at its top) or exactly one
  .safetensors or .npz checkpoint;
- the name of a model embedded in the package (`jetcli.weights`, the repository's top-level `weights/`
  folder, one subfolder per model: model.safetensors + config.json), found the same way in an editable
  install and in an installed wheel; `embedded_models()` lists them;
- nothing: the embedded model named DEFAULT_MODEL.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path

from jetcli import checkpoints
from jetcli.checkpoints import CheckpointError
from jetcli.errors import SettingError
from jetcli.fileio import one_line
from jetcli.model import Jet

EMBEDDED_PACKAGE = "jetcli.weights"
DEFAULT_MODEL = "photo"  # the embedded model that runs when --model is not given (weights/photo/README.md)
HUB_PATTERNS = ["*.safetensors", "*.npz", "*.json"]  # never pickles from the network
REPO_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
CHECKPOINT_SUFFIXES = (".safetensors", ".npz", *checkpoints.PICKLE_SUFFIXES)


class HubError(ValueError):
    """A Hub repo that cannot be fetched or holds no usable checkpoint."""


class ModelChoiceError(HubError, CheckpointError, SettingError):
    """No model without a choice of model (no default, a repo of several checkpoints): the message names
    the setting by field, `{model}` (jetcli.errors)."""


@dataclass(frozen=True)
class LoadedModel:
    model: Jet  # on the CPU, in eval mode
    name: str  # how to name it in reports: "default", the path given, or owner/name@commit
    origin: str  # where the weights came from, in words
    weights: Path  # the file the tensors were read from
    format: str  # "jetcli", "jet-pytorch" or "big_vision"

    def sha256(self) -> str:
        """Of the weights file, as `sha256sum` gives it: the model's identity in latents and reports."""
        stat = self.weights.stat()
        return _file_sha256(self.weights, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)  # a command asks once per file it writes; the file is read once
def _file_sha256(path: Path, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(spec: str | None = None) -> LoadedModel:
    """The model `--model spec` names (see the module docstring); None is the default model."""
    path = Path(spec).expanduser() if spec is not None else None
    if path is not None and path.exists():
        return _load(path, spec, f"local checkpoint {path.resolve()}")
    if spec is None or spec in embedded_models():
        name = spec or DEFAULT_MODEL
        folder = embedded_folder(name)
        default = " (the default)" if name == DEFAULT_MODEL else ""
        return _load(folder, name, f"the model {name!r} embedded in jetcli{default} ({folder})")
    match = REPO_ID.fullmatch(spec)
    if match is None or path.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise CheckpointError(f"{spec}: no such file or folder")
    folder = fetch(match["repo"], match["revision"])
    name = f"{match['repo']}@{folder.name}"  # the snapshot folder is named by its commit
    return _load(checkpoint_in(folder, spec), name, f"Hugging Face Hub {spec}, cached in {folder}")


def embedded_models() -> dict[str, Path]:
    """{name: folder} of the models embedded in the package (an install without them has none)."""
    try:
        root = Path(str(importlib.resources.files(EMBEDDED_PACKAGE)))
    except ModuleNotFoundError:
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / checkpoints.WEIGHTS_NAME).is_file()}


def embedded_folder(name: str) -> Path:
    """The folder of an embedded model; a clear error where it is not there."""
    folder = embedded_models().get(name)
    if folder is None:
        raise ModelChoiceError("this jetcli install has no embedded model {name!r} (package {package}); pass "
                               "{model} PATH or {model} owner/name", name=name, package=EMBEDDED_PACKAGE)
    return folder


def fetch(repo: str, revision: str | None) -> Path:
    """The local snapshot folder of a Hub repo, downloaded (checkpoint and JSON files only) if needed."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, HfHubHTTPError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"{repo}" + (f"@{revision}" if revision else "")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise HubError(f"{where}: not a local path, and not in the Hub cache ({constants.HF_HUB_CACHE}) "
                       f"while {why}") from None
    except GatedRepoError:
        raise HubError(f"{where}: gated repo: accept its terms on huggingface.co and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"{where}: not a local path, and no such repo on the Hub (if it is private, "
                       "set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"{where}: the repo has no revision {revision!r}") from None
    except (HfHubHTTPError, HFValidationError, OSError) as e:
        raise HubError(f"{where}: cannot fetch from the Hub ({one_line(e)})") from None


def checkpoint_in(folder: Path, spec: str) -> Path:
    """The checkpoint inside a downloaded repo: jetcli's layout, else its only .safetensors/.npz."""
    if (folder / checkpoints.WEIGHTS_NAME).is_file():
        return folder
    found = sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".npz"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise HubError(f"{spec}: the repo holds no .safetensors or .npz checkpoint")
    names = ", ".join(str(p.relative_to(folder)) for p in found)
    raise ModelChoiceError("{spec}: the repo holds {count} checkpoints ({names}); download the one you "
                           "want and pass its path to {model}", spec=spec, count=len(found), names=names)


def _load(path: Path, name: str, origin: str) -> LoadedModel:
    model = checkpoints.load(path)
    return LoadedModel(model, name, origin, *checkpoints.identify(path))
