#!/usr/bin/env python
"""MaSSL pretraining: student/teacher ViTs compared against a FIFO memory of teacher embeddings.

One script for every scale (docs/method.md describes the method step by step):

    python main_massl.py --arch vit_nano --patch_size 4 --global_crops_size 28 ...   # CPU or 1 GPU
    torchrun --nproc-per-node=8 main_massl.py --arch vit_small --data_path /imagenet/train ...

A run writes ``checkpoint.pth`` (every epoch), ``checkpointNNNN.pth`` (every
``--saveckp_freq`` epochs), ``log.txt`` (one JSON line per epoch) and TensorBoard events to
``--output_dir``. Starting the same command again resumes from ``checkpoint.pth``, exactly:
the random memory blocks and every image's augmentations are seeded from (seed, step) and
(seed, epoch, image), and the RNG states of every rank travel in the checkpoint. SIGTERM or
SIGUSR1 (cluster preemption) finish the current step, save and exit 0.

This file holds the flags, the set-up, the loop (``train`` sets up and tears down,
``train_loop`` runs the epochs, ``run_epoch`` one epoch) and ``main``. One optimizer step and
the checkpoint contents live in ``trainer.py``, saving and resuming in ``run_folder.py``, what
a run prints and logs in ``runlog.py``, the data pipeline in ``data.py``.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

import distributed
import utils
from data import (PretrainDataset, TrainingData, build_pretrain_dataset, build_pretrain_transform,
                  build_training_data, shutdown_loader_workers)
from device_augment import AUGMENT_ON
from evaluation import usable_workers
from monitor import HEALTH_KEYS, OnlineKNN, default_knn_resize
from run_folder import (ResumePoint, check_resume_file, epoch_state, prepare_output_dir,
                        remove_if_unused, resume, save_checkpoint)
from runlog import MetricMeter, RunLog, TimedIterator, format_seconds
from trainer import MaSSLTrainer, NonFiniteLossError
from vision_transformer import VIT_ARCHS, UnknownArchError, check_arch


# --------------------------------------------------------------------------- command line


# --compile's default. Off until measured on a GPU: when benchmarks/gpu_check.sh shows the
# compiled step faster (after its start-up pause), set True here (CPU runs pass false).
COMPILE_DEFAULT = False


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
    group.add_argument("--out_dim", "--memory_size", dest="memory_size", default=65536, type=int, help=(
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
    group.add_argument("--use_bn_in_head", default=False, type=utils.bool_flag, help=(
        "BatchNorm after the hidden layers of the projection head (SyncBatchNorm on multi-GPU "
        "runs). Reference runs: false."))
    group.add_argument("--drop_path_rate", "--drop_path", dest="drop_path_rate", default=0.1,
                       type=float, help=(
        "Stochastic depth rate of the student backbone (the teacher uses 0). Reference runs: 0.1."))
    group.add_argument("--momentum_teacher", default=0.992, type=float, help=(
        "Base EMA momentum of the teacher, raised to 1 over training with a cosine schedule. "
        "Higher values suit smaller batches. Reference runs: 0.992 (ViT-S), 0.996 (ViT-B)."))
    group.add_argument("--compile", default=COMPILE_DEFAULT, type=utils.bool_flag, help=(
        "torch.compile the student and teacher backbones (faster steps on GPU after a "
        "compilation pause at start-up; on CPU the two crop sizes compile 3 graphs in the "
        "first step, never again). Default false until a GPU measurement "
        "(benchmarks/gpu_check.sh) shows it faster: then flip COMPILE_DEFAULT."))
    group.add_argument("--tf32_logits", default=True, type=utils.bool_flag, help=(
        "On CUDA, the memory logits' matmuls in TF32 (10 mantissa bits in, float32 sums: "
        "the precision of the authors' fp16 logits; measured error in docs/method.md, "
        "section 10). False: IEEE float32. No effect on CPU. Default true."))

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
    group.add_argument("--use_fp16", default=True, type=utils.bool_flag, help=(
        "fp16 mixed precision with a gradient scaler (CUDA only: on CPU the run warns and uses "
        "fp32). Faster and lighter; turn it off if the loss is unstable. Reference runs: true."))
    group.add_argument("--use_bf16", default=False, type=utils.bool_flag, help=(
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
    group.add_argument("--color_jitter_prob", default=0.8, type=float, help=(
        "Probability of colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) "
        "per crop. Reference runs: 0.8, which the quick start keeps (turning it off cost it 2 "
        "points: docs/quickstart.md)."))
    group.add_argument("--grayscale_prob", default=0.2, type=float, help=(
        "Probability of converting a crop to grayscale. Reference runs: 0.2."))
    group.add_argument("--solarization_prob", default=0.2, type=float, help=(
        "Probability of solarizing global crop 2. Reference runs: 0.2."))
    group.add_argument("--augment_on", default="workers", type=str, help=(
        "Where the crops are made. workers: PIL in the DataLoader workers (~19 ms of CPU per "
        "image for 2x224 + 10x96 crops; the reference). device: the workers only decode and "
        "draw the random parameters (the same draws), and the crops are made in batches on "
        "the training device with PIL's arithmetic: for GPUs whose loader cores cannot keep "
        "up. On CPU it works but is slower. See README, Data loading."))

    group = parser.add_argument_group("data, output and launching")
    group.add_argument("--data_path", required=True, type=str, help=(
        "Training images: an ImageFolder root (class sub-folders, e.g. imagenet/train) or any "
        "folder of images searched recursively (unlabelled data; labels are not used)."))
    group.add_argument("--skip_bad_images", default=False, type=utils.bool_flag, help=(
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

    group = parser.add_argument_group("monitoring (README: Monitoring a run)")
    group.add_argument("--health_metrics", default=True, type=utils.bool_flag, help=(
        "Every --print_freq steps, log block entropies, student-teacher agreement, memory usage "
        "and spread, and the gradient norm (read off tensors the step has; no extra forward), "
        "and warn when they look collapsed. Default true."))
    group.add_argument("--knn_data_path", default="", type=str, help=(
        "Labelled ImageFolder with train/<class>/* and val/<class>/* for an online k-NN of the "
        "teacher backbone (eval_knn.py's protocol, k=20, T=0.07) every --knn_freq epochs and "
        "after the last one, logged as knn_top1. Default: none."))
    group.add_argument("--knn_freq", default=10, type=int, help=(
        "Epochs between online k-NN evaluations (the last epoch is always evaluated)."))
    group.add_argument("--knn_max_train", default=50000, type=int, help=(
        "Use at most this many images of KNN_DATA/train (a fixed class-balanced subset chosen "
        "from --seed); 0: all. Bounds the k-NN's cost (every image goes through the teacher)."))
    group.add_argument("--knn_max_val", default=10000, type=int, help=(
        "Use at most this many images of KNN_DATA/val (fixed, class-balanced); 0: all."))
    group.add_argument("--knn_crop_size", default=None, type=int, help=(
        "Centre-crop size of the k-NN images. Default: --global_crops_size (224 for ImageNet)."))
    group.add_argument("--knn_resize_size", default=None, type=int, help=(
        "Shorter side after the bicubic resize, before the crop. Default: 256/224 of the crop "
        "(256 for 224, as eval_knn.py); for small images pass the image size (e.g. 28)."))
    return parser


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
    need(args.memory_size >= 1, "--out_dim (memory size) must be positive")
    need(args.partition_size >= 1, "--partition_size (block size) must be positive")
    need(args.partition_size <= args.memory_size,
         f"--partition_size (block size) {args.partition_size} is larger than the memory size "
         f"--out_dim {args.memory_size}")
    global_batch = args.batch_size_per_gpu * world_size
    need(args.memory_size % global_batch == 0,
         f"--out_dim (memory size) {args.memory_size} is not a multiple of the global batch "
         f"{global_batch} (batch_size_per_gpu {args.batch_size_per_gpu} x {world_size} "
         f"processes): the memory is refilled one global batch at a time")
    need(args.bottleneck_dim >= 1, "--bottleneck_dim must be positive")
    need(args.local_crops_number >= 0, "--local_crops_number must be >= 0")
    need(args.augment_on in AUGMENT_ON,
         f"--augment_on must be {' or '.join(AUGMENT_ON)}, got '{args.augment_on}'")
    for name in ("color_jitter_prob", "grayscale_prob", "solarization_prob"):
        need(0.0 <= getattr(args, name) <= 1.0, f"--{name} must be in [0, 1]")
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
    need(args.warmup_epochs <= args.epochs,
         f"--warmup_epochs {args.warmup_epochs} is more than --epochs {args.epochs}: the learning "
         "rate would never reach --lr; use fewer warm-up epochs")
    for name in ("weight_decay", "weight_decay_end"):
        need(not getattr(args, name) < 0,  # nan is left to the finite-number check below
             f"--{name} must be >= 0, got {getattr(args, name)}")
    problem = utils.seed_problem(args.seed)
    need(problem is None, problem or "")
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
    need(args.knn_freq >= 1, "--knn_freq must be at least 1")
    need(args.knn_max_train >= 0 and args.knn_max_val >= 0,
         "--knn_max_train and --knn_max_val must be >= 0 (0: all images)")
    for name in ("knn_crop_size", "knn_resize_size"):
        need(getattr(args, name) is None or getattr(args, name) >= 1, f"--{name} must be positive")
    if args.knn_crop_size is not None and args.arch in VIT_ARCHS:
        need(args.knn_crop_size >= args.patch_size,
             f"--knn_crop_size {args.knn_crop_size} is smaller than --patch_size {args.patch_size}")
    bad_floats = [f"--{name} {value}" for name, value in sorted(vars(args).items())
                  if isinstance(value, float) and not math.isfinite(value)]
    need(not bad_floats, f"{', '.join(bad_floats)}: must be a finite number")
    check_memory_need(args, utils.resolve_device(args.device))


def memory_need_bytes(args: argparse.Namespace) -> int:
    """A lower bound of the bytes the memory and its per-step logits take on one process: the
    bank (memory_size x bottleneck_dim fp32) and, for every crop of the batch, a row of
    memory_size logits with its softmax and gradient (3 copies)."""
    crops = 2 + args.local_crops_number
    return 4 * args.memory_size * (args.bottleneck_dim + 3 * args.batch_size_per_gpu * crops)


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of the device a run will use (GPU memory, else RAM); None if unknown."""
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK") or 0) % max(torch.cuda.device_count(), 1)
        return torch.cuda.get_device_properties(local_rank).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory_need(args: argparse.Namespace, device: torch.device) -> None:
    """Refuse a memory size that cannot fit, before anything is allocated (an allocator
    traceback asking for terabytes tells the user less)."""
    need, have = memory_need_bytes(args), device_memory_bytes(device)
    if have is not None and need > have:
        raise utils.UserError(
            f"--out_dim {args.memory_size} needs at least {need / 2 ** 30:.1f} GiB for the memory "
            f"and its logits (bottleneck {args.bottleneck_dim}, batch {args.batch_size_per_gpu} x "
            f"{2 + args.local_crops_number} crops), more than the {have / 2 ** 30:.1f} GiB of the "
            "device: use a smaller --out_dim (the paper: 65536)")


