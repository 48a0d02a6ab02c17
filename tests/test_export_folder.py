"""export.py --format timm_folder: a timm / Hugging Face Hub model folder (config.json,
model.safetensors, README.md model card) that timm loads with ``local-dir:`` and hubconf.py
accepts as ``pretrained=``. Offline throughout: HF_HUB_OFFLINE=1 and no sockets."""
import json
import os
import re
import shlex
import stat

import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms

import checkpoints
import export
import images
import storage
import utils
import vision_transformer as vits
from vision_transformer import MaSSLHead, MultiCropWrapper

IMAGENET_MEAN, IMAGENET_STD = utils.IMAGENET_MEAN, utils.IMAGENET_STD


@pytest.fixture(autouse=True)
def offline(no_network):
    """Loading a local folder must never reach the network (nor the Hub's cache logic)."""


def fabricate_checkpoint(path, arch, patch_size, img_size, seed=0):
    """A checkpoint in main_massl.py's layout for any --arch (ours or timm's), teacher and
    student different; BatchNorm statistics are made non-trivial so that buffers must
    travel too. Returns the teacher backbone."""
    torch.manual_seed(seed)
    nets = []
    for _ in range(2):
        backbone, dim = vits.build_backbone(arch, patch_size, img_size)
        for module in backbone.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        nets.append(MultiCropWrapper(backbone, MaSSLHead(dim, 32, hidden_dim=64)))
    student, teacher = nets
    storage.save_atomic({
        "student": {f"module.{k}": v for k, v in student.state_dict().items()},
        "teacher": teacher.state_dict(), "epoch": 7, "iteration": 0,
        "args": {"arch": arch, "patch_size": patch_size, "global_crops_size": img_size,
                 "epochs": 100, "out_dim": 32},
    }, path)
    return teacher.backbone.eval()


def features(model, x):
    with torch.no_grad():
        return model.eval()(x)


def real_images(fmnist_folder, n=3):
    """Real Fashion-MNIST pictures, made RGB and non-square (wider than high) so the
    shorter-side resize and the centre crop both matter."""
    files = sorted((fmnist_folder / "val").rglob("*.png"))[:n]
    return [images.load_rgb_image(str(f)).resize((45, 37), Image.BILINEAR) for f in files]


def our_eval_transform(resize, crop):
    """eval_knn.py / eval_linear.py's evaluation transform, written out literally."""
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def run_export(argv, capsys):
    export.main([str(a) for a in argv])
    return capsys.readouterr().out


