"""export.py: results of other weights refused, existing files kept unless --force, only its
own files replaced in a folder, a full disk as one line."""
import json

import pytest
import safetensors
import safetensors.torch
import torch

import export
import checkpoints
import vision_transformer as vits
from test_export_folder import one_line_error, run_export


def pico_weights(path, seed):
    torch.manual_seed(seed)
    model, _ = vits.build_backbone("vit_pico", 7, img_size=28)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def two_checkpoints(tmp_path):
    return pico_weights(tmp_path / "a.pth", 0), pico_weights(tmp_path / "b.pth", 1)


def knn_results(path, checkpoint, **extra):
    info = checkpoints.build_backbone_from_checkpoint(checkpoint)[2]
    results = {"k=20": {"top1": 40.0, "top5": 80.0}, "num_train": 300, "num_val": 100,
               "num_classes": 10, "top5_is_top": 5, "checkpoint": str(checkpoint),
               "checkpoint_key": "teacher", "arch": "vit_pico",
               "weights_sha256": info["weights_sha256"], **extra}
    path.write_text(json.dumps(results))
    return path


def test_results_of_another_checkpoint_are_refused(two_checkpoints, tmp_path, capsys):
    a, b = two_checkpoints
    results = knn_results(tmp_path / "knn_results.json", a)
    argv = ["--checkpoint", b, "--format", "timm_folder", "--out", tmp_path / "folder",
            "--knn_results", results]
    assert "holds results of other weights" in one_line_error(argv, capsys)
    assert not (tmp_path / "folder").exists()
    # The same weights, read from another file (an export of a), are accepted.
    export.export(str(a), str(tmp_path / "a_export.pth"))
    run_export(["--checkpoint", tmp_path / "a_export.pth", "--format", "timm_folder", "--out",
                tmp_path / "folder", "--knn_results", results], capsys)
    assert "| 20 | 40.00 | 80.00 |" in (tmp_path / "folder" / "README.md").read_text()


def test_results_without_a_weights_hash_are_refused(two_checkpoints, tmp_path, capsys):
    a, _ = two_checkpoints
    results = knn_results(tmp_path / "knn_results.json", a)
    data = json.loads(results.read_text())
    del data["weights_sha256"]
    results.write_text(json.dumps(data))
    err = one_line_error(["--checkpoint", a, "--format", "timm_folder", "--out", tmp_path / "f",
                          "--knn_results", results], capsys)
    assert "does not record which weights it evaluated" in err


@pytest.mark.parametrize("name", ["model.pth", "model.safetensors"])
def test_an_existing_file_is_overwritten_only_with_force(two_checkpoints, tmp_path, capsys, name):
    a, _ = two_checkpoints
    out = tmp_path / name
    out.write_text("my thesis")
    assert "exists: name a new file, or pass --force" in one_line_error(
        ["--checkpoint", a, "--out", out], capsys)
    assert out.read_text() == "my thesis"
    run_export(["--checkpoint", a, "--out", out, "--force"], capsys)
    state, _ = checkpoints.read_checkpoint_backbone(out)
    assert torch.equal(state["cls_token"], torch.load(a, weights_only=True)["cls_token"])


def test_force_on_a_folder_replaces_only_the_exports_files(two_checkpoints, tmp_path, capsys):
    a, b = two_checkpoints
    out = tmp_path / "folder"
    run_export(["--checkpoint", a, "--format", "timm_folder", "--out", out], capsys)
    (out / "my_notes.md").write_text("keep me")
    (out / "eval").mkdir()
    (out / "eval" / "knn_results.json").write_text("{}")
    run_export(["--checkpoint", b, "--format", "timm_folder", "--out", out, "--force"], capsys)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "eval",
                                                     "model.safetensors", "my_notes.md"]
    assert (out / "my_notes.md").read_text() == "keep me"
    state, _ = checkpoints.read_checkpoint_backbone(out / "model.safetensors")
    assert torch.equal(state["cls_token"], torch.load(b, weights_only=True)["cls_token"])


def full_disk_save_file(*args, **kwargs):
    # What safetensors' Rust writer raises on a full disk (no errno, no OSError).
    raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: '
                                      'StorageFull, message: "No space left on device" })')


@pytest.mark.parametrize("folder", [False, True])
def test_a_full_disk_is_one_line(two_checkpoints, tmp_path, capsys, monkeypatch, folder):
    a, _ = two_checkpoints
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk_save_file)
    argv = (["--format", "timm_folder", "--out", tmp_path / "f"] if folder
            else ["--out", tmp_path / "m.safetensors"])
    err = one_line_error(["--checkpoint", a, *argv], capsys)
    assert "no space left on device while writing" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pth", "b.pth"]  # nothing left behind
