"""Lossless image compression with the flow: bits-back coding, so that files are as small as the bpd says.

    compress(model, pixels, model_sha256) -> Compressed(data, payload_bits, header_bytes, tiles, steps)
    decompress(model, data, model_sha256) -> pixels uint8 (H, W, 3)
    read_header(data) -> Header;  steady_bits(model, pixels) -> int (a measurement, see below)

The method: local bits-back coding for coupling flows (Ho, Lohn & Abbeel, NeurIPS 2019) on an ANS stack
(`constriction`'s AnsCoder, 32-bit words). Every value the coder holds is an integer cell index on a
fine grid of step d = (1/127.5) / 2**noise_bits in model space (index v <-> the cell [v d, (v+1) d)),
and every step is an exact bijection between (integers, stack) pairs, so decoding runs the encoder
backwards, op by op.

1. Dequantisation, bits back: pixel p covers 2**noise_bits cells; the encoder *pops* which one from
   the stack (uniform), taking back the noise's bits.
2. Each affine coupling, y2 = (x2 + bias(x1)) * scale(x1), is paid where it happens. Per value of x2 the
   encoder pops r uniform in 0..M-1 (M = 2**refine_bits), refines the cell to F = x2 M + r, maps it to
   Z = floor(scale * ((F + 1/2) / M + bias / d)) and pushes F's place among the n(Z) fine points whose
   image is Z (uniform; n ~ M / scale). Net cost log2 n - log2 M ~ -log2 scale, the change of volume.
   The decoder finds Z's preimage [first(Z), first(Z + 1)) with the same float64 expression, which is
   monotone in F (IEEE rounding is), pops F's place and pushes r back. x1 passes unchanged: the ViT
   reads its cells' centres, which the decoder knows before it inverts the coupling. A scale below
   scale_floor is raised to it on both sides (keeps n within constriction's 2**24).
3. The latent is coded under the N(0, 1) prior at the fine grid: its coarse cell (2**coarse_bits cells
   of d, so sigma = 63.75 coarse cells) with constriction's QuantizedGaussian, the cell within it
   uniformly (the density is flat to ~1e-5 bits there); coarse cells beyond +-PRIOR_RANGE (32 sigma)
   escape to 48 raw bits.

A tile's cost is then -log2 N(z) d - sum log2 scale - noise_bits D: its bpd * D up to the grid's
rounding. `steady_bits` measures that part alone (the tiles coded on top of a stack that already holds
plenty of bits), to compare with `jet bpd`'s bits for the same padded image.

Initial bits. Bits-back pops before it pushes: a tile takes back its noise and its couplings' expansion
(noise_bits + ~6 bits per dim on photos, more on smooth ones) before it pushes its latent, and the first
tiles have nothing below them to take that from. So the coding order follows the stack (_plan_step):
while the stack holds less than (noise_bits + DIRECT_BELOW_BITS) per dim, the next tile is coded
directly, without bits-back (push_direct: LOCO-I's median predictor, green's residual subtracted from
red's and blue's, two Laplaces); then tiles go through the flow in ViT batches as large as the stack can
pay for at noise_bits + EXCURSION_BITS per dim each, up to GROUP_MAX, a batch of one popping and pushing
in chunks. Each step (0: a direct tile, g: a batch of g) is pushed after it, so the decoder pops the
order as it goes. What this start costs, payload_bits - steady_bits, is the fixed per-file overhead
besides the HEADER_SIZE-byte header; it can be negative where the direct coder beats the flow on the
first tiles (smooth skies). Numbers: benchmarks/compress.py.

Quantization (stored in the header), by measurement with the photo model on whole photos (CBSD68 101087
and 102061, McMaster 11; steady bits against jet bpd's): noise_bits 2 / 3 / 4 / 5 (refine_bits 6) gave
+0.90 / +0.18 / +0.09 / -0.02%, +0.69 / +0.15 / +0.05 / -0.05% and -0.07 / -0.14 / -0.16 / -0.18%;
the finer grid's longer start is covered by direct tiles. refine_bits 6 vs 8 made no difference
(n(Z) >= 32 fine points per cell).

Sizes: any image; it is padded at the bottom and right to whole tiles by `images.pad_to_tiles` (edge
padding, the convention of jet bpd and jet encode) and the decoder cuts the padding off by the stored
height and width. Files whose pixels fit in one tile are all start-up: they are coded directly.

Numerics. Bits-back needs the decoder to reproduce the encoder's floats exactly (one scale rounded
differently moves a preimage, and every symbol after it is garbage). Both sides run the ViTs on the CPU
in float32 under `codec.exact_arithmetic()` with the same batches. The header holds a fingerprint of the
numerics: a hash of every scale and bias (float64 bits) and of the coded words for fixed probe tiles run
through the whole encoder (batches of 1 and 2). `decompress` refuses with one line where this machine's
fingerprint differs, before decoding anything. After decoding, the stack must be back to empty and the
pixels must match the header's digest, so a difference the probe missed is a refusal too, never wrong
pixels; `compress` decompresses every file before returning it.

File layout, format version 2 (little-endian): the header, then the ANS words (constriction's AnsCoder,
32-bit words). The coding order travels in the words; its rules (direct coder, chunking, symbols) are
part of the format.

    0  4s magic b"JETZ"        | 4  B format version     | 5 B noise_bits | 6 B refine_bits | 7 B coarse_bits
    8  32s model sha256        | 40 16s numerics fingerprint | 56 16s pixel digest (sha256 of the pixels)
    72 I height | 76 I width   | 80 H tile height | 82 H tile width
    84 I payload bytes         | 88 I crc32 of the whole file with this field zeroed
"""