# --------------------------------------------------------------------------- training


def train(args: argparse.Namespace, install_signal_handlers: bool = True) -> str:
    """Pretrain MaSSL as ``args`` say; returns ``"finished"``, ``"preempted"`` (SIGTERM/SIGUSR1)
    or ``"interrupted"`` (Ctrl-C), the last two after saving.

    Raises ``utils.UserError`` for bad input and ``NonFiniteLossError`` when the loss
    diverges. Installs SIGTERM/SIGUSR1/SIGINT handlers (unless told not to) and restores the
    previous ones on return. Initialises and tears down ``torch.distributed`` when a
    launcher asks for several processes.
    """
    check_args(args, distributed.world_size_from_env())
    output_dir = Path(args.output_dir)
    check_resume_file(args, output_dir)  # before anything is created
    created = not output_dir.exists()
    # Rank 0 owns --output_dir: it checks that it is writable and locks it for the run.
    lock = prepare_output_dir(output_dir) if distributed.rank_from_env() == 0 else None
    try:
        dataset = build_pretrain_dataset(args.data_path, build_pretrain_transform(args),
                                         args.skip_bad_images)
        knn = build_online_knn(args)

        owns_process_group = not distributed.is_dist()
        env = distributed.init_distributed(device=args.device)
        stop = distributed.StopRequest()
        try:
            if install_signal_handlers and not stop.install():
                print("warning: train() not called from the main thread: SIGTERM/SIGUSR1 will "
                      "not trigger a save", file=sys.stderr, flush=True)
            return train_loop(args, env, dataset, stop, knn)
        finally:
            stop.restore()
            if owns_process_group:
                distributed.cleanup_distributed()
    except BaseException:
        if lock is not None and created:
            lock.release()
            remove_if_unused(output_dir)  # a failed start leaves no empty folder behind
        raise
    finally:
        if lock is not None:
            lock.release()


