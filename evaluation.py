"""The evaluation library: what every frozen-feature evaluation script shares.

The flags naming a backbone and an ImageFolder with ``train/`` and ``val/``; DINO's evaluation
transform; the frozen backbone from any checkpoint the shared loader takes (or random, as a
baseline); feature extraction split across ranks and gathered back in dataset order; the
weighted k-NN classifier; feature dumps. ``eval_knn.py``, ``eval_linear.py``, the other
``eval_*.py`` scripts and the online k-NN of ``main_massl.py`` all use these, so one protocol
gives one number whichever script computes it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

import checkpoints
import distributed
import images
import storage
import utils
import vision_transformer as vits

# Largest val-chunk x train similarity matrix built at once (elements; 512 MB in fp32).
# ImageNet's 1.28 M train images then go ~100 val images at a time.
SIMILARITY_ELEMENTS_PER_CHUNK = 2 ** 27
# Rows all-gathered per collective call when assembling features (bounds device memory).
GATHER_ROWS_PER_CALL = 65536

# Seconds between two progress lines of a long loop (DINO's logger prints every 10-20 steps).
PROGRESS_INTERVAL_S = 10.0

FEATURE_FILES = ("trainfeat.pth", "valfeat.pth", "trainlabels.pth", "vallabels.pth")
FEATURE_META = "features_meta.json"
# What a dump records about what made it (``backbone_identity`` and the transform).
DUMP_IDENTITY = ("checkpoint", "checkpoint_key", "arch", "patch_size", "weights_sha256",
                 "feature_dim", "resize_size", "crop_size")


# --------------------------------------------------------------------------- flags


def add_backbone_and_data_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by eval_knn.py and eval_linear.py."""
    group = parser.add_argument_group("backbone")
    group.add_argument("--pretrained_weights", default="", type=str, help="""Checkpoint to
        evaluate: a training checkpoint.pth (ours, DINO's or iBOT's), a bare backbone state
        dict, or an exported .pth/.safetensors file. Never downloaded. Empty: a randomly
        initialised backbone (a baseline only; a loud warning is printed).""")
    group.add_argument("--checkpoint_key", default="teacher", type=str, help="""Which network
        of a training checkpoint to evaluate: 'teacher' (default, what the paper reports) or
        'student'. Ignored for files that hold a single backbone.""")
    group.add_argument("--arch", default=None, type=str, help="""Backbone architecture
        (vit_nano, vit_tiny, vit_small, vit_base, vit_large or a timm model name). Default:
        the arch stored in the checkpoint, else inferred from the weights; vit_small for
        random init.""")
    group.add_argument("--patch_size", default=None, type=int, help="""ViT patch size.
        Default: the checkpoint's (16 in the reference runs; 16 for random init).""")
    group.add_argument("--seed", default=0, type=int, help="""Seed for random init and data
        order; every process uses the same, so a random backbone is the same on all.""")

    group = parser.add_argument_group("data")
    group.add_argument("--data_path", default=None, type=str, help="""ImageFolder root with
        train/<class>/* and val/<class>/* (e.g. ImageNet; or the folder written by
        fashion_mnist.py).""")
    group.add_argument("--resize_size", default=256, type=int, help="""Shorter side after a
        bicubic resize, before the centre crop (256 as in DINO's evaluation; use the image
        size, e.g. 28, for small-image datasets).""")
    group.add_argument("--crop_size", default=224, type=int, help="""Centre-crop size of the
        evaluation images (224 as in DINO; 28 for 28-px images).""")
    group.add_argument("--batch_size_per_gpu", default=128, type=int, help="""Images per
        process and step of feature extraction (and of linear training).""")
    group.add_argument("--num_workers", default=8, type=int,
                       help="Data-loading processes per process (capped at the CPUs it may use).")

    group = parser.add_argument_group("run")
    group.add_argument("--output_dir", default=".", type=str, help="""Where results (JSON),
        feature dumps and saved heads go.""")
    group.add_argument("--device", default=None, type=str, help="""'cuda', 'cpu', ...
        Default: CUDA when available (one GPU per local rank), else CPU.""")


