"""images.py: what counts as an image, decoding that names the bad file, high bit depths
scaled to 8 bits (not clipped) the same way in training and evaluation."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import images
from faults import ROOT


# --------------------------------------------------------------------------- decoding


def test_load_rgb_image_names_the_bad_file(tmp_path, fmnist_folder):
    good = next((fmnist_folder / "train").rglob("*.png"))
    assert images.load_rgb_image(str(good)).mode == "RGB"
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(images.BadImageError, match="broken.jpg"):
        images.load_rgb_image(str(bad))


# --------------------------------------------------------------------------- 16-bit images


def _png_16bit(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)  # Pillow writes mode I;16


def _ramp(low: float, high: float) -> np.ndarray:
    return np.linspace(low, high, 28 * 28).reshape(28, 28)


def _pgm_16bit(path: Path, values: np.ndarray) -> None:
    """Binary PGM with maxval 65535 (Pillow opens it as mode I)."""
    path.write_bytes(b"P5\n28 28\n65535\n" + values.astype(">u2").tobytes())


# name, writer, values, expected 8-bit values (computed here, independently of the code)
HIGH_BIT_DEPTH_CASES = {
    "png I;16": (_png_16bit, "x.png", np.rint(_ramp(0, 65535)), lambda v: np.rint(v / 257)),
    "tiff I;16B": (lambda p, v: Image.fromarray(v.astype(">u2")).save(p), "x.tif",
                   np.rint(_ramp(1000, 60000)), lambda v: np.rint(v / 257)),
    "pgm I": (_pgm_16bit, "x.pgm", np.rint(_ramp(0, 65535)), lambda v: np.rint(v / 257)),
    "tiff F in [0, 1]": (lambda p, v: Image.fromarray(v.astype(np.float32)).save(p), "x.tif",
                         _ramp(0.0, 1.0), lambda v: np.rint(v.astype(np.float32) * 255.0)),
    "tiff F out of range": (lambda p, v: Image.fromarray(v.astype(np.float32)).save(p), "x.tif",
                            _ramp(-3.0, 5.0), lambda v: np.rint((v + 3.0) / 8.0 * 255.0)),
    "tiff I beyond 16 bits": (lambda p, v: Image.fromarray(v.astype(np.int32)).save(p), "x.tif",
                              np.rint(_ramp(-100000, 300000)),
                              lambda v: np.rint((v + 100000) / 400000 * 255.0)),
}


@pytest.mark.parametrize("case", sorted(HIGH_BIT_DEPTH_CASES))
def test_high_bit_depth_images_are_scaled_to_8_bits_not_clipped(case, tmp_path):
    write, name, values, expected = HIGH_BIT_DEPTH_CASES[case]
    path = tmp_path / name
    write(path, values)
    rgb = np.asarray(images.load_rgb_image(str(path)))
    assert rgb.shape == (28, 28, 3) and rgb.dtype == np.uint8
    want = expected(values)
    for channel in range(3):
        # +-1: float32 rounding at .5 boundaries
        assert np.abs(rgb[..., channel].astype(int) - want).max() <= 1, case
    assert (rgb == 255).mean() < 0.01, f"{case}: saturated like a clipped 16-bit image"
    assert len(np.unique(rgb[..., 0])) > 200  # the ramp keeps its gradations


def test_training_and_evaluation_read_16bit_images_the_same_scaled_way(tmp_path):
    import data
    import evaluation

    values = np.rint(_ramp(0, 65535))
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            _png_16bit(tmp_path / split / cls / "x.png", values)
    want = np.rint(values / 257)
    pretrain = data.build_pretrain_dataset(str(tmp_path / "train"), transform=None)
    train, val = evaluation.build_train_val(str(tmp_path), np.asarray, np.asarray)
    for image in (np.asarray(pretrain[0][0]), train[0][0], val[1][0]):
        np.testing.assert_array_equal(image[..., 1], want)
    # visualize_attention reads its --image_path with the same loader
    assert "load_rgb_image(args.image_path)" in (ROOT / "visualize_attention.py").read_text()
