"""Transfer to other datasets with frozen features: k-NN (k=20) and a linear classifier per dataset, one table.

For each ``--datasets`` folder (an ImageFolder root with ``train/`` and ``val/``): every image
goes once through the frozen backbone (resize, centre crop, CLS feature, L2-normalised: the
features of ``eval_knn.py``), cached in ``OUTPUT_DIR/transfer/<name>/features``; then

- weighted k-NN top-1 (DINO's vote, k = ``--knn_k`` = 20, T = ``--temperature``), and
- a linear classifier on the cached features: multinomial logistic regression by L-BFGS,
  its L2 strength chosen on ``--holdout_fraction`` of each class's train images, refit on all
  train images (``eval_lowshot.py``'s 100 % setting), val top-1.

One table, a row per dataset named by its folder and the mean (the form of CARP's and Mugs'
transfer tables), printed and written as ``OUTPUT_DIR/transfer_results.md`` and
``transfer_results.json``. Each finished dataset's row is saved in
``OUTPUT_DIR/transfer/<name>.json`` first: running the command again skips the datasets already
done (same backbone and settings) and only computes the others.

    python eval_transfer.py --pretrained_weights checkpoint.pth --output_dir transfer_out \\
        --datasets /data/cifar10 /data/cifar100 /data/flowers102 /data/pets
    torchrun --nproc_per_node=8 eval_transfer.py --pretrained_weights checkpoint.pth \\
        --datasets /data/cifar10 /data/inat18 --output_dir transfer_out

Accuracies are percentages. Nothing is downloaded: convert each dataset to ``train/<class>/*``
and ``val/<class>/*`` first.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch

import distributed
import storage
import utils
from eval_lowshot import DEFAULT_L2_GRID, Setting, logistic_regression_problems, run_job
from evaluation import (check_eval_args, effective_ks, eval_args_parser, finish_run,
                        knn_classifier, print_table, run_as_script, start_run, train_val_features)

RESULTS_FILE = "transfer_results.json"
TABLE_FILE = "transfer_results.md"
# What a saved row depends on: a rerun with other values recomputes nothing silently.
ROW_SETTINGS = ("pretrained_weights", "checkpoint_key", "arch", "patch_size", "resize_size",
                "crop_size", "knn_k", "temperature", "l2_grid", "holdout_fraction", "max_iter", "seed")


def get_args_parser() -> argparse.ArgumentParser:
    parser = eval_args_parser("eval_transfer", __doc__)
    # Features are cached per dataset under --output_dir (no --dump/--load_features flags).
    parser.set_defaults(dump_features=None, load_features=None)
    group = parser.add_argument_group("transfer")
    group.add_argument("--datasets", default=None, nargs="*", type=str, help="""ImageFolder
        roots, each with train/<class>/* and val/<class>/*; a row per folder, named by it
        (folder names must differ). --data_path is not used.""")
    group.add_argument("--knn_k", default=20, type=int,
                       help="Neighbours of the k-NN vote (20 as in the paper and CARP).")
    group.add_argument("--temperature", default=0.07, type=float,
                       help="T of the k-NN vote weight exp(similarity / T) (0.07 as DINO).")
    group.add_argument("--l2_grid", default=DEFAULT_L2_GRID, nargs="+", type=float, help="""L2
        strengths of the linear classifier tried on the held-out train images.""")
    group.add_argument("--holdout_fraction", default=0.2, type=float, help="""Fraction of each
        class's train images held out to choose the L2 strength.""")
    group.add_argument("--max_iter", default=1000, type=int,
                       help="L-BFGS iterations per fit of the linear classifier at most.")
    return parser


def dataset_name(path: str) -> str:
    return Path(os.path.abspath(path)).name  # a link keeps its own name


def check_args(args: argparse.Namespace) -> None:
    """Every flag and every dataset folder checked before any work (one-line errors)."""
    problems = []
    if args.data_path:
        problems.append(f"--data_path {args.data_path}: eval_transfer.py takes its folders from "
                        "--datasets (give it there)")
    if not args.datasets:
        problems.append("--datasets needs at least one ImageFolder root (with train/ and val/)")
    names = [dataset_name(d) for d in args.datasets or []]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"--datasets: two folders named '{repeated[0]}' (rows are named by "
                        "the folder: rename or link one)")
    for folder in args.datasets or []:
        for split in ("train", "val"):
            if not (Path(folder) / split).is_dir():
                problems.append(f"--datasets {folder}: no {split}/ folder (each dataset needs "
                                f"{folder}/train/<class>/* and {folder}/val/<class>/*)")
    if args.knn_k < 1:
        problems.append(f"--knn_k must be >= 1, got {args.knn_k}")
    if not args.temperature > 0:
        problems.append(f"--temperature must be > 0, got {args.temperature}")
    check_eval_args(args, problems + logistic_regression_problems(args))


def settings_of(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in ROW_SETTINGS}


def saved_row(path: Path, settings: dict) -> dict | None:
    """The row saved by an earlier run with the same settings; None when there is none."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise utils.UserError(f"cannot read {path}: {utils.user_error_message(e)} (delete it to "
                              "recompute that dataset)") from e
    differences = [f"{k}: saved {saved.get('settings', {}).get(k)!r} vs now {v!r}"
                   for k, v in settings.items() if saved.get("settings", {}).get(k) != v]
    if differences:
        raise utils.UserError(f"{path} belongs to another run ({'; '.join(differences)}): use a "
                              "fresh --output_dir, or delete it to recompute that dataset")
    return saved["row"]


def evaluate_dataset(args: argparse.Namespace, env: distributed.DistEnv, folder: str, cache: Path
                     ) -> dict | None:
    """k-NN and linear top-1 on one dataset (the row on rank 0, None elsewhere)."""
    run = copy.copy(args)
    run.data_path = folder
    done = (cache / "features_meta.json").is_file()
    run.load_features, run.dump_features = (str(cache), None) if done else (None, str(cache))
    features = train_val_features(run, env)
    if not env.is_main:
        return None
    k = effective_ks([args.knn_k], features.train.shape[0])[0]
    knn_top1, _ = knn_classifier(features.train, features.train_labels, features.val,
                                 features.val_labels, k, args.temperature, features.num_classes)
    features.train, features.val = features.train.cpu(), features.val.cpu()
    linear = run_job(features, Setting("percent", 100.0), 0, args, env.device)
    return {"dataset": dataset_name(folder), "knn_top1": round(knn_top1, 4),
            "linear_top1": round(linear["top1"], 4), "linear_l2": linear["l2"], "k": k,
            "num_train": int(features.train.shape[0]), "num_val": int(features.val.shape[0]),
            "num_classes": features.num_classes}


def markdown_table(rows: list[dict], mean: dict) -> str:
    lines = ["| dataset | k-NN top-1 | linear top-1 |", "|---|---:|---:|"]
    lines += [f"| {r['dataset']} | {r['knn_top1']:.1f} | {r['linear_top1']:.1f} |" for r in rows]
    lines.append(f"| **mean** | **{mean['knn_top1']:.1f}** | **{mean['linear_top1']:.1f}** |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> dict | None:
    """Evaluate every dataset not done yet; returns the table (dict) on the main process."""
    check_args(args)
    env, output_dir = start_run(args)
    settings = settings_of(args)
    rows = []
    for folder in args.datasets:
        name = dataset_name(folder)
        row_file = output_dir / "transfer" / f"{name}.json"
        row = saved_row(row_file, settings)  # every rank reads it before rank 0 may write it
        if row is not None:
            if env.is_main:
                print(f"{name}: done in an earlier run ({row_file}), skipped", flush=True)
        else:
            if env.is_main:
                print(f"\n=== {name} ({folder})", flush=True)
            row = evaluate_dataset(args, env, folder, output_dir / "transfer" / name / "features")
            if env.is_main:
                storage.write_json({"settings": settings, "row": row}, row_file)
                print(f"{name}: k-NN top-1 {row['knn_top1']:.2f}  linear top-1 "
                      f"{row['linear_top1']:.2f}", flush=True)
        rows.append(row)
    results = None
    if env.is_main:
        mean = {key: round(sum(r[key] for r in rows) / len(rows), 4)
                for key in ("knn_top1", "linear_top1")}
        results = {"rows": rows, "mean": mean, **settings, "world_size": env.world_size}
        print(f"\ntransfer: {len(rows)} dataset(s), k-NN k={args.knn_k} and linear (logistic "
              "regression) on frozen features, top-1 %")
        print_table(["dataset", "k-NN", "linear"],
                    [[r["dataset"], r["knn_top1"], r["linear_top1"]] for r in rows]
                    + [["mean", mean["knn_top1"], mean["linear_top1"]]])
        with storage.atomic_path(output_dir / TABLE_FILE) as tmp:
            tmp.write_text(markdown_table(rows, mean))
        print(f"table written to {output_dir / TABLE_FILE}")
    finish_run(results, output_dir, RESULTS_FILE)
    return results


if __name__ == "__main__":
    run_as_script(get_args_parser, main)