from __future__ import annotations

import copy
import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import constriction
import numpy as np
import torch

from jetcli.codec import CodecError, Progress, exact_arithmetic
from jetcli.images import MAX_PIXELS, pad_to_tiles, tiles
from jetcli.model import Jet, patchify, unpatchify

MAGIC = b"JETZ"
FORMAT_VERSION = 2  # 2: the coding order chosen by the stack and sent in-band (1: fixed groups)
SUFFIX = ".jetz"
HEADER = struct.Struct("<4sBBBB32s16s16sIIHHII")
HEADER_SIZE = HEADER.size  # 92 bytes
CRC_OFFSET = HEADER_SIZE - 4
GROUP_MAX = 8  # tiles per ViT batch at most (CPU throughput is flat beyond 8)
EXCURSION_BITS = 10  # bits per dim a flow group may take from the stack per tile, beyond its noise (_plan_step)
DIRECT_BELOW_BITS = 8  # a tile is coded directly while the stack holds less than (noise_bits + this) per dim
THIN_CHUNK = 128  # a flow group of one tile pops and pushes its couplings this many values at a time
STEP_SYMBOLS = GROUP_MAX + 1  # each step of the coding order, pushed after it: 0 a direct tile, g a group
DIRECT_SCALES = 0.5 * 2.0 ** (np.arange(16) / 2)  # Laplace scales push_direct chooses from
PRIOR_RANGE = 1 << 11  # coarse latent cells coded by the Gaussian model; beyond: escapes
ESCAPE_BITS = 48  # an escaped coarse value's excess, as 3 x 16 raw bits
LIMIT = 1 << 40  # |cell index| bound for every value the coder holds (float64 stays exact far beyond)
UNIFORM_MAX = (1 << 24) - 1  # constriction's Uniform sizes must stay below 2**24

_Uniform = constriction.stream.model.Uniform
_AnsCoder = constriction.stream.stack.AnsCoder


class CompressError(CodecError):
    """A file that cannot be decoded here, or an image this model cannot compress (one-line message)."""


class _Undecodable(Exception):
    """Inside the decoder: the stream does not decode to a valid image (damaged, or other numerics)."""


@dataclass(frozen=True)
class Quantization:
    """The coder's grids, stored in each file's header."""

    noise_bits: int = 5  # cells per 8-bit bin: 2**noise_bits; d = (1/127.5) / 2**noise_bits
    refine_bits: int = 6  # M = 2**refine_bits fine points per cell inside a coupling
    coarse_bits: int = 6  # the prior's coarse cell is 2**coarse_bits cells of d (sigma = 63.75 of them)

    def __post_init__(self):
        if not (1 <= self.noise_bits <= 16 and 4 <= self.refine_bits <= 12 and 1 <= self.coarse_bits <= 20):
            raise ValueError(f"quantization out of range: {self}")

    @property
    def inv_delta(self) -> float:
        """1 / d: cells per unit of model space (exact in float64)."""
        return 127.5 * (1 << self.noise_bits)

    @property
    def refine(self) -> int:
        return 1 << self.refine_bits

    @property
    def scale_floor(self) -> float:
        """Smallest coupling scale the coder uses (a smaller one is raised to it, on both sides): keeps
        n(Z) ~ M / scale below constriction's 2**24."""
        return self.refine / (1 << 23)

    @property
    def prior_std(self) -> float:
        """The prior's standard deviation in coarse cells."""
        return self.inv_delta / (1 << self.coarse_bits)


