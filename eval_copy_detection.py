"""Copy detection on Copydays with frozen features (DINO's protocol): mAP per attack, 'strong' the headline.

Every image is resized to ``--imsize`` x ``--imsize`` (bicubic; 320 in DINO) and goes once
through the backbone; its feature is the last block's CLS token concatenated with the
GeM-pooled (p = 4) patch tokens of that block, as in DINO's ``eval_copy_detection.py``. The
database holds the originals (and the ``--distractors_path`` images, 10k YFCC100M images in
DINO's paper); each query block (the originals themselves, ``strong``, every ``jpegqual/<q>``
and ``crops/<p>``) searches it by cosine similarity. Optional PCA whitening (``d^-1/2``, as
DINO's ``utils.PCA(whit=0.5)``) is learned on ``--whitening_path`` images (20k other YFCC100M
images in the paper); features are L2-normalised after it. Reported: mAP of each block, with
Holidays' AP from ranks (trapezoids of the precision-recall curve; ``score_ap_from_ranks_1``)
over the ``--max_rank`` best database images (DINO's 20).

    python eval_copy_detection.py --data_path /path/to/copydays --pretrained_weights checkpoint.pth
    torchrun --nproc_per_node=8 eval_copy_detection.py --data_path /path/to/copydays \\
        --pretrained_weights checkpoint.pth --distractors_path /path/to/yfcc_10k \\
        --whitening_path /path/to/yfcc_20k --output_dir copydays_out

``--data_path`` is the Copydays folder as DINO reads it: ``original/*.jpg`` (157 images),
``strong/*.jpg`` (229; a strong image's positives are the originals sharing its first 4 name
characters), ``jpegqual/<q>/*.jpg`` and ``crops/<p>/*.jpg`` (each 1:1 with ``original/`` in
sorted order). Block sizes come from the folders. Nothing is downloaded. Results go to
``OUTPUT_DIR/copydays_results.json``::

    {"protocol": "copydays", "strong": 40.1, "blocks": {"original": 100.0, "strong": 40.1,
     "jpegqual/3": ..., "crops/10": ..., ...}, "num_database": ..., "whitening": ..., ...}

mAPs are percentages. Where we differ from DINO's script on purpose: the whitening covariance
is that of the centred whitening features (DINO's skips the centring its mean subtraction
implies); ``--max_rank 0`` ranks the whole database instead of the top 20.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms

import distributed
import images
import utils
from evaluation import (add_feature_file_args, build_eval_backbone, check_eval_args,
                        describe_backbone, dump_features, eval_args_parser, extract_features,
                        finish_run, load_features, print_table, run_as_script, start_run)

RESULTS_FILE = "copydays_results.json"
GEM_P = 4  # DINO's GeM exponent for the patch tokens
PREFIX = 4  # a strong attack shares this many name characters with its originals


def get_args_parser() -> argparse.ArgumentParser:
    parser = eval_args_parser("eval_copy_detection", __doc__)
    group = parser.add_argument_group("copy detection")
    group.add_argument("--imsize", default=320, type=int, help="""Images are resized to
        imsize x imsize (bicubic), as in DINO (320). --resize_size and --crop_size do not
        apply here.""")
    group.add_argument("--distractors_path", default=None, type=str, help="""Folder of images
        added to the database (searched recursively; DINO: 10k random YFCC100M images).""")
    group.add_argument("--whitening_path", default=None, type=str, help="""Folder of images to
        learn PCA whitening on (searched recursively; DINO: 20k random YFCC100M images, not
        the distractors). Without it, no whitening.""")
    group.add_argument("--max_rank", default=20, type=int, help="""AP counts the positives
        among this many best database images (DINO: 20); 0 ranks the whole database.""")
    add_feature_file_args(group)
    return parser


def check_args(args: argparse.Namespace) -> None:
    problems = []
    if args.imsize < 1:
        problems.append(f"--imsize must be >= 1, got {args.imsize}")
    if args.max_rank < 0:
        problems.append(f"--max_rank must be >= 0, got {args.max_rank}")
    for flag in ("distractors_path", "whitening_path"):
        folder = getattr(args, flag)
        if folder and not args.load_features and not Path(folder).is_dir():
            problems.append(f"--{flag} {folder} is not a folder")
    check_eval_args(args, problems)


# --------------------------------------------------------------------------- metric


def score_ap_from_ranks_1(ranks: list[int], nres: int) -> float:
    """Average precision of one search, as the Holidays evaluation package computes it.

    ``ranks``: the 0-based places of the true positives in the result list, increasing;
    ``nres``: the number of positives in the database. Each positive adds a trapezoid of
    width 1/nres between precisions ntp/rank (1 at rank 0) and (ntp + 1)/(rank + 1)."""
    ap = 0.0
    for ntp, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else ntp / rank
        precision_1 = (ntp + 1) / (rank + 1)
        ap += (precision_0 + precision_1) / (2 * nres)
    return ap


def mean_average_precision(similarity: torch.Tensor, positives: list[list[int]], max_rank: int
                           ) -> float:
    """mAP (percent) of queries (rows of ``similarity`` against the database) whose positives
    are ``positives[i]``; only the ``max_rank`` best results count (0: all)."""
    depth = similarity.shape[1] if max_rank == 0 else min(max_rank, similarity.shape[1])
    # Stable sort: ties keep database order, the same ranking on every machine.
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :depth].tolist()
    total = 0.0
    for ranking, positive in zip(order, positives):
        wanted = set(positive)
        total += score_ap_from_ranks_1([r for r, i in enumerate(ranking) if i in wanted], len(positive))
    return 100.0 * total / len(positives)


# --------------------------------------------------------------------------- Copydays layout


@dataclass
class Copydays:
    """The query blocks in DINO's order and each query's positives among the originals."""
    originals: list[Path]
    blocks: dict[str, list[Path]]  # "original", "strong", "jpegqual/<q>"..., "crops/<p>"...
    positives: dict[str, list[list[int]]]

    def queries(self) -> list[Path]:
        return [path for files in self.blocks.values() for path in files]


def jpg_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg" and p.is_file())


def _level(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def read_copydays(data_path: str | None) -> Copydays:
    """Check and list the Copydays folders (one-line ``UserError`` naming what is missing)."""
    if not data_path:
        raise utils.UserError("--data_path is required (the Copydays folder with original/, "
                              "strong/, jpegqual/<q>/ and crops/<p>/)")
    root = Path(data_path)
    if not root.is_dir():
        raise utils.UserError(f"--data_path {root} does not exist")
    for name in ("original", "strong", "jpegqual", "crops"):
        if not (root / name).is_dir():
            raise utils.UserError(f"no Copydays block folder {root / name} (expected original/, "
                                  "strong/, jpegqual/<q>/ and crops/<p>/ of .jpg images)")
    originals = jpg_files(root / "original")
    if not originals:
        raise utils.UserError(f"no .jpg image in {root / 'original'}")
    original_names = [p.name for p in originals]
    blocks = {"original": originals, "strong": jpg_files(root / "strong")}
    positives = {"original": [[i] for i in range(len(originals))]}
    positives["strong"] = []
    for path in blocks["strong"]:
        match = [j for j, name in enumerate(original_names) if name[:PREFIX] == path.name[:PREFIX]]
        if not match:
            raise utils.UserError(f"{path} has no original sharing its first {PREFIX} characters "
                                  f"'{path.name[:PREFIX]}' in {root / 'original'}")
        positives["strong"].append(match)
    for family in ("jpegqual", "crops"):
        levels = sorted((p.name for p in (root / family).iterdir() if p.is_dir()), key=_level)
        if not levels:
            raise utils.UserError(f"no Copydays block folder in {root / family} (expected "
                                  f"{family}/<level>/*.jpg)")
        for level in levels:
            files = jpg_files(root / family / level)
            if len(files) != len(originals):
                raise utils.UserError(f"{root / family / level} holds {len(files)} .jpg images, "
                                      f"not one per original ({len(originals)})")
            blocks[f"{family}/{level}"] = files
            positives[f"{family}/{level}"] = [[i] for i in range(len(originals))]
    return Copydays(originals, blocks, positives)


def image_files(folder: str) -> list[Path]:
    files = sorted(Path(p) for p in images.iter_image_files(folder))
    if not files:
        raise utils.UserError(f"no image in {folder}")
    return files


class ImageList(Dataset):
    """Images from a list of files, resized to a square (DINO's Copydays transform)."""

    def __init__(self, paths: list[Path], imsize: int):
        self.paths = paths
        self.transform = transforms.Compose([
            transforms.Resize((imsize, imsize), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(images.load_rgb_image(str(self.paths[index]))), index


# --------------------------------------------------------------------------- features


def cls_gem_featurizer(model: nn.Module, p: int = GEM_P) -> Callable[[torch.Tensor], torch.Tensor]:
    """Last block's CLS token concatenated with the GeM(p) pool of its patch tokens
    (clamped at 1e-6 first, as DINO): ``(B, 2 * embed_dim)``."""
    def featurize(images: torch.Tensor) -> torch.Tensor:
        tokens = model.get_intermediate_layers(images, 1)[0]
        gem = tokens[:, 1:].clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p)
        return torch.cat([tokens[:, 0], gem], dim=1)
    return featurize


def learn_whitening(features: torch.Tensor, eps_ratio: float = 1e-5
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA whitening from ``features`` (rows): (mean, projection) with
    ``whiten(x) = (x - mean) @ projection``; eigenvalues below ``eps_ratio`` x the largest
    are raised to it (DINO's ``utils.PCA``), each direction scaled by eigenvalue^-1/2."""
    x = features.double()
    mean = x.mean(dim=0)
    centred = x - mean
    eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / x.shape[0])
    eigenvalues = eigenvalues.clamp(min=eigenvalues.max().item() * eps_ratio)
    order = eigenvalues.argsort(descending=True)
    projection = eigenvectors[:, order] / eigenvalues[order].sqrt()
    return mean.float(), projection.float()


def copydays_features(args: argparse.Namespace, env: distributed.DistEnv, data: Copydays
                      ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(database, queries) features, whitened if asked, L2-normalised; extracted once across
    ranks, or read back from ``--load_features``."""
    model, embed_dim, info = build_eval_backbone(
        args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size, args.imsize,
        args.seed)
    if not hasattr(model, "get_intermediate_layers"):
        raise utils.UserError(f"--arch {info['arch']}: copy detection pools the patch tokens of "
                              "a ViT (use one of ours: vit_tiny, vit_small, vit_base, ...)")
    model.to(env.device)
    distractors = image_files(args.distractors_path) if args.distractors_path else []
    whitening = image_files(args.whitening_path) if args.whitening_path else []
    if env.is_main:
        print(f"backbone: {describe_backbone(info)}")
        print(f"extracting features of {len(data.queries())} queries, {len(data.originals)} "
              f"originals, {len(distractors)} distractors and {len(whitening)} whitening images "
              f"at {args.imsize} px on {env.world_size} process(es)", flush=True)
    featurize = cls_gem_featurizer(model)
    extract = dict(feature_dim=2 * embed_dim, batch_size=args.batch_size_per_gpu,
                   num_workers=args.num_workers, device=env.device)
    queries = extract_features(featurize, ImageList(data.queries(), args.imsize), **extract,
                               progress_label="query features")
    database = extract_features(featurize, ImageList(data.originals + distractors, args.imsize),
                                **extract, progress_label="database features")
    if whitening:
        mean, projection = learn_whitening(extract_features(
            featurize, ImageList(whitening, args.imsize), **extract,
            progress_label="whitening features"))
        queries, database = (queries - mean) @ projection, (database - mean) @ projection
    return F.normalize(database, dim=1), F.normalize(queries, dim=1), {
        "checkpoint": info["path"], "checkpoint_key": info["checkpoint_key"], "arch": info["arch"],
        "patch_size": info["patch_size"], "num_distractors": len(distractors),
        "num_whitening": len(whitening), "whitening": args.whitening_path}


# --------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict | None:
    """Run the evaluation; returns the results dict on the main process (None elsewhere)."""
    check_args(args)
    data = None if args.load_features else read_copydays(args.data_path)
    env, output_dir = start_run(args)
    if args.load_features:
        database, queries, _, _, meta = load_features(Path(args.load_features))
        if meta.get("protocol") != "copydays":
            raise utils.UserError(f"--load_features {args.load_features} holds no Copydays "
                                  "features (dump them with eval_copy_detection.py --dump_features)")
        positives, sizes = meta["positives"], meta["block_sizes"]
        database, queries = database.float(), queries.float()
        backbone = {k: meta.get(k) for k in ("checkpoint", "checkpoint_key", "arch", "patch_size",
                                             "num_distractors", "num_whitening", "whitening")}
        if env.is_main:
            print(f"features loaded from {args.load_features}")
    else:
        database, queries, backbone = copydays_features(args, env, data)
        positives = {name: data.positives[name] for name in data.blocks}
        sizes = {name: len(files) for name, files in data.blocks.items()}
        if args.dump_features and env.is_main:
            block_of_query = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes.values())])
            dump_features(Path(args.dump_features), database, queries, torch.arange(len(database)),
                          block_of_query, {**backbone, "protocol": "copydays", "imsize": args.imsize,
                                           "block_sizes": sizes, "positives": positives})
            print(f"features saved to {args.dump_features}")
    results = None
    if env.is_main:
        similarity = queries.to(env.device) @ database.to(env.device).T
        blocks, start = {}, 0
        for name, size in sizes.items():
            blocks[name] = round(mean_average_precision(similarity[start:start + size],
                                                        positives[name], args.max_rank), 4)
            start += size
        results = {"protocol": "copydays", "strong": blocks["strong"], "blocks": blocks,
                   "block_sizes": sizes, "num_database": len(database),
                   "num_queries": len(queries), "imsize": args.imsize, "max_rank": args.max_rank,
                   **backbone, "world_size": env.world_size}
        print(f"\nCopydays copy detection: {len(queries)} queries, {len(database)} database images "
              f"({backbone.get('num_distractors') or 0} distractors), "
              f"{'whitened' if backbone.get('whitening') else 'no whitening'}")
        print_table(["block", "queries", "mAP"], [[name, sizes[name], blocks[name]] for name in blocks])
        print(f"headline (strong): mAP {blocks['strong']:.2f}")
    finish_run(results, output_dir, RESULTS_FILE)
    return results


if __name__ == "__main__":
    run_as_script(get_args_parser, main)
