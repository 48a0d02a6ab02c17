"""Linear probe on a frozen backbone (DINO's linear evaluation protocol).

The backbone is frozen; a single linear layer is trained on its features with SGD
(momentum 0.9, no weight decay, lr scaled by global batch / 256, cosine over the
epochs), on RandomResizedCrop + horizontal-flip views of the train images, and tested
on resized, centre-cropped val images. Features: the CLS tokens of the last
``--n_last_blocks`` blocks concatenated (4 for ViT-S in the paper), optionally with the
mean patch token of the last block (``--avgpool_patchtokens true``; ViT-B in the paper
uses ``--n_last_blocks 1 --avgpool_patchtokens true``).

    python eval_linear.py --data_path /path/to/imagenet --pretrained_weights checkpoint.pth
    torchrun --nproc_per_node=8 eval_linear.py --data_path /path/to/imagenet \\
        --pretrained_weights checkpoint.pth --output_dir linear_out
    python eval_linear.py ... --evaluate          # accuracy of the saved head only
    python eval_linear.py ... --cache_features true --resize_size 28 --crop_size 28  # small data

The head is saved to ``OUTPUT_DIR/linear_last.pth`` every epoch (a run restarted with
the same output folder resumes from it, exactly: every epoch's shuffle and augmentations
are seeded from (--seed, epoch), so a run killed at any point and restarted ends with the
same head as one never stopped) and to ``linear_best.pth`` when val top-1 improves. One
JSON line per epoch goes to ``OUTPUT_DIR/linear_log.txt`` (never a training's ``log.txt``);
the folder is locked like a training's, so two runs never write into one folder. Results go to ``OUTPUT_DIR/linear_results.json``::

    {"top1": ..., "top5": ..., "best_top1": ..., "epoch": ..., "num_train": ..., "num_val": ...,
     "num_classes": ..., "top5_is_top": 5, "protocol": ..., "checkpoint": ..., "arch": ..., ...}

``--cache_features true`` runs the backbone once over un-augmented (centre-cropped)
train images and trains the head on those stored features: minutes instead of hours on
small datasets, but *not* the paper protocol (no augmentation), so its numbers are not
comparable with published linear-probe results.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from torchvision import transforms

import distributed
import storage
import utils
import vision_transformer as vits
from evaluation import (add_backbone_and_data_args, backbone_identity, build_eval_backbone,
                        build_train_val, check_common_args, check_crop_size, describe_backbone,
                        eval_transform, extract_features, lock_output_dir, Progress, run_as_script,
                        shard_range, unlock_output_dir, usable_workers)

LAST_HEAD = "linear_last.pth"
BEST_HEAD = "linear_best.pth"
LOG_FILE = "linear_log.txt"  # not log.txt: that name is a training's (plot_training.py reads it)
# Settings a saved head depends on: resuming with other values would mix two experiments.
RESUME_SETTINGS = ("pretrained_weights", "checkpoint_key", "arch", "patch_size", "n_last_blocks",
                   "avgpool_patchtokens", "cache_features", "resize_size", "crop_size", "epochs",
                   "lr", "feature_dim", "num_classes", "weights_sha256")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "eval_linear", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_backbone_and_data_args(parser)
    group = parser.add_argument_group("linear probe")
    group.add_argument("--n_last_blocks", default=4, type=int, help="""Concatenate the CLS
        tokens of this many last blocks (4 for ViT-S/16, 1 for ViT-B/16 in DINO and the
        paper). Non-ViT timm backbones use their pooled feature instead.""")
    group.add_argument("--avgpool_patchtokens", default=False, type=utils.bool_flag, help="""Also
        concatenate the mean patch token of the last block (true for ViT-B/16 in the paper,
        false for ViT-S/16).""")
    group.add_argument("--epochs", default=100, type=int, help="Training epochs (100 in the paper).")
    group.add_argument("--lr", default=0.001, type=float, help="""Learning rate per 256 images:
        the SGD lr is lr * batch_size_per_gpu * world_size / 256, then cosine to 0 over the
        epochs (DINO's default 0.001; DINO sweeps it for its best numbers).""")
    group.add_argument("--val_freq", default=1, type=int, help="""Validate every this many
        epochs (and always after the last).""")
    group.add_argument("--cache_features", default=False, type=utils.bool_flag, help="""Fast path for
        small data: extract frozen features of un-augmented train images once and train the
        head on them. Not the paper protocol (no augmentation): numbers are not comparable.""")
    group.add_argument("--evaluate", action="store_true", help="""Only report the val accuracy
        of a saved head (--head_weights, default OUTPUT_DIR/linear_best.pth, else
        linear_last.pth); no training.""")
    group.add_argument("--head_weights", default=None, type=str, help="""Saved head for
        --evaluate (a linear_last.pth / linear_best.pth written by this script).""")
    return parser


# --------------------------------------------------------------------------- model


class FrozenFeatures(nn.Module):
    """The linear-probe input: last blocks' CLS tokens [+ mean patch token], no gradients.

    For a non-ViT timm backbone it is the backbone's pooled feature.
    """

    def __init__(self, backbone: nn.Module, n_last_blocks: int, avgpool_patchtokens: bool):
        super().__init__()
        self.backbone = backbone
        self.is_vit = isinstance(backbone, vits.VisionTransformer)
        if self.is_vit:
            depth = len(backbone.blocks)
            if not 1 <= n_last_blocks <= depth:
                raise utils.UserError(
                    f"--n_last_blocks {n_last_blocks}: the backbone has {depth} blocks")
            self.feature_dim = backbone.embed_dim * (n_last_blocks + int(avgpool_patchtokens))
        else:
            self.feature_dim = backbone.num_features
        self.n_last_blocks = n_last_blocks
        self.avgpool_patchtokens = avgpool_patchtokens

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.is_vit:
            return self.backbone(images)
        blocks = self.backbone.get_intermediate_layers(images, self.n_last_blocks)
        features = [tokens[:, 0] for tokens in blocks]
        if self.avgpool_patchtokens:
            features.append(blocks[-1][:, 1:].mean(dim=1))
        return torch.cat(features, dim=-1)


class LinearClassifier(nn.Module):
    """One linear layer; weights N(0, 0.01), zero bias (as DINO)."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(feature_dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features.flatten(1))


def train_transform(crop_size: int) -> transforms.Compose:
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD),
    ])


# --------------------------------------------------------------------------- train / evaluate


def train_one_epoch(head: nn.Module, featurize: Callable[[torch.Tensor], torch.Tensor],
                    loader: DataLoader, optimizer: torch.optim.Optimizer, device: torch.device,
                    progress: Progress | None = None) -> float:
    """One pass over ``loader``; returns the mean loss over all ranks. ``progress`` (rank 0's
    line every few seconds) counts rank 0's images times the number of ranks."""
    head.train()
    criterion = nn.CrossEntropyLoss()
    total, steps = 0.0, 0
    world_size = distributed.get_world_size()
    for inputs, labels in loader:
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = head(featurize(inputs))
        loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        steps += 1
        if progress is not None:
            progress.update(len(labels) * world_size)
    return distributed.all_reduce_mean(total / max(steps, 1), device)


@torch.no_grad()
def evaluate(head: nn.Module, featurize: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset,
             num_classes: int, batch_size: int, num_workers: int, device: torch.device
             ) -> tuple[float, float]:
    """Top-1 and top-min(5, classes) accuracy (percent) over the whole ``dataset``, each
    image counted exactly once: ranks take contiguous unpadded shards and sum their counts."""
    head.eval()
    shard = Subset(dataset, list(shard_range(len(dataset), distributed.get_rank(), distributed.get_world_size())))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    top_n = min(5, num_classes)
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-n hits, images
    for inputs, labels in loader:
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        ranked = head(featurize(inputs)).topk(top_n, dim=1).indices
        hits = ranked == labels[:, None]
        counts[0] += hits[:, 0].sum()
        counts[1] += hits.sum()
        counts[2] += len(labels)
    if distributed.is_dist():
        dist.all_reduce(counts)
    return (100.0 * counts[0] / counts[2]).item(), (100.0 * counts[1] / counts[2]).item()


# --------------------------------------------------------------------------- saved heads


def load_head_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise utils.UserError(f"no saved head {path} (train one first, or pass --head_weights)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise utils.UserError(f"cannot read saved head {path}: {utils.user_error_message(e)}") from e
    if not isinstance(ckpt, dict) or "head" not in ckpt or "settings" not in ckpt:
        raise utils.UserError(f"{path} is not a head saved by eval_linear.py")
    return ckpt


def load_head_weights(head: nn.Module, ckpt: dict, path: Path) -> None:
    try:
        head.load_state_dict(ckpt["head"], strict=True)
    except RuntimeError as e:
        saved = ckpt["settings"]
        raise utils.UserError(
            f"the head in {path} ({saved.get('feature_dim')} features -> {saved.get('num_classes')} "
            f"classes) does not fit this backbone/dataset ({head.linear.in_features} -> "
            f"{head.linear.out_features}): check --arch, --n_last_blocks, --avgpool_patchtokens and "
            "--data_path") from e


def settings_mismatch(saved: dict, current: dict) -> list[str]:
    return [f"{key}: saved {saved.get(key)!r} vs now {current.get(key)!r}"
            for key in RESUME_SETTINGS if saved.get(key) != current.get(key)]


# --------------------------------------------------------------------------- main


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked, and --output_dir proven writable, before any work."""
    problems = [f"--{name} must be at least 1" for name in ("epochs", "val_freq", "n_last_blocks")
                if getattr(args, name) < 1]
    if not args.lr > 0:  # also refuses nan
        problems.append(f"--lr must be > 0, got {args.lr}")
    check_common_args(args, problems)
    storage.check_writable_dir(args.output_dir)


def main(args: argparse.Namespace) -> dict | None:
    """Train (or only evaluate) the linear head; returns the results dict on the main process."""
    check_args(args)
    lock_output_dir(args.output_dir)
    args.num_workers = usable_workers(args.num_workers)
    env = distributed.init_distributed(device=args.device)
    device = env.device
    output_dir = Path(args.output_dir)

    head_path, saved_head = None, None
    if args.evaluate:
        head_path = Path(args.head_weights) if args.head_weights else (
            output_dir / BEST_HEAD if (output_dir / BEST_HEAD).is_file() else output_dir / LAST_HEAD)
        saved_head = load_head_checkpoint(head_path)
        saved = saved_head["settings"]
        # The head defines its own input: use the feature settings it was trained with.
        args.n_last_blocks = saved["n_last_blocks"]
        args.avgpool_patchtokens = saved["avgpool_patchtokens"]
        if env.is_main and saved.get("pretrained_weights") != args.pretrained_weights:
            print(f"warning: the head in {head_path} was trained on features of "
                  f"'{saved.get('pretrained_weights')}', not '{args.pretrained_weights}'",
                  file=sys.stderr, flush=True)

    utils.fix_random_seeds(args.seed)
    val_tf = eval_transform(args.resize_size, args.crop_size)
    augment = not args.cache_features and not args.evaluate
    train_set, val_set = build_train_val(
        args.data_path, train_transform(args.crop_size) if augment else val_tf, val_tf)
    backbone, _, info = build_eval_backbone(args.pretrained_weights, args.checkpoint_key, args.arch,
                                            args.patch_size, args.crop_size, args.seed)
    check_crop_size(info, args.crop_size)
    featurizer = FrozenFeatures(backbone, args.n_last_blocks, args.avgpool_patchtokens).to(device)
    featurizer.eval()
    if not featurizer.is_vit and env.is_main:
        print(f"note: {info['arch']} is not a ViT: using its pooled feature "
              "(--n_last_blocks/--avgpool_patchtokens do not apply)", flush=True)
    num_classes = len(train_set.classes)
    head = LinearClassifier(featurizer.feature_dim, num_classes).to(device)
    settings = {"pretrained_weights": args.pretrained_weights, "checkpoint_key": info["checkpoint_key"],
                "arch": info["arch"], "patch_size": info["patch_size"],
                "n_last_blocks": args.n_last_blocks, "avgpool_patchtokens": args.avgpool_patchtokens,
                "cache_features": args.cache_features, "resize_size": args.resize_size,
                "crop_size": args.crop_size, "epochs": args.epochs, "lr": args.lr,
                "feature_dim": featurizer.feature_dim, "num_classes": num_classes,
                "weights_sha256": info["weights_sha256"]}
    protocol = ("cached features: un-augmented train images, NOT the paper protocol"
                if args.cache_features else "paper: frozen backbone, RandomResizedCrop + flip")
    if env.is_main:
        print(f"backbone: {describe_backbone(info)}")
        print(f"linear probe on {featurizer.feature_dim} features -> {num_classes} classes; "
              f"{len(train_set)} train / {len(val_set)} val images; {env.world_size} process(es); "
              f"{protocol}", flush=True)
    results_common = {"num_train": len(train_set), "num_val": len(val_set), "num_classes": num_classes,
                      "top5_is_top": min(5, num_classes), **backbone_identity(info),
                      "n_last_blocks": args.n_last_blocks,
                      "avgpool_patchtokens": args.avgpool_patchtokens,
                      "feature_dim": featurizer.feature_dim, "world_size": env.world_size}
    eval_kwargs = dict(num_classes=num_classes, batch_size=args.batch_size_per_gpu, device=device)

    if args.evaluate:
        load_head_weights(head, saved_head, head_path)
        top1, top5 = evaluate(head, featurizer, val_set, num_workers=args.num_workers, **eval_kwargs)
        results = {"top1": round(top1, 4), "top5": round(top5, 4), "epoch": saved_head.get("epoch"),
                   "head_weights": str(head_path), "evaluate_only": True,
                   "protocol": saved_head["settings"].get("protocol", protocol), **results_common}
        return _finish(results, output_dir, env.is_main)

    # Inputs of the head: images through the frozen backbone, or features cached once.
    if args.cache_features:
        extract = dict(feature_dim=featurizer.feature_dim, batch_size=args.batch_size_per_gpu,
                       num_workers=args.num_workers, device=device, out_device="cpu")
        if env.is_main:
            print("caching frozen features of train and val images ...", flush=True)
        train_data: Dataset = TensorDataset(extract_features(featurizer, train_set, **extract),
                                            torch.tensor(train_set.targets))
        val_data: Dataset = TensorDataset(extract_features(featurizer, val_set, **extract),
                                          torch.tensor(val_set.targets))
        featurize: Callable[[torch.Tensor], torch.Tensor] = nn.Identity()
        loader_workers = 0  # tensors in memory: workers would only add start-up time
    else:
        train_data, val_data, featurize = train_set, val_set, featurizer
        loader_workers = args.num_workers

    sampler = DistributedSampler(train_data, shuffle=True, seed=args.seed) if env.distributed else None
    train_loader = DataLoader(train_data, sampler=sampler, shuffle=sampler is None,
                              batch_size=args.batch_size_per_gpu, num_workers=loader_workers,
                              pin_memory=device.type == "cuda", drop_last=False)
    trained_head = head
    if env.distributed:
        trained_head = nn.parallel.DistributedDataParallel(
            head, device_ids=[device.index] if device.type == "cuda" else None)
    lr = args.lr * args.batch_size_per_gpu * env.world_size / 256.0
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0.0)

    start_epoch, best_top1, last_val = 0, -1.0, None  # -1: not validated yet
    last_path = output_dir / LAST_HEAD
    if last_path.is_file():
        ckpt = load_head_checkpoint(last_path)
        differences = settings_mismatch(ckpt["settings"], settings)
        if differences:
            raise utils.UserError(f"{last_path} belongs to another run ({'; '.join(differences)}): "
                                  "use a fresh --output_dir, or delete it to start over")
        load_head_weights(head, ckpt, last_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, best_top1, last_val = ckpt["epoch"], ckpt["best_top1"], ckpt.get("val")
        if env.is_main:
            print(f"resumed from {last_path} after epoch {start_epoch}", flush=True)

    settings["protocol"] = protocol
    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        # The shuffle, the workers' seeds and the augmentations of this epoch all come from
        # torch's global generator: seeded from (seed, epoch), an epoch replays identically
        # after a restart from linear_last.pth, wherever the previous run was killed.
        utils.fix_random_seeds(epoch_seed(args.seed, epoch))
        epoch_lr = optimizer.param_groups[0]["lr"]
        progress = Progress(f"epoch {epoch + 1}/{args.epochs}", len(train_data))
        loss = train_one_epoch(trained_head, featurize, train_loader, optimizer, device, progress)
        scheduler.step()
        log = {"epoch": epoch + 1, "train_loss": round(loss, 6), "lr": epoch_lr}
        improved = False
        if (epoch + 1) % args.val_freq == 0 or epoch + 1 == args.epochs:
            top1, top5 = evaluate(head, featurize, val_data, num_workers=loader_workers, **eval_kwargs)
            last_val = {"top1": top1, "top5": top5, "epoch": epoch + 1}
            improved = top1 > best_top1
            best_top1 = max(best_top1, top1)
            log.update(val_top1=round(top1, 4), val_top5=round(top5, 4), best_top1=round(best_top1, 4))
        if env.is_main:
            state = {"head": head.state_dict(), "epoch": epoch + 1, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "best_top1": best_top1, "val": last_val,
                     "classes": list(train_set.classes), "settings": settings,
                     "args": {k: v for k, v in vars(args).items()}}
            storage.save_atomic(state, last_path)
            if improved:
                storage.save_atomic(state, output_dir / BEST_HEAD)
            line = f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  lr {epoch_lr:.3g}"
            if "val_top1" in log:
                line += (f"  val top-1 {log['val_top1']:.2f}  top-{min(5, num_classes)} "
                         f"{log['val_top5']:.2f}  (best top-1 {best_top1:.2f})")
            print(line, flush=True)
            storage.append_line(output_dir / LOG_FILE, json.dumps(log))

    if last_val is None or last_val.get("epoch") != args.epochs:  # e.g. resumed a finished run
        top1, top5 = evaluate(head, featurize, val_data, num_workers=loader_workers, **eval_kwargs)
        last_val = {"top1": top1, "top5": top5, "epoch": args.epochs}
        best_top1 = max(best_top1, top1)
    results = {"top1": round(last_val["top1"], 4), "top5": round(last_val["top5"], 4),
               "best_top1": round(best_top1, 4), "epoch": args.epochs,
               "head_weights": str(last_path), "evaluate_only": False,
               "cache_features": args.cache_features, "protocol": protocol, **results_common}
    return _finish(results, output_dir, env.is_main)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's randomness, within numpy's 32-bit range."""
    return (seed * 1_000_003 + epoch) % 2 ** 32


def _finish(results: dict, output_dir: Path, is_main: bool) -> dict | None:
    if is_main:
        top_n = results["top5_is_top"]
        print(f"\nlinear probe: top-1 {results['top1']:.2f}  top-{top_n} {results['top5']:.2f}"
              + (f"  (best top-1 {results['best_top1']:.2f})" if "best_top1" in results else ""))
        storage.write_json(results, output_dir / "linear_results.json")
        print(f"results written to {output_dir / 'linear_results.json'}", flush=True)
    distributed.barrier()
    distributed.cleanup_distributed()
    unlock_output_dir(output_dir)
    return results if is_main else None


if __name__ == "__main__":
    run_as_script(get_args_parser, main)