DEFAULT_QUANTIZATION = Quantization()


class Header(NamedTuple):
    version: int
    quantization: Quantization
    model_sha256: bytes
    fingerprint: bytes
    pixel_digest: bytes
    height: int
    width: int
    tile: tuple[int, int]
    payload_bytes: int


class Compressed(NamedTuple):
    data: bytes  # the whole file
    payload_bits: int  # the ANS words, in bits (a multiple of 32)
    header_bytes: int
    tiles: int
    steps: tuple[int, ...]  # the coding order: 0 a tile coded directly, g a ViT batch of g tiles


# --------------------------------------------------------------------------- public API
def compress(model: Jet, pixels: np.ndarray, model_sha256: bytes | str,
             quantization: Quantization = DEFAULT_QUANTIZATION, verify: bool = True,
             progress: Progress | None = None) -> Compressed:
    """8-bit RGB image (H, W, 3) -> the bytes of a compressed file. With verify (the default) the file is
    decompressed here and compared pixel for pixel; a mismatch raises CompressError, never returns.
    `progress(done, total)` is called after each group of tiles (verify counts the tiles twice)."""
    flow = _cpu_float32(model)
    sha = _sha_bytes(model_sha256)
    _check_pixels(pixels)
    tile = flow.config.image_size
    padded = pad_to_tiles(pixels, tile)
    batch = tiles(padded, tile)
    stack = _Stack()
    coder = _Coder(flow, quantization)
    passes = 2 if verify else 1
    steps, start = [], 0
    while start < len(batch):
        step = _plan_step(stack, len(batch) - start, batch[0].size, quantization)
        if step == 0:
            coder.push_direct(stack, batch[start])
        else:
            coder.encode_group(stack, batch[start:start + step], chunk=THIN_CHUNK if step == 1 else None)
        stack.push_uniform_of(np.array([step]), STEP_SYMBOLS)  # the decoder pops it before the step
        steps.append(step)
        start += max(1, step)
        if progress:
            progress(start, passes * len(batch))
    words = stack.words()
    payload = words.astype("<u4").tobytes()
    header = Header(FORMAT_VERSION, quantization, sha, fingerprint(flow, quantization), _digest(pixels),
                    pixels.shape[0], pixels.shape[1], tile, len(payload))
    data = _with_crc(_pack(header) + payload)
    if verify:
        decoded = decompress(flow, data, sha, progress=progress and (
            lambda done, total: progress(len(batch) + done, 2 * len(batch))))
        if decoded.shape != pixels.shape or not np.array_equal(decoded, pixels):
            raise CompressError("the compressed file does not decode to the same pixels on this machine; "
                                "nothing written")
    return Compressed(data, 32 * len(words), HEADER_SIZE, len(batch), tuple(steps))


