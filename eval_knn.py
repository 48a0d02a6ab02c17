"""Weighted k-NN classification on frozen features (DINO's k-NN protocol).

Every train and val image goes once through the backbone (resize, centre crop, no
augmentation); its CLS feature is L2-normalised. Each val image is classified by its k
most cosine-similar train images, each voting for its class with weight exp(sim / T).
No training, no hyperparameters beyond k and T: a quick, stable read of feature quality.

    python eval_knn.py --data_path /path/to/imagenet --pretrained_weights checkpoint.pth
    torchrun --nproc_per_node=8 eval_knn.py --data_path /path/to/imagenet \\
        --pretrained_weights checkpoint.pth --output_dir knn_out
    python eval_knn.py --data_path DATA --pretrained_weights checkpoint.pth \\
        --resize_size 28 --crop_size 28 --nb_knn 20 --output_dir out   # 28-px images

The dataset is an ImageFolder: ``DATA/train/<class>/*`` and ``DATA/val/<class>/*``.
Results are printed and written to ``OUTPUT_DIR/knn_results.json``::

    {"k=10": {"top1": 74.2, "top5": 89.9}, "k=20": {...}, ...,
     "num_train": ..., "num_val": ..., "num_classes": ..., "top5_is_top": 5,
     "temperature": 0.07, "checkpoint": ..., "checkpoint_key": ..., "arch": ..., ...}

Accuracies are percentages. ``top5_is_top`` is min(5, number of classes): with fewer than
5 classes the "top5" entry is top-that-many. A k larger than the train set is clipped
to the train set size (with a warning) and reported under its clipped value.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import utils
from evaluation import (add_backbone_and_data_args, build_eval_backbone, build_train_val,
                        check_common_args, describe_backbone, dump_features, effective_ks,
                        eval_transform, extract_features, knn_classifier, load_features,
                        usable_workers)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "eval_knn", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_backbone_and_data_args(parser)
    group = parser.add_argument_group("k-NN")
    group.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=int, help="""
        Numbers of neighbours to report (the paper reports 20; DINO also lists 10, 100, 200).
        Values above the train set size are clipped to it.""")
    group.add_argument("--temperature", default=0.07, type=float, help="""T of the vote
        weight exp(similarity / T) (0.07 in DINO and the paper).""")
    group.add_argument("--dump_features", default=None, type=str, help="""Also save the
        normalised features and labels to this folder (trainfeat.pth, valfeat.pth,
        trainlabels.pth, vallabels.pth, features_meta.json).""")
    group.add_argument("--load_features", default=None, type=str, help="""Skip the backbone
        and the images: read features saved by --dump_features from this folder.""")
    return parser


# --------------------------------------------------------------------------- main


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked, and the output folders proven writable, before any work."""
    problems = [f"--nb_knn values must be >= 1, got {k}" for k in args.nb_knn if k < 1]
    if not args.temperature > 0:  # also refuses nan
        problems.append(f"--temperature must be > 0 (the vote weight is exp(similarity / T)), "
                        f"got {args.temperature}")
    check_common_args(args, problems)
    utils.check_writable_dir(args.output_dir)
    if args.dump_features:
        utils.check_writable_dir(args.dump_features, "--dump_features")


def main(args: argparse.Namespace) -> dict | None:
    """Run the evaluation; returns the results dict on the main process (None elsewhere)."""
    check_args(args)
    args.num_workers = usable_workers(args.num_workers)
    env = utils.init_distributed(device=args.device)
    output_dir = Path(args.output_dir)

    if args.load_features:
        train_features, val_features, train_labels, val_labels, meta = \
            load_features(Path(args.load_features))
        train_features, val_features = train_features.to(env.device), val_features.to(env.device)
        num_classes = len(meta["classes"]) if "classes" in meta else \
            int(max(train_labels.max(), val_labels.max())) + 1
        backbone = {k: meta.get(k) for k in ("checkpoint", "checkpoint_key", "arch", "patch_size")}
        if env.is_main:
            print(f"features loaded from {args.load_features}")
    else:
        transform = eval_transform(args.resize_size, args.crop_size)
        train_set, val_set = build_train_val(args.data_path, transform, transform)
        model, feature_dim, info = build_eval_backbone(
            args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size,
            args.crop_size, args.seed)
        model.to(env.device)
        if env.is_main:
            print(f"backbone: {describe_backbone(info)}")
            print(f"extracting features of {len(train_set)} train and {len(val_set)} val images "
                  f"on {env.world_size} process(es)", flush=True)
        extract = dict(feature_dim=feature_dim, batch_size=args.batch_size_per_gpu,
                       num_workers=args.num_workers, device=env.device)
        train_features = F.normalize(extract_features(model, train_set, **extract), dim=1)
        val_features = F.normalize(extract_features(model, val_set, **extract), dim=1)
        train_labels = torch.tensor(train_set.targets)
        val_labels = torch.tensor(val_set.targets)
        num_classes = len(train_set.classes)
        backbone = {"checkpoint": info["path"], "checkpoint_key": info["checkpoint_key"],
                    "arch": info["arch"], "patch_size": info["patch_size"]}
        if args.dump_features and env.is_main:
            meta = {**backbone, "classes": train_set.classes, "resize_size": args.resize_size,
                    "crop_size": args.crop_size}
            dump_features(Path(args.dump_features), train_features, val_features,
                          train_labels, val_labels, meta)
            print(f"features saved to {args.dump_features}")

    results = None
    ks = effective_ks(args.nb_knn, train_features.shape[0])
    if env.is_main:
        top_n = min(5, num_classes)
        results = {}
        for k in ks:
            top1, top5 = knn_classifier(train_features, train_labels, val_features, val_labels,
                                        k, args.temperature, num_classes)
            results[f"k={k}"] = {"top1": round(top1, 4), "top5": round(top5, 4)}
        results.update({
            "num_train": int(train_features.shape[0]), "num_val": int(val_features.shape[0]),
            "num_classes": num_classes, "top5_is_top": top_n, "temperature": args.temperature,
            **backbone, "resize_size": args.resize_size, "crop_size": args.crop_size,
            "world_size": env.world_size,
        })
        print(f"\nweighted k-NN (T={args.temperature}), {results['num_train']} train / "
              f"{results['num_val']} val images, {num_classes} classes")
        top_label = "top-5" if top_n == 5 else f"top-{top_n}*"
        print(f"{'k':>6}  {'top-1':>7}  {top_label:>7}")
        for k in ks:
            row = results[f"k={k}"]
            print(f"{k:>6}  {row['top1']:>7.2f}  {row['top5']:>7.2f}")
        if top_n < 5:
            print(f"* only {num_classes} classes: the 'top5' column is top-{top_n}")
        utils.write_json(results, output_dir / "knn_results.json")
        print(f"results written to {output_dir / 'knn_results.json'}", flush=True)
    utils.barrier()
    utils.cleanup_distributed()
    return results


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    try:
        main(parsed)
    except utils.UserError as e:
        utils.exit_with_error(utils.user_error_message(e))
