#!/usr/bin/env python
"""MaSSL pretraining: student/teacher ViTs compared against a FIFO memory of teacher embeddings.

One script for every scale (see ``massl-method.md`` for the method, steps 1-9):

    python main_massl.py --arch vit_nano --patch_size 4 --global_crops_size 28 ...   # CPU or 1 GPU
    torchrun --nproc-per-node=8 main_massl.py --arch vit_small --data_path /imagenet/train ...

A run writes ``checkpoint.pth`` (every epoch), ``checkpointNNNN.pth`` (every
``--saveckp_freq`` epochs), ``log.txt`` (one JSON line per epoch) and TensorBoard events to
``--output_dir``. Starting the same command again resumes from ``checkpoint.pth``, exactly:
the random memory blocks and every image's augmentations are seeded from (seed, step) and
(seed, epoch, image), and the RNG states of every rank travel in the checkpoint. SIGTERM or
SIGUSR1 (cluster preemption) finish the current step, save and exit 0.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

import utils
from massl_loss import KoLeoLoss, MaSSLLoss
from memory import MemoryBank
from vision_transformer import (VIT_ARCHS, MaSSLHead, MultiCropWrapper, UnknownArchError,
                                build_backbone, check_arch)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bad images tried in a row (with --skip_bad_images) before giving up on a sample.
MAX_CONSECUTIVE_BAD_IMAGES = 100
# Images opened at start-up to prove the data is readable (never the whole dataset).
MAX_STARTUP_PROBES = 100


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops and keeps its last good checkpoint."""


# --------------------------------------------------------------------------- command line


def bool_flag(value: str) -> bool:
    """argparse type for ``true/false`` strings (DINO's ``bool_flag``)."""
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