def check_common_args(args: argparse.Namespace, problems: list[str]) -> None:
    """Refuse bad values of the shared flags, and those in ``problems`` (one-line messages
    of the script's own checks), before any work starts (raises ``utils.UserError``)."""
    problems = list(problems)
    for name in ("batch_size_per_gpu", "resize_size", "crop_size"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1")
    if args.patch_size is not None and args.patch_size < 1:
        problems.append("--patch_size must be at least 1")
    if args.num_workers < 0:
        problems.append("--num_workers must be >= 0")
    if utils.seed_problem(args.seed):
        problems.append(utils.seed_problem(args.seed))
    if args.pretrained_weights and checkpoints.pretrained_path_problem(args.pretrained_weights):
        problems.append(checkpoints.pretrained_path_problem(args.pretrained_weights))
    problems += [f"--{name} {value}: must be a finite number" for name, value in sorted(vars(args).items())
                 if isinstance(value, float) and not math.isfinite(value)]
    if problems:
        raise utils.UserError(problems[0])
    utils.resolve_device(args.device)


# --------------------------------------------------------------------------- data


def eval_transform(resize_size: int, crop_size: int) -> transforms.Compose:
    """Resize (bicubic) + centre crop + ImageNet normalisation: DINO's evaluation transform."""
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD),
    ])


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder listing files by the training rule (``images.iter_image_files``):
    images by ``images.is_image_file`` (no macOS ``._x.png``), dot-folders skipped (neither
    classes nor searched), links followed but each real folder of a class once (no symlink
    loop). Samples in torchvision's order; images loaded by ``images.load_rgb_image``."""

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory)
                         if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(directory: str | os.PathLike, class_to_idx: dict[str, int],
                     extensions: tuple[str, ...] | None = None,
                     is_valid_file: Callable[[str], bool] | None = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        # ``extensions``/``is_valid_file`` are ignored: images.is_image_file is the one rule.
        samples, empty = [], []
        for name in sorted(class_to_idx):
            files = images.iter_image_files(os.path.join(directory, name),
                                           {os.path.realpath(directory)})
            found = sorted(files, key=lambda p: (os.path.dirname(p), os.path.basename(p)))
            samples.extend((path, class_to_idx[name]) for path in found)
            if not found:
                empty.append(name)
        if empty and not allow_empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}.")
        return samples


def _image_folder(root: Path, transform: Callable) -> datasets.ImageFolder:
    if not root.is_dir():
        raise utils.UserError(f"no folder {root}: the dataset must be laid out as "
                              f"{root.parent}/train/<class>/* and {root.parent}/val/<class>/*")
    try:
        return ImageFolder(str(root), transform=transform, loader=images.load_rgb_image)
    except FileNotFoundError as e:
        raise utils.UserError(f"no images in {root}: expected {root}/<class>/<image> files "
                              f"({utils.user_error_message(e)})") from e


