"""visualize_attention.py: the maps of a real image (per head, all heads, masks), with or without
matplotlib; bad input, and an output folder it cannot write, are one line, before or during
the writing of the PNGs."""
import errno
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import storage
import vision_transformer as vits
import visualize_attention


def run(fmnist_folder, out, capsys):
    image = next((fmnist_folder / "train").rglob("*.png"))
    with pytest.raises(SystemExit) as exc:
        visualize_attention.main(["--arch", "vit_nano", "--patch_size", "8", "--image_path",
                                  str(image), "--image_size", "32", "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_read_only_output_folder_is_one_line(fmnist_folder, tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):  # what a read-only folder does, also to root
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(storage.tempfile, "mkstemp", read_only)
    err = run(fmnist_folder, tmp_path / "ro", capsys)
    assert err.startswith("error: cannot write to --output_dir") and "Permission denied" in err


def test_a_write_failing_mid_way_is_one_line(fmnist_folder, tmp_path, capsys, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    err = run(fmnist_folder, tmp_path / "out", capsys)
    assert "cannot write to --output_dir" in err and "No space left on device" in err


# --------------------------------------------------------------------------- attention maps


def test_visualize_attention_on_a_real_image(nano_checkpoint, fmnist_folder, tmp_path, capsys):
    ckpt_path, _ = nano_checkpoint
    image = next((fmnist_folder / "val").rglob("*.png"))
    out = tmp_path / "attn"
    visualize_attention.main(["--pretrained_weights", str(ckpt_path), "--image_path", str(image),
                              "--image_size", "30", "--output_dir", str(out)])
    assert "vit_nano/4" in capsys.readouterr().out  # arch and patch size from the checkpoint
    heads = vits.VIT_ARCHS["vit_nano"][2]
    expected = ["img.png", "attn-all.png", "attn-heads-colour.png"] + [
        f"{kind}-head{i}.png" for i in range(heads) for kind in ("attn", "mask")]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    # 30 px is cropped to 28 (a multiple of the 4 px patch); every map has the image's size.
    for name in expected[:1] + expected[2:]:
        assert Image.open(out / name).size == (28, 28)
    assert Image.open(out / "attn-all.png").size[1] == 28
    # A head's heat-map is not the plain image: the attention is drawn over it.
    img = np.asarray(Image.open(out / "img.png"), dtype=float)
    assert np.abs(np.asarray(Image.open(out / "attn-head0.png"), dtype=float) - img).mean() > 5


def test_visualize_attention_random_init_without_weights(fmnist_folder, tmp_path, capsys):
    image = next((fmnist_folder / "train").rglob("*.png"))
    visualize_attention.main(["--arch", "vit_nano", "--patch_size", "8", "--image_path",
                              str(image), "--image_size", "32", "48", "--output_dir",
                              str(tmp_path)])
    assert "random initialisation" in capsys.readouterr().out
    assert Image.open(tmp_path / "attn-head3.png").size == (48, 32)  # (W, H)


def test_mass_threshold_masks_keep_the_fewest_patches_holding_the_mass():
    torch.manual_seed(0)
    attn = torch.rand(3, 5, 6) ** 4
    attn = attn / attn.sum(dim=(1, 2), keepdim=True)
    for threshold in (0.3, 0.6, 0.9):
        masks = visualize_attention.mass_threshold_masks(attn, threshold)
        for head in range(3):
            kept = attn[head][masks[head]]
            assert kept.sum() >= threshold  # enough mass
            assert kept.sum() - kept.min() < threshold  # and no patch to spare
            assert kept.min() >= attn[head][~masks[head]].max()  # the largest ones


def test_colour_map_works_without_matplotlib(monkeypatch):
    values = np.linspace(0, 1, 11).reshape(1, 11)
    with_mpl = visualize_attention.colorize(values)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    fallback = visualize_attention.colorize(values)
    assert fallback.shape == with_mpl.shape == (1, 11, 3) and fallback.dtype == np.uint8
    np.testing.assert_array_equal(fallback[0, 0], visualize_attention._RAMP[0])
    np.testing.assert_array_equal(fallback[0, -1], visualize_attention._RAMP[-1])
    assert (np.diff(fallback[0].astype(int).sum(axis=1)) > 0).all()  # brighter as values grow


def test_visualize_attention_bad_input_is_one_line(tmp_path, fmnist_folder, capsys):
    image = next((fmnist_folder / "train").rglob("*.png"))
    cases = [
        (["--image_path", str(tmp_path / "missing.jpg")], "cannot read image"),
        (["--image_path", str(image), "--arch", "resnet18"], "no self-attention"),
        (["--image_path", str(image), "--threshold", "1.5"], "--threshold"),
        (["--image_path", str(image), "--image_size", "2"], "smaller than one"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            visualize_attention.main(["--output_dir", str(tmp_path / "out"), "--arch", "vit_nano",
                                      "--patch_size", "4", *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