def get_args_parser() -> argparse.ArgumentParser:
    """All training flags. ``add_help=False`` so launchers can use it as a parent parser
    (``argparse.ArgumentParser(parents=[get_args_parser()])``), as DINO's scripts do."""
    parser = argparse.ArgumentParser("MaSSL", add_help=False)

    group = parser.add_argument_group("model")
    group.add_argument("--arch", default="vit_small", type=str, help=(
        f"Backbone: one of {', '.join(VIT_ARCHS)} (ViTs returning the CLS token; vit_nano is a "
        "1.2M-parameter CPU model), or any timm model name (its pooled feature; built without "
        "pretrained weights). Reference runs: vit_small and vit_base."))
    group.add_argument("--patch_size", default=16, type=int, help=(
        "ViT patch size in pixels (ignored for timm model names, whose name fixes it). Smaller "
        "patches cost more compute. Reference runs: 16."))
    group.add_argument("--out_dim", "--memory_size", dest="out_dim", default=65536, type=int, help=(
        "Number of slots K of the memory bank of past teacher embeddings (the authors call it "
        "out_dim). Must be a multiple of the global batch (batch_size_per_gpu x number of "
        "processes). Reference runs: 131072."))
    group.add_argument("--partition_size", "--block_size", dest="partition_size", default=16384,
                       type=int, help=(
        "Size P of the random memory blocks: every step the K memory slots are shuffled and cut "
        "into K // P blocks, each its own softmax. Must be <= --out_dim. Reference runs: 16384."))
    group.add_argument("--bottleneck_dim", default=256, type=int, help=(
        "Dimension of the projection head output, i.e. of the embeddings stored in memory. "
        "Reference runs: 256."))
    group.add_argument("--use_bn_in_head", default=False, type=bool_flag, help=(
        "BatchNorm after the hidden layers of the projection head (SyncBatchNorm on multi-GPU "
        "runs). Reference runs: false."))
    group.add_argument("--norm_last_layer", default=True, type=bool_flag, help=(
        "Accepted for compatibility with DINO-style command lines; has no effect: the MaSSL head "
        "has no weight-normalised prototype layer (the memory plays that role)."))
    group.add_argument("--drop_path_rate", "--drop_path", dest="drop_path_rate", default=0.1,
                       type=float, help=(
        "Stochastic depth rate of the student backbone (the teacher uses 0). Reference runs: 0.1."))
    group.add_argument("--momentum_teacher", default=0.992, type=float, help=(
        "Base EMA momentum of the teacher, raised to 1 over training with a cosine schedule. "
        "Higher values suit smaller batches. Reference runs: 0.992 (ViT-S), 0.996 (ViT-B)."))
    group.add_argument("--compile", default=False, type=bool_flag, help=(
        "torch.compile the student and teacher backbones (faster steps on GPU after a "
        "compilation pause at start-up). Default false."))

    group = parser.add_argument_group("temperatures")
    group.add_argument("--student_temp", default=0.1, type=float, help=(
        "Temperature of the student's view-to-memory logits. Reference runs: 0.1."))
    group.add_argument("--teacher_temp", default=0.07, type=float, help=(
        "Teacher temperature after its warm-up; above 0.07 tends to be unstable. "
        "Reference runs: 0.07."))
    group.add_argument("--warmup_teacher_temp", default=0.04, type=float, help=(
        "Teacher temperature at the start of training; lower it if the loss does not go down. "
        "Reference runs: 0.04."))
    group.add_argument("--warmup_teacher_temp_epochs", default=30, type=int, help=(
        "Epochs of linear warm-up from --warmup_teacher_temp to --teacher_temp (per iteration), "
        "constant afterwards. Reference runs: 30 (ViT-S), 50 (ViT-B)."))

    group = parser.add_argument_group("optimisation")
    group.add_argument("--use_fp16", default=True, type=bool_flag, help=(
        "fp16 mixed precision with a gradient scaler (CUDA only: on CPU the run warns and uses "
        "fp32). Faster and lighter; turn it off if the loss is unstable. Reference runs: true."))
    group.add_argument("--use_bf16", default=False, type=bool_flag, help=(
        "bf16 mixed precision, no scaler (Ampere or newer GPUs; allowed but slow on CPU). "
        "Overrides --use_fp16. Default false."))
    group.add_argument("--batch_size_per_gpu", default=64, type=int, help=(
        "Images per process and step (per micro-batch with --gradient_accumulation). "
        "Reference runs: 64 x 2 GPUs (ViT-S), 32 x 4 GPUs (ViT-B)."))
    group.add_argument("--gradient_accumulation", "--gradient_accumulation_steps",
                       dest="gradient_accumulation", default=1, type=int, help=(
        "Micro-batches per optimizer step: gradients of N micro-batches are summed (loss / N), "
        "the memory is updated after every micro-batch, schedules advance per optimizer step. "
        "Reference runs: 1."))
    group.add_argument("--epochs", default=800, type=int, help=(
        "Training epochs. Reference runs: 800 (ViT-S), 400 (ViT-B)."))
    group.add_argument("--lr", default=5e-4, type=float, help=(
        "Peak learning rate for an effective batch of 256, scaled linearly: the rate used is "
        "lr x batch_size_per_gpu x processes x gradient_accumulation / 256. Reached after "
        "--warmup_epochs, then cosine decay to --min_lr. Reference runs: 5e-4 (ViT-S), "
        "7.5e-4 (ViT-B)."))
    group.add_argument("--min_lr", default=1e-6, type=float, help=(
        "Learning rate at the end of the cosine schedule (not scaled). Reference runs: 1e-6 "
        "(ViT-S), 2e-6 (ViT-B)."))
    group.add_argument("--warmup_epochs", default=0, type=int, help=(
        "Epochs of linear learning-rate warm-up from 0. Reference runs: 0 (ViT-S), 10 (ViT-B)."))
    group.add_argument("--weight_decay", default=0.04, type=float, help=(
        "Weight decay at the start of the cosine weight-decay schedule (biases and other 1-D "
        "parameters are never decayed). Reference runs: 0.04."))
    group.add_argument("--weight_decay_end", default=0.4, type=float, help=(
        "Weight decay at the end of training. Reference runs: 0.4."))
    group.add_argument("--clip_grad", default=3.0, type=float, help=(
        "Clip the gradient norm of each parameter tensor to this value (as DINO); 0 disables. "
        "Reference runs: 3.0."))
    group.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help=(
        "adamw (fused on CUDA) or sgd (momentum 0.9). Reference runs: adamw."))
    group.add_argument("--koleo_loss_weight", default=0.0, type=float, help=(
        "Weight of the KoLeo regulariser on the student's global-crop embeddings (spreads the "
        "batch; needs batch_size_per_gpu >= 2). Reference runs: 0 (off)."))

    group = parser.add_argument_group("multi-crop augmentation")
    group.add_argument("--global_crops_scale", default=(0.32, 1.0), type=float, nargs=2,
                       metavar=("MIN", "MAX"), help=(
        "Area range of the 2 global crops, relative to the image. Reference runs: 0.32 1.0."))
    group.add_argument("--local_crops_scale", default=(0.05, 0.32), type=float, nargs=2,
                       metavar=("MIN", "MAX"), help=(
        "Area range of the local crops. Reference runs: 0.05 0.32."))
    group.add_argument("--local_crops_number", default=10, type=int, help=(
        "Number of small local crops per image (0 disables multi-crop). Reference runs: 10."))
    group.add_argument("--global_crops_size", default=224, type=int, help=(
        "Side of the global crops in pixels; also fixes the ViT position-embedding grid. Use "
        "e.g. 28 (with --patch_size 4) for 28 px images on CPU. Reference runs: 224."))
    group.add_argument("--local_crops_size", default=96, type=int, help=(
        "Side of the local crops in pixels. Reference runs: 96."))

    group = parser.add_argument_group("data, output and launching")
    group.add_argument("--data_path", required=True, type=str, help=(
        "Training images: an ImageFolder root (class sub-folders, e.g. imagenet/train) or any "
        "folder of images searched recursively (unlabelled data; labels are not used)."))
    group.add_argument("--skip_bad_images", default=False, type=bool_flag, help=(
        "Skip unreadable image files with a warning (another image takes their place) instead of "
        "stopping with an error naming the file. Default false."))
    group.add_argument("--output_dir", default="./output", type=str, help=(
        "Where checkpoints, log.txt and TensorBoard events go. A checkpoint.pth found here is "
        "resumed automatically."))
    group.add_argument("--resume", default="", type=str, help=(
        "Checkpoint to start from when --output_dir has no checkpoint.pth yet (the full training "
        "state: weights, optimizer, memory, epoch). Once the run has saved in --output_dir, "
        "restarts continue from there."))
    group.add_argument("--saveckp_freq", default=50, type=int, help=(
        "Also keep checkpointNNNN.pth (NNNN = finished epochs) every this many epochs; 0 keeps "
        "none. checkpoint.pth is rewritten every epoch regardless."))
    group.add_argument("--print_freq", default=50, type=int, help=(
        "Console line and TensorBoard scalars every this many optimizer steps."))
    group.add_argument("--num_workers", default=10, type=int, help=(
        "Data-loading worker processes per GPU/process (0 loads in the training process). "
        "Reference runs: 10 (ViT-S), 6 (ViT-B)."))
    group.add_argument("--seed", default=0, type=int, help=(
        "Seed of the initial weights, the memory, the augmentations and the memory blocks."))
    group.add_argument("--device", default=None, type=str, help=(
        "cpu or cuda (default: cuda when available, else cpu). Under torchrun each process uses "
        "the GPU of its LOCAL_RANK."))
    group.add_argument("--local-rank", "--local_rank", dest="local_rank", default=0, type=int,
                       help="Set by old launchers; ignored in favour of the LOCAL_RANK variable.")
    return parser


def plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """``vars(args)`` as JSON types only (tuples -> lists, paths -> str): safe for
    ``torch.load(weights_only=True)`` and for json."""
    return json.loads(json.dumps(vars(args), default=str))


