"""jetcli.compress: bits-back files that decode to the exact pixels, sized by the bpd, and refused with
one line when they cannot be decoded here. Tiny models (8x8 tiles), tiny images: the whole file runs in
seconds."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jetcli import compress as C
from jetcli.config import JetConfig
from jetcli.scoring import score_image
from jetcli.testing import random_jet

CONFIG = JetConfig(image_size=(8, 8), patch_size=2, couplings=4, block_depth=1, width=32, heads=2, mlp_ratio=2)
SHA = hashlib.sha256(b"tiny").hexdigest()


@pytest.fixture(scope="module")
def model():
    return random_jet(CONFIG, seed=1, strength=0.5)


@pytest.fixture(scope="module")
def other():
    return random_jet(CONFIG, seed=2, strength=0.5)


def smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photo-like image: gradients plus a little noise."""
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    base = np.stack([i * 3 + j, 200 - 2 * i + j, 60 + i + 2 * j], axis=-1)
    return np.clip(base + rng.integers(-6, 7, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def packed(model):
    """A compressed 20x13 image (any size: padded to 24x16, 6 tiles) and its pixels."""
    pixels = smooth(20, 13)
    result = C.compress(model, pixels, SHA)
    assert any(result.steps)  # some tiles go through the flow (the rest are coded directly)
    return result, pixels


def with_crc(data: bytes) -> bytes:
    """`data` with a valid crc32 (what a deliberate forger would write)."""
    return data[:C.CRC_OFFSET] + struct.pack("<I", zlib.crc32(data[:C.CRC_OFFSET] + bytes(4) + data[C.HEADER_SIZE:])) \
        + data[C.HEADER_SIZE:]


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("size", [(1, 1), (8, 8), (7, 13), (17, 9), (33, 40)])
def test_any_size_round_trips_exactly(model, size):
    for pixels in (smooth(*size, seed=size[0]), np.random.default_rng(size[1]).integers(0, 256, (*size, 3), np.uint8)):
        result = C.compress(model, pixels, SHA)
        assert np.array_equal(C.decompress(model, result.data, SHA), pixels)
        header = C.read_header(result.data)
        assert (header.height, header.width, header.tile) == (*size, (8, 8))
        assert len(result.data) == C.HEADER_SIZE + result.payload_bits // 8


def test_extreme_images_round_trip(model):
    for pixels in (np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 255, np.uint8),
                   (np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)):
        assert np.array_equal(C.decompress(model, C.compress(model, pixels, SHA).data, SHA), pixels)


@pytest.mark.parametrize("quantization", [C.Quantization(1, 4, 1), C.Quantization(6, 10, 9)])
def test_the_header_carries_the_quantization(model, quantization):
    pixels = smooth(24, 20, seed=3)
    data = C.compress(model, pixels, SHA, quantization=quantization).data
    assert C.read_header(data).quantization == quantization
    assert np.array_equal(C.decompress(model, data, SHA), pixels)


def test_compression_is_deterministic(model, packed):
    result, pixels = packed
    assert C.compress(model, pixels, SHA).data == result.data


def test_extreme_couplings_round_trip():
    """Latents beyond the prior's range (escapes) and scales below the floor (clamped) still code."""
    far = random_jet(CONFIG, seed=3)
    with torch.no_grad():
        for coupling in far.couplings:
            half = coupling.vit.final_proj.bias.shape[0] // 2
            coupling.vit.final_proj.bias[:half] = 60.0  # bias: pushes latents out to ~60 sigma and more
            coupling.vit.final_proj.bias[half:half + 3] = -40.0  # raw scale: sigmoid ~ 4e-18
    pixels = smooth(16, 16)
    result = C.compress(far, pixels, SHA)
    assert any(result.steps) and np.array_equal(C.decompress(far, result.data, SHA), pixels)


# --------------------------------------------------------------------------- sizes
def test_size_tracks_the_bpd(model):
    """Without the fixed start-up cost, the bits equal the model's bpd of the padded tiles (noise
    integrated by Monte Carlo, as jet bpd does) to within 1%; the file adds only that fixed cost."""
    pixels = smooth(60, 62, seed=5)  # padded to 64x64: 64 tiles
    reference = score_image(model, pixels, samples=8).bpd * pixels.size  # what jet bpd reports, in bits
    steady = C.steady_bits(model, pixels)
    assert abs(steady / reference - 1) < 0.01, (steady, reference)
    overhead = C.compress(model, pixels, SHA).payload_bits - steady
    assert abs(overhead) < 2 * 12 * 8 * 8 * 3  # start-up: of the order of one tile's noise and expansion


def test_coding_order_follows_the_stack(model):
    """Tiles are coded directly while the stack is too thin to take bits back from, then in ViT batches
    as large as the stack can pay for, up to GROUP_MAX; the order travels in the stream."""
    result = C.compress(model, smooth(96, 96, seed=7), SHA)  # 144 tiles
    steps = result.steps
    assert sum(max(1, s) for s in steps) == result.tiles == 144 and all(0 <= s <= C.GROUP_MAX for s in steps)
    direct = steps.index(1)
    assert direct >= 1 and set(steps[:direct]) == {0} and 0 not in steps[direct:]  # the stack only grows
    assert max(steps) == C.GROUP_MAX and list(steps[direct:steps.index(C.GROUP_MAX)]) == sorted(
        steps[direct:steps.index(C.GROUP_MAX)])


def test_direct_tiles_round_trip():
    coder = C._Coder.__new__(C._Coder)
    coder.tile = (8, 8)
    rng = np.random.default_rng(4)
    for tile in (rng.integers(0, 256, (8, 8, 3), np.uint8), smooth(8, 8), np.full((8, 8, 3), 255, np.uint8)):
        stack = C._Stack()
        coder.push_direct(stack, tile)
        assert np.array_equal(coder.pop_direct(stack), tile) and stack.coder.is_empty()


# --------------------------------------------------------------------------- refusals
def test_zero_byte_file_is_refused(model):
    with pytest.raises(C.CompressError, match="empty file"):
        C.decompress(model, b"", SHA)


def test_other_files_are_refused(model):
    for data in (b"\x89PNG\r\n\x1a\n" + bytes(100), b"JE", b"hello world" * 20):
        with pytest.raises(C.CompressError, match="not a jet compressed file|truncated"):
            C.decompress(model, data, SHA)


def test_every_truncation_is_refused(model, packed):
    data = packed[0].data
    for length in [*range(1, C.HEADER_SIZE + 8), *range(C.HEADER_SIZE + 8, len(data), 7), len(data) - 1]:
        with pytest.raises(C.CompressError, match="truncated"):
            C.decompress(model, data[:length], SHA)
    with pytest.raises(C.CompressError, match="after the end"):
        C.decompress(model, data + b"\0\0\0\0", SHA)


def test_corrupted_bytes_are_refused(model, packed):
    data = packed[0].data
    rng = np.random.default_rng(0)
    for position in [5, 9, 50, 72, 84, *rng.integers(C.HEADER_SIZE, len(data), 20)]:
        bad = bytearray(data)
        bad[position] ^= 1 << int(rng.integers(8))
        with pytest.raises(C.CompressError, match="damaged|truncated"):
            C.decompress(model, bytes(bad), SHA)


def test_forged_payloads_never_decode_to_wrong_pixels(model, packed):
    """A payload altered *with* a valid checksum is refused by the decoder itself (garbage symbols, left
    over data, or the pixel digest), never returned as different pixels."""
    data = packed[0].data
    rng = np.random.default_rng(1)
    for _ in range(12):
        bad = bytearray(data)
        position = int(rng.integers(C.HEADER_SIZE, len(data)))
        bad[position] ^= 1 << int(rng.integers(8))
        with pytest.raises(C.CompressError, match="does not decode|fail the file's checksum"):
            C.decompress(model, with_crc(bytes(bad)), SHA)


def test_file_of_another_model_is_refused(model, other, packed):
    data = packed[0].data
    other_sha = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(C.CompressError, match="another model"):
        C.decompress(other, data, other_sha)
    # the same sha256 but other weights (a stand-in for other numerics): the fingerprint differs
    with pytest.raises(C.CompressError, match="computes the model differently"):
        C.decompress(other, data, SHA)


def test_header_from_the_future_is_refused(model, packed):
    data = bytearray(packed[0].data)
    data[4] = C.FORMAT_VERSION + 1
    for candidate in (bytes(data), with_crc(bytes(data))):
        with pytest.raises(C.CompressError, match=f"format version {C.FORMAT_VERSION + 1} by a newer jetcli"):
            C.decompress(model, candidate, SHA)


def test_header_of_an_older_format_is_refused(model, packed):
    """Format 1 coded the tiles in fixed groups: its words mean something else to this decoder."""
    data = bytearray(packed[0].data)
    data[4] = C.FORMAT_VERSION - 1
    with pytest.raises(C.CompressError, match="format version 1 by an older jetcli"):
        C.decompress(model, with_crc(bytes(data)), SHA)


def test_absurd_header_fields_are_refused(model, packed):
    data = packed[0].data
    for offset, fmt, value, message in [(72, "<I", 0, "invalid header"), (76, "<I", 1 << 31, "invalid header"),
                                         (5, "<B", 0, "unsupported quantization"), (80, "<H", 16, "16x8 tiles")]:
        bad = bytearray(data)
        struct.pack_into(fmt, bad, offset, value)
        with pytest.raises(C.CompressError, match=message):
            C.decompress(model, with_crc(bytes(bad)), SHA)


def test_other_numerics_are_refused_not_miscoded(model, packed, monkeypatch):
    """A machine whose ViT rounds its raw scales one ulp differently: refused by the fingerprint before
    decoding; and where a probe missed a difference, by the decoder's own checks, never wrong pixels."""
    data = packed[0].data
    network = C._Coder._network

    def other_rounding(self, coupling, x1):
        bias, raw = network(self, coupling, x1)
        return bias, np.nextafter(raw, np.float32(np.inf))

    monkeypatch.setattr(C._Coder, "_network", other_rounding)
    with pytest.raises(C.CompressError, match="computes the model differently"):
        C.decompress(model, data, SHA)

    def other_kernels(self, coupling, x1):
        bias, raw = network(self, coupling, x1)
        return bias, raw * np.float32(1 + 1e-4)

    monkeypatch.setattr(C._Coder, "_network", other_kernels)
    monkeypatch.setattr(C, "fingerprint", lambda *args: C.read_header(data).fingerprint)
    with pytest.raises(C.CompressError, match="does not decode|fail the file's checksum"):
        C.decompress(model, data, SHA)


def test_a_file_that_would_not_decode_is_never_returned(model, monkeypatch):
    decompress = C.decompress
    monkeypatch.setattr(C, "decompress", lambda *a, **k: decompress(*a, **k) ^ np.uint8(1))
    with pytest.raises(C.CompressError, match="does not decode to the same pixels"):
        C.compress(model, smooth(8, 8), SHA)


def test_bad_inputs_are_refused(model):
    for pixels, message in [(np.zeros((8, 8), np.uint8), "RGB"), (np.zeros((8, 8, 3), np.float32), "uint8"),
                            (np.zeros((0, 8, 3), np.uint8), "empty")]:
        with pytest.raises(C.CompressError, match=message):
            C.compress(model, pixels, SHA)


# --------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, other):
    from jetcli import checkpoints
    root = tmp_path_factory.mktemp("compress")
    checkpoints.save(model, root / "model")
    checkpoints.save(other, root / "other")
    for name, size in {"a.png": (20, 13), "b.png": (8, 8)}.items():
        Image.fromarray(smooth(*size, seed=size[0])).save(root / name)
    return root


def jet(*args, input=None):
    from typer.testing import CliRunner

    from jetcli.cli import app
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def test_cli_compress_decompress_round_trip(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = jet("compress", saved / "a.png", saved / "b.png", "-o", "packed/", "-m", saved / "model")
    assert result.exit_code == 0, result.output
    assert "round trip verified" in result.stderr and "bits per subpixel" in result.stderr
    result = jet("decompress", "packed/a.jetz", "packed/b.jetz", "-o", "back/", "-m", saved / "model")
    assert result.exit_code == 0, result.output
    for name in ("a", "b"):
        assert np.array_equal(np.asarray(Image.open(f"back/{name}.png")), np.asarray(Image.open(saved / f"{name}.png")))
    # stdin to stdout, and the same bytes as the file
    data = jet("compress", "-", "-m", saved / "model", input=(saved / "a.png").read_bytes()).stdout_bytes
    assert data == (tmp_path / "packed" / "a.jetz").read_bytes()


def test_cli_refusals_are_one_line_and_exit_2(saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert jet("compress", saved / "a.png", "-o", "a.jetz", "-m", saved / "model").exit_code == 0
    cases = [(("compress", saved / "a.png", "-o", "a.jetz"), "exists; pass --force"),
             (("decompress", "a.jetz", "-o", "a.png", "-m", saved / "other"), "another model"),
             (("decompress", "empty.jetz", "-o", "e.png"), "empty file"),
             (("decompress", "cut.jetz", "-o", "c.png"), "truncated")]
    Path("empty.jetz").write_bytes(b"")
    Path("cut.jetz").write_bytes(Path("a.jetz").read_bytes()[:200])
    for args, message in cases:
        result = jet(*args, *(() if "-m" in args else ("-m", saved / "model")))
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error:") and message in lines[-1] and "Traceback" not in result.output
        assert not Path(args[3]).exists() or args[3] == "a.jetz"
