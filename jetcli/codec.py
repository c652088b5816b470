"""Lossless codec: an 8-bit image of any size <-> its Jet latent, bit-exact both ways or a clear refusal.

    encode(model, pixels) -> Encoded(latent, margin, float32_margin, size)
    decode(model, latent, size) -> Decoded(pixels, margin)

Encoding is deterministic: each pixel p sits at the centre of its bin, x = (p + 0.5) / 127.5 - 1, and
z = model(x). Decoding inverts the flow and rounds p_hat = (x_hat + 1) * 127.5 - 0.5 to the 8-bit grid.
The round trip is exact while every |p_hat - p| < 0.5 px; the worst of them is the *margin*.

Sizes. Any H x W >= 1 x 1: the image is padded at the bottom and right to whole tiles of the model's
input by `images.pad_to_tiles` (edge padding: a function of the image alone), and the tiles are coded
row-major, in batches. The latent has the padded shape (H', W', 3); `decode` needs the original
(H, W) to cut the padding off again (jetcli.latents stores it beside the latent), and checks that what
it cuts off is the edge padding of what it keeps: a wrong size, or an altered latent, is refused.

Precision. The inverse amplifies rounding error by the product of the couplings' 1/scale and by the
ViTs' sensitivity to their input; a deep random flow can turn float32's 1e-7 into tens of pixels.
`encode` therefore decodes the stored latent exactly as `decode` will and keeps float32 only when its
margin is at most SAFE_MARGIN = 1/64 px; otherwise it repeats the whole encode with a float64 copy of
the model, and if even that misses by more than 1/64 px it refuses (CodecError). The latent's dtype
(float32 or float64) tells `decode` which arithmetic to use.

Why 1/64 px and not just < 0.5: the margin is measured on the encoding machine, and another machine
rounds differently. Re-decoding with every latent value, or every weight, moved by one ulp (our
stand-in for another machine's rounding) raised the margin by up to 17.5x (99% of cases under 6x) over
455 tiles of random 32- and 64-coupling flows near the float32 limit, so 1/64 px keeps a factor of 32
to the 0.5 px at which a pixel would change. Under the looser 0.25 px, a latent kept at 0.06 px was
seen to reach 0.35 px after such a perturbation. A trained-like flow sits near 1e-3 px in float32; a
random 64-coupling flow at PyTorch's default init needs float64 (1e-9 px there, up to 3 px in float32).

Devices: the codec always computes on the CPU, whatever device the model sits on (a GPU model is
copied to the CPU). A latent is then portable by construction: a CPU encode and a CPU decode run the
same IEEE float32/float64 kernels, deterministic and independent of any GPU, its model or its driver,
and float64 runs at full speed (consumer GPUs run it at 1/32 to 1/64 of float32); there is no
cuBLAS determinism warning to silence. What can still differ between two machines is their CPU's
rounding inside the matmul kernels (another vector width or library build): that is the case the
1/64 px margin is sized for, and jetcli.latents records the torch build and CPU architecture of the
encode in the latent file. `decode` refuses rather than guesses when a decoded value lies more than
DECODE_LIMIT = 0.4 px from the nearest pixel level in 0..255, which is also what a latent decoded with
the wrong model, or altered, does.

Arithmetic. Encode and decode run under `exact_arithmetic()`: IEEE float32 matmuls (no TF32 on CUDA, no
bf16 in oneDNN on CPU), no autocast, the plain "math" attention kernel and deterministic algorithms,
with the caller's settings restored afterwards (they are process-wide; do not run other torch work in
parallel threads meanwhile). Tiles are batched the same way on both sides, so on one machine and torch
build, decode repeats encode's check bit for bit (on the 2-core CPU it was written on, also with 1 or 2
threads).
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from jetcli.images import pad_to_tiles, tiles
from jetcli.model import Jet

SAFE_MARGIN = 1 / 64  # px: the most a stored latent may miss its pixels by, on the encoding machine
DECODE_LIMIT = 0.4  # px: decode refuses values further than this from the 8-bit grid
TILE_BATCH = 64  # tiles per forward/inverse call, identical for encode and decode
LATENT_DTYPES = (np.float32, np.float64)
DEVICE = torch.device("cpu")  # where the codec computes, whatever device the model is on (see above)

Progress = Callable[[int, int], None]  # (tiles done, tiles to do), after each batch


class CodecError(ValueError):
    """An image or latent the codec cannot turn into an exact round trip (one-line message)."""


class Encoded(NamedTuple):
    latent: np.ndarray  # (H', W', C): the image padded to whole tiles; float32, or float64 where float32 is not safe
    margin: float  # max |p_hat - p| in px when `latent` is decoded here; nan if not verified
    float32_margin: float  # the same for the float32 attempt (== margin when float32 was kept)
    size: tuple[int, int]  # the image's own (H, W): what `decode` cuts the padding off to


class Decoded(NamedTuple):
    pixels: np.ndarray  # (H, W, C) uint8
    margin: float  # max distance in px of the decoded values from the 8-bit grid (== encode's margin)


@contextlib.contextmanager
def exact_arithmetic(device: torch.device):
    """IEEE float32 (or float64) arithmetic, deterministic kernels, no autocast; restores settings."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: a switch per backend
        knobs = [torch.backends.cuda.matmul, torch.backends.mkldnn.matmul]
        saved = [k.fp32_precision for k in knobs]
        for k in knobs:
            k.fp32_precision = "ieee"
    else:
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # warn_only: on CUDA without CUBLAS_WORKSPACE_CONFIG, strict mode would raise instead of computing.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.autocast(device.type, enabled=False), sdpa_kernel(SDPBackend.MATH), torch.inference_mode():
            yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if isinstance(saved, list):
            for k, s in zip(knobs, saved):
                k.fp32_precision = s
        else:
            torch.set_float32_matmul_precision(saved)