def build_train_val(data_path: str | None, train_transform: Callable, val_transform: Callable
                    ) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """``DATA/train`` and ``DATA/val`` as ImageFolders whose labels mean the same class.

    Val may lack some train classes (labels then still index train's class list); a val
    class that train does not have is an error.
    """
    if not data_path:
        raise utils.UserError("--data_path is required (an ImageFolder root with train/ and val/)")
    root = Path(data_path)
    if not root.is_dir():
        raise utils.UserError(f"--data_path {root} does not exist")
    train = _image_folder(root / "train", train_transform)
    val = _image_folder(root / "val", val_transform)
    unknown = sorted(set(val.classes) - set(train.classes))
    if unknown:
        raise utils.UserError(f"{root / 'val'} has classes that {root / 'train'} lacks: "
                              f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    if val.classes != train.classes:  # re-index val's labels by train's class list
        val_names = val.classes
        val.samples = [(p, train.class_to_idx[val_names[t]]) for p, t in val.samples]
        val.imgs = val.samples
        val.targets = [t for _, t in val.samples]
        val.classes, val.class_to_idx = list(train.classes), dict(train.class_to_idx)
    return train, val


def usable_workers(requested: int) -> int:
    """``--num_workers``, but no more than the CPUs this process may use (more only adds
    start-up time and a DataLoader warning on small machines)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(requested, cpus))


# --------------------------------------------------------------------------- backbone




def build_eval_backbone(pretrained_weights: str, checkpoint_key: str, arch: str | None,
                        patch_size: int | None, crop_size: int, seed: int
                        ) -> tuple[nn.Module, int, dict]:
    """The frozen backbone to evaluate: from a checkpoint, or random (same on every rank)."""
    if pretrained_weights:
        model, feature_dim, info = checkpoints.build_backbone_from_checkpoint(
            pretrained_weights, arch=arch, patch_size=patch_size, checkpoint_key=checkpoint_key)
    else:
        arch, patch_size = arch or "vit_small", patch_size or 16
        utils.fix_random_seeds(seed)  # every rank must build the same random weights
        try:
            model, feature_dim = vits.build_backbone(arch, patch_size, img_size=crop_size)
        except vits.UnknownArchError as e:
            raise utils.UserError(str(e)) from e
        info = {"path": None, "checkpoint_key": None, "arch": arch, "patch_size": patch_size,
                "img_size": crop_size, "feature_dim": feature_dim,
                "weights_sha256": checkpoints.state_dict_sha256(model.state_dict()), "args": None,
                "notes": [f"seed {seed}"]}
        if distributed.is_main_process():
            print(f"WARNING: no --pretrained_weights: evaluating a RANDOMLY INITIALISED {arch} "
                  f"(patch {patch_size}). This is a baseline, not a trained model.",
                  file=sys.stderr, flush=True)
    model.eval()
    model.requires_grad_(False)
    return model, feature_dim, info


def check_crop_size(info: dict, crop_size: int) -> None:
    """A ViT cuts the crop into whole patches: refuse a --crop_size that is no multiple of
    the patch size before any image is read (timm would assert mid-run)."""
    patch = info.get("patch_size")
    if info["arch"] in vits.VIT_ARCHS and patch and crop_size % patch:
        below = max(patch, crop_size // patch * patch)
        raise utils.UserError(f"--crop_size {crop_size} is not a multiple of the patch size "
                              f"{patch}: use e.g. {below} or {below + patch}")


def backbone_identity(info: dict) -> dict:
    """What made a set of features: results files and feature dumps carry it, so features or
    numbers of one checkpoint are never taken for another's (``weights_sha256`` is the hash of
    the backbone weights, the same whether read from a training checkpoint or an export)."""
    return {"checkpoint": info["path"], "checkpoint_key": info["checkpoint_key"],
            "arch": info["arch"], "patch_size": info["patch_size"],
            "weights_sha256": info["weights_sha256"], "feature_dim": info["feature_dim"]}


def describe_backbone(info: dict) -> str:
    source = info["path"] or "random init"
    key = f" [{info['checkpoint_key']}]" if info["path"] else ""
    patch = f", patch {info['patch_size']}" if info["arch"] in vits.VIT_ARCHS else ""
    notes = f" ({'; '.join(info['notes'])})" if info["notes"] else ""
    return f"{info['arch']}{patch} from {source}{key}{notes}"


# --------------------------------------------------------------------------- progress


class Progress:
    """A progress line every ``interval`` seconds of a long loop over images, on rank 0 only:
    ``label: done/total images (pct)  N images/s  ETA h:mm:ss``.
    ``interval`` defaults to ``PROGRESS_INTERVAL_S``.

    Call ``update(n)`` after each batch with the images it held (summed over ranks, or
    estimated from rank 0's as ``extract_features`` does). Lines come at most every
    ``interval`` seconds, never one per batch; ``clock`` (default ``time.monotonic``) can be
    replaced to test it without waiting.
    """

    def __init__(self, label: str, total: int, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic, enabled: bool | None = None) -> None:
        self.label, self.total, self.clock = label, total, clock
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self.enabled = distributed.is_main_process() if enabled is None else enabled
        self.done = 0
        self.start = self.last = clock()

    def update(self, images: int) -> None:
        self.done = min(self.total, self.done + images)
        if not self.enabled:
            return
        now = self.clock()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            print(self.line(now), flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (datetime.timedelta(seconds=round((self.total - self.done) / rate))
               if rate > 0 else "?")
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.label}: {self.done}/{self.total} images ({percent:.0f}%)  "
                f"{rate:.1f} images/s  ETA {eta}")


# --------------------------------------------------------------------------- distributed features


def shard_range(num_items: int, rank: int, world_size: int) -> range:
    """Contiguous, non-overlapping, unpadded slice of ``range(num_items)`` for ``rank``."""
    return range(num_items * rank // world_size, num_items * (rank + 1) // world_size)


def gather_in_order(local: torch.Tensor, num_items: int, out_device: torch.device | str | None = None
                    ) -> torch.Tensor:
    """Concatenate every rank's ``shard_range`` rows in rank order: the full tensor, in dataset order.

    Shards differ in size by at most one row; they are padded to the largest for
    ``all_gather`` and trimmed after. Rows travel in slices of ``GATHER_ROWS_PER_CALL`` and
    land on ``out_device`` (default: where ``local`` is).
    """
    out_device = torch.device(out_device) if out_device is not None else local.device
    if not distributed.is_dist():
        return local.to(out_device)
    world_size = distributed.get_world_size()
    sizes = [len(shard_range(num_items, r, world_size)) for r in range(world_size)]
    assert local.shape[0] == sizes[distributed.get_rank()], "local rows must be this rank's shard"
    max_rows = max(sizes)
    padded = local.new_zeros((max_rows, *local.shape[1:]))
    padded[:local.shape[0]] = local
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(world_size)]
    for start in range(0, max_rows, GATHER_ROWS_PER_CALL):
        piece = padded[start:start + GATHER_ROWS_PER_CALL].contiguous()
        received = [torch.empty_like(piece) for _ in range(world_size)]
        dist.all_gather(received, piece)
        for r in range(world_size):
            per_rank[r].append(received[r].to(out_device))
    return torch.cat([torch.cat(parts)[:size] for parts, size in zip(per_rank, sizes)])


@torch.no_grad()
def extract_features(featurize: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset,
                     feature_dim: int, batch_size: int, num_workers: int, device: torch.device,
                     out_device: torch.device | str | None = None,
                     generator: torch.Generator | None = None,
                     progress_label: str = "features") -> torch.Tensor:
    """``featurize`` over the whole dataset once, split across ranks: ``(len(dataset), feature_dim)``
    in dataset order on every rank (on ``out_device``, default ``device``).

    ``generator`` seeds the loader (its workers' base seed); without one, the DataLoader
    draws that seed from the global torch RNG, which the online k-NN of a training run must
    leave alone. Rank 0 prints a ``Progress`` line (``progress_label: ...``) every few
    seconds; the images done are rank 0's times the number of ranks (shards are equal to
    within one image)."""
    num_items = len(dataset)
    world_size = distributed.get_world_size()
    shard = Subset(dataset, list(shard_range(num_items, distributed.get_rank(), world_size)))
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=False, generator=generator)
    progress = Progress(progress_label, num_items)
    chunks = [torch.empty(0, feature_dim, device=device)]
    for batch, _ in loader:
        chunks.append(featurize(batch.to(device, non_blocking=True)).float())
        progress.update(len(batch) * world_size)
    return gather_in_order(torch.cat(chunks), num_items, out_device)


# --------------------------------------------------------------------------- k-NN


@torch.no_grad()
def knn_classifier(train_features: torch.Tensor, train_labels: torch.Tensor,
                   test_features: torch.Tensor, test_labels: torch.Tensor, k: int, T: float,
                   num_classes: int, chunk_size: int | None = None) -> tuple[float, float]:
    """Weighted k-NN accuracy (top-1, top-5, in percent), DINO's vote.

    Features are L2-normalised rows, so the dot product is the cosine similarity. For each
    test row, the ``k`` most similar train rows vote for their label with weight
    ``exp(sim / T)``; classes are ranked by their summed votes. Top-5 counts a test row when
    its label is among the ``min(5, num_classes)`` best-ranked classes *and* got a vote:
    a class with no neighbour is never a hit (DINO's ranking among zero-vote classes is an
    arbitrary tie-break; otherwise the numbers are the same).
    """
    num_train, num_test = train_features.shape[0], test_features.shape[0]
    if not 1 <= k <= num_train:
        raise ValueError(f"k={k} must be between 1 and the number of train features ({num_train})")
    if num_test == 0:
        raise ValueError("no test features")
    if chunk_size is None:
        chunk_size = max(1, min(num_test, SIMILARITY_ELEMENTS_PER_CHUNK // num_train))
    device = train_features.device
    train_labels = train_labels.to(device).long()
    test_labels = test_labels.to(device).long()
    top_n = min(5, num_classes)
    top1 = top5 = 0
    for start in range(0, num_test, chunk_size):
        features = test_features[start:start + chunk_size].to(device)
        targets = test_labels[start:start + chunk_size]
        similarity = features @ train_features.T
        neighbour_sims, neighbour_idx = similarity.topk(k, dim=1, largest=True, sorted=True)
        neighbour_labels = train_labels[neighbour_idx]
        weights = (neighbour_sims / T).exp()
        votes = torch.zeros(features.shape[0], num_classes, device=device, dtype=weights.dtype)
        votes.scatter_add_(1, neighbour_labels, weights)
        voters = torch.zeros(features.shape[0], num_classes, device=device)
        voters.scatter_add_(1, neighbour_labels, torch.ones_like(weights, dtype=voters.dtype))
        ranked = votes.topk(top_n, dim=1, largest=True, sorted=True).indices
        hits = (ranked == targets[:, None]) & (voters.gather(1, ranked) > 0)
        top1 += hits[:, 0].sum().item()
        top5 += hits.sum().item()
    return top1 * 100.0 / num_test, top5 * 100.0 / num_test


def effective_ks(requested: list[int], num_train: int) -> list[int]:
    """Requested k values, clipped to the train set size (with a warning), deduplicated, in order."""
    ks: list[int] = []
    for k in requested:
        if k < 1:
            raise utils.UserError(f"--nb_knn values must be >= 1, got {k}")
        if k > num_train:
            if distributed.is_main_process():
                print(f"warning: k={k} is larger than the train set ({num_train} images); "
                      f"using k={num_train}", file=sys.stderr, flush=True)
            k = num_train
        if k not in ks:
            ks.append(k)
    return ks


# --------------------------------------------------------------------------- files




def dump_features(folder: Path, train_features: torch.Tensor, val_features: torch.Tensor,
                  train_labels: torch.Tensor, val_labels: torch.Tensor, meta: dict) -> None:
    """The four tensors, then ``features_meta.json`` with ``meta`` (what made them: see
    ``backbone_identity``), their sizes and each file's SHA-256: a dump whose files were
    replaced or mixed with another dump's is refused by ``load_features``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensor in zip(FEATURE_FILES, (train_features, val_features, train_labels, val_labels)):
        storage.save_atomic(tensor.cpu(), folder / name)
    files = {name: checkpoints.file_sha256(folder / name) for name in FEATURE_FILES}
    storage.write_json({**meta, "num_train": len(train_features), "num_val": len(val_features),
                      "files_sha256": files}, folder / FEATURE_META)


def load_features(folder: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The tensors and meta of ``dump_features``, each file checked against the meta."""
    missing = [name for name in (*FEATURE_FILES, FEATURE_META) if not (folder / name).is_file()]
    if missing:
        raise utils.UserError(f"--load_features {folder}: missing {', '.join(missing)} "
                              "(write them with --dump_features)")
    try:
        meta = json.loads((folder / FEATURE_META).read_text())
    except (OSError, ValueError) as e:
        raise utils.UserError(f"--load_features {folder}: cannot read {FEATURE_META}: {e}") from e
    recorded = meta.get("files_sha256") if isinstance(meta, dict) else None
    if not isinstance(recorded, dict):
        raise utils.UserError(f"--load_features {folder}: {FEATURE_META} does not say which "
                              "files it describes (written by an older version?): dump the "
                              "features again with --dump_features")
    changed = [name for name in FEATURE_FILES if recorded.get(name) != checkpoints.file_sha256(folder / name)]
    if changed:
        raise utils.UserError(f"--load_features {folder}: {', '.join(changed)} are not the files "
                              f"{FEATURE_META} describes (replaced, or mixed from another dump): "
                              "dump the features again with --dump_features")
    try:
        tensors = [torch.load(folder / name, map_location="cpu", weights_only=True)
                   for name in FEATURE_FILES]
    except Exception as e:
        raise utils.UserError(f"cannot read features in {folder}: {utils.user_error_message(e)}") from e
    train, val, train_labels, val_labels = tensors
    if (train.ndim != 2 or val.ndim != 2 or train.shape[1] != val.shape[1]
            or len(train_labels) != len(train) or len(val_labels) != len(val)):
        raise utils.UserError(f"--load_features {folder}: inconsistent shapes (train "
                              f"{tuple(train.shape)}, val {tuple(val.shape)}, labels "
                              f"{len(train_labels)}/{len(val_labels)})")
    return (*tensors, meta)


def check_dump_identity(meta: dict, args: argparse.Namespace) -> None:
    """With ``--load_features`` and ``--pretrained_weights`` both given, the dump must hold
    features of those weights (and ``--checkpoint_key``): built and hashed to compare."""
    if not args.pretrained_weights:
        return
    _, _, info = build_eval_backbone(args.pretrained_weights, args.checkpoint_key, args.arch,
                                     args.patch_size, args.crop_size, args.seed)
    if meta.get("weights_sha256") != info["weights_sha256"]:
        raise utils.UserError(
            f"--load_features {args.load_features} holds features of {meta.get('checkpoint')} "
            f"[{meta.get('checkpoint_key')}], not of --pretrained_weights {args.pretrained_weights} "
            f"[{args.checkpoint_key}] (their weights differ): dump the features of this "
            "checkpoint, or drop --pretrained_weights")


# --------------------------------------------------------------------------- shared by eval_* scripts


def eval_args_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An eval_*.py parser: the first paragraph of ``doc`` as description, defaults shown,
    and the backbone/data/run flags of ``add_backbone_and_data_args``."""
    parser = argparse.ArgumentParser(prog, description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_backbone_and_data_args(parser)
    return parser


def run_as_script(get_args_parser: Callable[[], argparse.ArgumentParser],
                  main: Callable[[argparse.Namespace], object]) -> None:
    """``python eval_x.py ...``: parse, run, and turn a ``UserError`` into one line + exit 2."""
    parsed = get_args_parser().parse_args()
    try:
        main(parsed)
    except utils.UserError as e:
        utils.exit_with_error(utils.user_error_message(e))
    finally:  # a run stopped by an error leaves the output folder free (also when run in-process)
        for folder in list(_OUTPUT_LOCKS):
            unlock_output_dir(folder)


def print_table(header: list[str], rows: list[list]) -> None:
    """A plain-text results table: text columns left-aligned, numbers right-aligned (floats
    with two decimals)."""
    numeric = [not isinstance(c, str) for c in rows[0]] if rows else [False] * len(header)
    cells = [[c if isinstance(c, str) else f"{c:.2f}" if isinstance(c, float) else str(c)
              for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.rjust(w) if right else c.ljust(w)
                        for c, w, right in zip(row, widths, numeric)).rstrip())


def add_feature_file_args(group: argparse._ArgumentGroup) -> None:
    """``--dump_features`` / ``--load_features``: the feature files of ``dump_features``."""
    group.add_argument("--dump_features", default=None, type=str, help=f"""Also save the
        normalised features and labels to this folder ({', '.join(FEATURE_FILES)},
        {FEATURE_META}); every eval_*.py script reads them back with --load_features.""")
    group.add_argument("--load_features", default=None, type=str, help="""Skip the backbone
        and the images: read features saved by --dump_features (of any eval_*.py script)
        from this folder. Each file is checked against the SHA-256 the dump recorded; with
        --pretrained_weights also given, the dump must hold that checkpoint's features
        (weights hash compared), else the run stops.""")


def check_eval_args(args: argparse.Namespace, problems: list[str]) -> None:
    """``check_common_args``, then the output folders (``--output_dir``, ``--dump_features``)
    created and proven writable: everything an eval_*.py script checks before any work."""
    check_common_args(args, problems)
    storage.check_writable_dir(args.output_dir)
    if args.dump_features:
        storage.check_writable_dir(args.dump_features, "--dump_features")


# Output folders this process holds locked (an evaluation run in-process that stopped on an
# error leaves its lock here; the next run into that folder takes it over).
_OUTPUT_LOCKS: dict[Path, storage.FolderLock] = {}


def lock_output_dir(output_dir: str | os.PathLike) -> None:
    """Rank 0 locks ``--output_dir`` with the lock training takes (``storage.FolderLock``): an
    evaluation never runs into a folder where a training or another evaluation is running.
    Evaluations write their own files only (``*_results.json``, ``linear_log.txt``, heads),
    never a training's ``log.txt`` or checkpoints, so a finished training's folder is fine."""
    if distributed.rank_from_env() != 0:
        return
    key = Path(output_dir).resolve()
    if key in _OUTPUT_LOCKS:
        _OUTPUT_LOCKS.pop(key).release()
    lock = storage.FolderLock(output_dir)
    lock.acquire()
    _OUTPUT_LOCKS[key] = lock


def unlock_output_dir(output_dir: str | os.PathLike) -> None:
    lock = _OUTPUT_LOCKS.pop(Path(output_dir).resolve(), None)
    if lock is not None:
        lock.release()


def start_run(args: argparse.Namespace) -> tuple[distributed.DistEnv, Path]:
    """Output folder locked (``lock_output_dir``), worker cap and process group (torchrun or
    none), once the flags are checked."""
    lock_output_dir(args.output_dir)
    args.num_workers = usable_workers(args.num_workers)
    env = distributed.init_distributed(device=args.device)
    return env, Path(args.output_dir)


def finish_run(results: dict | None, output_dir: Path, file_name: str) -> None:
    """Write ``results`` (rank 0) as JSON, then wait for every rank, leave the group and
    release the output folder."""
    if results is not None:
        storage.write_json(results, output_dir / file_name)
        print(f"results written to {output_dir / file_name}", flush=True)
    distributed.barrier()
    distributed.cleanup_distributed()
    unlock_output_dir(output_dir)


@dataclass
class TrainValFeatures:
    """L2-normalised frozen features of ``DATA/train`` and ``DATA/val``, with labels."""
    train: torch.Tensor
    val: torch.Tensor
    train_labels: torch.Tensor
    val_labels: torch.Tensor
    num_classes: int
    classes: list[str] | None
    backbone: dict  # what produced them: checkpoint, checkpoint_key, arch, patch_size, sizes


LabelCheck = Callable[[torch.Tensor, torch.Tensor, int, "list[str] | None"], None]


def train_val_features(args: argparse.Namespace, env: distributed.DistEnv,
                       check_labels: LabelCheck | None = None) -> TrainValFeatures:
    """Features for an eval_*.py script: ``--load_features``, or every train and val image once
    through the backbone (sharded across ranks), L2-normalised, saved by ``--dump_features``.

    ``check_labels(train_labels, val_labels, num_classes, classes)`` may raise ``UserError``
    about the dataset; it runs before the backbone is built or any image is read.
    """
    if args.load_features:
        train, val, train_labels, val_labels, meta = load_features(Path(args.load_features))
        if meta.get("protocol") == "revisited":
            raise utils.UserError(f"--load_features {args.load_features} holds revisited "
                                  "Oxford/Paris features, not the train/val features of an ImageFolder")
        num_classes = len(meta["classes"]) if "classes" in meta else \
            int(max(train_labels.max(), val_labels.max())) + 1
        classes = meta.get("classes")
        if check_labels is not None:
            check_labels(train_labels, val_labels, num_classes, classes)
        check_dump_identity(meta, args)
        backbone = {k: meta.get(k) for k in DUMP_IDENTITY}
        if env.is_main:
            print(f"features loaded from {args.load_features}")
        # Dumps hold normalised features already: used bit for bit, as computed.
        return TrainValFeatures(train.float().to(env.device), val.float().to(env.device),
                                train_labels.long(), val_labels.long(), num_classes, classes, backbone)
    transform = eval_transform(args.resize_size, args.crop_size)
    train_set, val_set = build_train_val(args.data_path, transform, transform)
    train_labels, val_labels = torch.tensor(train_set.targets), torch.tensor(val_set.targets)
    if check_labels is not None:
        check_labels(train_labels, val_labels, len(train_set.classes), train_set.classes)
    model, feature_dim, info = build_eval_backbone(
        args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size,
        args.crop_size, args.seed)
    check_crop_size(info, args.crop_size)
    model.to(env.device)
    if env.is_main:
        print(f"backbone: {describe_backbone(info)}")
        print(f"extracting features of {len(train_set)} train and {len(val_set)} val images "
              f"on {env.world_size} process(es)", flush=True)
    extract = dict(feature_dim=feature_dim, batch_size=args.batch_size_per_gpu,
                   num_workers=args.num_workers, device=env.device)
    train = F.normalize(extract_features(model, train_set, **extract,
                                         progress_label="train features"), dim=1)
    val = F.normalize(extract_features(model, val_set, **extract,
                                       progress_label="val features"), dim=1)
    backbone = {**backbone_identity(info), "resize_size": args.resize_size,
                "crop_size": args.crop_size}
    if args.dump_features and env.is_main:
        dump_features(Path(args.dump_features), train, val, train_labels, val_labels,
                      {**backbone, "classes": train_set.classes})
        print(f"features saved to {args.dump_features}")
    return TrainValFeatures(train, val, train_labels, val_labels, len(train_set.classes),
                            list(train_set.classes), backbone)


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class, ``(num_classes,)`` (zeros for classes without images)."""
    return torch.bincount(labels.long().cpu(), minlength=num_classes)


def class_name(classes: list[str] | None, index: int) -> str:
    return f"'{classes[index]}'" if classes else f"{index}"