def world_size_from_env() -> int:
    """The world size a launcher announced (what ``utils.init_distributed`` will use)."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return 1


def check_args(args: argparse.Namespace, world_size: int) -> None:
    """Refuse bad settings before any model or GPU memory is touched (raises UserError)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise utils.UserError(message)

    try:
        check_arch(args.arch)
    except UnknownArchError as e:
        raise utils.UserError(str(e)) from None
    need(args.batch_size_per_gpu >= 1, "--batch_size_per_gpu must be at least 1")
    need(args.gradient_accumulation >= 1, "--gradient_accumulation must be at least 1")
    need(args.epochs >= 1, "--epochs must be at least 1")
    need(args.out_dim >= 1, "--out_dim (memory size) must be positive")
    need(args.partition_size >= 1, "--partition_size (block size) must be positive")
    need(args.partition_size <= args.out_dim,
         f"--partition_size (block size) {args.partition_size} is larger than the memory size "
         f"--out_dim {args.out_dim}")
    global_batch = args.batch_size_per_gpu * world_size
    need(args.out_dim % global_batch == 0,
         f"--out_dim (memory size) {args.out_dim} is not a multiple of the global batch "
         f"{global_batch} (batch_size_per_gpu {args.batch_size_per_gpu} x {world_size} "
         f"processes): the memory is refilled one global batch at a time")
    need(args.bottleneck_dim >= 1, "--bottleneck_dim must be positive")
    need(args.local_crops_number >= 0, "--local_crops_number must be >= 0")
    for name in ("global_crops_scale", "local_crops_scale"):
        low, high = getattr(args, name)
        need(0 < low <= high <= 1, f"--{name} needs 0 < MIN <= MAX <= 1, got {low} {high}")
    for name in ("global_crops_size", "local_crops_size"):
        need(getattr(args, name) >= 1, f"--{name} must be positive")
        if args.arch in VIT_ARCHS:
            need(getattr(args, name) >= args.patch_size,
                 f"--{name} {getattr(args, name)} is smaller than --patch_size {args.patch_size}")
    need(args.patch_size >= 1, "--patch_size must be positive")
    for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        need(getattr(args, name) > 0, f"--{name} must be positive")
    need(args.warmup_teacher_temp_epochs >= 0, "--warmup_teacher_temp_epochs must be >= 0")
    need(args.warmup_epochs >= 0, "--warmup_epochs must be >= 0")
    need(0 <= args.momentum_teacher <= 1, "--momentum_teacher must be in [0, 1]")
    need(math.isfinite(args.lr) and args.lr >= 0, "--lr must be a finite number >= 0")
    need(args.min_lr >= 0, "--min_lr must be >= 0")
    need(args.clip_grad >= 0, "--clip_grad must be >= 0 (0 disables clipping)")
    need(0 <= args.drop_path_rate < 1, "--drop_path_rate must be in [0, 1)")
    need(args.koleo_loss_weight >= 0, "--koleo_loss_weight must be >= 0")
    need(args.koleo_loss_weight == 0 or args.batch_size_per_gpu >= 2,
         "--koleo_loss_weight > 0 needs --batch_size_per_gpu >= 2 (nearest neighbours in a batch)")
    need(args.print_freq >= 1, "--print_freq must be at least 1")
    need(args.saveckp_freq >= 0, "--saveckp_freq must be >= 0")
    need(args.num_workers >= 0, "--num_workers must be >= 0")
    if args.device is not None and args.device.startswith("cuda"):
        need(torch.cuda.is_available(), f"--device {args.device} but CUDA is not available")


# --------------------------------------------------------------------------- data


