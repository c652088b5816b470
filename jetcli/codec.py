"""Lossless codec: an 8-bit image <-> its Jet latent, bit-exact both ways or a clear refusal.

    encode(model, pixels) -> Encoded(latent, margin, float32_margin)
    decode(model, latent) -> Decoded(pixels, margin)

Encoding is deterministic: each pixel p sits at the centre of its bin, x = (p + 0.5) / 127.5 - 1, and
z = model(x). Decoding inverts the flow and rounds p_hat = (x_hat + 1) * 127.5 - 0.5 to the 8-bit grid.
The round trip is exact while every |p_hat - p| < 0.5 px; the worst of them is the *margin*.

Precision. The inverse amplifies rounding error by the product of the couplings' 1/scale and by the
ViTs' sensitivity to their input; a deep random flow can turn float32's 1e-7 into tens of pixels.
`encode` therefore decodes the stored latent exactly as `decode` will and keeps float32 only when its
margin is at most SAFE_MARGIN = 1/64 px; otherwise it repeats the whole encode with a float64 copy of
the model, and if even that misses by more than 1/64 px it refuses (CodecError). The latent's dtype
(float32 or float64) tells `decode` which arithmetic to use.

Why 1/64 px and not just < 0.5: the margin is measured on the encoding machine, and another machine
rounds differently. Re-decoding with every latent value, or every weight, moved by one ulp (our
stand-in for another device's rounding) raised the margin by up to 17.5x (99% of cases under 6x) over
455 tiles of random 32- and 64-coupling flows near the float32 limit, so 1/64 px keeps a factor of 32
to the 0.5 px at which a pixel would change. Under the looser 0.25 px, a latent kept at 0.06 px was
seen to reach 0.35 px after such a perturbation. A trained-like flow sits near 1e-3 px in float32; a
random 64-coupling flow at PyTorch's default init needs float64 (1e-9 px there, up to 3 px in float32).

Arithmetic. Encode and decode run under `exact_arithmetic()`: IEEE float32 matmuls (no TF32 on CUDA, no
bf16 in oneDNN on CPU), no autocast, the plain "math" attention kernel and deterministic algorithms,
with the caller's settings restored afterwards (they are process-wide; do not run other torch work in
parallel threads meanwhile). Tiles are batched the same way on both sides, so on one machine and torch
build, decode repeats encode's check bit for bit (on the 2-core CPU it was written on, also with 1 or 2
threads).

CPU vs CUDA (untested: no GPU was available when this was written). A latent made on one device and
decoded on another goes through different kernels (GEMM blocking, reductions, sigmoid/tanh/exp), so
x_hat differs in its last bits: nothing here makes two devices bit-identical, and the ViT's bias and
scale are only equal to rounding between them. What protects the round trip is the margin: the
difference is another rounding of the same computation, the case the 1/64 px threshold was sized for
(sized with CPU perturbations, not with real CUDA kernels). On CUDA, deterministic algorithms run in
warn-only mode; set CUBLAS_WORKSPACE_CONFIG=:4096:8 before CUDA starts to make cuBLAS strictly
deterministic too. `decode` refuses rather than guesses when a decoded value lies more than
DECODE_LIMIT = 0.4 px from the nearest pixel level in 0..255, which is also what a latent decoded with
the wrong model, or altered, does.

Sizes. Images whose height and width are whole multiples of the model's input size are cut into tiles
(row-major, encoded in batches); the latent has the image's own shape (H, W, 3). Other sizes are
refused: a padding scheme would have to store the original size beside the latent, and the latent's
shape alone would no longer say what image it holds.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from jetcli.images import tiles
from jetcli.model import Jet

SAFE_MARGIN = 1 / 64  # px: the most a stored latent may miss its pixels by, on the encoding machine
DECODE_LIMIT = 0.4  # px: decode refuses values further than this from the 8-bit grid
TILE_BATCH = 64  # tiles per forward/inverse call, identical for encode and decode
LATENT_DTYPES = (np.float32, np.float64)


class CodecError(ValueError):
    """An image or latent the codec cannot turn into an exact round trip (one-line message)."""


class Encoded(NamedTuple):
    latent: np.ndarray  # (H, W, C) float32, or float64 where float32 is not safe
    margin: float  # max |p_hat - p| in px when `latent` is decoded here; nan if not verified
    float32_margin: float  # the same for the float32 attempt (== margin when float32 was kept)


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


def encode(model: Jet, pixels: np.ndarray, verify: bool = True) -> Encoded:
    """8-bit image (H, W, C) -> Encoded(latent (H, W, C), margin, float32_margin).

    verify=True (the default) decodes the latent exactly as `decode` does and guarantees the round
    trip on this machine: float32 if its margin is <= SAFE_MARGIN, else float64 under the same test,
    else CodecError. verify=False returns the float32 latent unchecked (margins nan): no guarantee.
    """
    _check_pixels(model, pixels)
    flow = _Flow.of(model, torch.float32)
    latent = _forward(flow, pixels)
    if not verify:
        return Encoded(latent, math.nan, math.nan)
    float32_margin = _margin(flow, latent, pixels)
    if float32_margin <= SAFE_MARGIN:
        return Encoded(latent, float32_margin, float32_margin)
    flow = _Flow.of(model, torch.float64)
    latent = _forward(flow, pixels)
    margin = _margin(flow, latent, pixels)
    if margin <= SAFE_MARGIN:
        return Encoded(latent, margin, float32_margin)
    raise CodecError(f"this model cannot encode the image losslessly: decoding misses the pixels by "
                     f"{margin:.3g} px in float64 ({float32_margin:.3g} px in float32), more than the "
                     f"{SAFE_MARGIN:g} px allowed; the flow amplifies rounding error too much")


def decode(model: Jet, latent: np.ndarray) -> Decoded:
    """Latent (H, W, C) float32/float64 -> Decoded(pixels uint8 (H, W, C), margin); CodecError if the
    latent is malformed or does not decode onto the 8-bit grid (wrong model, altered, corrupt)."""
    values = reconstruct(model, latent)
    levels = np.clip(np.rint(values), 0, 255)
    distance = np.abs(values - levels)
    margin = float(distance.max()) if np.isfinite(distance).all() else math.inf
    if margin > DECODE_LIMIT:
        raise CodecError(f"the latent does not decode to an 8-bit image with this model: a value lies "
                         f"{margin:.3g} px from the nearest level in 0..255 (limit {DECODE_LIMIT:g} px); "
                         f"was it encoded with another model, or altered?")
    return Decoded(levels.astype(np.uint8), margin)


def reconstruct(model: Jet, latent: np.ndarray) -> np.ndarray:
    """The decoded pixel values before rounding, float64 (H, W, C), in the latent's precision."""
    _check_latent(model, latent)
    return _inverse(_Flow.of(model, torch.float64 if latent.dtype == np.float64 else torch.float32), latent)


