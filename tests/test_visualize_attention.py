"""visualize_attention.py: an output folder it cannot write is one line, before or during the
writing of the PNGs."""
import errno

import pytest
from PIL import Image

import storage
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
