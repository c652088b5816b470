"""Training data: every source format, the restricted CIFAR unpickler, crops, flips and the val split."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from jetcli.images import ImageError
from jetcli.data import (DataError, ImageSet, Stream, dequantize, item_keys, load_cifar_batch, load_datasets,
                         load_images, noise)
from jetcli.likelihood import BIN, to_model_space

RNG = np.random.default_rng(0)


def images(n, h=8, w=8):
    return RNG.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def chw_rows(x: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> (N, 3*H*W) rows in CHW order, the CIFAR/ImageNet batch layout."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), -1))


# --------------------------------------------------------------------------- image folders
def test_folder_is_searched_recursively_and_modes_become_rgb(tmp_path):
    y, x = np.mgrid[0:8, 0:8]
    rgb = np.stack([x * 30, y * 30, np.full_like(x, 128)], axis=-1).astype(np.uint8)  # smooth, for JPEG
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(rgb).save(tmp_path / "1.png")
    Image.fromarray(rgb).save(tmp_path / "a" / "2.webp", lossless=True)
    Image.fromarray(rgb).save(tmp_path / "a" / "b" / "3.tiff")
    Image.fromarray(rgb).save(tmp_path / "a" / "4.jpg", quality=95)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "a" / "b" / "5_grey.png")  # L
    rgba = np.concatenate([rgb, np.full_like(rgb[..., :1], 255)], axis=-1)  # opaque
    Image.fromarray(rgba).save(tmp_path / "6_rgba.png")
    (tmp_path / "notes.txt").write_text("not an image")

    loaded = load_images(str(tmp_path))
    assert len(loaded) == 6
    by_name = dict(zip(["1", "6_rgba", "2", "4", "3", "5_grey"], loaded))  # sorted by path
    for name in ("1", "2", "3"):  # lossless formats give the pixels back
        np.testing.assert_array_equal(by_name[name], rgb)
    assert np.abs(by_name["4"].astype(int) - rgb).mean() < 10  # JPEG: close (random pixels: ~85)
    np.testing.assert_array_equal(by_name["5_grey"], np.repeat(rgb[..., :1], 3, axis=-1))  # grey copied
    np.testing.assert_array_equal(by_name["6_rgba"], rgb)  # opaque alpha dropped
    assert all(im.dtype == np.uint8 and im.shape == (8, 8, 3) for im in loaded)


def test_images_read_rgb_refuses_stop_the_load(tmp_path):
    """Folders follow jetcli.images' policy: a 16-bit image is refused, not silently clipped."""
    Image.fromarray(images(1)[0]).save(tmp_path / "ok.png")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(ImageError, match="deep.png"):
        load_images(str(tmp_path))


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no images"):
        load_images(str(tmp_path))
    with pytest.raises(DataError, match="no such file"):
        load_images(str(tmp_path / "missing"))
    Image.fromarray(images(1, 8, 8)[0]).save(tmp_path / "a.png")
    Image.fromarray(images(1, 8, 12)[0]).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="crop"):
        ImageSet(load_images(str(tmp_path)))
    with pytest.raises(DataError, match="larger than an image"):
        ImageSet(load_images(str(tmp_path)), crop=10)


# --------------------------------------------------------------------------- arrays
def test_npy_npz_and_chw_rows(tmp_path):
    x = images(5)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", train_images=x, other=x[:2])
    np.savez(tmp_path / "rows.npz", data=chw_rows(x))
    np.testing.assert_array_equal(load_images(str(tmp_path / "x.npy")), x)
    np.testing.assert_array_equal(load_images(str(tmp_path / "x.npz")), x)
    np.testing.assert_array_equal(load_images(f"{tmp_path / 'x.npz'}:other"), x[:2])
    np.testing.assert_array_equal(load_images(str(tmp_path / "rows.npz")), x)
    np.save(tmp_path / "f.npy", x.astype(np.float32))
    with pytest.raises(DataError, match="expected uint8"):
        load_images(str(tmp_path / "f.npy"))
    with pytest.raises(DataError, match="no array"):
        load_images(f"{tmp_path / 'x.npz'}:nope")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match="not a readable"):
        load_images(str(tmp_path / "bad.npz"))