def mix_seed(*values: int) -> int:
    """A well-mixed 64-bit seed from integers (splitmix64 chained), cheap enough per image."""
    mask = (1 << 64) - 1
    x = 0
    for v in values:
        x = (x + (v & mask) + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x


def blur_kernel_size(crop_size: int) -> int:
    """Odd Gaussian-blur kernel of about 10% of the crop (23 px at 224, 9 at 96, 3 at 28)."""
    return max(3, int(0.1 * crop_size) // 2 * 2 + 1)


class DataAugmentationMaSSL:
    """DINO's multi-crop augmentation (spec step 1): an image -> [global 1, global 2, locals...].

    Global crops: RandomResizedCrop(``global_crops_size``, ``global_crops_scale``), flip,
    colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, Gaussian blur (sigma 0.1-2)
    p 1.0 (crop 1) / p 0.1 (crop 2), solarization p 0.2 (crop 2 only). Local crops: the
    same at ``local_crops_size`` with blur p 0.5. Bicubic resizing, ImageNet normalisation.
    Works on PIL images; all randomness comes from torch's global generator.
    """

    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 local_crops_number: int, global_crops_size: int = 224, local_crops_size: int = 96):
        bicubic = v2.InterpolationMode.BICUBIC
        flip_and_color_jitter = [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                           p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        to_normalized_tensor = [
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ToPureTensor(),
        ]

        def blur(size: int, p: float) -> v2.Transform:
            return v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=p)

        self.global_transfo1 = v2.Compose([
            v2.RandomResizedCrop(global_crops_size, scale=tuple(global_crops_scale),
                                 interpolation=bicubic),
            *flip_and_color_jitter,
            blur(global_crops_size, 1.0),
            *to_normalized_tensor,
        ])
        self.global_transfo2 = v2.Compose([
            v2.RandomResizedCrop(global_crops_size, scale=tuple(global_crops_scale),
                                 interpolation=bicubic),
            *flip_and_color_jitter,
            blur(global_crops_size, 0.1),
            v2.RandomSolarize(threshold=128, p=0.2),
            *to_normalized_tensor,
        ])
        self.local_crops_number = local_crops_number
        self.local_transfo = v2.Compose([
            v2.RandomResizedCrop(local_crops_size, scale=tuple(local_crops_scale),
                                 interpolation=bicubic),
            *flip_and_color_jitter,
            blur(local_crops_size, 0.5),
            *to_normalized_tensor,
        ])

    def __call__(self, image) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops.extend(self.local_transfo(image) for _ in range(self.local_crops_number))
        return crops


def _is_visible_image(name: str) -> bool:
    # Dot-files (e.g. macOS "._x.jpg" resource forks) are never images.
    return not name.startswith(".") and name.lower().endswith(utils.IMAGE_EXTENSIONS)


def _image_files(folder: str) -> list[str]:
    """Image files under ``folder``, recursively, in sorted order (as ImageFolder lists them)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_visible_image(f))
    return found


def _has_image(folder: str) -> bool:
    for _, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(_is_visible_image(f) for f in filenames):
            return True
    return False


class PretrainDataset(Dataset):
    """Images of an ImageFolder tree or of a plain folder, as multi-crop lists.

    ``dataset[i]`` -> ``(crops, label)``. ``dataset[(seed, i)]`` (what ``PretrainSampler``
    yields) draws the augmentations from a generator seeded with ``seed``, so an image's
    crops depend only on (run seed, epoch, image) -- not on the worker, rank or resume point.
    """

    def __init__(self, root: str, samples: list[tuple[str, int]], classes: list[str],
                 transform: Callable | None, skip_bad_images: bool):
        self.root = root
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        """The PIL image at ``index`` (or, skipping bad files, the next readable one) and its label."""
        for attempt in range(MAX_CONSECUTIVE_BAD_IMAGES):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                return utils.load_rgb_image(path), label
            except utils.BadImageError as e:
                if not self.skip_bad_images:
                    raise utils.BadImageError(
                        f"{e} (--skip_bad_images true skips unreadable images)") from None
                if path not in self._warned:
                    self._warned.add(path)
                    print(f"warning: skipping unreadable image: {e}", file=sys.stderr, flush=True)
        raise utils.UserError(
            f"{MAX_CONSECUTIVE_BAD_IMAGES} unreadable images in a row after "
            f"{self.samples[index][0]}: is the dataset corrupt?")

    def __getitem__(self, key: int | tuple[int, int]):
        seed, index = key if isinstance(key, tuple) else (None, key)
        image, label = self.load(index)
        if self.transform is None:
            return image, label
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return self.transform(image), label


def build_pretrain_dataset(data_path: str, transform: Callable | None,
                           skip_bad_images: bool = False) -> PretrainDataset:
    """The training images under ``data_path``.

    With class sub-folders holding images (ImageFolder layout, e.g. ``imagenet/train``) the
    samples and labels are ImageFolder's; otherwise every image under ``data_path``
    (recursively) is a sample with label 0. Files are listed, not opened, except the first
    few to prove the data is readable. Raises ``utils.UserError`` for a missing or empty
    folder and ``utils.BadImageError`` naming an unreadable first image.
    """
    root = os.path.expanduser(str(data_path))
    if not os.path.exists(root):
        raise utils.UserError(f"data folder {root} does not exist (--data_path)")
    if not os.path.isdir(root):
        raise utils.UserError(f"--data_path {root} is not a folder")
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    classes = [d for d in subdirs if _has_image(os.path.join(root, d))]
    if classes:
        samples = [(path, label) for label, name in enumerate(classes)
                   for path in _image_files(os.path.join(root, name))]
        loose = [f for f in os.listdir(root) if _is_visible_image(f)]
        if loose:
            print(f"warning: {len(loose)} images directly in {root} are outside the class "
                  "folders and are not used", file=sys.stderr, flush=True)
    else:
        samples = [(path, 0) for path in _image_files(root)]
    if not samples:
        raise utils.UserError(
            f"no images found in {root} (looked recursively for "
            f"{', '.join(utils.IMAGE_EXTENSIONS)} files)")
    dataset = PretrainDataset(root, samples, classes, transform, skip_bad_images)
    _check_some_image_readable(dataset)
    return dataset


def _check_some_image_readable(dataset: PretrainDataset) -> None:
    errors = []
    for path, _ in dataset.samples[:MAX_STARTUP_PROBES]:
        try:
            utils.load_rgb_image(path)
            return
        except utils.BadImageError as e:
            if not dataset.skip_bad_images:
                raise utils.BadImageError(
                    f"{e} (--skip_bad_images true skips unreadable images)") from None
            errors.append(e)
    raise utils.UserError(
        f"no readable image in {dataset.root}: the first {len(errors)} files all failed "
        f"(first: {errors[0]})")


class PretrainSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch, same order on every rank) that

    * yields ``(augmentation seed, index)`` with the seed mixed from (seed, epoch, index),
    * stops after ``samples_per_epoch`` (whole optimizer steps; the rest is dropped),
    * can start mid-epoch (``set_start``) to resume after a preemption.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int,
                 samples_per_epoch: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        if samples_per_epoch > self.num_samples:
            raise ValueError(f"samples_per_epoch {samples_per_epoch} > {self.num_samples}")
        self.samples_per_epoch = samples_per_epoch
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(super().__iter__())[self.start:self.samples_per_epoch]
        return ((mix_seed(self.seed, 1, self.epoch, index), index) for index in order)

    def __len__(self) -> int:
        return self.samples_per_epoch - self.start


WORKER_STOP_GRACE_S = 120


def _defer_stop_signal(signum: int, frame: Any) -> None:
    # The first stop signal arms a SIGALRM (default action: end the process) for
    # WORKER_STOP_GRACE_S; later ones leave the running countdown as it is.
    remaining = signal.alarm(0)
    signal.alarm(remaining or WORKER_STOP_GRACE_S)


def _defer_stop_signals(worker_id: int) -> None:
    """Data-worker init: leave SIGTERM/SIGUSR1 to the training process.

    SLURM signals every process of the job at once. A worker that died at once would make the
    training process fail ("DataLoader worker exited unexpectedly") before it could save, so
    workers let the training process save and then stop them (shutdown_loader_workers). They
    do not ignore the signal for good: a worker nobody stops (the training process is exiting
    without having shut it down, and multiprocessing's exit-time terminate() is all that is
    left) ends WORKER_STOP_GRACE_S later instead of keeping the job, and its GPUs, alive.
    """
    if not hasattr(signal, "alarm"):  # Windows: no SIGUSR1/SIGALRM; keep the defaults
        return
    for name in ("SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), _defer_stop_signal)


def shutdown_loader_workers(loader: DataLoader) -> None:
    """Stop a DataLoader's persistent workers now, not whenever its iterator is collected.

    After an exception the iterator lives on in the traceback, and its workers with it, until
    interpreter exit, where multiprocessing terminates and joins them."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()  # private, but the only way that does not wait for gc
    loader._iterator = None


# --------------------------------------------------------------------------- model and optimiser


def build_networks(args: argparse.Namespace) -> tuple[MultiCropWrapper, MultiCropWrapper, int]:
    """Student and teacher (same weights; drop-path only in the student), on CPU."""
    student_backbone, embed_dim = build_backbone(
        args.arch, args.patch_size, img_size=args.global_crops_size,
        drop_path_rate=args.drop_path_rate)
    teacher_backbone, _ = build_backbone(
        args.arch, args.patch_size, img_size=args.global_crops_size, drop_path_rate=0.0)
    student = MultiCropWrapper(student_backbone, MaSSLHead(
        embed_dim, out_dim=args.bottleneck_dim, hidden_dim=2048, use_bn=args.use_bn_in_head))
    teacher = MultiCropWrapper(teacher_backbone, MaSSLHead(
        embed_dim, out_dim=args.bottleneck_dim, hidden_dim=2048, use_bn=args.use_bn_in_head))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher, embed_dim


def check_backbone_accepts_crops(backbone: nn.Module, arch: str, sizes: Sequence[int],
                                 device: torch.device) -> None:
    """One tiny no-grad forward per crop size, so e.g. a fixed-size timm ViT with 96 px
    local crops fails at start-up with a clear message, not at step 1 with a traceback."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            for size in sorted(set(sizes)):
                try:
                    backbone(torch.zeros(2, 3, size, size, device=device))
                except (RuntimeError, AssertionError, ValueError) as e:
                    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise utils.UserError(
                        f"--arch {arch} cannot take {size} px crops ({reason}); set "
                        "--global_crops_size/--local_crops_size to sizes it accepts or use one "
                        f"of {', '.join(VIT_ARCHS)}") from None
    finally:
        backbone.train(was_training)


def get_params_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight-decayed matrices first; biases and 1-D parameters (norms, tokens' ... ) undecayed."""
    decayed, undecayed = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (undecayed if name.endswith(".bias") or param.ndim <= 1 else decayed).append(param)
    return [{"params": decayed}, {"params": undecayed, "weight_decay": 0.0}]


def build_optimizer(name: str, params_groups: list[dict[str, Any]],
                    device: torch.device) -> torch.optim.Optimizer:
    """lr and weight decay start at 0: the schedules set them every step."""
    if name == "adamw":
        return torch.optim.AdamW(params_groups, lr=0.0, weight_decay=0.0,
                                 fused=device.type == "cuda")
    if name == "sgd":
        return torch.optim.SGD(params_groups, lr=0.0, momentum=0.9, weight_decay=0.0)
    raise utils.UserError(f"unknown --optimizer {name}")


def build_schedules(args: argparse.Namespace, steps_per_epoch: int,
                    base_lr: float) -> dict[str, np.ndarray]:
    """Per-optimizer-step values of lr, weight decay, teacher momentum and temperature."""
    total = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_teacher_temp_epochs * steps_per_epoch
    # Linear ramp at a rate set by --warmup_teacher_temp_epochs even when the run is shorter.
    ramp = np.minimum(np.arange(total) / warmup_steps, 1.0) if warmup_steps > 0 else np.ones(total)
    return {
        "lr": utils.cosine_scheduler(base_lr, args.min_lr, args.epochs, steps_per_epoch,
                                     warmup_epochs=args.warmup_epochs),
        "wd": utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs,
                                     steps_per_epoch),
        "momentum": utils.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs,
                                           steps_per_epoch),
        "teacher_temp": args.warmup_teacher_temp + ramp * (args.teacher_temp
                                                            - args.warmup_teacher_temp),
    }