def build_online_knn(args: argparse.Namespace) -> OnlineKNN | None:
    """The online k-NN that ``--knn_data_path`` asks for (its folders checked now, before
    any training), or None."""
    if not args.knn_data_path:
        return None
    crop = args.knn_crop_size or args.global_crops_size
    resize = args.knn_resize_size or default_knn_resize(crop)
    return OnlineKNN(args.knn_data_path, resize_size=resize, crop_size=crop,
                     max_train=args.knn_max_train, max_val=args.knn_max_val,
                     batch_size=args.batch_size_per_gpu,
                     num_workers=usable_workers(args.num_workers), seed=args.seed)


def train_loop(args: argparse.Namespace, env: distributed.DistEnv, dataset: PretrainDataset,
               stop: distributed.StopRequest, knn: OnlineKNN | None = None) -> str:
    """The training loop of ``train``: build the trainer, resume, run the epochs (each saving
    its checkpoint) until ``--epochs`` or a stop signal; returns ``train``'s outcome."""
    world, B, accum = env.world_size, args.batch_size_per_gpu, args.gradient_accumulation
    check_args(args, world)  # the real world size, in case the launcher's variables lied
    data = build_training_data(args, dataset, world, env.rank, env.device)
    steps_per_epoch = data.steps_per_epoch
    output_dir = Path(args.output_dir)
    log = RunLog(args, env, output_dir, steps_per_epoch)
    log("args: " + json.dumps(vars(args), sort_keys=True, default=str))

    trainer = MaSSLTrainer(args, env, steps_per_epoch, log=log)
    log(f"student and teacher: {args.arch} (feature dim {trainer.embed_dim}) + head -> "
        f"{args.bottleneck_dim}, {trainer.n_params / 1e6:.2f}M parameters each; memory "
        f"{args.memory_size} x {args.bottleneck_dim}, blocks of {args.partition_size}")
    start = resume(trainer, args, output_dir, log)
    if start.epoch >= args.epochs:
        log(f"nothing to do: {start.epoch} epochs already done (--epochs {args.epochs})")
        return "finished"

    amp = f", {str(trainer.amp_dtype).replace('torch.', '')} autocast" if trainer.amp_dtype else ""
    log(f"data: {len(dataset)} images in {args.data_path}; {world} process(es) x {B} images x "
        f"{accum} micro-batches = {trainer.images_per_step} per step, {steps_per_epoch} steps per "
        f"epoch; lr {trainer.base_lr:.3g} (= {args.lr:g} x {trainer.images_per_step} / 256); "
        f"device {env.device}{amp}; crops made on the "
        f"{'training device' if args.augment_on == 'device' else 'loader workers'} "
        f"(--augment_on {args.augment_on})")
    if knn is not None:
        log(f"{knn.describe()}; every {args.knn_freq} epoch(s) and after the last")
    log.open_tensorboard(trainer.global_step)
    log(f"training from epoch {start.epoch + 1} to {args.epochs}")
    try:
        for epoch in range(start.epoch, args.epochs):
            resumed = start if epoch == start.epoch else ResumePoint(epoch=epoch)
            stopped = run_epoch(trainer, data, resumed, stop, log, knn)
            if stopped is not None:
                where = (f"epoch {epoch + 1} step {stopped}/{steps_per_epoch}"
                         if stopped < steps_per_epoch else f"the end of epoch {epoch + 1}")
                log(f"stop signal ({stop.signal_name or 'on another rank'}): saved "
                    f"{output_dir / 'checkpoint.pth'} at {where}")
                return "interrupted" if stop.signal_name == "SIGINT" else "preempted"
    finally:
        shutdown_loader_workers(data.loader)
        log.close()
    log(f"Training time {format_seconds(time.time() - log.run_start)}")
    return "finished"