def test_downsampled_imagenet_batches(tmp_path):
    """Chrabaszcz et al.: train_data_batch_N.npz with 'data' (N, 3*S*S) CHW rows, 'labels', 'mean'."""
    parts = [images(3, 16, 16), images(2, 16, 16), images(4, 16, 16)]
    folder = tmp_path / "Imagenet16_train_npz"
    folder.mkdir()
    for i, part in zip((1, 2, 10), parts):  # natural order: 10 comes last
        np.savez(folder / f"train_data_batch_{i}.npz", data=chw_rows(part), labels=list(range(1, len(part) + 1)),
                 mean=np.zeros(3 * 16 * 16))
    np.savez(tmp_path / "val_data.npz", data=chw_rows(parts[0]), labels=[1, 2, 3])
    np.testing.assert_array_equal(load_images(str(folder)), np.concatenate(parts))
    np.testing.assert_array_equal(load_images(str(folder / "train_data_batch_2.npz")), parts[1])
    np.testing.assert_array_equal(load_images(str(tmp_path / "val_data.npz")), parts[0])


# --------------------------------------------------------------------------- CIFAR-10 pickles
class Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2 wrote the CIFAR-10 batches: str as BINSTRING, numpy.core globals."""

    def save_bytes(self, obj):
        self.write((pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256
                    else pickle.BINSTRING + struct.pack("<i", len(obj))) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__name__}\n".encode())
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def cifar_batch(x: np.ndarray, style: str) -> bytes:
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3] * len(x), b"data": chw_rows(x),
             b"filenames": [b"x.png"] * len(x)}
    if style == "py2":
        import io
        buffer = io.BytesIO()
        Py2Pickler(buffer, protocol=2).dump(batch)
        return buffer.getvalue()
    return pickle.dumps(batch, protocol=2 if style == "py3-protocol-2" else 4)


@pytest.mark.parametrize("style", ["py2", "py3-protocol-2", "py3-protocol-4"])
def test_cifar_batch_file(tmp_path, style):
    x = images(4, 32, 32)
    (tmp_path / "data_batch_1").write_bytes(cifar_batch(x, style))
    np.testing.assert_array_equal(load_images(str(tmp_path / "data_batch_1")), x)


def test_cifar_folder_takes_the_training_batches(tmp_path):
    parts = [images(2, 32, 32) for _ in range(3)]
    for name, part in zip(("data_batch_1", "data_batch_2", "test_batch"), parts):
        (tmp_path / name).write_bytes(cifar_batch(part, "py2"))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"cat"]}, protocol=2))
    np.testing.assert_array_equal(load_images(str(tmp_path)), np.concatenate(parts[:2]))


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(marker)}, protocol=2))
    with pytest.raises(DataError, match="refused"):
        load_cifar_batch(tmp_path / "data_batch_1")
    assert not marker.exists()
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": [1, 2, 3]}, protocol=2))
    with pytest.raises(DataError, match="no 'data' array"):
        load_cifar_batch(tmp_path / "data_batch_2")


# --------------------------------------------------------------------------- crops, flips, split
def photos(sizes):
    """Photos whose red channel is the photo's id and green channel the column (to see crops and flips)."""
    out = []
    for i, (h, w) in enumerate(sizes):
        im = np.zeros((h, w, 3), np.uint8)
        im[..., 0] = i
        im[..., 1] = np.arange(w)
        im[..., 2] = np.arange(h)[:, None]
        out.append(im)
    return out