def one_line_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        export.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def pico_run(tmp_path_factory, fmnist_folder):
    """A real (1 epoch, 32 images) main_massl.py run: vit_pico, patch 7, 28 px crops."""
    import main_massl

    root = tmp_path_factory.mktemp("pico_run")
    images = root / "images"
    for src in sorted((fmnist_folder / "train").rglob("*.png"))[::300 // 32][:32]:
        (images / src.parent.name).mkdir(parents=True, exist_ok=True)
        (images / src.parent.name / src.name).write_bytes(src.read_bytes())
    argv = ["--arch", "vit_pico", "--patch_size", "7", "--global_crops_size", "28",
            "--local_crops_size", "14", "--local_crops_number", "1", "--batch_size_per_gpu", "16",
            "--out_dim", "128", "--partition_size", "64", "--bottleneck_dim", "32",
            "--epochs", "1", "--num_workers", "0", "--use_fp16", "false", "--print_freq", "1",
            "--saveckp_freq", "0", "--data_path", str(images), "--output_dir", str(root / "run")]
    args = main_massl.get_args_parser().parse_args(argv)
    assert main_massl.train(args, install_signal_handlers=False) == "finished"
    return root / "run" / "checkpoint.pth"


@pytest.fixture(scope="module")
def pico_folder(pico_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "massl-vit-pico"
    export.main(["--checkpoint", str(pico_run), "--format", "timm_folder", "--out", str(out)])
    return out


# --------------------------------------------------------------------------- timm loads it


def test_timm_loads_the_folder_with_the_teachers_features(pico_run, tmp_path, capsys,
                                                          fmnist_folder):
    out = tmp_path / "massl-vit-pico"
    printed = run_export(["--checkpoint", pico_run, "--format", "timm_folder", "--out", out],
                         capsys)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp folder left behind

    # The line the script prints, run as printed.
    line = next(s.strip() for s in printed.splitlines() if "local-dir:" in s)
    namespace = {}
    exec(line, namespace)
    model = namespace["model"]
    assert type(model) is timm.models.VisionTransformer  # timm's own class, not ours
    teacher, _, _ = checkpoints.build_backbone_from_checkpoint(pico_run)
    x = torch.stack([our_eval_transform(32, 28)(im) for im in real_images(fmnist_folder)])
    torch.testing.assert_close(features(model, x), features(teacher, x), atol=1e-6, rtol=0)
    # Our ViT takes any input size; so does the timm model the folder describes.
    x = torch.stack([our_eval_transform(48, 42)(im) for im in real_images(fmnist_folder)])
    # at other sizes timm resamples pos_embed its own way, the training network as DINO (docs/method.md)
    diff = (features(model, x) - features(teacher, x)).norm() / features(teacher, x).norm()
    assert 0 < diff < 0.05

    # The weights file is the checkpoint's teacher backbone, literally: no head, no prefix.
    from safetensors.torch import load_file

    ckpt = torch.load(pico_run, weights_only=True)
    expected = {k[len("backbone."):]: v for k, v in ckpt["teacher"].items()
                if k.startswith("backbone.")}
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)


def test_config_is_timms_folder_format(pico_folder):
    config = json.loads((pico_folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"  # no vit_pico in timm's registry
    assert (config["num_classes"], config["num_features"], config["global_pool"]) == (0, 128, "token")
    args = config["model_args"]
    assert (args["embed_dim"], args["depth"], args["num_heads"]) == vits.VIT_ARCHS["vit_pico"]
    assert (args["patch_size"], args["img_size"]) == ([7, 7], [28, 28])
    assert args["class_token"] and args["global_pool"] == "token" and args["num_classes"] == 0
    # timm rejects unknown pretrained_cfg keys; this is the parser create_model uses.
    from timm.models._hub import load_model_config_from_path

    pretrained_cfg, name, model_args = load_model_config_from_path(pico_folder)
    assert name == "vit_tiny_patch16_224" and model_args == args
    timm.models.PretrainedCfg(**pretrained_cfg)


def test_timm_names_our_vits_by_their_registered_twins():
    assert export.timm_architecture("vit_small", 16) == "vit_small_patch16_224"
    assert export.timm_architecture("vit_base", 8) == "vit_base_patch8_224"
    assert export.timm_architecture("vit_small", 7) == "vit_small_patch16_224"  # dims in model_args
    assert export.timm_architecture("vit_nano", 4) == "vit_tiny_patch16_224"


@pytest.mark.parametrize("crop_pct,resize", [(None, 32), (1.0, 28)])
def test_resolve_data_config_is_our_evaluation_transform(pico_run, tmp_path, crop_pct, resize,
                                                         fmnist_folder):
    out = tmp_path / "folder"
    argv = ["--checkpoint", str(pico_run), "--format", "timm_folder", "--out", str(out)]
    export.main(argv + (["--crop_pct", str(crop_pct)] if crop_pct else []))
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    config = timm.data.resolve_data_config({}, model=model)
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()} == {
        "input_size": (3, 28, 28), "interpolation": "bicubic", "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD, "crop_pct": crop_pct or 0.875, "crop_mode": "center"}
    timm_transform = timm.data.create_transform(**config)
    ours = our_eval_transform(resize, 28)  # resize = 28 / crop_pct
    for image in real_images(fmnist_folder):
        torch.testing.assert_close(timm_transform(image), ours(image), atol=0, rtol=0)


def test_a_timm_arch_exports_as_itself(tmp_path, capsys, fmnist_folder):
    ckpt = tmp_path / "checkpoint.pth"
    teacher = fabricate_checkpoint(ckpt, "resnet18", 16, 32)
    out = tmp_path / "massl-resnet18"
    run_export(["--checkpoint", ckpt, "--format", "timm_folder", "--out", out], capsys)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["global_pool"] == "avg"
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert type(model) is timm.models.ResNet and model.num_classes == 0
    cfg = timm.data.resolve_data_config({}, model=model)
    assert tuple(cfg["input_size"]) == (3, 32, 32) and cfg["crop_pct"] == 0.875
    x = torch.stack([our_eval_transform(36, 32)(im) for im in real_images(fmnist_folder)])
    torch.testing.assert_close(features(model, x), features(teacher, x), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- model card


def card_command(card):
    command = re.search(r"```bash\n(.*?)```", card, re.S).group(1)
    return shlex.split(command.replace("\\\n", " "))


def test_model_card_has_the_training_command_epochs_results_and_citation(pico_run, tmp_path,
                                                                         monkeypatch,
                                                                         fmnist_folder):
    knn = {"k=10": {"top1": 41.25, "top5": 88.0}, "k=20": {"top1": 43.5, "top5": 89.75},
           "num_train": 300, "num_val": 100, "num_classes": 10, "top5_is_top": 5,
           "temperature": 0.07, "checkpoint": str(pico_run), "checkpoint_key": "teacher",
           "arch": "vit_pico", "resize_size": 28, "crop_size": 28}
    linear = {"top1": 55.125, "top5": 93.0, "best_top1": 56.0, "epoch": 10, "num_train": 300,
              "num_val": 100, "num_classes": 10, "top5_is_top": 5, "protocol": "cached features",
              "checkpoint": str(pico_run), "checkpoint_key": "teacher", "arch": "vit_pico"}
    knn["weights_sha256"] = linear["weights_sha256"] = \
        checkpoints.build_backbone_from_checkpoint(pico_run)[2]["weights_sha256"]
    (tmp_path / "knn_results.json").write_text(json.dumps(knn))
    (tmp_path / "linear_results.json").write_text(json.dumps(linear))
    out = tmp_path / "massl-vit-pico"
    export.main(["--checkpoint", str(pico_run), "--format", "timm_folder", "--out", str(out),
                 "--knn_results", str(tmp_path / "knn_results.json"),
                 "--linear_results", str(tmp_path / "linear_results.json"),
                 "--license", "cc-by-nc-4.0"])
    card = (out / "README.md").read_text()

    front = card.split("---\n")[1]
    assert "library_name: timm" in front and "license: cc-by-nc-4.0" in front
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["license"] == \
        "cc-by-nc-4.0"

    # The command in the card parses, with main_massl.py's own parser, back to the stored args.
    import main_massl

    argv = card_command(card)
    assert argv[:2] == ["python", "main_massl.py"]
    parsed = main_massl.get_args_parser().parse_args(argv[2:])
    stored = torch.load(pico_run, weights_only=True)["args"]
    assert json.loads(json.dumps(vars(parsed))) == stored

    assert "| pretraining | 1 of 1 epochs |" in card
    assert "| 10 | 41.25 | 88.00 |" in card and "| 20 | 43.50 | 89.75 |" in card
    assert "resize 28, crop 28" in card  # the k-NN setting, which differs from crop_pct
    assert "| top-1 (%) | 55.12 |" in card and "| best top-1 during training (%) | 56.00 |" in card
    assert "@inproceedings{silva2024massl" in card and "Pedrini" in card
    # The card's usage example runs as written, next to the folder, on a photo.
    monkeypatch.chdir(tmp_path)
    real_images(fmnist_folder, n=1)[0].save("photo.jpg")
    namespace = {}
    exec(re.search(r"```python\n(.*?)```", card, re.S).group(1), namespace)
    teacher, _, _ = checkpoints.build_backbone_from_checkpoint(pico_run)
    x = our_eval_transform(32, 28)(Image.open("photo.jpg").convert("RGB")).unsqueeze(0)
    torch.testing.assert_close(namespace["features"], features(teacher, x), atol=1e-6, rtol=0)


def test_card_of_a_fabricated_checkpoint_without_results(tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    fabricate_checkpoint(ckpt, "vit_pico", 7, 28)
    out = tmp_path / "folder"
    export.main(["--checkpoint", str(ckpt), "--format", "timm_folder", "--out", str(out)])
    card = (out / "README.md").read_text()
    assert "| pretraining | 7 of 100 epochs |" in card
    assert "## Results" not in card and "license:" not in card
    assert card_command(card) == ["python", "main_massl.py", "--arch", "vit_pico",
                                  "--patch_size", "7", "--global_crops_size", "28",
                                  "--epochs", "100", "--out_dim", "32"]


def test_training_command_writes_each_value_as_main_massl_reads_it():
    command = export.training_command(
        {"arch": "vit_small", "use_fp16": False, "global_crops_scale": [0.32, 1.0],
         "data_path": "/data/my images", "resume": "", "device": None, "local_rank": 3},
        world_size=8)
    assert shlex.split(command.replace("\\\n", " ")) == [
        "torchrun", "--nproc_per_node=8", "main_massl.py", "--arch", "vit_small",
        "--use_fp16", "false", "--global_crops_scale", "0.32", "1.0",
        "--data_path", "/data/my images"]


# --------------------------------------------------------------------------- torch.hub


def test_hub_entry_accepts_a_model_folder(tmp_path, repo_root, fmnist_folder):
    ckpt = tmp_path / "checkpoint.pth"
    teacher = fabricate_checkpoint(ckpt, "vit_tiny", 16, 32, seed=3)
    out = tmp_path / "massl-vitt16"
    export.main(["--checkpoint", str(ckpt), "--format", "timm_folder", "--out", str(out)])
    model = torch.hub.load(str(repo_root), "massl_vitt16", source="local", pretrained=str(out))
    x = torch.stack([our_eval_transform(36, 32)(im) for im in real_images(fmnist_folder)])
    torch.testing.assert_close(features(model, x), features(teacher, x), atol=1e-6, rtol=0)

    (out / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="not a timm model folder"):
        torch.hub.load(str(repo_root), "massl_vitt16", source="local", pretrained=str(out))


# --------------------------------------------------------------------------- errors, files


def test_missing_checkpoint_key_is_one_line(pico_run, tmp_path, capsys):
    out = tmp_path / "folder"
    err = one_line_error(["--checkpoint", pico_run, "--checkpoint_key", "ema", "--format",
                          "timm_folder", "--out", out], capsys)
    assert "no 'ema' entry" in err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_kept_unless_forced(pico_run, pico_folder, tmp_path, capsys):
    out = tmp_path / "folder"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["--checkpoint", pico_run, "--format", "timm_folder", "--out", out]
    assert "exists and is not empty" in one_line_error(argv, capsys)
    # --force replaces only what export.py wrote, never an arbitrary folder.
    assert "not a model folder" in one_line_error([*argv, "--force"], capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    (out / "config.json").write_text("{}")  # a stale export
    run_export([*argv, "--force"], capsys)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"  # not written by export.py: kept
    assert (out / "config.json").read_bytes() == (pico_folder / "config.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]

    # An empty folder is filled in place: the same folder, not a new one renamed over it.
    empty = tmp_path / "empty"
    empty.mkdir()
    inode = empty.stat().st_ino
    run_export(["--checkpoint", pico_run, "--format", "timm_folder", "--out", empty], capsys)
    assert empty.stat().st_ino == inode
    assert sorted(p.name for p in empty.iterdir()) == ["README.md", "config.json",
                                                       "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "folder"]


def test_force_never_deletes_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    fabricate_checkpoint(run / "checkpoint.pth", "vit_pico", 7, 28)
    (run / "config.json").write_text("{}")
    err = one_line_error(["--checkpoint", run / "checkpoint.pth", "--format", "timm_folder",
                          "--out", run, "--force"], capsys)
    assert "is inside --out" in err and (run / "checkpoint.pth").is_file()


def test_out_naming_a_file_is_one_line(pico_run, tmp_path, capsys):
    existing = tmp_path / "model.pth"
    existing.write_text("keep")
    err = one_line_error(["--checkpoint", pico_run, "--format", "timm_folder", "--out",
                          existing, "--force"], capsys)
    assert "is a file" in err and existing.read_text() == "keep"
    folder = tmp_path / "folder"
    folder.mkdir()
    err = one_line_error(["--checkpoint", pico_run, "--out", folder], capsys)  # --format file
    assert "--format timm_folder" in err


def test_read_only_parent_is_one_line(pico_run, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: answer as the system does for a user
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: (
            not mode & os.W_OK if os.fspath(path) == os.fspath(parent) else access(path, mode)))
    try:
        err = one_line_error(["--checkpoint", pico_run, "--format", "timm_folder", "--out",
                              parent / "folder"], capsys)
    finally:
        parent.chmod(0o755)
    assert "not writable" in err and list(parent.iterdir()) == []


def test_a_refused_write_is_one_line(pico_run, tmp_path, capsys, monkeypatch):
    # What a read-only or full disk looks like to the writer, also when tests run as root.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(export.tempfile, "mkdtemp", refuse)
    err = one_line_error(["--checkpoint", pico_run, "--format", "timm_folder", "--out",
                          tmp_path / "folder"], capsys)
    assert "cannot write --out" in err and "Permission denied" in err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_leaves_no_half_folder(pico_run, pico_folder, tmp_path, monkeypatch):
    def crash(state_dict, out, metadata=None):
        out.write_bytes(b"partial")
        raise RuntimeError("disk vanished")

    monkeypatch.setattr(export, "write_backbone", crash)
    out = tmp_path / "folder"
    with pytest.raises(RuntimeError):
        export.export(str(pico_run), str(out), fmt="timm_folder")
    assert list(tmp_path.iterdir()) == []
    # A forced replacement that fails keeps the previous export whole.
    out.mkdir()
    for f in pico_folder.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RuntimeError):
        export.export(str(pico_run), str(out), fmt="timm_folder",
                      folder=export.FolderOptions(force=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
    assert (out / "model.safetensors").read_bytes() == \
        (pico_folder / "model.safetensors").read_bytes()


@pytest.mark.parametrize("argv,message", [
    (["--knn_results", "{results}"], "evaluated arch vit_small"),
    (["--knn_results", "{missing}"], "no such file"),
    (["--crop_pct", "1.5"], "--crop_pct must be in (0, 1]"),
    (["--license", "Apache 2"], "Hub licence id"),
])
def test_bad_folder_options_are_one_line(pico_run, tmp_path, capsys, argv, message):
    results = tmp_path / "knn_results.json"
    results.write_text(json.dumps({"k=20": {"top1": 1.0, "top5": 5.0}, "arch": "vit_small",
                                   "checkpoint": "x.pth", "checkpoint_key": "teacher"}))
    argv = [a.format(results=results, missing=tmp_path / "nope.json") for a in argv]
    out = tmp_path / "folder"
    assert message in one_line_error(["--checkpoint", pico_run, "--format", "timm_folder",
                                      "--out", out, *argv], capsys)
    assert not out.exists()


def test_folder_options_need_the_folder_format(pico_run, tmp_path, capsys):
    err = one_line_error(["--checkpoint", pico_run, "--out", tmp_path / "x.pth",
                          "--license", "mit", "--force"], capsys)
    assert "--license only apply to --format timm_folder" in err  # --force applies to both


def test_exports_respect_the_umask(pico_run, tmp_path, capsys):
    old = os.umask(0o027)
    try:
        run_export(["--checkpoint", pico_run, "--format", "timm_folder", "--out",
                    tmp_path / "folder"], capsys)
        for name in ("b.pth", "b.safetensors"):
            run_export(["--checkpoint", pico_run, "--out", tmp_path / name], capsys)
    finally:
        os.umask(old)

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(tmp_path / "folder") == 0o750
    assert {p.name: mode(p) for p in (tmp_path / "folder").iterdir()} == {
        "README.md": 0o640, "config.json": 0o640, "model.safetensors": 0o640}
    assert mode(tmp_path / "b.pth") == 0o640 and mode(tmp_path / "b.safetensors") == 0o640
