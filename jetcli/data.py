"""Training data: uint8 RGB images in memory, and batches whose randomness is a pure function of position.

`load_images(spec)` reads any of:

- a folder of image files, searched recursively (PNG, JPEG, WebP, TIFF, BMP), decoded by
  `images.read_rgb` under the policy every jet command follows (see jetcli.images): RGB as stored;
  greyscale and bilevel copied to the three channels; palette images take their palette colours; alpha
  only when every pixel is opaque (then dropped); 16-bit, float, CMYK/YCbCr/LAB/HSV and multi-frame
  files are refused with a one-line error naming the file.
- a .npy/.npz of uint8 images (N, H, W, 3); `FILE.npz:KEY` picks an array of an .npz.
- uint8 rows (N, 3·S·S) in CHW order, the layout of the two formats below, in an .npy/.npz.
- CIFAR-10 python batches: a batch file (`data_batch_1`, `test_batch`), or the `cifar-10-batches-py`
  folder for its training batches data_batch_1..5. They are pickles, so a restricted unpickler reads
  them: it can build numpy arrays and refuses every other global.
- the downsampled ImageNet batches of Chrabaszcz et al. ('data' (N, 3·S·S) CHW rows): one file
  (`train_data_batch_3.npz`, `val_data.npz`), or a folder for its train_data_batch_N.npz files.

Labels are ignored: Jet is an unconditional density model.

With `crop=S` every item is a random S×S crop of one image (photos of any size); without it, all images
must share one size. A held-out validation set is split off by whole image, never by crop. The crop,
flip and dequantisation noise of the item at stream position p (step × batch size + index in the batch)
come from `sample_generator(seed, p)`, so a batch depends only on (seed, step, batch size): resuming needs
no saved RNG state, and processes or micro-batches that each draw their own slice of a batch see exactly
what a single process drawing the whole batch sees.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jetcli.errors import SettingError
from jetcli.fileio import one_line
from jetcli.images import IMAGE_SUFFIXES, read_rgb

NPZ_KEYS = ("train_images", "images", "x", "data")
CIFAR_BATCH = re.compile(r"data_batch_\d+")
IMAGENET_BATCH = re.compile(r".*data_batch_\d+\.npz")


class DataError(ValueError):
    """Training data that cannot be used."""


class DataSettingError(DataError, SettingError):
    """Training data that a setting (the crop) does not fit; worded by field (jetcli.errors)."""


# --------------------------------------------------------------------------- arrays
def _as_images(array: np.ndarray, source: str) -> np.ndarray:
    """uint8 (N, H, W, 3) as is; uint8 rows (N, 3·S·S) read as CHW (a strided view, no copy)."""
    if array.dtype == np.uint8 and array.ndim == 4 and array.shape[-1] == 3:
        return array
    if array.dtype == np.uint8 and array.ndim == 2:
        side = round((array.shape[1] / 3) ** 0.5)
        if side and 3 * side * side == array.shape[1]:
            return array.reshape(len(array), 3, side, side).transpose(0, 2, 3, 1)
    raise DataError(f"{source}: expected uint8 images (N, H, W, 3) or CHW rows (N, 3*S*S), "
                    f"got {array.dtype} {array.shape}")


def load_array(spec: str) -> np.ndarray:
    """A .npy or .npz (optionally `path.npz:key`) of uint8 images."""
    path, _, key = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    path = Path(path)
    try:
        if path.suffix == ".npy":
            return _as_images(np.load(path, allow_pickle=False), spec)
        with np.load(path, allow_pickle=False) as npz:
            if not key:
                found = [k for k in NPZ_KEYS if k in npz.files] or (npz.files if len(npz.files) == 1 else [])
                if not found:
                    raise DataError(f"{path}: say which array to use as {path}:KEY (one of {', '.join(npz.files)})")
                key = found[0]
            if key not in npz.files:
                raise DataError(f"{path}: no array {key!r} (has {', '.join(npz.files)})")
            return _as_images(npz[key], f"{path}:{key}")
    except DataError:
        raise
    except Exception as e:  # damaged bytes raise OSError, BadZipFile, SyntaxError, MemoryError (a lying header)...
        raise DataError(f"{path}: not a readable numpy array file ({one_line(e, None)})") from None


# --------------------------------------------------------------------------- CIFAR-10 pickles
def _latin1_encode(text: str, encoding: str) -> bytes:
    """What protocol-2 pickles written by Python 3 use for bytes; any other codec is refused."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused codec {encoding!r}")
    return text.encode("latin1")


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; any other global is refused, so a
    malicious file cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.zeros(0).__reduce__()[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}") from None


def load_cifar_batch(path: Path) -> np.ndarray:
    """The images of one CIFAR-10 python batch: a dict whose 'data' is uint8 (N, 3072) CHW rows."""
    try:
        with open(path, "rb") as f:
            batch = ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # malformed bytes raise almost anything (KeyError, struct.error, MemoryError...)
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {one_line(e, None)})") from None
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path}: not a CIFAR-10 python batch (no 'data' array)")
    return _as_images(data, str(path))


def _is_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


