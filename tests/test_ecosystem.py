"""Using a trained backbone elsewhere: torch.hub, timm export, attention maps, SLURM launcher,
training curves. Checkpoints are fabricated in the layout main_massl.py writes.

matplotlib, safetensors and submitit are optional dependencies: the tests that need one are
skipped without it, and the clear error each script gives without it is tested always."""
import importlib.util
import json
import os
import signal
import sys
import types

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import checkpoints
import export
import images
import plot_training
import run_with_submitit
import storage
import utils
import vision_transformer as vits
import visualize_attention
from vision_transformer import MaSSLHead, MultiCropWrapper


# --------------------------------------------------------------------------- helpers


def needs(module):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"optional dependency {module} is not installed")


def make_checkpoint(path, arch, patch_size, img_size, seed=0):
    """A training checkpoint in main_massl.py's layout: MultiCropWrapper state dicts for
    student (here with the ``module.`` prefix a DDP save leaves) and teacher, args as a plain
    dict. Student and teacher differ, so a test can tell which one was loaded. Returns the
    teacher backbone."""
    torch.manual_seed(seed)
    dim = vits.VIT_ARCHS[arch][0]
    teacher = MultiCropWrapper(vits.build_backbone(arch, patch_size, img_size)[0],
                               MaSSLHead(dim, 32, hidden_dim=64))
    student = MultiCropWrapper(vits.build_backbone(arch, patch_size, img_size)[0],
                               MaSSLHead(dim, 32, hidden_dim=64))
    ckpt = {
        "student": {f"module.{k}": v for k, v in student.state_dict().items()},
        "teacher": teacher.state_dict(),
        "optimizer": {"state": {}, "param_groups": []},
        "memory": {"bank": torch.nn.functional.normalize(torch.randn(64, 32), dim=1),
                   "ptr": torch.zeros((), dtype=torch.long)},
        "epoch": 3,
        "args": {"arch": arch, "patch_size": patch_size, "global_crops_size": img_size,
                 "output_dir": str(path.parent), "out_dim": 32},
    }
    storage.save_atomic(ckpt, path)
    return teacher.backbone.eval()


def features(model, x):
    with torch.no_grad():
        return model.eval()(x)


PTH_AND_SAFETENSORS = [".pth", pytest.param(".safetensors", marks=needs("safetensors"))]


@pytest.fixture(scope="module")
def vits16_checkpoint(tmp_path_factory):
    """ViT-S/16 trained (fabricated) on 224 px global crops: timm's vit_small_patch16_224."""
    path = tmp_path_factory.mktemp("vits16") / "checkpoint.pth"
    return path, make_checkpoint(path, "vit_small", 16, 224)


@pytest.fixture(scope="module")
def vitt16_checkpoint(tmp_path_factory):
    """ViT-Ti/16 trained (fabricated) on 64 px crops: the cheapest model a hub entry builds."""
    path = tmp_path_factory.mktemp("vitt16") / "checkpoint.pth"
    return path, make_checkpoint(path, "vit_tiny", 16, 64, seed=2)


@pytest.fixture(scope="module")
def nano_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("nano") / "checkpoint.pth"
    return path, make_checkpoint(path, "vit_nano", 4, 28, seed=1)


def fmnist_batch(fmnist_folder, size, n=2):
    """Real Fashion-MNIST images, resized and normalised as evaluation does."""
    files = sorted((fmnist_folder / "val").rglob("*.png"))[:n]
    imgs = [visualize_attention.preprocess(images.load_rgb_image(str(f)), [size, size], 1)
            for f in files]
    return torch.cat(imgs)


