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

import torch

from evaluation import (add_backbone_and_data_args, add_feature_file_args, check_eval_args,
                        effective_ks, finish_run, knn_classifier, run_as_script, start_run,
                        train_val_features)


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
    add_feature_file_args(group)
    return parser


# --------------------------------------------------------------------------- main


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked, and the output folders proven writable, before any work."""
    problems = [f"--nb_knn values must be >= 1, got {k}" for k in args.nb_knn if k < 1]
    if not args.temperature > 0:  # also refuses nan
        problems.append(f"--temperature must be > 0 (the vote weight is exp(similarity / T)), "
                        f"got {args.temperature}")
    check_eval_args(args, problems)


def main(args: argparse.Namespace) -> dict | None:
    """Run the evaluation; returns the results dict on the main process (None elsewhere)."""
    check_args(args)
    env, output_dir = start_run(args)
    features = train_val_features(args, env)
    train_features, val_features = features.train, features.val
    num_classes = features.num_classes
    results = None
    ks = effective_ks(args.nb_knn, train_features.shape[0])
    if env.is_main:
        top_n = min(5, num_classes)
        results = {}
        for k in ks:
            top1, top5 = knn_classifier(train_features, features.train_labels, val_features,
                                        features.val_labels, k, args.temperature, num_classes)
            results[f"k={k}"] = {"top1": round(top1, 4), "top5": round(top5, 4)}
        results.update({
            "num_train": int(train_features.shape[0]), "num_val": int(val_features.shape[0]),
            "num_classes": num_classes, "top5_is_top": top_n, "temperature": args.temperature,
            **features.backbone, "world_size": env.world_size,
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
    finish_run(results, output_dir, "knn_results.json")
    return results


if __name__ == "__main__":
    run_as_script(get_args_parser, main)