def _check_pixels(model: Jet, pixels: np.ndarray) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        kind = pixels.dtype if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise CodecError(f"pixels must be a uint8 array (8-bit image), got {kind}")
    _check_shape(model, pixels.shape, "image")


def _check_latent(model: Jet, latent: np.ndarray) -> None:
    if not isinstance(latent, np.ndarray):
        raise CodecError(f"a latent must be a numpy array, got {type(latent).__name__}")
    if latent.dtype not in LATENT_DTYPES:
        raise CodecError(f"latent has dtype {latent.dtype}; encode writes float32 or float64")
    _check_shape(model, latent.shape, "latent")
    if not np.isfinite(latent).all():
        bad = int((~np.isfinite(latent)).sum())
        raise CodecError(f"latent holds NaN or Inf at {bad} of its {latent.size} values")


def _check_shape(model: Jet, shape: tuple[int, ...], what: str) -> None:
    h, w = model.config.image_size
    c = model.config.channels
    if len(shape) != 3 or shape[2] != c:
        raise CodecError(f"{what} has shape {tuple(shape)}; expected (height, width, {c})")
    if shape[0] == 0 or shape[1] == 0 or shape[0] % h or shape[1] % w:
        raise CodecError(f"{what} is {shape[0]}x{shape[1]} (height x width) but the model codes {h}x{w} "
                         f"tiles: both sides must be whole multiples of {h}x{w}")


class _Flow(NamedTuple):
    """The model in one precision, and the device that computes with it."""

    model: Jet
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, model: Jet, dtype: torch.dtype) -> _Flow:
        """The model itself if already in `dtype`, else a converted copy (the caller's is never touched)."""
        device = next(model.parameters()).device
        if dtype == torch.float64 and device.type == "mps":  # MPS has no float64
            device = torch.device("cpu")
        if any(p.dtype != dtype or p.device != device for p in model.parameters()):
            model = copy.deepcopy(model).to(device, dtype)
        return cls(model, dtype, device)


def _forward(flow: _Flow, pixels: np.ndarray) -> np.ndarray:
    return _tilewise(flow, pixels, lambda p: flow.model((p + 0.5) / 127.5 - 1)[0])  # bin centres


def _inverse(flow: _Flow, latent: np.ndarray) -> np.ndarray:
    """Latent -> pixel values before rounding (float64)."""
    return _tilewise(flow, latent, lambda z: (flow.model.inverse(z)[0].double() + 1) * 127.5 - 0.5)


def _tilewise(flow: _Flow, image: np.ndarray, step) -> np.ndarray:
    """Apply `step` to the image's tiles, TILE_BATCH at a time, under exact arithmetic."""
    h, w = flow.model.config.image_size
    with exact_arithmetic(flow.device):
        out = [step(torch.from_numpy(batch).to(flow.device, flow.dtype)).cpu().numpy()
               for batch in _batches(tiles(image, (h, w)).copy())]  # a fresh writable copy for torch
    return _from_tiles(np.concatenate(out), *image.shape[:2])


def _margin(flow: _Flow, latent: np.ndarray, pixels: np.ndarray) -> float:
    """max |p_hat - p| in px, decoding exactly as `decode` does; inf if anything is not finite."""
    if not np.isfinite(latent).all():
        return math.inf
    error = np.abs(_inverse(flow, latent) - pixels)
    return float(error.max()) if np.isfinite(error).all() else math.inf


def _from_tiles(tiled: np.ndarray, H: int, W: int) -> np.ndarray:
    """The inverse of `images.tiles` for an image that whole tiles cover."""
    n, h, w, C = tiled.shape
    return tiled.reshape(H // h, W // w, h, w, C).transpose(0, 2, 1, 3, 4).reshape(H, W, C)


def _batches(tiles: np.ndarray):
    for start in range(0, len(tiles), TILE_BATCH):
        yield tiles[start:start + TILE_BATCH]
