"""Training data: uint8 RGB images, in memory or memory-mapped, and a stream of items whose randomness is
a pure function of (seed, stream position).

Sources. `load_images(spec)` reads any of:

- a .npy of uint8 images (N, H, W, 3): memory-mapped, never read whole (`jet prepare` writes these);
- a .npz of them (read into memory); `FILE.npz:KEY` picks an array;
- uint8 rows (N, 3·S·S) in CHW order, the layout of the two formats below, in an .npy/.npz (training
  reorders them to (N, S, S, 3) in memory);
- CIFAR-10 python batches: a batch file (`data_batch_1`, `test_batch`), or the `cifar-10-batches-py`
  folder for its training batches data_batch_1..5. They are pickles, so a restricted unpickler reads
  them: it can build numpy arrays and refuses every other global;
- the downsampled ImageNet batches of Chrabaszcz et al. ('data' (N, 3·S·S) CHW rows): one file
  (`train_data_batch_3.npz`, `val_data.npz`), or a folder for its train_data_batch_N.npz files;
- a folder of image files, searched recursively (PNG, JPEG, WebP, TIFF, BMP), decoded into memory by
  `images.read_rgb` under the policy every jet command follows (see jetcli.images). For collections
  larger than memory, `jet prepare` turns the folder into a .npy first.

Labels are ignored: Jet is an unconditional density model.

The stream. Training reads stream positions 0, 1, 2, ...: position p is image
`epoch_order(n, seed, p // n)[p % n]`, and everything random about it (its crop, its flip when flips
are on, the dequantisation noise of each of its values) is hashed from (seed, stream, p) with integer
tensor arithmetic. A batch is therefore a pure function of (seed, positions): resuming needs no RNG
state, and processes or micro-batches that each take a slice of a batch see exactly what one process
taking the whole batch sees. The noise comes out bit-identical on any device and in any batch split,
so a device loop may move uint8 pixels and dequantise there:

    stream = Stream(train_set, seed)
    pixels = stream.pixels(positions, pin=True)                  # uint8 (B, H, W, 3), page-locked
    x = dequantize(pixels.to(device, non_blocking=True), stream.noise(positions, device=device))

gives the same float32 values as `stream.batch(positions)` on the CPU, which is
`likelihood.to_model_space(pixels) + u / 127.5` with u in [0, 1) on a 2**-24 grid, the reference
dequantisation (jetcli.likelihood.dequantize) with hashed instead of drawn noise.

A held-out validation set is split off by whole image, never by crop, and without copying pixels.
"""

from __future__ import annotations

import copy
import functools
import mmap
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from jetcli.errors import SettingError
from jetcli.fileio import one_line
from jetcli.images import IMAGE_SUFFIXES, read_rgb
from jetcli.likelihood import BIN, to_model_space

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


def map_npy(path: Path) -> np.ndarray:
    """The array of an .npy file, memory-mapped read-only through a mapping of our own (the array's
    base), which ImageSet uses to release the pages it has read."""
    header = np.load(path, mmap_mode="r", allow_pickle=False)  # parses the header; maps lazily
    order = "C" if header.flags.c_contiguous else "F"
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    # Training reads images at random: no readahead around each one (on a 40 GB file it made every
    # page fault read and map 32 pages for the 3 wanted; 1.8k images/s -> 150k on one core here).
    mapping.madvise(mmap.MADV_RANDOM)
    return np.ndarray(header.shape, header.dtype, buffer=mapping, offset=header.offset, order=order)


def load_array(spec: str) -> np.ndarray:
    """A .npy or .npz (optionally `path.npz:key`) of uint8 images."""
    path, _, key = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    path = Path(path)
    try:
        if path.suffix == ".npy":
            return _as_images(map_npy(path), spec)
        with np.load(path, allow_pickle=False) as npz:
            if not key:
                found = [k for k in NPZ_KEYS if k in npz.files] or (npz.files if len(npz.files) == 1 else [])
                if not found:
                    raise DataError(f"{path}: say which array to use as {path}:KEY (one of {', '.join(npz.files)})")
                key = found[0]
                if len(npz.files) > 1:  # the others may be what was meant (test_images beside train_images)
                    warnings.warn(f"{path}: reading its array {key!r} (it also holds "
                                  f"{', '.join(k for k in npz.files if k != key)}); pass {path}:KEY for another",
                                  stacklevel=2)
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