def run_epoch(trainer: MaSSLTrainer, data: TrainingData, start: ResumePoint,
              stop: distributed.StopRequest, log: RunLog, knn: OnlineKNN | None = None) -> int | None:
    """Train ``start.epoch`` from ``start``; save the checkpoint at its end, or mid-epoch when a
    stop signal arrives. Returns None, or the step in the epoch at which the run stopped.

    Health metrics are computed on logging steps only (every ``--print_freq`` steps and the
    epoch's last), so the other steps pay nothing; the online k-NN runs at the epoch's end,
    before the checkpoint that carries the epoch's log line."""
    args, epoch, spe = trainer.args, start.epoch, trainer.steps_per_epoch
    data.sampler.set_epoch(epoch)
    data.sampler.set_start(start.sample)
    meter, health = MetricMeter(), MetricMeter()  # health: logging steps only
    if start.meter:
        meter.load_state_dict(start.meter)
    if start.health:
        health.load_state_dict(start.health)
    log.epoch_warnings = list(start.warnings)
    trainer.global_step = epoch * spe + start.step
    batches = TimedIterator(iter(data.loader), data.crops)
    epoch_start = time.time() - start.epoch_time_s
    log.window_start = time.time()
    stopping = False
    for step in range(start.step + 1, spe + 1):
        logging_step = step % args.print_freq == 0 or step == spe
        metrics = trainer.train_step(itertools.islice(batches, trainer.accum),
                                     stop_requested=stop.signal_name is not None,
                                     monitor=args.health_metrics and logging_step)
        stopping = metrics.pop("stop") > 0
        health_values = {k: metrics.pop(k) for k in HEALTH_KEYS if k in metrics}
        if health_values:  # logging steps only: the means are over the steps that measured
            health.update(**health_values)
        meter.update(**metrics, images=trainer.images_per_step, data_s=batches.pop_wait())
        if logging_step or stopping:
            log.step(epoch, step, trainer.global_step, meter, health, epoch_start, start.step,
                     len(trainer.params))
        if stopping and step < spe:
            save_checkpoint(trainer, log.output_dir, epoch, step,
                            epoch_state(meter, health, time.time() - epoch_start, log),
                            writer=log.checkpoints)
            return step
    epoch_time = time.time() - epoch_start
    stats = meter.epoch_means(trainer.device)
    stats.pop("data_s", None)
    stats["images_per_sec"] = stats.pop("images") / max(epoch_time / meter.count, 1e-9)
    stats["epoch_time_s"] = epoch_time
    if health.count:
        stats.update(health.epoch_means(trainer.device))
    entry = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in sorted(stats.items())}}
    if knn is not None and ((epoch + 1) % args.knn_freq == 0 or epoch + 1 == args.epochs):
        if stopping:  # the job has seconds left: save first (this epoch's k-NN is skipped)
            log(f"Epoch [{epoch + 1}/{args.epochs}] online k-NN skipped: stop signal")
        else:
            result = knn.evaluate(trainer.teacher.backbone, trainer.embed_dim, trainer.device)
            entry.update(knn_top1=result.top1, knn_seconds=result.seconds)
            log(f"Epoch [{epoch + 1}/{args.epochs}] online k-NN top-1 (k={result.k}, "
                f"{result.num_train} train / {result.num_val} val images): {result.top1:.2f}% "
                f"({result.seconds:.1f} s)")
    if log.epoch_warnings:
        entry["warnings"] = log.epoch_warnings
    entry["time"] = datetime.datetime.now().isoformat(timespec="seconds")
    if trainer.env.distributed:
        entry["rank_fingerprints"] = distributed.gather_objects(trainer.fingerprint())
        if any(fp != entry["rank_fingerprints"][0] for fp in entry["rank_fingerprints"]):
            log("warning: teacher/memory differ across ranks (see rank_fingerprints)")
    # The checkpoint first: it carries the epoch's log line, which resume() writes to log.txt
    # if a kill between the two lost it. Both are written in the background, the line once
    # the checkpoint is in place, while the next epoch trains.
    save_checkpoint(trainer, log.output_dir, epoch + 1, 0, epoch_state(None, None, 0.0, log),
                    numbered=args.saveckp_freq > 0 and (epoch + 1) % args.saveckp_freq == 0,
                    log_entry=entry, writer=log.checkpoints,
                    then=lambda: log.append_log_line(entry))
    log.epoch_scalars(entry)
    log(f"Epoch [{epoch + 1}/{args.epochs}] done: loss {stats['loss']:.4f}, "
        f"{epoch_time:.1f} s, checkpoint saved")
    return spe if stopping else None


# --------------------------------------------------------------------------- command line entry


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
        utils.exit_with_error(utils.user_error_message(e))
    except NonFiniteLossError as e:
        utils.exit_with_error(str(e), code=1)
    except Exception as e:  # noqa: BLE001 - reworded only when a peer was lost
        message = distributed.lost_peer_message(e, args.output_dir)
        if message is None:
            raise
        utils.exit_with_error(message, code=1)
    if outcome == "interrupted":
        if distributed.rank_from_env() == 0:
            print(f"interrupted (Ctrl-C): state saved in {Path(args.output_dir) / 'checkpoint.pth'}"
                  "; run the same command again to resume", file=sys.stderr, flush=True)
        sys.exit(130)  # the shell's code for Ctrl-C: `main_massl.py && next` does not go on
    if outcome == "preempted" and distributed.rank_from_env() == 0:
        print(f"preempted: state saved in {Path(args.output_dir) / 'checkpoint.pth'}; run the "
              "same command again to resume", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