@pytest.fixture
def tiny_images(fmnist_folder, tmp_path):
    """32 real Fashion-MNIST images, 2 steps of 16 per epoch: a run of a few seconds."""
    root = tmp_path / "images"
    for src in sorted((fmnist_folder / "train").rglob("*.png"))[::300 // 32][:32]:
        dst = root / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    return root


def tiny_run_argv(data, output_dir, epochs, batch=16):
    return ["--arch", "vit_nano", "--patch_size", "4", "--global_crops_size", "16",
            "--local_crops_size", "8", "--local_crops_number", "1", "--batch_size_per_gpu",
            str(batch), "--out_dim", "128", "--partition_size", "64", "--bottleneck_dim", "32",
            "--epochs", str(epochs), "--num_workers", "0", "--use_fp16", "false",
            "--print_freq", "1", "--saveckp_freq", "0", "--data_path", str(data),
            "--output_dir", str(output_dir)]


def logged_epochs(output_dir):
    return [json.loads(line)["epoch"] for line in (output_dir / "log.txt").read_text().splitlines()]


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


# --------------------------------------------------------------------------- torch.hub


def test_hub_loads_our_checkpoint_and_gives_the_teachers_features(
        vits16_checkpoint, repo_root, fmnist_folder, no_network):
    ckpt_path, teacher = vits16_checkpoint
    model = torch.hub.load(str(repo_root), "massl_vits16", source="local",
                           pretrained=str(ckpt_path))
    x = fmnist_batch(fmnist_folder, 224)
    torch.testing.assert_close(features(model, x), features(teacher, x))
    # Any input size (position embeddings are resampled on the fly).
    assert features(model, fmnist_batch(fmnist_folder, 96)).shape == (2, 384)


def test_hub_loads_an_exported_file_from_a_url(vitt16_checkpoint, repo_root, tmp_path,
                                               monkeypatch, fmnist_folder):
    # A file:// URL takes the download path (cache in torch.hub's dir) without a network.
    # The checkpoint was trained on 64 px crops: the model gets its 4x4 position grid.
    ckpt_path, teacher = vitt16_checkpoint
    exported = tmp_path / "published" / "massl_vitt16.pth"
    export.export(str(ckpt_path), str(exported))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    model = torch.hub.load(str(repo_root), "massl_vitt16", source="local",
                           pretrained=exported.as_uri(), progress=False)
    assert len(list((tmp_path / "torch_home" / "hub" / "checkpoints").glob(f"massl-*/{exported.name}"))) == 1
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 192)
    x = fmnist_batch(fmnist_folder, 64)
    torch.testing.assert_close(features(model, x), features(teacher, x))


def test_hub_without_weights_is_random_and_offline(repo_root, no_network):
    a = torch.hub.load(str(repo_root), "massl_vitt16", source="local", pretrained=None)
    b = torch.hub.load(str(repo_root), "massl_vitt16", source="local")
    assert a.embed_dim == 192 and a.patch_embed.patch_size == (16, 16)
    assert a.pos_embed.shape == (1, 1 + 14 * 14, 192)  # 224 px grid without a checkpoint
    assert not torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="path or URL"):
        torch.hub.load(str(repo_root), "massl_vits16", source="local", pretrained=True)