# --------------------------------------------------------------------------- randomness by position
# Wellons' lowbias32 integer hash on int32 tensors: two's-complement wrap-around on add and multiply
# (what every torch backend computes), logical right shifts by masking. Counter c of a key k hashes
# k + c * WEYL, the SplitMix way.
WEYL = 0x9E3779B9
MIXERS = ((16, 0x21F0AAAD), (15, 0x735A2D97))  # (shift, multiplier): multipliers below 2**31
STREAMS = {"train": 1, "val": 2}
CROP_TOP, CROP_LEFT, FLIP, NOISE = 0, 1, 2, 3  # an item's counters; noise draw d uses NOISE + d
UNIT = 2.0 ** -24  # 24 random bits -> [0, 1) exactly in float32
CHUNK = 16  # items whose noise is made at a time on the CPU: the int32 temporaries stay in cache


def _wrap(value: int) -> int:
    """An integer as the int32 with the same low 32 bits."""
    return (value + 2**31) % 2**32 - 2**31


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of each element of an int32 tensor, in place."""
    t = torch.empty_like(x)
    for shift, multiplier in MIXERS:
        torch.bitwise_right_shift(x, shift, out=t).bitwise_and_((1 << (32 - shift)) - 1)
        x.bitwise_xor_(t).mul_(multiplier)
    torch.bitwise_right_shift(x, 15, out=t).bitwise_and_((1 << 17) - 1)
    return x.bitwise_xor_(t)


def _counter(keys: torch.Tensor, counter: int) -> torch.Tensor:
    """int32 (B,): the hash of counter `counter` of each key."""
    return _mix32(keys + _wrap(counter * WEYL))


def item_keys(seed: int, positions: torch.Tensor, stream: str = "train") -> torch.Tensor:
    """int32 (B,): the key of each stream position, from which its crop, flip and noise are hashed."""
    positions, seed = positions.to(torch.int64), seed % 2**64
    key = _mix32(torch.tensor([_wrap(STREAMS[stream] * WEYL)], dtype=torch.int32, device=positions.device))
    for word in (seed & 0xFFFFFFFF, seed >> 32):
        key = _mix32(key + _wrap(word))
    for word in (positions >> 32, positions & 0xFFFFFFFF):
        key = _mix32(key + ((word + 2**31) % 2**32 - 2**31).to(torch.int32))
    return key


@functools.lru_cache(maxsize=8)
def _weyl_offsets(count: int, device: str) -> torch.Tensor:
    """int32 (count,): i * WEYL for the i-th value of an item."""
    return ((torch.arange(count) * WEYL + 2**31) % 2**32 - 2**31).to(torch.int32).to(device)


def uniform(keys: torch.Tensor, values: int, draw: int = 0) -> torch.Tensor:
    """float32 (B, values) in [0, 1): noise draw `draw` of each key, 24 random bits per value. On the CPU a
    few keys at a time, so that the int32 temporaries stay in cache (twice as fast at 64x64)."""
    out = torch.empty((len(keys), values), dtype=torch.float32, device=keys.device)
    rows = CHUNK if keys.device.type == "cpu" else max(1, len(keys))
    offsets = _weyl_offsets(values, str(keys.device))
    for start in range(0, len(keys), rows):
        bits = _counter(keys[start:start + rows], NOISE + draw)[:, None] + offsets
        out[start:start + rows].copy_(_mix32(bits).bitwise_and_((1 << 24) - 1)).mul_(UNIT)
    return out


def noise(seed: int, positions: torch.Tensor, shape: tuple[int, ...], device: str | torch.device = "cpu",
          stream: str = "train", draw: int = 0) -> torch.Tensor:
    """float32 (B, *shape) in [0, 1): the dequantisation noise of the items at `positions`, made on
    `device`; the same values on every device."""
    keys = item_keys(seed, torch.as_tensor(positions).to(device), stream)
    return uniform(keys, int(np.prod(shape)), draw).view(len(keys), *shape)


@functools.lru_cache(maxsize=8)
def _model_space_table(device: str) -> torch.Tensor:
    return to_model_space(torch.arange(256)).to(device)  # the reference values, computed on the CPU


def model_space(pixels: torch.Tensor) -> torch.Tensor:
    """likelihood.to_model_space's float32 values on any device: computed on the CPU, read from a table
    of the CPU's values elsewhere (a GPU divides by a scalar through its reciprocal, which rounds
    otherwise)."""
    if pixels.device.type == "cpu":
        return to_model_space(pixels)
    table = _model_space_table(str(pixels.device))
    return torch.index_select(table, 0, pixels.reshape(-1).int()).view(pixels.shape)


def dequantize(pixels: torch.Tensor, noise: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 pixels (B, ...) and noise in [0, 1) of the same shape -> pixels / 127.5 - 1 + noise / 127.5
    in float32 (into `out` if given): likelihood.dequantize's values, bit for bit on any device (on the
    CPU a few items at a time, in cache)."""
    out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device) if out is None else out
    rows = CHUNK if pixels.device.type == "cpu" else max(1, len(pixels))
    for start in range(0, len(pixels), rows):
        here = slice(start, start + rows)
        torch.add(model_space(pixels[here]), noise[here].mul(BIN), out=out[here])
    return out