def decompress(model: Jet, data: bytes, model_sha256: bytes | str, progress: Progress | None = None) -> np.ndarray:
    """The bytes of a compressed file -> the exact pixels (H, W, 3) uint8, or CompressError (one line):
    not a compressed file, truncated, damaged, another model's, a newer format, or numerics that differ
    from the encoding machine's."""
    header = read_header(data)
    sha = _sha_bytes(model_sha256)
    if header.model_sha256 != sha:
        raise CompressError(f"compressed with another model (sha256 {header.model_sha256.hex()[:16]}...), "
                            f"not this one ({sha.hex()[:16]}...): pass the model it was made with")
    flow = _cpu_float32(model)
    if tuple(flow.config.image_size) != header.tile or flow.config.channels != 3:
        raise CompressError(f"the file holds {header.tile[0]}x{header.tile[1]} tiles; this model codes "
                            f"{flow.config.image_size[0]}x{flow.config.image_size[1]}")
    here = fingerprint(flow, header.quantization)
    if here != header.fingerprint:
        raise CompressError(f"this machine computes the model differently from the one that compressed the "
                            f"file (numerics fingerprint {here.hex()[:12]} here, {header.fingerprint.hex()[:12]} "
                            f"there): decompress it on the same kind of CPU and torch build")
    words = np.frombuffer(data, dtype="<u4", offset=HEADER_SIZE).astype(np.uint32)
    tile = header.tile
    rows, cols = -(-header.height // tile[0]), -(-header.width // tile[1])
    coder = _Coder(flow, header.quantization)
    stack = _Stack(words)
    out = np.empty((rows * cols, *tile, 3), dtype=np.uint8)
    try:
        stop = rows * cols
        while stop:
            if stack.coder.is_empty():  # the encoder's never is, once it has coded a tile
                raise _Undecodable("the data ran out before the first tile")
            step = int(stack.pop_model(_Uniform(STEP_SYMBOLS), 1)[0])
            if step > stop:
                raise _Undecodable(f"a group of {step} tiles where {stop} are left")
            if step == 0:
                out[stop - 1] = coder.pop_direct(stack)
            else:
                out[stop - step:stop] = coder.decode_group(stack, step, chunk=THIN_CHUNK if step == 1 else None)
            stop -= max(1, step)
            if progress:
                progress(rows * cols - stop, rows * cols)
        if not stack.coder.is_empty():  # every op undone: the stack is back where the encoder began
            raise _Undecodable("data left over after the last tile")
    except (_Undecodable, ValueError, OverflowError, RuntimeError) as e:  # constriction raises ValueError
        raise CompressError(f"the data does not decode to an image ({type(e).__name__}: {str(e)[:120]}); "
                            "the file is damaged, or was made on a machine that computes differently") from None
    image = out.reshape(rows, cols, *tile, 3).transpose(0, 2, 1, 3, 4).reshape(rows * tile[0], cols * tile[1], 3)
    image = np.ascontiguousarray(image[:header.height, :header.width])
    if _digest(image) != header.pixel_digest:
        raise CompressError("the decoded pixels fail the file's checksum: this machine computes the model "
                            "differently from the one that compressed it (or the file was altered)")
    return image


def read_header(data: bytes) -> Header:
    """The header of a compressed file, with every check that needs no model: CompressError if the bytes
    are empty, not a compressed file, from a newer format, truncated or damaged."""
    if len(data) == 0:
        raise CompressError("empty file (0 bytes), not a compressed image")
    if not MAGIC.startswith(data[:4]):
        raise CompressError(f"not a jet compressed file (it does not start with {MAGIC.decode()})")
    if len(data) < 5:
        raise CompressError(f"truncated: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    version = data[4]
    if version > FORMAT_VERSION:
        raise CompressError(f"written in format version {version} by a newer jetcli; this one reads version "
                            f"{FORMAT_VERSION}: upgrade jetcli")
    if version < 1:
        raise CompressError(f"unknown format version {version}")
    if version < FORMAT_VERSION:
        raise CompressError(f"written in format version {version} by an older jetcli; this one reads version "
                            f"{FORMAT_VERSION} only: decompress it with the jetcli that wrote it")
    if len(data) < HEADER_SIZE:
        raise CompressError(f"truncated: {len(data)} bytes, the header alone is {HEADER_SIZE}")
    (_, _, noise, refine, coarse, sha, fp, digest, height, width, th, tw, payload,
     crc) = HEADER.unpack_from(data)
    if len(data) != HEADER_SIZE + payload:
        if len(data) < HEADER_SIZE + payload:
            raise CompressError(f"truncated: {len(data)} of {HEADER_SIZE + payload} bytes")
        raise CompressError(f"{len(data) - HEADER_SIZE - payload} bytes after the end of the data: damaged")
    if crc != zlib.crc32(data[:CRC_OFFSET] + b"\0\0\0\0" + data[HEADER_SIZE:]):
        raise CompressError("damaged: the file fails its checksum (crc32)")
    try:
        quantization = Quantization(noise, refine, coarse)
    except ValueError:
        raise CompressError(f"unsupported quantization ({noise}, {refine}, {coarse})") from None
    if payload % 4 or not height or not width or not th or not tw or height * width > MAX_PIXELS:
        raise CompressError(f"invalid header (image {height}x{width}, tiles {th}x{tw}, {payload} data bytes)")
    return Header(version, quantization, sha, fp, digest, height, width, (th, tw), payload)


def steady_bits(model: Jet, pixels: np.ndarray, quantization: Quantization = DEFAULT_QUANTIZATION) -> int:
    """What the image's tiles cost coded one after another through the flow on top of a stack that
    already holds plenty of bits: a file's payload without its initial-bits overhead (a measurement;
    nothing is written). payload_bits - steady_bits is the fixed per-file cost of starting empty."""
    flow = _cpu_float32(model)
    _check_pixels(pixels)
    batch = tiles(pad_to_tiles(pixels, flow.config.image_size), flow.config.image_size)
    prefill = _probe_words(GROUP_MAX * batch[0].size * (quantization.noise_bits + 16) // 32)  # > any excursion
    stack, coder = _Stack(prefill), _Coder(flow, quantization)
    for start in range(0, len(batch), GROUP_MAX):
        coder.encode_group(stack, batch[start:start + GROUP_MAX])
    return 32 * (len(stack.words()) - len(prefill))


def fingerprint(model: Jet, quantization: Quantization = DEFAULT_QUANTIZATION) -> bytes:
    """16 bytes that change when this machine computes the coder differently: a hash of every coupling's
    scales and biases (float64, bit for bit) and of the compressed words, for two fixed probe tiles
    (batches of 1 and 2) through the whole encoder from a fixed stack."""
    flow = _cpu_float32(model)
    h, w = flow.config.image_size
    probe = _probe_pixels(3, h, w)
    coder = _Coder(flow, quantization)
    coder.trace = hashlib.sha256()
    stack = _Stack(_probe_words(64))
    coder.encode_group(stack, probe[:1], chunk=THIN_CHUNK)
    coder.encode_group(stack, probe[1:])
    coder.trace.update(stack.words().astype("<u4").tobytes())
    return coder.trace.digest()[:16]


# --------------------------------------------------------------------------- the coder
class _Stack:
    """constriction's AnsCoder as a stack: push (encode_reverse) and pop (decode) vectors of symbols."""

    def __init__(self, words: np.ndarray | None = None):
        self.coder = _AnsCoder() if words is None else _AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))

    def words(self) -> np.ndarray:
        return self.coder.get_compressed()

    def pop_uniform(self, bits: int, count: int) -> np.ndarray:
        return self.coder.decode(_Uniform(1 << bits), count).astype(np.int64)

    def push_uniform(self, values: np.ndarray, bits: int) -> None:
        self.push_uniform_of(values, 1 << bits)

    def push_uniform_of(self, values: np.ndarray, size: int) -> None:
        self.coder.encode_reverse(values.astype(np.int32), _Uniform(size))

    def pop_sized(self, sizes: np.ndarray) -> np.ndarray:
        return self.coder.decode(_Uniform(), sizes.astype(np.int32)).astype(np.int64)

    def push_sized(self, values: np.ndarray, sizes: np.ndarray) -> None:
        self.coder.encode_reverse(values.astype(np.int32), _Uniform(), sizes.astype(np.int32))

    def push_model(self, values: np.ndarray, model) -> None:
        self.coder.encode_reverse(values.astype(np.int32), model)

    def pop_model(self, model, count: int) -> np.ndarray:
        return self.coder.decode(model, count).astype(np.int64)


class _Coder:
    """The flow as integer bijections on the fine grid, for one model and quantization."""

    def __init__(self, model: Jet, quantization: Quantization):
        self.model = model
        self.p = quantization
        self.trace = None  # a hash object that sees every scale and bias computed (the fingerprint)
        self.couplings = list(model.couplings)
        self.patch = model.config.patch_size
        self.tile = tuple(model.config.image_size)
        self.scale_factor = float(model.config.scale_factor)
        self.prior = constriction.stream.model.QuantizedGaussian(-PRIOR_RANGE, PRIOR_RANGE, -0.5,
                                                                 quantization.prior_std)
        self.offset = 255 << (quantization.noise_bits - 1)  # cell of pixel p's bottom edge: p * 2**k - offset
        if quantization.refine < 4 * self.scale_factor:  # keeps every preimage at 2 or more fine points
            raise CompressError(f"refine_bits {quantization.refine_bits} is too coarse for scale factor "
                                f"{self.scale_factor:g}")

    # ----- encoder
    def encode_group(self, stack: _Stack, pixels: np.ndarray, chunk: int | None = None) -> None:
        """Push a group of tiles (G, h, w, 3) uint8 onto the stack, each coupling's values `chunk` at a
        time (None: a tile's at once)."""
        k = self.p.noise_bits
        cells = (pixels.astype(np.int64) << k) - self.offset
        cells = cells + stack.pop_uniform(k, cells.size).reshape(cells.shape)  # dequantisation: bits back
        x = patchify(torch.from_numpy(cells), self.patch)
        for coupling in self.couplings:
            x1, x2 = coupling.split.split(x)
            scale, bias = self._affine(coupling, x1)
            x2 = x2.numpy().reshape(len(pixels), -1)
            z2 = np.empty_like(x2)
            width = chunk or x2.shape[1]
            for t in range(len(pixels)):
                for c in range(0, x2.shape[1], width):
                    part = slice(c, c + width)
                    z2[t, part] = self._forward(stack, x2[t, part], scale[t, part], bias[t, part])
            x = coupling.split.merge(x1, torch.from_numpy(z2).view(x1.shape))
        z = unpatchify(x, self.patch, self.tile).numpy().reshape(len(pixels), -1)
        for t in range(len(pixels)):
            self._push_prior(stack, z[t])

    def _forward(self, stack: _Stack, x2: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """One coupling on values x2 of one tile. The pop comes before the push, so the stack must hold
        refine_bits per value first: while it is thin, values go in chunks."""
        m = self.p.refine_bits
        fine = (x2 << m) + stack.pop_uniform(m, x2.size)  # refine each cell (bits back) ...
        z = self._cell(fine, scale, bias)  # ... map it ...
        low, high = self._first(z, scale, bias), self._first(z + 1, scale, bias)
        stack.push_sized(fine - low, high - low)  # ... and pay for its place in z's preimage
        return z

    def _push_prior(self, stack: _Stack, z: np.ndarray) -> None:
        c = self.p.coarse_bits
        coarse, fine = z >> c, z & ((1 << c) - 1)
        symbols = np.clip(coarse, -PRIOR_RANGE, PRIOR_RANGE)
        excess = np.abs(coarse - symbols)[np.abs(symbols) == PRIOR_RANGE]  # the range's ends escape
        if excess.size:
            if excess.max() >= 1 << ESCAPE_BITS:
                raise CompressError("the model maps this image to latents too far out to code")
            stack.push_uniform(np.stack([(excess >> s) & 0xFFFF for s in (0, 16, 32)], 1).reshape(-1), 16)
        stack.push_model(symbols, self.prior)
        stack.push_uniform(fine, c)

    def push_direct(self, stack: _Stack, pixels: np.ndarray) -> None:
        """Push one tile (h, w, 3) without bits-back, as a classical lossless coder would: each value's
        difference from LOCO-I's median predictor (left, above, above-left; 128 at the corner), green's
        difference subtracted from red's and blue's, wrapped to -128..127, under two Laplaces (green,
        red and blue) whose scales, each one of DIRECT_SCALES, are pushed last. It costs more than the
        flow would, but it needs no bits below it."""
        residual = _wrap(pixels.astype(np.int64) - _med(pixels.astype(np.int64)))
        green, others = residual[..., 1], _wrap(residual[..., [0, 2]] - residual[..., 1:2])
        scales = [_scale_index(green), _scale_index(others)]
        stack.push_model(green.reshape(-1), _laplace(scales[0]))
        stack.push_model(others.reshape(-1), _laplace(scales[1]))
        stack.push_uniform(np.array(scales), 4)

    def pop_direct(self, stack: _Stack) -> np.ndarray:
        h, w = self.tile
        scales = stack.pop_model(_Uniform(16), 2)
        others = stack.pop_model(_laplace(int(scales[1])), h * w * 2).reshape(h, w, 2)
        green = stack.pop_model(_laplace(int(scales[0])), h * w).reshape(h, w)
        residual = np.stack([others[..., 0] + green, green, others[..., 1] + green], axis=-1)
        return _unmed(residual).astype(np.uint8)

    # ----- decoder
    def decode_group(self, stack: _Stack, count: int, chunk: int | None = None) -> np.ndarray:
        """Pop a group of `count` tiles; returns their pixels (count, h, w, 3) uint8."""
        h, w = self.tile
        dims = h * w * 3
        z = np.empty((count, dims), dtype=np.int64)
        for t in reversed(range(count)):
            z[t] = self._pop_prior(stack, dims)
        x = patchify(torch.from_numpy(z.reshape(count, h, w, 3)), self.patch)
        for coupling in reversed(self.couplings):
            x1, z2 = coupling.split.split(x)
            scale, bias = self._affine(coupling, x1)
            z2 = z2.numpy().reshape(count, -1)
            low, high = self._first(z2, scale, bias), self._first(z2 + 1, scale, bias)
            if (high - low < 2).any() or (high - low > UNIFORM_MAX).any():
                raise _Undecodable("a latent cell outside the coupling's image")
            x2 = np.empty_like(z2)
            width = chunk or x2.shape[1]
            for t in reversed(range(count)):
                for c in reversed(range(0, x2.shape[1], width)):
                    part = slice(c, c + width)
                    fine = low[t, part] + stack.pop_sized(high[t, part] - low[t, part])
                    stack.push_uniform(fine & (self.p.refine - 1), self.p.refine_bits)
                    x2[t, part] = fine >> self.p.refine_bits
            x = coupling.split.merge(x1, torch.from_numpy(x2).view(x1.shape))
        cells = unpatchify(x, self.patch, self.tile).numpy() + self.offset
        k = self.p.noise_bits
        pixels = cells >> k
        if pixels.min() < 0 or pixels.max() > 255:
            raise _Undecodable("values outside 0..255")
        stack.push_uniform((cells & ((1 << k) - 1)).reshape(-1), k)  # give the noise's bits back
        return pixels.astype(np.uint8)

    def _pop_prior(self, stack: _Stack, dims: int) -> np.ndarray:
        c = self.p.coarse_bits
        fine = stack.pop_model(_Uniform(1 << c), dims)
        coarse = stack.pop_model(self.prior, dims)
        escaped = np.abs(coarse) == PRIOR_RANGE
        if escaped.any():
            parts = stack.pop_model(_Uniform(1 << 16), 3 * int(escaped.sum())).reshape(-1, 3)
            excess = parts[:, 0] | (parts[:, 1] << 16) | (parts[:, 2] << 32)
            coarse[escaped] += np.sign(coarse[escaped]) * excess
        return (coarse << c) + fine

    # ----- shared arithmetic
    def _affine(self, coupling, x1: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The coupling's (scale, bias in cells), float64 (G, D/2), from the kept half's cells."""
        if x1.abs().max() >= LIMIT:
            raise _Undecodable("a value beyond the coder's range")
        bias, raw = self._network(coupling, x1)
        with np.errstate(over="ignore"):
            scale = self.scale_factor / (1.0 + np.exp(-raw.astype(np.float64)))
        scale = np.maximum(scale, self.p.scale_floor)
        bias = bias.astype(np.float64) * self.p.inv_delta
        if not (np.isfinite(scale).all() and np.isfinite(bias).all()):
            raise CompressError("the model's couplings give NaN or Inf on this image")
        if self.trace is not None:
            self.trace.update(scale.astype("<f8").tobytes() + bias.astype("<f8").tobytes())
        return scale, bias

    def _network(self, coupling, x1: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The ViT's (bias, raw scale), float32 (G, D/2), reading the cells' centres in float32 under
        exact arithmetic."""
        with exact_arithmetic(torch.device("cpu")):
            bias, raw = coupling.vit(((x1.double() + 0.5) / self.p.inv_delta).float())
        return bias.numpy().reshape(len(x1), -1), raw.numpy().reshape(len(x1), -1)

    def _cell(self, fine: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """floor(scale * ((fine + 1/2) / M + bias)): monotone non-decreasing in `fine`."""
        value = np.floor(scale * ((fine.astype(np.float64) + 0.5) / self.p.refine + bias))
        if not (np.abs(value) < LIMIT).all():
            raise CompressError("the model maps this image beyond the coder's range")
        return value.astype(np.int64)

    def _first(self, z: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """The smallest fine point whose cell is >= z (so z's preimage is [first(z), first(z + 1)))."""
        if not (np.abs(z) < LIMIT).all():
            raise _Undecodable("a value beyond the coder's range")
        fine = np.ceil((z / scale - bias) * self.p.refine - 0.5)
        if not (np.abs(fine) < LIMIT * self.p.refine * 2).all():
            raise _Undecodable("a value beyond the coder's range")
        fine = fine.astype(np.int64)
        for _ in range(8):  # the estimate is off by at most one or two: step to the exact boundary
            down = self._cell(fine - 1, scale, bias) >= z
            up = self._cell(fine, scale, bias) < z
            if not (down.any() or up.any()):
                return fine
            fine = fine - down + up
        raise _Undecodable("no preimage boundary found")


# --------------------------------------------------------------------------- helpers
def _plan_step(stack: _Stack, left: int, dims: int, quantization: Quantization) -> int:
    """The next step of the coding order, from how many bits the stack holds: 0 (code the next tile
    directly) while it cannot pay one flow tile's excursion, else a ViT batch of as many tiles as it
    can pay for at noise_bits + EXCURSION_BITS per dim each, 1 to GROUP_MAX. (A flow tile takes back its
    noise and its couplings' expansion, ~6 bits per dim on photos, before it pushes its latent.)"""
    bits = stack.coder.num_valid_bits()
    if bits < dims * (quantization.noise_bits + DIRECT_BELOW_BITS):
        return 0
    return int(min(left, GROUP_MAX, max(1, bits // (dims * (quantization.noise_bits + EXCURSION_BITS)))))


def _wrap(values: np.ndarray) -> np.ndarray:
    """Integers modulo 256, as -128..127."""
    return (values + 128) % 256 - 128


def _med(image: np.ndarray) -> np.ndarray:
    """LOCO-I's median edge predictor of every value of an (h, w, c) int image from its left (a), above
    (b) and above-left (c) neighbours: min(a, b) if c >= max(a, b), max(a, b) if c <= min(a, b), else
    a + b - c. The first row predicts from the left, the first column from above, the corner 128."""
    left, above, corner = np.empty_like(image), np.empty_like(image), np.empty_like(image)
    left[:, 1:], above[1:], corner[1:, 1:] = image[:, :-1], image[:-1], image[:-1, :-1]
    left[0, 0] = above[0, 0] = corner[0, 0] = 128
    above[0, 1:] = corner[0, 1:] = left[0, 1:]
    left[1:, 0] = corner[1:, 0] = above[1:, 0]
    low, high = np.minimum(left, above), np.maximum(left, above)
    return np.where(corner >= high, low, np.where(corner <= low, high, left + above - corner))


def _unmed(residual: np.ndarray) -> np.ndarray:
    """The image whose values are (_med's prediction + residual) mod 256, rebuilt value by value."""
    h, w, c = residual.shape
    res = residual.tolist()
    out = [[[0] * c for _ in range(w)] for _ in range(h)]
    for i in range(h):
        for j in range(w):
            for k in range(c):
                if i == 0:
                    guess = 128 if j == 0 else out[0][j - 1][k]
                elif j == 0:
                    guess = out[i - 1][0][k]
                else:
                    a, b, corner = out[i][j - 1][k], out[i - 1][j][k], out[i - 1][j - 1][k]
                    guess = min(a, b) if corner >= max(a, b) else max(a, b) if corner <= min(a, b) else a + b - corner
                out[i][j][k] = (guess + res[i][j][k]) % 256
    return np.array(out, dtype=np.int64)


def _scale_index(residual: np.ndarray) -> int:
    """The DIRECT_SCALES entry nearest (in log) to the residuals' mean absolute value, Laplace's ML scale."""
    return int(np.abs(np.log2(DIRECT_SCALES / max(float(np.abs(residual).mean()), 0.25))).argmin())


def _laplace(index: int):
    return constriction.stream.model.QuantizedLaplace(-128, 127, 0.0, float(DIRECT_SCALES[index]))


def _cpu_float32(model: Jet) -> Jet:
    """The model itself when it is on the CPU in float32, else such a copy (the caller's is untouched)."""
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).to("cpu", torch.float32)
    return model


def _sha_bytes(sha: bytes | str) -> bytes:
    raw = bytes.fromhex(sha) if isinstance(sha, str) else bytes(sha)
    if len(raw) != 32:
        raise ValueError(f"a model sha256 is 32 bytes, got {len(raw)}")
    return raw


def _check_pixels(pixels: np.ndarray) -> None:
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        what = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise CompressError(f"expected an 8-bit RGB image (H, W, 3) uint8, got {what}")
    if not pixels.shape[0] or not pixels.shape[1]:
        raise CompressError(f"the image is empty ({pixels.shape[0]}x{pixels.shape[1]})")


def _digest(pixels: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).digest()[:16]


def _pack(header: Header) -> bytes:
    p = header.quantization
    return HEADER.pack(MAGIC, header.version, p.noise_bits, p.refine_bits, p.coarse_bits, header.model_sha256,
                       header.fingerprint, header.pixel_digest, header.height, header.width, *header.tile,
                       header.payload_bytes, 0)


def _with_crc(data: bytes) -> bytes:
    return data[:CRC_OFFSET] + struct.pack("<I", zlib.crc32(data)) + data[HEADER_SIZE:]


def _probe_pixels(count: int, h: int, w: int) -> np.ndarray:
    """Fixed probe tiles: smooth gradients plus hashed noise, from integer arithmetic only."""
    i, j, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    tiles_ = []
    for n in range(count):
        noise = (((i * 73856093) ^ (j * 19349663) ^ ((c + 3 * n) * 83492791)) % 61).astype(np.int64)
        tiles_.append(((i * 255 // max(1, h - 1) + j * (n + 1) * 5 + c * 40 + noise) % 256).astype(np.uint8))
    return np.stack(tiles_)


def _probe_words(count: int) -> np.ndarray:
    """Fixed stack contents for the probe: a 32-bit LCG's outputs."""
    out, state = [], 12345
    for _ in range(count):
        state = (1664525 * state + 1013904223) % (1 << 32)
        out.append(state)
    return np.array(out, dtype=np.uint32)