def encode(model: Jet, pixels: np.ndarray, verify: bool = True, progress: Progress | None = None) -> Encoded:
    """8-bit image (H, W, C) of any size -> Encoded(latent (H', W', C) of the padded image, margin,
    float32_margin, (H, W)).

    verify=True (the default) decodes the latent exactly as `decode` does and guarantees the round
    trip on this machine: float32 if its margin is <= SAFE_MARGIN, else float64 under the same test,
    else CodecError. verify=False returns the float32 latent unchecked (margins nan): no guarantee.
    `progress(done, total)` is called after each batch of tiles; the total grows if float64 is needed.
    """
    _check_pixels(model, pixels)
    size = pixels.shape[:2]
    padded = pad_to_tiles(pixels, model.config.image_size)
    work = _Work(len(tiles(padded, model.config.image_size)), progress)
    work.plan(2 if verify else 1)
    flow = _Flow.of(model, torch.float32)
    latent = _forward(flow, padded, work)
    if not verify:
        return Encoded(latent, math.nan, math.nan, size)
    float32_margin = _margin(flow, latent, padded, work)
    if float32_margin <= SAFE_MARGIN:
        return Encoded(latent, float32_margin, float32_margin, size)
    work.plan(2)
    flow = _Flow.of(model, torch.float64)
    latent = _forward(flow, padded, work)
    margin = _margin(flow, latent, padded, work)
    if margin <= SAFE_MARGIN:
        return Encoded(latent, margin, float32_margin, size)
    raise CodecError(f"this model cannot encode the image losslessly: decoding misses the pixels by "
                     f"{margin:.3g} px in float64 ({float32_margin:.3g} px in float32), more than the "
                     f"{SAFE_MARGIN:g} px allowed; the flow amplifies rounding error too much")


def decode(model: Jet, latent: np.ndarray, size: tuple[int, int] | None = None,
           progress: Progress | None = None) -> Decoded:
    """Latent (H', W', C) float32/float64 -> Decoded(pixels uint8 (H, W, C), margin): the padded image
    cut to `size` (H, W), or whole when `size` is None. CodecError if the latent is malformed, does not
    decode onto the 8-bit grid (wrong model, altered, corrupt), or its padding is not the edge padding
    of an H x W image."""
    _check_latent(model, latent)
    if size is not None:
        _check_size(model, latent, size)
    values = _reconstruct(model, latent, progress)
    levels = np.clip(np.rint(values), 0, 255)
    distance = np.abs(values - levels)
    margin = float(distance.max()) if np.isfinite(distance).all() else math.inf
    if margin > DECODE_LIMIT:
        raise CodecError(f"the latent does not decode to an 8-bit image with this model: a value lies "
                         f"{margin:.3g} px from the nearest level in 0..255 (limit {DECODE_LIMIT:g} px); "
                         f"was it encoded with another model, or altered?")
    padded = levels.astype(np.uint8)
    if size is None:
        return Decoded(padded, margin)
    pixels = padded[:size[0], :size[1]]
    if not np.array_equal(pad_to_tiles(pixels, model.config.image_size), padded):
        raise CodecError(f"the latent's padding is not the edge padding of a {size[0]}x{size[1]} image: the "
                         f"size stored with it is wrong, or the latent was altered")
    return Decoded(np.ascontiguousarray(pixels), margin)


def reconstruct(model: Jet, latent: np.ndarray, progress: Progress | None = None) -> np.ndarray:
    """The decoded pixel values before rounding, float64 (H', W', C), in the latent's precision."""
    _check_latent(model, latent)
    return _reconstruct(model, latent, progress)


def _reconstruct(model: Jet, latent: np.ndarray, progress: Progress | None) -> np.ndarray:
    work = _Work(len(tiles(latent, model.config.image_size)), progress)
    work.plan(1)
    return _inverse(_Flow.of(model, torch.float64 if latent.dtype == np.float64 else torch.float32), latent, work)


def _check_pixels(model: Jet, pixels: np.ndarray) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        kind = pixels.dtype if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise CodecError(f"pixels must be a uint8 array (8-bit image), got {kind}")
    _check_channels(model, pixels.shape, "image")
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise CodecError(f"image is {pixels.shape[0]}x{pixels.shape[1]} (height x width): it has no pixels")