@pytest.mark.parametrize("flip", [False, True])
def test_crops_flips_and_split_by_whole_image(flip):
    sizes = [(20 + i % 5, 24 + 3 * (i % 4)) for i in range(12)]
    train, val = ImageSet(photos(sizes), crop=8, flip=flip).split(0.25, seed=3)
    assert (len(train), len(val)) == (9, 3) and val.flip is False and train.flip is flip
    train_ids = {int(train.image(i)[0, 0, 0]) for i in range(len(train))}
    val_ids = {int(val.image(i)[0, 0, 0]) for i in range(len(val))}
    assert not train_ids & val_ids and len(train_ids | val_ids) == 12
    n, flipped, unflipped, corners = 300, 0, 0, set()
    crops = Stream(train, seed=0).pixels(torch.arange(n)).numpy()
    assert crops.shape == (n, 8, 8, 3)
    for crop in crops:
        assert int(crop[0, 0, 0]) in train_ids and (crop[..., 0] == crop[0, 0, 0]).all()  # no val pixel
        cols, rows = crop[0, :, 1].astype(int), crop[:, 0, 2].astype(int)
        assert (np.diff(rows) == 1).all()  # a contiguous window
        flipped += (np.diff(cols) == -1).all()
        unflipped += (np.diff(cols) == 1).all()
        corners.add((int(crop[0, 0, 0]), int(rows[0]), int(min(cols))))
    assert flipped + unflipped == n and (100 < flipped < 200 if flip else flipped == 0)
    assert len(corners) > 200  # crops at many places
    # Validation crops are fixed per image and never flipped.
    val_crops = Stream(val, 0, "val", shuffle=False).pixels(torch.arange(3)).numpy()
    assert all((np.diff(c[0, :, 1].astype(int)) == 1).all() for c in val_crops)
    assert np.array_equal(val_crops, Stream(val, 0, "val", shuffle=False).pixels(torch.arange(3)).numpy())


def test_uniform_arrays_crop_and_flip_like_numpy_slicing():
    """The vectorised gather against plain slicing, for a C-contiguous array and a strided CHW view."""
    x = images(6, 12, 10)
    chw = chw_rows(images(6, 12, 12)).reshape(6, 3, 12, 12).transpose(0, 2, 3, 1)
    for array in (x, chw):
        stream = Stream(ImageSet(array, crop=8, flip=True), seed=4)
        positions = torch.arange(40)
        got = stream.pixels(positions).numpy()
        tops, lefts, mirrored = set(), set(), 0
        for crop, index in zip(got, stream.indices(positions).tolist()):
            image = array[index]
            windows = [(t, l, m) for t in range(image.shape[0] - 7) for l in range(image.shape[1] - 7)
                       for m in (False, True)
                       if np.array_equal(crop, image[t:t + 8, l:l + 8][:, ::-1] if m else image[t:t + 8, l:l + 8])]
            assert windows, "not a crop of its image"
            tops.add(windows[0][0]), lefts.add(windows[0][1])
            mirrored += windows[0][2]
        assert len(tops) > 2 and len(lefts) > 2 and 5 < mirrored < 35
    whole = Stream(ImageSet(x), seed=4)
    assert np.array_equal(whole.pixels(torch.arange(6)).numpy(), x[whole.indices(torch.arange(6)).numpy()])


def test_batches_are_a_pure_function_of_position():
    data = ImageSet(images(10, 8, 8))
    stream = Stream(data, seed=5)
    whole = stream.batch(torch.arange(16, 24))
    halves = [Stream(data, seed=5).batch(torch.arange(f, f + 4)) for f in (16, 20)]
    assert torch.equal(whole, torch.cat(halves))
    assert not torch.equal(whole, Stream(data, seed=6).batch(torch.arange(16, 24)))
    # An epoch visits every image once; the next epoch in another order.
    first, second = stream.indices(torch.arange(10)), stream.indices(torch.arange(10, 20))
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)


def test_batch_is_the_reference_dequantisation_of_hashed_noise():
    """batch = likelihood.to_model_space(pixels) + u * BIN with u = noise(...): the device path's pieces."""
    stream = Stream(ImageSet(images(40, 8, 8), crop=6, flip=True), seed=2**40 + 3)
    positions = torch.arange(100, 137)  # more than one CHUNK, and an epoch boundary
    u = noise(stream.seed, positions, (6, 6, 3))
    assert torch.equal(u, stream.noise(positions))
    expected = to_model_space(stream.pixels(positions)) + u * BIN
    assert torch.equal(stream.batch(positions), expected)
    assert torch.equal(dequantize(stream.pixels(positions), u), expected)
    assert torch.equal(stream.batch(positions, draw=0), expected)
    assert not torch.equal(stream.batch(positions, draw=1), expected)