@torch.no_grad()
def clip_gradients(params: list[nn.Parameter], max_norm: float) -> None:
    """Scale each parameter's gradient to norm <= max_norm, separately (DINO's clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, scales)


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor],
               momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


# --------------------------------------------------------------------------- checkpoints


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *[x for x in np_state[2:]]],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a one-item list without a process group)."""
    if not utils.is_dist():
        return [obj]
    out: list[Any] = [None] * utils.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


# Settings a checkpoint must share with the run resuming it (the weights' shapes).
RESUME_MUST_MATCH = ("arch", "patch_size", "out_dim", "bottleneck_dim", "use_bn_in_head",
                     "global_crops_size")


def load_checkpoint(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated/corrupt file, not a checkpoint, ...
        raise utils.UserError(f"cannot load checkpoint {path}: {e}") from None
    missing = [k for k in ("student", "teacher", "optimizer", "memory", "epoch") if k not in ckpt]
    if missing:
        raise utils.UserError(f"{path} is not a MaSSL training checkpoint (no {', '.join(missing)})")
    saved = ckpt.get("args", {})
    for key in RESUME_MUST_MATCH:
        if key in saved and saved[key] != getattr(args, key):
            raise utils.UserError(
                f"{path} was trained with --{key} {saved[key]}, this run has --{key} "
                f"{getattr(args, key)}: use a new --output_dir or the same settings")
    return ckpt


# --------------------------------------------------------------------------- signals


class StopRequest:
    """SIGTERM/SIGUSR1 handlers that only record the request; the loop finishes the step,
    saves and returns. ``restore()`` puts the previous handlers back."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False  # Python only delivers signals to the main thread
        for name in self.SIGNALS:
            if hasattr(signal, name):
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------- training


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def _agree(flags: Sequence[float], device: torch.device) -> list[float]:
    """Max of each flag over ranks, so every rank takes the same decision."""
    if not utils.is_dist():
        return list(flags)
    t = torch.tensor(flags, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def train(args: argparse.Namespace, install_signal_handlers: bool = True) -> str:
    """Pretrain MaSSL as ``args`` say; returns ``"finished"`` or ``"preempted"`` (after saving).

    Raises ``utils.UserError`` for bad input and ``NonFiniteLossError`` when the loss
    diverges. Installs SIGTERM/SIGUSR1 handlers (unless told not to) and restores the
    previous ones on return. Initialises and tears down ``torch.distributed`` when a
    launcher asks for several processes.
    """
    check_args(args, world_size_from_env())
    transform = DataAugmentationMaSSL(args.global_crops_scale, args.local_crops_scale,
                                      args.local_crops_number, args.global_crops_size,
                                      args.local_crops_size)
    dataset = build_pretrain_dataset(args.data_path, transform, args.skip_bad_images)

    owns_process_group = not utils.is_dist()
    env = utils.init_distributed(device=args.device)
    stop = StopRequest()
    try:
        if install_signal_handlers and not stop.install():
            print("warning: train() not called from the main thread: SIGTERM/SIGUSR1 will not "
                  "trigger a save", file=sys.stderr, flush=True)
        return _train(args, env, dataset, stop)
    finally:
        stop.restore()
        if owns_process_group:
            utils.cleanup_distributed()


def _train(args: argparse.Namespace, env: utils.DistEnv, dataset: PretrainDataset,
           stop: StopRequest) -> str:
    device = env.device
    is_main = env.is_main

    def log(message: str) -> None:
        if is_main:
            print(message, flush=True)

    world, B, accum = env.world_size, args.batch_size_per_gpu, args.gradient_accumulation
    check_args(args, world)  # the real world size, in case the launcher's variables lied
    steps_per_epoch = len(dataset) // world // B // accum
    if steps_per_epoch == 0:
        raise utils.UserError(
            f"the dataset has {len(dataset)} images, fewer than one optimizer step uses "
            f"(batch_size_per_gpu {B} x {world} processes x gradient_accumulation {accum} = "
            f"{B * world * accum})")
    output_dir = Path(args.output_dir)
    if is_main:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise utils.UserError(f"cannot create --output_dir {output_dir}: {e}") from None

    # ---- precision
    amp_dtype = None
    if args.use_bf16:
        amp_dtype = torch.bfloat16
        if device.type == "cpu":
            log("warning: --use_bf16 on CPU works but is slow")
    elif args.use_fp16:
        if device.type == "cuda":
            amp_dtype = torch.float16
        else:
            log(f"note: --use_fp16 needs CUDA; training in fp32 on {device.type}")
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    log("args: " + json.dumps(plain_args(args), sort_keys=True))

    # ---- networks and memory: identical on every rank (same seed), then per-rank randomness
    utils.fix_random_seeds(args.seed)
    student, teacher, embed_dim = build_networks(args)  # --arch was checked by check_args
    memory = MemoryBank(args.out_dim, args.bottleneck_dim)
    student, teacher, memory = student.to(device), teacher.to(device), memory.to(device)
    check_backbone_accepts_crops(teacher.backbone, args.arch,
                                 [args.global_crops_size] + [args.local_crops_size] * (
                                     args.local_crops_number > 0), device)
    if args.use_bn_in_head and env.distributed and device.type == "cuda":
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    if args.compile:
        student.backbone.compile()
        teacher.backbone.compile()
    student_module = student
    if env.distributed:
        student = nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None)
    utils.fix_random_seeds(args.seed + env.rank)  # drop-path differs across ranks
    n_params = sum(p.numel() for p in student_module.parameters())
    log(f"student and teacher: {args.arch} (feature dim {embed_dim}) + head -> "
        f"{args.bottleneck_dim}, {n_params / 1e6:.2f}M parameters each; memory {args.out_dim} x "
        f"{args.bottleneck_dim}, blocks of {args.partition_size}")

    criterion = MaSSLLoss(args.partition_size, student_temp=args.student_temp, n_global_crops=2)
    koleo = KoLeoLoss() if args.koleo_loss_weight > 0 else None
    student_params = [p for p in student_module.parameters() if p.requires_grad]
    ema_student = list(student_module.parameters())
    ema_teacher = list(teacher.parameters())
    optimizer = build_optimizer(args.optimizer, get_params_groups(student_module), device)
    base_lr = args.lr * B * world * accum / 256.0
    schedules = build_schedules(args, steps_per_epoch, base_lr)

    # ---- resume
    start_epoch, start_step = 0, 0
    resume_sums: dict[str, float] | None = None
    ckpt_path = output_dir / "checkpoint.pth"
    source = ckpt_path if ckpt_path.exists() else (Path(args.resume) if args.resume else None)
    if source is not None and not source.exists():
        raise utils.UserError(f"--resume {source} does not exist")
    found = _agree([float(source is not None)], device)[0]
    if found != float(source is not None):
        raise utils.UserError(f"{ckpt_path} is visible on some ranks only: --output_dir must be "
                              "on a filesystem shared by all nodes")
    if source is not None:
        ckpt = load_checkpoint(source, args)
        try:
            student_module.load_state_dict(strip_module_prefix(ckpt["student"]))
            teacher.load_state_dict(strip_module_prefix(ckpt["teacher"]))
            memory.load_state_dict(ckpt["memory"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise utils.UserError(f"{source} does not fit this model: "
                                  f"{str(e).strip().splitlines()[0]}") from None
        if scaler is not None and "fp16_scaler" in ckpt:
            scaler.load_state_dict(ckpt["fp16_scaler"])
        start_epoch = int(ckpt["epoch"])
        start_step = int(ckpt.get("iteration", 0))
        if start_step >= steps_per_epoch:  # steps per epoch changed since: start a new epoch
            start_epoch, start_step = start_epoch + 1, 0
        rank_states = ckpt.get("rank_states", [])
        if len(rank_states) == world:
            set_rng_state(rank_states[env.rank]["rng"], device)
            resume_sums = rank_states[env.rank].get("epoch_sums") if start_step > 0 else None
        else:
            log(f"note: {source} was saved by {len(rank_states)} processes, this run has {world}: "
                "random streams are reseeded, so the run will not replay exactly")
            utils.fix_random_seeds(mix_seed(args.seed, 2, env.rank, start_epoch, start_step)
                                   % (2 ** 32))
        log(f"resumed from {source}: {start_epoch} epochs"
            + (f" + {start_step} steps" if start_step else "") + " done")
        del ckpt

    if start_epoch >= args.epochs:
        log(f"nothing to do: {start_epoch} epochs already done (--epochs {args.epochs})")
        return "finished"

    # ---- data
    sampler = PretrainSampler(dataset, num_replicas=world, rank=env.rank, seed=args.seed,
                              samples_per_epoch=steps_per_epoch * accum * B)
    loader_generator = torch.Generator()  # keeps DataLoader seeding off the global RNG
    loader_generator.manual_seed(mix_seed(args.seed, 3, env.rank) % (2 ** 63))
    loader = DataLoader(
        dataset, batch_size=B, sampler=sampler, num_workers=args.num_workers,
        pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=args.num_workers > 0, worker_init_fn=_defer_stop_signals,
        generator=loader_generator)
    log(f"data: {len(dataset)} images in {args.data_path}; {world} process(es) x {B} images x "
        f"{accum} micro-batches = {B * world * accum} per step, {steps_per_epoch} steps per "
        f"epoch; lr {base_lr:.3g} (= {args.lr:g} x {B * world * accum} / 256); device "
        f"{device}{', ' + str(amp_dtype).replace('torch.', '') + ' autocast' if amp_dtype else ''}")

    writer = None
    if is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"),
                                   purge_step=start_epoch * steps_per_epoch + start_step)
        except ImportError:
            print("warning: tensorboard is not installed: no TensorBoard logs "
                  "(pip install tensorboard)", file=sys.stderr, flush=True)

    perm_generator = torch.Generator(device=device)
    run_start = time.time()
    log(f"training from epoch {start_epoch + 1} to {args.epochs}")
    try:
        for epoch in range(start_epoch, args.epochs):
            first_step = start_step if epoch == start_epoch else 0
            sampler.set_epoch(epoch)
            sampler.set_start(first_step * accum * B)
            outcome, sums, stopping = train_one_epoch(
                student=student, student_module=student_module, teacher=teacher,
                memory=memory, criterion=criterion, koleo=koleo,
                koleo_weight=args.koleo_loss_weight, optimizer=optimizer, scaler=scaler,
                amp_dtype=amp_dtype, student_params=student_params, ema_student=ema_student,
                ema_teacher=ema_teacher, clip_grad=args.clip_grad, schedules=schedules,
                loader=loader, epoch=epoch, epochs=args.epochs, first_step=first_step,
                steps_per_epoch=steps_per_epoch, accum=accum, seed=args.seed,
                perm_generator=perm_generator, device=device, stop=stop,
                print_freq=args.print_freq, writer=writer, log=log,
                resume_sums=resume_sums if epoch == start_epoch else None,
                images_per_step=B * world * accum, run_start=run_start,
                start_global_step=start_epoch * steps_per_epoch + start_step)
            finished_epoch = outcome == "epoch_done"
            state = dict(student=student_module, teacher=teacher, memory=memory,
                         optimizer=optimizer, scaler=scaler, args=args, device=device,
                         output_dir=output_dir, is_main=is_main)
            if not finished_epoch:  # stopped by a signal mid-epoch
                step_in_epoch = sums.pop("_step")
                save_training_state(**state, epoch=epoch, iteration=int(step_in_epoch),
                                    global_step=epoch * steps_per_epoch + int(step_in_epoch),
                                    epoch_sums=sums, numbered=False)
                log(f"stop signal ({stop.signal_name or 'on another rank'}): saved {ckpt_path} at "
                    f"epoch {epoch + 1} step {int(step_in_epoch)}/{steps_per_epoch}")
                return "preempted"
            sums.pop("_step")
            stats = epoch_summary(sums, schedules, epoch, steps_per_epoch, device)
            if writer is not None:
                for key, value in stats.items():
                    writer.add_scalar(f"epoch/{key}", value, epoch + 1)
                writer.flush()
            entry = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in stats.items()},
                     "time": datetime.datetime.now().isoformat(timespec="seconds")}
            if env.distributed:
                entry["rank_fingerprints"] = gather_objects(fingerprint(teacher, memory))
                if any(fp != entry["rank_fingerprints"][0] for fp in entry["rank_fingerprints"]):
                    log("warning: teacher/memory differ across ranks (see rank_fingerprints)")
            if is_main:
                with open(output_dir / "log.txt", "a") as f:
                    f.write(json.dumps(entry) + "\n")
            numbered = args.saveckp_freq > 0 and (epoch + 1) % args.saveckp_freq == 0
            save_training_state(**state, epoch=epoch + 1, iteration=0,
                                global_step=(epoch + 1) * steps_per_epoch, epoch_sums={},
                                numbered=numbered)
            log(f"Epoch [{epoch + 1}/{args.epochs}] done: loss {stats['loss']:.4f}, "
                f"{stats['epoch_time_s']:.1f} s, checkpoint saved")
            if stopping:
                log(f"stop signal ({stop.signal_name or 'on another rank'}): saved {ckpt_path} at "
                    f"the end of epoch {epoch + 1}")
                return "preempted"
    finally:
        shutdown_loader_workers(loader)
        if writer is not None:
            writer.close()
    log(f"Training time {format_seconds(time.time() - run_start)}")
    return "finished"


def fingerprint(teacher: nn.Module, memory: MemoryBank) -> list[float]:
    """Cheap checksums of the teacher and memory (compared across ranks in log.txt)."""
    with torch.no_grad():
        params = [p.detach().double() for p in teacher.parameters()]
        return [sum(p.sum().item() for p in params), sum(p.square().sum().item() for p in params),
                memory.bank.double().sum().item(), float(memory.ptr.item())]


def epoch_summary(sums: dict[str, float], schedules: dict[str, np.ndarray], epoch: int,
                  steps_per_epoch: int, device: torch.device) -> dict[str, float]:
    """Epoch means over all steps and ranks, and the schedules' means over the epoch."""
    keys = sorted(k for k in sums if k.startswith("sum_"))
    totals = torch.tensor([sums[k] for k in keys] + [sums["steps"]], dtype=torch.float64,
                          device=device)
    if utils.is_dist():
        dist.all_reduce(totals)
    totals = totals.tolist()
    stats = {k[len("sum_"):]: v / totals[-1] for k, v in zip(keys, totals[:-1])}
    window = slice(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch)
    stats.update({name: float(values[window].mean()) for name, values in schedules.items()})
    stats["epoch_time_s"] = sums["time_s"]
    stats["images_per_sec"] = sums["images"] / max(sums["time_s"], 1e-9)
    return stats


def save_training_state(*, student: nn.Module, teacher: nn.Module, memory: MemoryBank,
                        optimizer: torch.optim.Optimizer, scaler: Any, args: argparse.Namespace,
                        device: torch.device, output_dir: Path, is_main: bool, epoch: int,
                        iteration: int, global_step: int, epoch_sums: dict[str, float],
                        numbered: bool) -> None:
    """Atomically write checkpoint.pth (and checkpointNNNN.pth) on rank 0. Collective: every
    rank contributes its RNG state and partial epoch sums."""
    rank_states = gather_objects({"rng": rng_state(device), "epoch_sums": dict(epoch_sums)})
    if is_main:
        ckpt = {
            "student": strip_module_prefix(student.state_dict()),
            "teacher": teacher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "memory": memory.state_dict(),
            "epoch": epoch,
            "iteration": iteration,
            "global_step": global_step,
            "args": plain_args(args),
            "rank_states": rank_states,
        }
        if scaler is not None:
            ckpt["fp16_scaler"] = scaler.state_dict()
        utils.save_atomic(ckpt, output_dir / "checkpoint.pth")
        if numbered:
            utils.save_atomic(ckpt, output_dir / f"checkpoint{epoch:04d}.pth")
    utils.barrier()


def train_one_epoch(*, student: nn.Module, student_module: nn.Module, teacher: nn.Module,
                    memory: MemoryBank, criterion: MaSSLLoss, koleo: KoLeoLoss | None,
                    koleo_weight: float, optimizer: torch.optim.Optimizer, scaler: Any,
                    amp_dtype: torch.dtype | None, student_params: list[nn.Parameter],
                    ema_student: list[torch.Tensor], ema_teacher: list[torch.Tensor],
                    clip_grad: float, schedules: dict[str, np.ndarray], loader: DataLoader,
                    epoch: int, epochs: int, first_step: int, steps_per_epoch: int, accum: int,
                    seed: int, perm_generator: torch.Generator, device: torch.device,
                    stop: StopRequest, print_freq: int, writer: Any, log: Callable[[str], None],
                    resume_sums: dict[str, float] | None, images_per_step: int,
                    run_start: float, start_global_step: int
                    ) -> tuple[str, dict[str, float], bool]:
    """Optimizer steps ``first_step .. steps_per_epoch - 1`` of ``epoch``.

    Returns ``(outcome, sums, stopping)``: outcome ``"epoch_done"``, or ``"stopped"`` when a
    stop signal (on any rank) arrived before the last step; ``sums["_step"]`` is the number
    of steps done in the epoch; ``stopping`` says all ranks agreed to stop after this step.
    """
    sums = {"sum_loss": 0.0, "sum_massl": 0.0, "steps": 0, "time_s": 0.0, "images": 0}
    if koleo is not None:
        sums["sum_koleo"] = 0.0
    if resume_sums:
        sums.update(resume_sums)
    ddp = isinstance(student, nn.parallel.DistributedDataParallel)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    data_iter = iter(loader)
    window = {"loss": 0.0, "massl": 0.0, "koleo": 0.0, "steps": 0, "data_s": 0.0,
              "start": time.time()}
    epoch_start = time.time()
    step_done = first_step
    for step in range(first_step, steps_per_epoch):
        it = epoch * steps_per_epoch + step
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = float(schedules["lr"][it])
            if i == 0:  # only the first group is decayed
                group["weight_decay"] = float(schedules["wd"][it])
        teacher_temp = float(schedules["teacher_temp"][it])
        step_loss = step_massl = step_koleo = 0.0
        stop_flag = 0.0
        for micro in range(accum):
            t_data = time.time()
            try:
                crops, _ = next(data_iter)
            except utils.BadImageError as e:  # from a worker: keep the message, drop the traceback
                raise utils.BadImageError(_last_line(str(e))) from None
            window["data_s"] += time.time() - t_data
            crops = [c.to(device, non_blocking=True) for c in crops]
            B = crops[0].shape[0]
            micro_step = it * accum + micro
            perm_generator.manual_seed(mix_seed(seed, 4, micro_step) % (2 ** 63))
            perm = torch.randperm(memory.size, generator=perm_generator, device=device)
            sync = nullcontext() if (not ddp or micro == accum - 1) else student.no_sync()
            with sync:
                with autocast:
                    student_out = student(crops)
                    with torch.no_grad():
                        teacher_out = teacher(crops[:2])
                    massl = criterion(student_out, teacher_out, memory.features, teacher_temp,
                                      perm=perm)
                    loss = massl
                    if koleo is not None:
                        koleo_value = sum(koleo(chunk) for chunk in student_out[:2 * B].chunk(2)) / 2
                        loss = loss + koleo_weight * koleo_value
                loss_value, massl_value = loss.item(), massl.item()
                koleo_item = koleo_value.item() if koleo is not None else 0.0
                nonfinite, stop_flag = _agree(
                    [float(not math.isfinite(loss_value)), float(stop.signal_name is not None)],
                    device)
                if nonfinite:
                    raise NonFiniteLossError(
                        f"non-finite loss at epoch {epoch + 1} iteration {step + 1}/"
                        f"{steps_per_epoch} (global step {it + 1}): loss={loss_value}, "
                        f"massl={massl_value}"
                        + (f", koleo={koleo_item}" if koleo is not None else "")
                        + "; the last good checkpoint is kept (try a lower --lr"
                        + (", or --use_fp16 false)" if amp_dtype == torch.float16 else ")"))
                memory.update(teacher_out[B:2 * B])  # teacher embeddings of global crop 2
                scaled = loss / accum
                if scaler is not None:
                    scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            step_loss += loss_value / accum
            step_massl += massl_value / accum
            step_koleo += koleo_item / accum

        if scaler is not None:
            if clip_grad:
                scaler.unscale_(optimizer)
                clip_gradients(student_params, clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            if clip_grad:
                clip_gradients(student_params, clip_grad)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        momentum = float(schedules["momentum"][it])
        ema_update(ema_teacher, ema_student, momentum)

        step_done = step + 1
        sums["sum_loss"] += step_loss
        sums["sum_massl"] += step_massl
        if koleo is not None:
            sums["sum_koleo"] += step_koleo
        sums["steps"] += 1
        sums["images"] += images_per_step
        window["loss"] += step_loss
        window["massl"] += step_massl
        window["koleo"] += step_koleo
        window["steps"] += 1

        if step_done % print_freq == 0 or step_done == steps_per_epoch or stop_flag:
            now = time.time()
            elapsed = now - window["start"]
            n = window["steps"]
            sec_per_step = elapsed / n
            epoch_rate = (now - epoch_start) / (step_done - first_step)
            total_done = it + 1 - start_global_step
            total_rate = (now - run_start) / total_done
            eta_epoch = epoch_rate * (steps_per_epoch - step_done)
            eta_total = total_rate * (epochs * steps_per_epoch - it - 1)
            images_per_sec = images_per_step * n / max(elapsed, 1e-9)
            values = {"loss": window["loss"] / n, "massl": window["massl"] / n,
                      "lr": float(schedules["lr"][it]), "wd": float(schedules["wd"][it]),
                      "momentum": momentum, "teacher_temp": teacher_temp,
                      "images_per_sec": images_per_sec}
            if koleo is not None:
                values["koleo"] = window["koleo"] / n
            width = len(str(steps_per_epoch))
            log(f"Epoch [{epoch + 1}/{epochs}] it [{step_done:>{width}}/{steps_per_epoch}]  "
                f"loss {values['loss']:.4f}"
                + (f" (massl {values['massl']:.4f} koleo {values['koleo']:.4f})"
                   if koleo is not None else "")
                + f"  lr {values['lr']:.3e}  wd {values['wd']:.4f}  mom {momentum:.5f}  "
                f"t_temp {teacher_temp:.4f}  {images_per_sec:.1f} img/s  "
                f"{sec_per_step:.3f} s/it (data {window['data_s'] / n:.3f})  "
                f"ETA {format_seconds(eta_epoch)} epoch, {format_seconds(eta_total)} total")
            if writer is not None:
                for key, value in values.items():
                    writer.add_scalar(f"train/{key}", value, it + 1)
            window = {"loss": 0.0, "massl": 0.0, "koleo": 0.0, "steps": 0, "data_s": 0.0,
                      "start": now}
        if stop_flag and step_done < steps_per_epoch:
            sums["time_s"] += time.time() - epoch_start
            sums["_step"] = step_done
            return "stopped", sums, True
    sums["time_s"] += time.time() - epoch_start
    sums["_step"] = step_done
    return "epoch_done", sums, bool(stop_flag)


def _last_line(message: str) -> str:
    """The error itself from a DataLoader worker's re-raised message (which embeds a traceback)."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else message
    marker = "BadImageError: "
    return last.split(marker, 1)[1] if marker in last else last


def build_cli_parser() -> argparse.ArgumentParser:
    """The command-line parser of this script: ``get_args_parser()`` plus ``--help``."""
    return argparse.ArgumentParser(
        "main_massl.py", parents=[get_args_parser()], allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="MaSSL self-supervised pretraining (one process, one GPU, or torchrun/SLURM).")


def main(argv: list[str] | None = None) -> None:
    args = build_cli_parser().parse_args(argv)
    try:
        outcome = train(args)
    except utils.UserError as e:
        utils.exit_with_error(_last_line(str(e)) if isinstance(e, utils.BadImageError) else str(e))
    except NonFiniteLossError as e:
        utils.exit_with_error(str(e), code=1)
    if outcome == "preempted":
        if int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0) == 0:
            print(f"preempted: state saved in {Path(args.output_dir) / 'checkpoint.pth'}; run the "
                  "same command again to resume", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
