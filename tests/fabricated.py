"""Shared by the tests of export, hubconf, visualize_attention, plot_training and
run_with_submitit: training checkpoints fabricated in the layout main_massl.py writes (the
fixtures in conftest.py hold them), real images resized for them, the flags of a run of a
few seconds."""
import importlib.util
import json

import pytest
import torch

import images
import storage
import vision_transformer as vits
import visualize_attention
from vision_transformer import MaSSLHead, MultiCropWrapper


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


def fmnist_batch(fmnist_folder, size, n=2):
    """Real Fashion-MNIST images, resized and normalised as evaluation does."""
    files = sorted((fmnist_folder / "val").rglob("*.png"))[:n]
    imgs = [visualize_attention.preprocess(images.load_rgb_image(str(f)), [size, size], 1)
            for f in files]
    return torch.cat(imgs)


def tiny_run_argv(data, output_dir, epochs, batch=16):
    return ["--arch", "vit_nano", "--patch_size", "4", "--global_crops_size", "16",
            "--local_crops_size", "8", "--local_crops_number", "1", "--batch_size_per_gpu",
            str(batch), "--out_dim", "128", "--partition_size", "64", "--bottleneck_dim", "32",
            "--epochs", str(epochs), "--num_workers", "0", "--use_fp16", "false",
            "--print_freq", "1", "--saveckp_freq", "0", "--data_path", str(data),
            "--output_dir", str(output_dir)]


def logged_epochs(output_dir):
    return [json.loads(line)["epoch"] for line in (output_dir / "log.txt").read_text().splitlines()]