def _draw_below(keys: torch.Tensor, counter: int, bounds: np.ndarray) -> np.ndarray:
    """int64 (B,): a number in [0, bound) per key (modulo bias below bound / 2**32)."""
    return (_counter(keys, counter).numpy().view(np.uint32).astype(np.int64)) % bounds


# --------------------------------------------------------------------------- image sets
def _memory(array: np.ndarray) -> tuple[np.ndarray, int, mmap.mmap | None]:
    """(buffer, start, mapping) of a C-contiguous uint8 array: a 1-D view of the memory under it (the
    whole file when it is memory-mapped), where the array starts in it, and the file mapping if any."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(root.base, mmap.mmap):
        return array.reshape(-1), 0, None
    buffer = np.frombuffer(root.base, np.uint8)
    return buffer, array.__array_interface__["data"][0] - buffer.__array_interface__["data"][0], root.base


class ImageSet:
    """Images to draw items from: one uint8 array (N, H, W, 3), in memory or memory-mapped, or photos of
    different sizes packed into one buffer. With `crop`, items are S×S crops; with `flip`, mirrored half
    of the time. `members` (image numbers) makes a subset, such as a validation split, without copying
    pixels.

    `pixels(indices, keys)` gathers a batch with array operations: every item (or every row of a crop)
    is a run of bytes in the buffer, copied by one fancy index over a sliding window of the buffer."""

    RELEASE_BYTES = 1 << 26  # release a mapping's pages after reading this much through it

    def __init__(self, images: np.ndarray | list[np.ndarray], crop: int | None = None, flip: bool = False,
                 members: np.ndarray | None = None):
        self.crop, self.flip = crop, flip
        if not len(images):
            raise DataError("no images")
        if isinstance(images, list) and len({im.shape for im in images}) == 1:
            images = np.stack(images)
        elif isinstance(images, list) and crop is None:
            raise DataSettingError("images have {count} different sizes: use {crop} S to train on crops",
                                   count=len({im.shape[:2] for im in images}))
        if isinstance(images, np.ndarray):
            images = np.ascontiguousarray(images)  # a copy only for strided views (CHW rows), in memory
            self._buffer, self._start, self._mapping = _memory(images)
            self._sizes = np.array(images.shape[1:3])[None]
            self._offsets = None
        else:
            self._sizes = np.array([im.shape[:2] for im in images], dtype=np.int64)
            lengths = self._sizes.prod(1) * 3
            self._offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            self._buffer = np.empty(int(lengths.sum()), np.uint8)
            for im, start, length in zip(images, self._offsets, lengths):
                self._buffer[start:start + length] = im.reshape(-1)
            self._mapping = None
        self._images = images
        self._unread = self.RELEASE_BYTES
        self.members = np.arange(len(images)) if members is None else np.asarray(members, dtype=np.int64)
        if crop is not None:
            if crop < 1:
                raise DataSettingError("{crop} {size}: the crop size must be positive", size=crop)
            small = self._sizes[np.argmin(self._sizes.min(1))]
            if small.min() < crop:
                raise DataSettingError("{crop} {size} is larger than an image of size {h}x{w}", size=crop,
                                       h=int(small[0]), w=int(small[1]))

    def __len__(self) -> int:
        return len(self.members)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.crop, self.crop) if self.crop else tuple(int(s) for s in self._sizes[0])

    def image(self, index: int) -> np.ndarray:
        """uint8 (H, W, 3): member `index`, whole."""
        return np.asarray(self._images[int(self.members[index])])

    def subset(self, indices: np.ndarray, flip: bool | None = None) -> ImageSet:
        """The members at `indices`, sharing this set's pixels."""
        part = copy.copy(self)
        part.members = self.members[indices]
        part.flip = self.flip if flip is None else flip
        return part

    def pixels(self, indices: torch.Tensor, keys: torch.Tensor, pin: bool = False) -> torch.Tensor:
        """uint8 (B, h, w, 3): members `indices`, cropped and flipped as their keys (item_keys) say; in
        page-locked memory when `pin` (for asynchronous copies to a GPU)."""
        source = self.members[np.asarray(indices, dtype=np.int64)]
        h, w = self.image_size
        if self._offsets is None:
            starts = self._start + source * int(self._sizes[0].prod()) * 3
            sizes = np.broadcast_to(self._sizes, (len(source), 2))
        else:
            starts, sizes = self._offsets[source], self._sizes[source]
        if self.crop is None:  # whole images: one run each
            runs, length = starts, h * w * 3
        else:  # a run per row of the crop
            top = _draw_below(keys, CROP_TOP, sizes[:, 0] - h + 1)
            left = _draw_below(keys, CROP_LEFT, sizes[:, 1] - w + 1)
            runs = (starts + 3 * left)[:, None] + (top[:, None] + np.arange(h)) * (3 * sizes[:, 1:])
            length = 3 * w
        items = torch.from_numpy(sliding_window_view(self._buffer, length)[runs.reshape(-1)]).view(-1, h, w, 3)
        if self.flip:
            mirrored = torch.from_numpy(_draw_below(keys, FLIP, np.int64(2)).astype(bool))
            items[mirrored] = items[mirrored].flip(2)
        self._release(items.numel())
        return items.pin_memory() if pin else items

    def _release(self, count: int) -> None:
        """Drop a mapped file's pages from this process after every RELEASE_BYTES read: they stay in the
        page cache, but resident memory no longer grows with the share of the file a run has read."""
        if self._mapping is None:
            return
        self._unread -= count
        if self._unread <= 0:
            self._mapping.madvise(mmap.MADV_DONTNEED)
            self._unread = self.RELEASE_BYTES

    def split(self, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
        """Hold out a fraction of whole images (never crops of a training image) as (train, val)."""
        if not 0 < fraction < 1:
            raise DataError(f"the validation fraction must be between 0 and 1, got {fraction}")
        n_val = max(1, round(len(self) * fraction))
        if n_val >= len(self):
            raise DataError(f"cannot hold out {fraction:.0%} of {len(self)} images and still train")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).numpy()
        return self.subset(np.sort(order[n_val:])), self.subset(np.sort(order[:n_val]), flip=False)


