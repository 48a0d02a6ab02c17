"""export.py: the exported file loads into timm with the teacher's features (also from a
checkpoint main_massl.py wrote); results of other weights refused, existing files kept unless
--force, only its own files replaced in a folder, a full disk as one line."""
import json
import sys

import pytest
import safetensors
import safetensors.torch
import timm
import torch
from PIL import Image

import checkpoints
import export
import plot_training
import vision_transformer as vits
import visualize_attention
from fabricated import PTH_AND_SAFETENSORS, features, fmnist_batch, needs, tiny_run_argv
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


# --------------------------------------------------------------------------- export -> timm


@pytest.mark.parametrize("suffix", PTH_AND_SAFETENSORS)
def test_export_loads_into_timm_with_the_teachers_features(
        vits16_checkpoint, fmnist_folder, tmp_path, capsys, no_network, suffix):
    ckpt_path, teacher = vits16_checkpoint
    out = tmp_path / f"vits16_teacher{suffix}"
    export.main(["--checkpoint", str(ckpt_path), "--out", str(out)])
    printed = capsys.readouterr().out
    assert f'timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=True, ' \
           f"pretrained_cfg_overlay=dict(file={str(out)!r}))" in printed

    # Exactly the README line.
    model = timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out)))
    x = fmnist_batch(fmnist_folder, 224)
    torch.testing.assert_close(features(model, x), features(teacher, x))

    if suffix == ".pth":
        state = torch.load(out, weights_only=True)
        assert set(state) == set(teacher.state_dict())  # no head, no prefixes, nothing else
        assert all(torch.is_tensor(v) for v in state.values())
    else:
        from safetensors import safe_open
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata()
        assert json.loads(meta["arch"]) == "vit_small" and json.loads(meta["patch_size"]) == 16


def test_export_student_differs_from_teacher(vits16_checkpoint, tmp_path):
    ckpt_path, teacher = vits16_checkpoint
    out = tmp_path / "student.pth"
    export.main(["--checkpoint", str(ckpt_path), "--checkpoint_key", "student", "--out", str(out)])
    student_state = torch.load(out, weights_only=True)
    assert student_state.keys() == teacher.state_dict().keys()
    assert not torch.equal(student_state["blocks.0.attn.qkv.weight"],
                           teacher.state_dict()["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("which,suffix,size", [
    ("nano_checkpoint", ".pth", 28),  # no timm registry name: timm's ViT class with our dims
    pytest.param("nano_checkpoint", ".safetensors", 28, marks=needs("safetensors")),
    ("vitt16_checkpoint", ".pth", 64),  # vit_tiny_patch16_224 with img_size=64
])
def test_export_printed_line_works_for_any_arch_and_crop_size(
        which, suffix, size, request, fmnist_folder, tmp_path, capsys, no_network):
    ckpt_path, teacher = request.getfixturevalue(which)
    out = tmp_path / f"exported{suffix}"
    export.main(["--checkpoint", str(ckpt_path), "--out", str(out)])
    line = capsys.readouterr().out.strip().splitlines()[-1].strip()
    namespace = {}
    exec(line, namespace)
    model = namespace["model"]
    assert type(model) is timm.models.VisionTransformer
    x = fmnist_batch(fmnist_folder, size)
    torch.testing.assert_close(features(model, x), features(teacher, x))


def test_export_errors_are_one_line(tmp_path, nano_checkpoint, capsys):
    ckpt_path, _ = nano_checkpoint
    cases = [(["--checkpoint", str(tmp_path / "nope.pth")], "no such file"),
             (["--checkpoint", str(ckpt_path), "--checkpoint_key", "ema"], "no 'ema' entry"),
             (["--checkpoint", str(ckpt_path), "--arch", "vit_small"], "unrecognized arguments")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            export.main([*argv, "--out", str(tmp_path / "x.pth")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "x.pth").exists()


def test_export_without_safetensors_says_so(nano_checkpoint, tmp_path, monkeypatch, capsys):
    ckpt_path, _ = nano_checkpoint
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(ckpt_path), "--out", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2
    assert "pip install safetensors" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no partial file


def test_tools_work_on_a_checkpoint_main_massl_wrote(tiny_images, tmp_path, capsys,
                                                     fmnist_folder):
    # The fabricated checkpoints above follow the documented layout; this one is real.
    import main_massl

    out = tmp_path / "run"
    args = main_massl.get_args_parser().parse_args(tiny_run_argv(tiny_images, out, epochs=1))
    assert main_massl.train(args, install_signal_handlers=False) == "finished"
    teacher, _, info = checkpoints.build_backbone_from_checkpoint(out / "checkpoint.pth")
    assert (info["arch"], info["patch_size"], info["img_size"]) == ("vit_nano", 4, 16)

    export.main(["--checkpoint", str(out / "checkpoint.pth"), "--out", str(tmp_path / "b.pth")])
    namespace = {}
    exec(capsys.readouterr().out.strip().splitlines()[-1].strip(), namespace)
    x = fmnist_batch(fmnist_folder, 16)
    torch.testing.assert_close(features(namespace["model"], x), features(teacher, x))

    image = next((fmnist_folder / "val").rglob("*.png"))
    visualize_attention.main(["--pretrained_weights", str(out / "checkpoint.pth"),
                              "--image_path", str(image), "--image_size", "32",
                              "--output_dir", str(tmp_path / "attn")])
    assert Image.open(tmp_path / "attn" / "mask-head3.png").size == (32, 32)

    records, skipped = plot_training.read_log(out / "log.txt")
    assert skipped == 0 and [r["epoch"] for r in records] == [1]
    assert dict(plot_training.group_keys(records))["loss"] == ["train_loss"]