def lowbias32(x: np.ndarray) -> np.ndarray:
    """The hash in unsigned numpy arithmetic (well defined wrap-around), as its author writes it."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x21F0AAAD)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x735A2D97)
    x ^= x >> np.uint32(15)
    return x


def test_noise_is_lowbias32_of_counters_and_uniform():
    seed, positions = 7, torch.tensor([0, 1, 5, 2**33 + 9])
    keys = lowbias32(np.full(4, 2 * 0x9E3779B9 % 2**32))  # the "val" stream's constant
    for word in (seed, 0, positions.numpy() >> 32, positions.numpy() & 0xFFFFFFFF):
        keys = lowbias32(keys + np.asarray(word, dtype=np.uint64).astype(np.uint32))
    assert np.array_equal(item_keys(seed, positions, "val").numpy().view(np.uint32), keys)
    noise_keys = lowbias32(keys + np.uint32(3 * 0x9E3779B9 % 2**32))
    counters = (np.arange(12, dtype=np.uint64) * 0x9E3779B9 % 2**32).astype(np.uint32)
    bits = lowbias32(noise_keys[:, None] + counters) & np.uint32(2**24 - 1)
    u = noise(seed, positions, (2, 2, 3), stream="val")
    assert np.array_equal(u.numpy().reshape(4, 12), bits.astype(np.float32) / 2**24)
    many = noise(0, torch.arange(64), (32, 32, 3)).flatten()
    assert 0 <= many.min() and many.max() < 1 and abs(many.mean().item() - 0.5) < 0.002
    assert abs(many.var().item() - 1 / 12) < 0.001 and many.unique().numel() > 0.99 * many.numel()


def test_memory_mapped_npy_is_not_read_whole(tmp_path):
    x = images(50, 8, 8)
    np.save(tmp_path / "x.npy", x)
    loaded = load_images(str(tmp_path / "x.npy"))
    assert not loaded.flags.owndata and np.array_equal(loaded, x)
    train, val = load_datasets(str(tmp_path / "x.npy"), val_fraction=0.2)
    stream = Stream(train, seed=1)
    ImageSet.RELEASE_BYTES, before = 64, ImageSet.RELEASE_BYTES  # exercise the page release
    try:
        got = stream.pixels(torch.arange(80)).numpy()
    finally:
        ImageSet.RELEASE_BYTES = before
    assert np.array_equal(got, x[train.members[stream.indices(torch.arange(80)).numpy()]])


def test_load_datasets_val_sources(tmp_path):
    np.save(tmp_path / "train.npy", images(10))
    np.save(tmp_path / "val.npy", images(3))
    np.save(tmp_path / "big.npy", images(3, 16, 16))
    train, val = load_datasets(str(tmp_path / "train.npy"), str(tmp_path / "val.npy"))
    assert (len(train), len(val), train.image_size) == (10, 3, (8, 8))
    train, val = load_datasets(str(tmp_path / "train.npy"), val_fraction=0.3)
    assert (len(train), len(val)) == (7, 3)
    train_rows = {train.image(i).tobytes() for i in range(len(train))}
    assert not any(val.image(i).tobytes() in train_rows for i in range(len(val)))
    with pytest.raises(DataError, match="validation images are"):
        load_datasets(str(tmp_path / "train.npy"), str(tmp_path / "big.npy"))
    with pytest.raises(DataError, match="between 0 and 1"):
        load_datasets(str(tmp_path / "train.npy"), val_fraction=1.5)


def test_the_table_other_devices_read_holds_the_cpus_values():
    """Off the CPU, model_space reads a table the CPU computed (a GPU's x / 127.5 rounds otherwise)."""
    from jetcli.data import _model_space_table
    pixels = torch.randint(0, 256, (5, 4, 4, 3), dtype=torch.uint8)
    looked_up = torch.index_select(_model_space_table("cpu"), 0, pixels.reshape(-1).int()).view(pixels.shape)
    assert torch.equal(looked_up, to_model_space(pixels))
