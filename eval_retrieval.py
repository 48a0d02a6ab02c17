"""Image retrieval with frozen features: revisited Oxford/Paris (mAP) or any labelled ImageFolder (mAP@R, Recall@K).

Two protocols (``--protocol``):

``class`` (default): class-level retrieval on an ImageFolder with ``train/`` and ``val/``.
Every image goes once through the backbone (resize, centre crop, no augmentation; CLS
feature, L2-normalised). Each val image queries the train images ranked by cosine
similarity; a train image is relevant when it has the query's class. Reported:
mAP@R (Musgrave et al., "A Metric Learning Reality Check", 2020: R = number of gallery images
of the query's class, AP of the top R results counting only hits, divided by R) and
Recall@K (queries with a relevant image among their K nearest; ``--recall_ks``).

``revisited``: the revisited Oxford (``roxford5k``) and Paris (``rparis6k``) benchmarks
(Radenović et al., CVPR 2018), in the setting of DINO's ``eval_image_retrieval.py``:
images shrunk to fit ``--imsize`` (aspect kept, never enlarged), the query images first
cropped to their bounding box as the protocol requires; features are the mean of the CLS
outputs at scales 1, 1/√2 and 1/2 of that image (``--multiscale true``), L2-normalised.
Database images are ranked by cosine similarity. Reported: mAP and mP@1/5/10 on the Medium
(relevant: easy + hard images, ignored: junk) and Hard (relevant: hard, ignored: junk + easy)
splits, with the protocol's AP (ignored images are removed from the ranking; precision
interpolated between consecutive relevant images; queries without relevant images skipped).

    python eval_retrieval.py --data_path /path/to/imagenet --pretrained_weights checkpoint.pth
    python eval_retrieval.py --protocol revisited --dataset roxford5k \\
        --data_path /path/to/roxford5k --pretrained_weights checkpoint.pth
    torchrun --nproc_per_node=8 eval_retrieval.py --protocol revisited --dataset rparis6k \\
        --data_path /path/to/revisited_paris_oxford --pretrained_weights checkpoint.pth

The revisited data folder holds ``jpg/<name>.jpg`` and ``gnd_<dataset>.pkl`` (the official
ground truth), either directly or in ``<data_path>/<dataset>/`` (DINO's layout). Nothing is
downloaded. Features are extracted once, split across processes. Results go to
``OUTPUT_DIR/retrieval_results.json``::

    {"protocol": "class", "mAP@R": 31.2, "recall@1": 80.1, "recall@5": 92.0, ...}
    {"protocol": "revisited", "dataset": "roxford5k", "medium": {"mAP": 35.1, "mP@1": ...,
     "mP@5": ..., "mP@10": ...}, "hard": {...}, ...}

All scores are percentages.
"""
from __future__ import annotations

import argparse
import math
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

import distributed
import images
import utils
import vision_transformer as vits
from evaluation import (DUMP_IDENTITY, SIMILARITY_ELEMENTS_PER_CHUNK, add_feature_file_args,
                        backbone_identity, build_eval_backbone, check_dump_identity,
                        check_eval_args, describe_backbone, dump_features, eval_args_parser,
                        extract_features, finish_run, load_features, print_table, run_as_script,
                        start_run, train_val_features)

RESULTS_FILE = "retrieval_results.json"
REVISITED_DATASETS = ("roxford5k", "rparis6k")
MULTISCALES = (1.0, 1 / math.sqrt(2), 0.5)  # DINO's scales for the revisited benchmarks
PRECISION_KS = (1, 5, 10)