def test_hubconf_lists_only_the_entry_points(repo_root):
    spec = importlib.util.spec_from_file_location("hubconf_listed", repo_root / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    public = sorted(n for n in dir(hub) if callable(getattr(hub, n)) and not n.startswith("_"))
    assert public == ["massl_vitb16", "massl_vitl16", "massl_vits16", "massl_vitt16"]
    assert hub.dependencies == ["torch", "timm"]


def test_hub_refuses_a_checkpoint_of_another_arch(nano_checkpoint, repo_root):
    ckpt_path, _ = nano_checkpoint  # vit_nano, patch 4
    with pytest.raises(utils.UserError, match="missing keys|shape mismatches"):
        torch.hub.load(str(repo_root), "massl_vitt16", source="local", pretrained=str(ckpt_path))


def test_hub_drop_path_keeps_the_weights(vitt16_checkpoint, repo_root):
    ckpt_path, teacher = vitt16_checkpoint
    model = torch.hub.load(str(repo_root), "massl_vitt16", source="local",
                           pretrained=str(ckpt_path), drop_path_rate=0.1)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    torch.testing.assert_close(model.state_dict(), teacher.state_dict())


def test_hub_is_not_confused_by_the_callers_own_utils_module(repo_root, monkeypatch,
                                                            nano_checkpoint):
    # A project calling torch.hub usually has a utils.py of its own already imported.
    theirs = types.ModuleType("utils")
    theirs.__file__ = "/their/project/utils.py"
    monkeypatch.setitem(sys.modules, "utils", theirs)
    monkeypatch.delitem(sys.modules, "vision_transformer")
    model = torch.hub.load(str(repo_root), "massl_vitt16", source="local", pretrained=None)
    assert model.embed_dim == 192
    assert sys.modules["utils"] is theirs  # given back untouched
    assert "vision_transformer" not in sys.modules  # ours does not linger under a generic name


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


# --------------------------------------------------------------------------- training curves


def write_log(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


@needs("matplotlib")
def test_plot_training_from_a_log(tmp_path, capsys):
    records = []
    for epoch in range(12):
        r = {"epoch": epoch, "train_loss": 9 - 0.2 * epoch, "train_lr": 1e-4 * (epoch + 1),
             "train_wd": 0.04, "train_teacher_temp": 0.04, "time": 3.0}
        if epoch % 4 == 3:
            r["knn_top1"] = 20.0 + epoch
        records.append(r)
    # A resumed run logs epoch 10 again; a killed job leaves half a line.
    records.append(dict(records[10], train_loss=1.0))
    log = tmp_path / "log.txt"
    write_log(log, records, tail='{"epoch": 12, "train_lo')
    out = tmp_path / "plots" / "curves.png"
    plot_training.main(["--log", str(log), "--out", str(out)])
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out and "k-NN" in captured.out
    assert "skipped 1 line" in captured.err
    assert Image.open(out).size[0] > 3 * Image.open(out).size[1] / 2  # three panels side by side

    parsed, skipped = plot_training.read_log(log)
    assert skipped == 1 and [r["epoch"] for r in parsed] == list(range(12))
    assert parsed[10]["train_loss"] == 1.0  # the resumed run's record wins
    groups = dict(plot_training.group_keys(parsed))
    assert groups == {"loss": ["train_loss"], "learning rate": ["train_lr"],
                      "k-NN / accuracy": ["knn_top1"]}


@needs("matplotlib")
def test_plot_training_default_out_and_no_knn(tmp_path, capsys):
    log = tmp_path / "log.txt"
    write_log(log, [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_lr": 0.1} for e in range(3)])
    plot_training.main(["--log", str(log)])
    assert (tmp_path / "curves.png").is_file()
    assert "panels: loss, learning rate" in capsys.readouterr().out


def test_plot_training_bad_logs_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    write_log(tmp_path / "odd.txt", [{"epoch": 0, "speed": 3.0}])
    write_log(tmp_path / "good.txt", [{"epoch": 0, "train_loss": 3.0}])
    cases = [(tmp_path / "missing.txt", "no log file"),
             (tmp_path / "empty.txt", "no JSON records"),
             (tmp_path / "odd.txt", "nothing to plot"),
             (tmp_path / "good.txt", "pip install matplotlib")]  # last: hides matplotlib
    for log, message in cases:
        if message.startswith("pip"):
            monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
        with pytest.raises(SystemExit) as e:
            plot_training.main(["--log", str(log)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "curves.png").exists()


# --------------------------------------------------------------------------- SLURM launcher


@pytest.fixture
def as_a_submitit_task(monkeypatch, tmp_path):
    """This process as task 0 of a one-task submitit job on the local executor; the
    variables the Trainer sets and the signal handlers submitit installs are undone after."""
    folder = tmp_path / "job"
    folder.mkdir()
    for name, value in dict(SUBMITIT_EXECUTOR="local", SUBMITIT_FOLDER=str(folder),
                            SUBMITIT_LOCAL_JOB_ID="4242", SUBMITIT_LOCAL_NTASKS="1",
                            SUBMITIT_LOCAL_GLOBALID="0", SUBMITIT_LOCAL_LOCALID="0",
                            SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_JOB_NUM_NODES="1",
                            RANK="", WORLD_SIZE="", LOCAL_RANK="", MASTER_ADDR="",
                            MASTER_PORT="").items():
        monkeypatch.setenv(name, value)
    signals = [signal.SIGTERM, signal.SIGCONT, signal.SIGUSR1, signal.SIGUSR2]
    saved = {s: signal.getsignal(s) for s in signals}
    yield folder
    for s, handler in saved.items():
        signal.signal(s, handler)


@needs("submitit")
def test_checkpoint_hook_requeues_the_same_run(tmp_path):
    import submitit

    args = run_with_submitit.get_args_parser().parse_args(
        tiny_run_argv(tmp_path / "data", tmp_path / "out", epochs=5))
    trainer = run_with_submitit.Trainer(args)
    delayed = trainer.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, run_with_submitit.Trainer)
    assert delayed.function is not trainer and delayed.args == () and delayed.kwargs == {}
    assert vars(delayed.function.args) == vars(args)  # same output_dir: resumes from there


@needs("submitit")
def test_preemption_saves_mid_run_then_requeues_and_resumes(as_a_submitit_task, tiny_images,
                                                             tmp_path):
    import threading
    import time

    import submitit
    from submitit.core.job_environment import JobEnvironment
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    out = tmp_path / "out"
    args = run_with_submitit.get_args_parser().parse_args(tiny_run_argv(tiny_images, out, 3))
    delayed = submitit.helpers.DelayedSubmission(run_with_submitit.Trainer(args))
    delayed.set_timeout(60, 3)
    env = JobEnvironment()
    env._handle_signals(env.paths, delayed)  # what submitit does before running the job

    def preempt_after_first_epoch():
        deadline = time.monotonic() + 300
        while not (out / "log.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR2)  # what SLURM sends 90 s before the limit

    watcher = threading.Thread(target=preempt_after_first_epoch, daemon=True)
    watcher.start()
    with pytest.raises(SystemExit) as exit_info:
        delayed.result()
    watcher.join()
    assert exit_info.value.code == LOCAL_REQUEUE_RETURN_CODE  # requeued

    # The stop was clean: a checkpoint after epoch 1 and before the end of the run.
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert 2 <= ckpt["global_step"] < 3 * 2
    assert logged_epochs(out) == list(range(1, ckpt["epoch"] + 1))
    # The requeued job is the same run and resumes from that checkpoint, up to the end.
    requeued = submitit.helpers.DelayedSubmission.load(env.paths.submitted_pickle)
    assert vars(requeued.function.args) == vars(args)
    assert requeued.function() == "finished"
    assert logged_epochs(out) == [1, 2, 3]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["global_step"] == 3 * 2


@needs("submitit")
def test_local_executor_runs_two_ranks_from_the_job_environment(tiny_images, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "")  # submit() prepends the repository for the job
    out = tmp_path / "out"
    args = run_with_submitit.get_args_parser().parse_args(
        tiny_run_argv(tiny_images, out, epochs=1, batch=8)
        + ["--cluster", "local", "--ngpus", "2", "--timeout", "10"])
    job = run_with_submitit.submit(args)
    assert job.results() == ["finished", "finished"]
    log = json.loads((out / "log.txt").read_text())
    assert log["epoch"] == 1
    assert len(log["rank_fingerprints"]) == 2  # one process group of 2 ranks
    assert (out / "submitit").is_dir()


@needs("submitit")
def test_slurm_submission_asks_for_the_nodes_gpus_time_and_signal(tmp_path, monkeypatch, capsys,
                                                                  tiny_images):
    import submitit

    # Stand-ins for SLURM's commands: sbatch keeps the script it is given.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$(dirname "$0")/submitted.sh"\n'
                                    'echo "Submitted batch job 4321"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.chdir(tiny_images.parent)
    run_with_submitit.main(tiny_run_argv("images", "out", epochs=1, batch=4)
                           + ["--nodes", "2", "--ngpus", "4", "--timeout", "600",
                              "--partition", "gpu", "--account", "proj"])
    assert "submitted job 4321" in capsys.readouterr().out
    script = (bin_dir / "submitted.sh").read_text()
    for line in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=600",
                 "--partition=gpu", "--account=proj", "--mem=160GB",
                 f"--signal={submitit.JobEnvironment.USR_SIG}@90"]:
        assert f"#SBATCH {line}\n" in script, line
    # The pickled job holds absolute paths: it may start in another directory.
    job_dir = tmp_path / "out" / "submitit"
    pickled = submitit.helpers.DelayedSubmission.load(next(job_dir.glob("*_submitted.pkl")))
    assert pickled.function.args.data_path == str(tiny_images)
    assert pickled.function.args.output_dir == str(tmp_path / "out")


@needs("submitit")
def test_launcher_errors_are_one_line(tmp_path, monkeypatch, capsys, tiny_images):
    argv = tiny_run_argv(tiny_images, tmp_path / "out", epochs=1)
    cases = [
        (["--cluster", "slurm"], "sbatch not found"),
        (["--cluster", "local", "--nodes", "2"], "--nodes 1"),
        (["--cluster", "local", "--ngpus", "3"], "not a multiple of the global batch"),
    ]
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            run_with_submitit.main(argv + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    # A preemption signal the trainer would swallow (SUBMITIT_PREEMPT_SIGNAL=USR1) is refused.
    import submitit
    monkeypatch.setattr(submitit.JobEnvironment, "USR_SIG", "USR1")
    with pytest.raises(SystemExit):
        run_with_submitit.main(argv + ["--cluster", "local"])
    assert "would not be requeued" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing submitted


def test_launcher_without_submitit_says_how_to_get_it(tmp_path, monkeypatch, capsys,
                                                      tiny_images):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        run_with_submitit.main(tiny_run_argv(tiny_images, tmp_path / "out", epochs=1)
                               + ["--cluster", "local"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install submitit" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