# --------------------------------------------------------------------------- files and folders
def _natural(path: Path) -> list:
    """Sort key with numbers compared as numbers: data_batch_2 before data_batch_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def load_images(spec: str) -> list[np.ndarray] | np.ndarray:
    """The images of a folder (a list, sizes may differ) or of a file (one uint8 (N, H, W, 3) array)."""
    path = Path(spec)
    if not path.exists() and ":" in spec:
        path = Path(spec.rpartition(":")[0])
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.is_file()), key=_natural)
        batches = ([load_cifar_batch(p) for p in files if CIFAR_BATCH.fullmatch(p.name)]
                   or [load_array(str(p)) for p in files if IMAGENET_BATCH.fullmatch(p.name)])
        if batches:
            return np.concatenate(batches)
        images = sorted((p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES), key=str)
        if not images:
            raise DataError(f"{path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, "
                            "CIFAR-10 data_batch_N or ImageNet train_data_batch_N.npz)")
        return [read_rgb(p) for p in images]
    if path.suffix.lower() in (".npy", ".npz"):
        return load_array(spec)
    if _is_pickle(path):
        return load_cifar_batch(path)
    raise DataError(f"{path}: not a folder, .npy/.npz or CIFAR-10 batch")


# --------------------------------------------------------------------------- serving batches
@dataclass
class ImageSet:
    """Images as one uint8 tensor (N, H, W, 3) or a list of photos; with `crop`, random crops of them."""

    images: torch.Tensor | np.ndarray | list[torch.Tensor] | list[np.ndarray]
    crop: int | None = None
    flip: bool = True

    def __post_init__(self):
        if isinstance(self.images, np.ndarray):
            self.images = torch.from_numpy(self.images)
        elif isinstance(self.images, list):
            photos = [torch.as_tensor(im) for im in self.images]
            sizes = {tuple(im.shape[:2]) for im in photos}
            if len(sizes) == 1:
                self.images = torch.stack(photos)
            elif self.crop is None:
                raise DataSettingError("images have {count} different sizes: use {crop} S to train on crops",
                                       count=len(sizes))
            else:
                self.images = photos
        if not len(self.images):
            raise DataError("no images")
        if self.crop is not None:
            if self.crop < 1:
                raise DataSettingError("{crop} {size}: the crop size must be positive", size=self.crop)
            sizes = [self.images.shape[1:3]] if isinstance(self.images, torch.Tensor) else \
                [im.shape[:2] for im in self.images]
            small = min(sizes, key=min)
            if min(small) < self.crop:
                raise DataSettingError("{crop} {size} is larger than an image of size {h}x{w}", size=self.crop,
                                       h=small[0], w=small[1])

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.crop, self.crop) if self.crop else tuple(self.images[0].shape[:2])

    def item(self, index: int, generator: torch.Generator) -> torch.Tensor:
        """uint8 (H, W, 3): image `index`, cropped and flipped with `generator`."""
        im = self.images[index]
        if self.crop:
            top = int(torch.randint(im.shape[0] - self.crop + 1, (), generator=generator))
            left = int(torch.randint(im.shape[1] - self.crop + 1, (), generator=generator))
            im = im[top:top + self.crop, left:left + self.crop]
        if self.flip and torch.rand((), generator=generator) < 0.5:
            im = im.flip(1)
        return im

    def batch(self, indices: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """uint8 (B, H, W, 3): one item per index, each drawn with its own generator."""
        return torch.stack([self.item(i, g) for i, g in zip(indices.tolist(), generators)])

    def split(self, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
        """Hold out a fraction of whole images (never crops of a training image) as (train, val)."""
        if not 0 < fraction < 1:
            raise DataError(f"the validation fraction must be between 0 and 1, got {fraction}")
        n_val = max(1, round(len(self) * fraction))
        if n_val >= len(self):
            raise DataError(f"cannot hold out {fraction:.0%} of {len(self)} images and still train")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        pick = lambda idx: (self.images[idx.sort().values] if isinstance(self.images, torch.Tensor)
                            else [self.images[i] for i in sorted(idx.tolist())])
        return (ImageSet(pick(order[n_val:]), self.crop, self.flip),
                ImageSet(pick(order[:n_val]), self.crop, flip=False))


def load_datasets(data: str, val: str | None = None, val_fraction: float = 0.0, crop: int | None = None,
                  seed: int = 0) -> tuple[ImageSet, ImageSet | None]:
    """(train, val): val from its own source, or a held-out fraction of whole images, or none."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must be between 0 and 1 (0 for none), got {val_fraction}")
    if val is not None and val_fraction > 0:
        raise DataError("give either a validation set or a validation fraction, not both")
    train_set = ImageSet(load_images(data), crop=crop)
    if val is not None:
        val_set = ImageSet(load_images(val), crop=crop, flip=False)
    elif val_fraction > 0:
        train_set, val_set = train_set.split(val_fraction, seed)
    else:
        val_set = None
    if val_set is not None and val_set.image_size != train_set.image_size:
        raise DataError(f"validation images are {val_set.image_size}, training images {train_set.image_size}")
    return train_set, val_set


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The image order of one epoch: a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def image_indices(n: int, seed: int, first: int, count: int) -> torch.Tensor:
    """The images at stream positions first .. first+count-1, where epoch e visits epoch_order(n, seed, e)."""
    positions = torch.arange(first, first + count)
    epochs = positions // n
    return torch.cat([epoch_order(n, seed, int(e))[positions[epochs == e] % n] for e in epochs.unique()])


def sample_generator(seed: int, position: int, stream: str = "train") -> torch.Generator:
    """The generator for everything random about one item (crop, flip, noise), hashed from its position."""
    digest = hashlib.blake2b(f"{stream}/{seed}/{position}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))