def _check_latent(model: Jet, latent: np.ndarray) -> None:
    if not isinstance(latent, np.ndarray):
        raise CodecError(f"a latent must be a numpy array, got {type(latent).__name__}")
    if latent.dtype not in LATENT_DTYPES:
        raise CodecError(f"latent has dtype {latent.dtype}; encode writes float32 or float64")
    _check_channels(model, latent.shape, "latent")
    h, w = model.config.image_size
    if latent.shape[0] == 0 or latent.shape[1] == 0 or latent.shape[0] % h or latent.shape[1] % w:
        raise CodecError(f"latent is {latent.shape[0]}x{latent.shape[1]} (height x width) but the model codes "
                         f"{h}x{w} tiles: both sides must be whole multiples of {h}x{w}")
    if not np.isfinite(latent).all():
        bad = int((~np.isfinite(latent)).sum())
        raise CodecError(f"latent holds NaN or Inf at {bad} of its {latent.size} values")


def _check_channels(model: Jet, shape: tuple[int, ...], what: str) -> None:
    c = model.config.channels
    if len(shape) != 3 or shape[2] != c:
        raise CodecError(f"{what} has shape {tuple(shape)}; expected (height, width, {c})")


def _check_size(model: Jet, latent: np.ndarray, size: tuple[int, int]) -> None:
    """An (H, W) whose padding to whole tiles is the latent's shape."""
    h, w = model.config.image_size
    padded = tuple(-(-side // tile) * tile for side, tile in zip(size, (h, w)))
    if min(size) < 1 or padded != latent.shape[:2]:
        raise CodecError(f"a {size[0]}x{size[1]} image pads to {padded[0]}x{padded[1]} with {h}x{w} tiles, but "
                         f"the latent is {latent.shape[0]}x{latent.shape[1]}")


class _Flow(NamedTuple):
    """The model in one precision, on the codec's device."""

    model: Jet
    dtype: torch.dtype

    @classmethod
    def of(cls, model: Jet, dtype: torch.dtype) -> _Flow:
        """The model itself if already on the CPU in `dtype`, else a converted copy (the caller's is never
        touched)."""
        if any(p.dtype != dtype or p.device != DEVICE for p in model.parameters()):
            model = copy.deepcopy(model).to(DEVICE, dtype)
        return cls(model, dtype)


class _Work:
    """Counts tiles through the passes an encode or decode makes, for a progress callback."""

    def __init__(self, tile_count: int, progress: Progress | None):
        self.tiles, self.progress, self.done, self.total = tile_count, progress, 0, 0

    def plan(self, passes: int) -> None:
        self.total += passes * self.tiles

    def advance(self, count: int) -> None:
        self.done += count
        if self.progress is not None:
            self.progress(self.done, self.total)


def _forward(flow: _Flow, pixels: np.ndarray, work: _Work) -> np.ndarray:
    return _tilewise(flow, pixels, lambda p: flow.model((p + 0.5) / 127.5 - 1)[0], work)  # bin centres


def _inverse(flow: _Flow, latent: np.ndarray, work: _Work) -> np.ndarray:
    """Latent -> pixel values before rounding (float64)."""
    return _tilewise(flow, latent, lambda z: (flow.model.inverse(z)[0].double() + 1) * 127.5 - 0.5, work)


def _tilewise(flow: _Flow, image: np.ndarray, step, work: _Work) -> np.ndarray:
    """Apply `step` to the image's tiles, TILE_BATCH at a time, under exact arithmetic."""
    h, w = flow.model.config.image_size
    out = []
    with exact_arithmetic(DEVICE):
        for batch in _batches(tiles(image, (h, w)).copy()):  # a fresh writable copy for torch
            out.append(step(torch.from_numpy(batch).to(DEVICE, flow.dtype)).numpy())
            work.advance(len(batch))
    return _from_tiles(np.concatenate(out), *image.shape[:2])


def _margin(flow: _Flow, latent: np.ndarray, pixels: np.ndarray, work: _Work) -> float:
    """max |p_hat - p| in px, decoding exactly as `decode` does; inf if anything is not finite."""
    if not np.isfinite(latent).all():
        work.advance(work.tiles)
        return math.inf
    error = np.abs(_inverse(flow, latent, work) - pixels)
    return float(error.max()) if np.isfinite(error).all() else math.inf


def _from_tiles(tiled: np.ndarray, H: int, W: int) -> np.ndarray:
    """The inverse of `images.tiles` for an image that whole tiles cover."""
    n, h, w, C = tiled.shape
    return tiled.reshape(H // h, W // w, h, w, C).transpose(0, 2, 1, 3, 4).reshape(H, W, C)


def _batches(tiles: np.ndarray):
    for start in range(0, len(tiles), TILE_BATCH):
        yield tiles[start:start + TILE_BATCH]
