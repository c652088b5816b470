"""`jet prepare`: a folder of images to a uint8 .npy by area averaging, unreadable files skipped and
counted, a stopped run continued."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from jetcli.data import load_images
from jetcli.images import read_rgb
from jetcli.prepare import downsample, image_files, prepare

RNG = np.random.default_rng(0)


def run_cli(*args):
    from jetcli.cli import app
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def tree(tmp_path):
    """An ImageNet-style tree: class folders, photos of several shapes, a JPEG, a damaged file."""
    root = tmp_path / "train"
    for i, (cls, h, w) in enumerate([("n01", 32, 32), ("n01", 24, 40), ("n02", 40, 24), ("n02", 17, 23),
                                     ("n03", 64, 48), ("n03", 8, 8)]):
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    Image.fromarray(RNG.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(root / "n01" / "x.JPEG", quality=90)
    (root / "n02" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "n02" / "notes.txt").write_text("not an image")
    return root


def test_area_averaging_is_the_block_mean_and_non_square_images_are_squashed():
    image = RNG.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    small = downsample(image, 16).astype(int)  # 2x3 blocks: each output pixel is the mean of one
    means = image.reshape(16, 2, 16, 3, 3).mean(axis=(1, 3))
    assert small.shape == (16, 16, 3) and np.abs(small - means).max() <= 0.5 + 1e-9  # rounded mean
    centre = downsample(image, 16, center_crop=True).astype(int)
    assert np.abs(centre - image[:, 8:40].reshape(16, 2, 16, 2, 3).mean(axis=(1, 3))).max() <= 0.5 + 1e-9


def test_prepare_writes_sorted_downsampled_images_and_skips_unreadable(tree, tmp_path):
    out = tmp_path / "data.npy"
    result = run_cli("prepare", tree, "-o", out, "--size", "16", "--workers", "2")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "wrote 7 images of 16x16" in text and "skipped 1 unreadable: n02/broken.png" in text
    names = [n for n in image_files(tree) if "broken" not in n]
    expected = np.stack([downsample(read_rgb(tree / n), 16) for n in names])
    loaded = load_images(str(out))
    assert loaded.shape == (7, 16, 16, 3) and np.array_equal(loaded, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npy", "train"]  # no work files left
    result = run_cli("prepare", tree, "-o", out, "--size", "16")
    assert result.exit_code == 2 and "--force" in result.output
    assert run_cli("prepare", tree, "-o", tmp_path / "data.bin", "--size", "16").exit_code == 2
    result = run_cli("prepare", tmp_path / "missing", "-o", tmp_path / "x.npy", "--size", "16")
    assert result.exit_code == 2 and "not a folder" in result.output


def test_a_stopped_prepare_continues_where_it_was(tree, tmp_path):
    calls = []

    def stop_after_four(done, total):
        calls.append(done)
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(tree, tmp_path / "a.npy", 16, workers=2, progress=stop_after_four)
    assert not (tmp_path / "a.npy").exists() and (tmp_path / ".a.npy.status").exists()
    resumed = prepare(tree, tmp_path / "a.npy", 16, workers=2)
    assert resumed.resumed >= 4 and resumed.images == 7
    fresh = prepare(tree, tmp_path / "b.npy", 16, workers=2)
    assert fresh.resumed == 0
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    # Other settings start over instead of mixing sizes.
    with pytest.raises(KeyboardInterrupt):
        prepare(tree, tmp_path / "c.npy", 16, workers=2, progress=stop_after_four)
    assert prepare(tree, tmp_path / "c.npy", 8, workers=2).resumed == 0
    assert np.load(tmp_path / "c.npy").shape == (7, 8, 8, 3)