def get_args_parser() -> argparse.ArgumentParser:
    parser = eval_args_parser("eval_retrieval", __doc__)
    group = parser.add_argument_group("retrieval")
    group.add_argument("--protocol", default="class", choices=["class", "revisited"], help="""
        'class': val images query the train images of an ImageFolder (mAP@R, Recall@K).
        'revisited': revisited Oxford/Paris (mAP on Medium and Hard; needs --dataset).""")
    group.add_argument("--recall_ks", default=[1, 5], nargs="+", type=int,
                       help="'class' protocol: the K of Recall@K.")
    group.add_argument("--dataset", default=None, choices=REVISITED_DATASETS, help="""
        'revisited' protocol: which benchmark. --data_path holds jpg/ and gnd_<dataset>.pkl,
        directly or in a <dataset>/ subfolder. The .pkl file is read by a restricted
        unpickler: only dicts, lists, tuples, strings, numbers and numpy arrays (the
        official files' content); a file naming anything else is refused unrun.""")
    group.add_argument("--imsize", default=512, type=int, help="""'revisited' protocol: images
        are shrunk (aspect kept, never enlarged) to fit in imsize x imsize (DINO and CARP: 512
        with --multiscale; DINO's README also shows 224 without). --resize_size and
        --crop_size do not apply to this protocol.""")
    group.add_argument("--multiscale", default=True, type=utils.bool_flag, help="""'revisited'
        protocol: average the CLS features at scales 1, 1/sqrt(2), 1/2 (else scale 1 only).""")
    group.add_argument("--crop_queries", default=True, type=utils.bool_flag, help="""'revisited'
        protocol: crop query images to their bounding box, as the protocol prescribes (DINO's
        script does not: false reproduces it).""")
    add_feature_file_args(group)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for bad values, before anything is loaded."""
    problems = []
    if args.protocol == "class" and any(k < 1 for k in args.recall_ks):
        problems.append(f"--recall_ks values must be >= 1, got {args.recall_ks}")
    if args.protocol == "revisited" and args.dataset is None:
        problems.append(f"--protocol revisited needs --dataset ({' or '.join(REVISITED_DATASETS)})")
    if args.imsize < 1:
        problems.append(f"--imsize must be >= 1, got {args.imsize}")
    check_eval_args(args, problems)


# --------------------------------------------------------------------------- metrics: class level


@torch.no_grad()
def class_retrieval_scores(gallery: torch.Tensor, gallery_labels: torch.Tensor,
                           queries: torch.Tensor, query_labels: torch.Tensor,
                           recall_ks: list[int], chunk_size: int | None = None) -> dict:
    """mAP@R and Recall@K (percent) of ``queries`` against ``gallery`` (L2-normalised rows).

    For a query whose class has R gallery images: AP@R = (1/R) sum over the top R results
    of precision@i at each relevant result i. Recall@K: a relevant image among the top K
    (K clipped to the gallery size). Queries whose class has no gallery image are skipped
    and counted (the scores are None when no query is left).
    """
    device = gallery.device
    gallery_labels, query_labels = gallery_labels.to(device).long(), query_labels.to(device).long()
    num_classes = int(max(gallery_labels.max(), query_labels.max())) + 1
    per_class = torch.bincount(gallery_labels, minlength=num_classes)
    r = per_class[query_labels]
    depth = min(gallery.shape[0], max(int(r.max()), max(recall_ks)))
    if chunk_size is None:
        chunk_size = max(1, SIMILARITY_ELEMENTS_PER_CHUNK // gallery.shape[0])
    aps, recall_hits = [], {k: 0 for k in recall_ks}
    ranks = torch.arange(1, depth + 1, device=device, dtype=torch.float64)
    valid = r > 0
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start:start + chunk_size].to(device)
        keep = valid[start:start + chunk_size]
        top = (q @ gallery.T).topk(depth, dim=1).indices
        hits = (gallery_labels[top] == query_labels[start:start + chunk_size, None])[keep]
        r_chunk = r[start:start + chunk_size][keep]
        within_r = ranks[None, :] <= r_chunk[:, None]
        precision = hits.cumsum(1) / ranks
        aps.append((precision * (hits & within_r)).sum(1) / r_chunk)
        for k in recall_ks:
            recall_hits[k] += hits[:, :min(k, depth)].any(1).sum().item()
    num_valid = int(valid.sum())
    # One sum over all queries' APs: the same number whatever the chunking.
    scores = {"mAP@R": 100 * torch.cat(aps).sum().item() / num_valid if num_valid else None}
    scores.update({f"recall@{k}": 100 * recall_hits[k] / num_valid if num_valid else None
                   for k in recall_ks})
    scores["queries_skipped"] = int(queries.shape[0] - num_valid)
    return scores


# --------------------------------------------------------------------------- metrics: revisited


def revisited_average_precision(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray,
                                ks: tuple[int, ...] = PRECISION_KS) -> tuple[float, list[float]]:
    """AP and precision@k of one query, as defined by the revisited Oxford/Paris protocol.

    ``ranking``: database indices, most similar first. Junk images are taken out of the
    ranking; the j-th relevant image (0-based) then at 0-based rank r contributes a
    trapezoid (p0 + p1) / 2 / len(positives) with p0 = j / r (1 when r = 0) and
    p1 = (j + 1) / (r + 1). Precision@k uses k' = min(k, 1-based rank of the last relevant
    image) and counts relevant images up to k', over k'. NaN when there is no relevant image.
    """
    if len(positives) == 0:
        return float("nan"), [float("nan")] * len(ks)
    is_junk = np.isin(ranking, junk)
    where = np.flatnonzero(np.isin(ranking, positives))
    junk_before = np.cumsum(is_junk) - is_junk  # junk images strictly before each place
    rank = where - junk_before[where]
    j = np.arange(len(rank))
    p0 = np.where(rank == 0, 1.0, j / np.maximum(rank, 1))
    p1 = (j + 1) / (rank + 1)
    ap = float(((p0 + p1) / 2).sum() / len(positives))
    last = int(rank.max()) + 1
    precisions = [float((rank + 1 <= min(k, last)).sum() / min(k, last)) for k in ks]
    return ap, precisions


def revisited_scores(similarity: np.ndarray, gnd: list[dict]) -> dict:
    """Medium and Hard mAP and mP@k (percent) from a (queries, database) similarity matrix."""
    rankings = np.argsort(-similarity, axis=1, kind="stable")
    splits = {
        "medium": [(np.concatenate([g["easy"], g["hard"]]), np.asarray(g["junk"])) for g in gnd],
        "hard": [(np.asarray(g["hard"]), np.concatenate([g["junk"], g["easy"]])) for g in gnd],
    }
    scores = {}
    for name, truth in splits.items():
        per_query = [revisited_average_precision(ranking, pos, junk)
                     for ranking, (pos, junk) in zip(rankings, truth)]
        aps = np.array([ap for ap, _ in per_query])
        precisions = np.array([p for _, p in per_query])
        counted = ~np.isnan(aps)

        def mean(values: np.ndarray) -> float | None:  # None (JSON null) without any query
            return round(100 * float(values.mean()), 4) if counted.any() else None

        scores[name] = {"mAP": mean(aps[counted])}
        scores[name].update({f"mP@{k}": mean(precisions[counted, i])
                             for i, k in enumerate(PRECISION_KS)})
        scores[name]["queries_without_positives"] = int((~counted).sum())
    return scores


# --------------------------------------------------------------------------- revisited data


def find_ground_truth(data_path: str | None, dataset: str) -> Path:
    if not data_path:
        raise utils.UserError(f"--data_path is required (the folder with jpg/ and gnd_{dataset}.pkl)")
    root = Path(data_path)
    if not root.is_dir():
        raise utils.UserError(f"--data_path {root} does not exist")
    candidates = [root / f"gnd_{dataset}.pkl", root / dataset / f"gnd_{dataset}.pkl"]
    for path in candidates:
        if path.is_file():
            return path
    raise utils.UserError(f"no ground truth for {dataset}: neither {candidates[0]} nor "
                          f"{candidates[1]} exists (get gnd_{dataset}.pkl from the revisited "
                          "Oxford/Paris page; nothing is downloaded here)")


# The only globals a ground-truth pickle may name: what numpy arrays (and numpy scalars) are
# rebuilt from, under numpy 1's and numpy 2's module names (protocol 5 uses _frombuffer), and
# what protocol-2 pickles use for an array's bytes (the latin-1 encoder; ``bytes`` for an empty
# array). Containers, strings and numbers need no global.
GROUND_TRUTH_GLOBALS = {
    ("builtins", "bytes"), ("__builtin__", "bytes"), ("_codecs", "encode"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core")
      for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
}


class GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, strings, numbers, booleans, None and numpy arrays, and
    refuses every other global before it is imported: a crafted file cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in GROUND_TRUTH_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a ground-truth file "
                                         "never holds (refused, nothing was run)")
        return super().find_class(module, name)


def load_ground_truth(path: Path) -> dict:
    """The official ``gnd_*.pkl``: {'imlist': [...], 'qimlist': [...], 'gnd': [{'easy', 'hard',
    'junk', 'bbx'}, ...]} with 0-based database indices and (x1, y1, x2, y2) query boxes.

    Read with ``GroundTruthUnpickler``: only containers, strings, numbers and numpy arrays;
    anything else is refused without being run."""
    try:
        with open(path, "rb") as f:
            gt = GroundTruthUnpickler(f).load()
    except Exception as e:
        raise utils.UserError(f"cannot read ground truth {path}: {utils.user_error_message(e)}") from e
    if not isinstance(gt, dict) or not {"imlist", "qimlist", "gnd"} <= set(gt):
        raise utils.UserError(f"{path} is not a revisited Oxford/Paris ground truth "
                              "(expected a dict with 'imlist', 'qimlist' and 'gnd')")
    if len(gt["gnd"]) != len(gt["qimlist"]):
        raise utils.UserError(f"{path}: {len(gt['gnd'])} 'gnd' entries for "
                              f"{len(gt['qimlist'])} query images")
    n = len(gt["imlist"])
    for i, entry in enumerate(gt["gnd"]):
        missing = {"easy", "hard", "junk", "bbx"} - set(entry)
        if missing:
            raise utils.UserError(f"{path}: query {i} lacks {', '.join(sorted(missing))}")
        for key in ("easy", "hard", "junk"):
            index = np.asarray(entry[key], dtype=np.int64)
            if index.size and (index.min() < 0 or index.max() >= n):
                raise utils.UserError(f"{path}: query {i} '{key}' has indices outside the "
                                      f"{n} database images")
    return gt


class RevisitedImages(Dataset):
    """Images ``folder/<name>.jpg``, optionally cropped to a box, shrunk to fit ``imsize``."""

    def __init__(self, folder: Path, names: list[str], boxes: list | None, imsize: int):
        self.paths = [folder / f"{name}.jpg" for name in names]
        self.boxes = boxes
        self.imsize = imsize
        self.transform = transforms.Compose([
            transforms.ToTensor(), transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = images.load_rgb_image(str(self.paths[index]))
        if self.boxes is not None:
            image = image.crop(tuple(int(round(float(v))) for v in self.boxes[index]))
        image.thumbnail((self.imsize, self.imsize), Image.LANCZOS)
        return self.transform(image), index


def multiscale_featurizer(model: nn.Module, scales: tuple[float, ...], multiple: int = 1
                          ) -> Callable[[torch.Tensor], torch.Tensor]:
    """CLS output averaged over bilinear rescalings of the input (DINO's ``multi_scale``).

    Each rescaled image loses its last rows and columns beyond a multiple of ``multiple``
    (the patch size): what DINO's strided patch embedding drops, and what timm's refuses."""
    def featurize(images: torch.Tensor) -> torch.Tensor:
        total = 0
        for scale in scales:
            resized = images if scale == 1 else F.interpolate(
                images, scale_factor=scale, mode="bilinear", align_corners=False)
            height, width = resized.shape[-2:]
            total = total + model(resized[..., :height - height % multiple, :width - width % multiple])
        return total / len(scales)
    return featurize


def revisited_features(args: argparse.Namespace, env: distributed.DistEnv, gt: dict, image_dir: Path
                       ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(database, query) features, L2-normalised: loaded, or extracted once across ranks."""
    if args.load_features:
        database, queries, _, _, meta = load_features(Path(args.load_features))
        if meta.get("protocol") != "revisited" or meta.get("dataset") != args.dataset:
            raise utils.UserError(f"--load_features {args.load_features} holds no {args.dataset} "
                                  "features (dump them with --protocol revisited --dataset "
                                  f"{args.dataset} --dump_features)")
        if (len(database), len(queries)) != (len(gt["imlist"]), len(gt["qimlist"])):
            raise utils.UserError(f"--load_features {args.load_features}: {len(database)} database"
                                  f" / {len(queries)} query features do not fit the ground truth")
        check_dump_identity(meta, args)
        backbone = {k: meta.get(k) for k in DUMP_IDENTITY if k in meta}
        return database.float().to(env.device), queries.float().to(env.device), backbone
    model, feature_dim, info = build_eval_backbone(
        args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size, args.imsize,
        args.seed)
    model.to(env.device)
    scales = MULTISCALES if args.multiscale else (1.0,)
    database_set = RevisitedImages(image_dir, gt["imlist"], None, args.imsize)
    query_set = RevisitedImages(image_dir, gt["qimlist"],
                                [g["bbx"] for g in gt["gnd"]] if args.crop_queries else None,
                                args.imsize)
    if env.is_main:
        print(f"backbone: {describe_backbone(info)}")
        print(f"extracting features of {len(database_set)} database and {len(query_set)} query "
              f"images at {len(scales)} scale(s) on {env.world_size} process(es)", flush=True)
    # Batches of one: the images keep their own sizes.
    extract = dict(feature_dim=feature_dim, batch_size=1, num_workers=args.num_workers,
                   device=env.device)
    multiple = info["patch_size"] if info["arch"] in vits.VIT_ARCHS else 1
    featurize = multiscale_featurizer(model, scales, multiple)
    database = F.normalize(extract_features(featurize, database_set, **extract), dim=1)
    queries = F.normalize(extract_features(featurize, query_set, **extract), dim=1)
    backbone = backbone_identity(info)
    if args.dump_features and env.is_main:
        meta = {**backbone, "protocol": "revisited", "dataset": args.dataset,
                "imsize": args.imsize, "multiscale": args.multiscale,
                "crop_queries": args.crop_queries}
        dump_features(Path(args.dump_features), database, queries, torch.arange(len(database)),
                      torch.arange(len(queries)), meta)
        print(f"features saved to {args.dump_features}")
    return database, queries, backbone


def check_revisited_images(gt: dict, image_dir: Path) -> None:
    missing = [name for name in [*gt["imlist"], *gt["qimlist"]]
               if not (image_dir / f"{name}.jpg").is_file()]
    if missing:
        raise utils.UserError(f"{len(missing)} image(s) of the ground truth are missing, e.g. "
                              f"{image_dir / (missing[0] + '.jpg')}")


# --------------------------------------------------------------------------- main


def run_revisited(args: argparse.Namespace) -> dict | None:
    gt_file = find_ground_truth(args.data_path, args.dataset)
    gt = load_ground_truth(gt_file)
    image_dir = gt_file.parent / "jpg"
    if not args.load_features:
        if not image_dir.is_dir():
            raise utils.UserError(f"no image folder {image_dir} next to {gt_file.name}")
        check_revisited_images(gt, image_dir)
    env, output_dir = start_run(args)
    database, queries, backbone = revisited_features(args, env, gt, image_dir)
    results = None
    if env.is_main:
        similarity = (queries @ database.T).cpu().numpy()
        results = {"protocol": "revisited", "dataset": args.dataset,
                   **revisited_scores(similarity, gt["gnd"]),
                   "num_database": len(database), "num_queries": len(queries),
                   "imsize": args.imsize, "multiscale": args.multiscale,
                   "crop_queries": args.crop_queries, **backbone, "world_size": env.world_size}
        print(f"\n{args.dataset}: {len(queries)} queries, {len(database)} database images")
        columns = ["mAP", *(f"mP@{k}" for k in PRECISION_KS)]
        print_table(["split", *columns], [[split, *(results[split][c] for c in columns)]
                                          for split in ("medium", "hard")])
    finish_run(results, output_dir, RESULTS_FILE)
    return results


def run_class_level(args: argparse.Namespace) -> dict | None:
    env, output_dir = start_run(args)
    features = train_val_features(args, env)
    results = None
    if env.is_main:
        scores = class_retrieval_scores(features.train, features.train_labels, features.val,
                                        features.val_labels, args.recall_ks)
        results = {"protocol": "class", **{k: round(v, 4) if isinstance(v, float) else v
                                            for k, v in scores.items()},
                   "num_gallery": int(features.train.shape[0]),
                   "num_queries": int(features.val.shape[0]), "num_classes": features.num_classes,
                   **features.backbone, "world_size": env.world_size}
        print(f"\nclass-level retrieval: {results['num_queries']} val queries, "
              f"{results['num_gallery']} train gallery images, {features.num_classes} classes")
        names = ["mAP@R", *(f"recall@{k}" for k in args.recall_ks)]
        print_table(["queries", *names], [["val", *(results[name] for name in names)]])
        if results["queries_skipped"]:
            print(f"({results['queries_skipped']} queries skipped: no train image of their class)")
    finish_run(results, output_dir, RESULTS_FILE)
    return results


def main(args: argparse.Namespace) -> dict | None:
    """Run the evaluation; returns the results dict on the main process (None elsewhere)."""
    check_args(args)
    return run_revisited(args) if args.protocol == "revisited" else run_class_level(args)


if __name__ == "__main__":
    run_as_script(get_args_parser, main)