def load_datasets(data: str, val: str | None = None, val_fraction: float = 0.0, crop: int | None = None,
                  seed: int = 0, flip: bool = False) -> tuple[ImageSet, ImageSet | None]:
    """(train, val): val from its own source, or a held-out fraction of whole images, or none. Flips are
    for training items only."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must be between 0 and 1 (0 for none), got {val_fraction}")
    if val is not None and val_fraction > 0:
        raise DataError("give either a validation set or a validation fraction, not both")
    train_set = ImageSet(load_images(data), crop=crop, flip=flip)
    if val is not None:
        val_set = ImageSet(load_images(val), crop=crop)
    elif val_fraction > 0:
        train_set, val_set = train_set.split(val_fraction, seed)
    else:
        val_set = None
    if val_set is not None and val_set.image_size != train_set.image_size:
        raise DataError(f"validation images are {val_set.image_size}, training images {train_set.image_size}")
    return train_set, val_set


# --------------------------------------------------------------------------- streams
@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The image order of one epoch: a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class Stream:
    """The items of an ImageSet by stream position: which image (an epoch order when `shuffle`, else
    position p is image p), its crop and flip, and its noise, all hashed from (seed, name, position).
    Validation reads Stream(val_set, 0, "val", shuffle=False): each image keeps its crop and noise."""

    def __init__(self, images: ImageSet, seed: int, name: str = "train", shuffle: bool = True):
        self.images, self.seed, self.name, self.shuffle = images, seed, name, shuffle

    def indices(self, positions: torch.Tensor) -> torch.Tensor:
        """The image at each position: epoch e visits epoch_order(n, seed, e)."""
        n = len(self.images)
        if not self.shuffle:
            return positions % n
        epochs = positions // n
        order = torch.empty_like(positions)
        for e in epochs.unique().tolist():  # one or two epochs per batch
            here = epochs == e
            order[here] = epoch_order(n, self.seed, e)[positions[here] % n]
        return order

    def keys(self, positions: torch.Tensor) -> torch.Tensor:
        return item_keys(self.seed, positions, self.name)

    def pixels(self, positions: torch.Tensor, pin: bool = False) -> torch.Tensor:
        """uint8 (B, h, w, 3): the items at `positions`, cropped and flipped (page-locked when `pin`)."""
        return self.images.pixels(self.indices(positions), self.keys(positions), pin)

    def noise(self, positions: torch.Tensor, device: str | torch.device = "cpu", draw: int = 0) -> torch.Tensor:
        """float32 (B, h, w, 3) in [0, 1): the items' noise (draw `draw` of it), made on `device`."""
        return noise(self.seed, positions, (*self.images.image_size, 3), device, self.name, draw)

    def batch(self, positions: torch.Tensor, draw: int = 0) -> torch.Tensor:
        """float32 (B, h, w, 3): the items dequantised on the CPU, dequantize(pixels(p), noise(p)), made a
        few items at a time so that pixels, noise and output meet in cache."""
        pixels, keys = self.pixels(positions), self.keys(positions)
        out = torch.empty(pixels.shape, dtype=torch.float32)
        for start in range(0, len(positions), CHUNK):
            here = slice(start, start + CHUNK)
            noise = uniform(keys[here], pixels[0].numel(), draw).view(pixels[here].shape)
            dequantize(pixels[here], noise, out=out[here])
        return out
