"""Low-shot classification on frozen features: logistic regression on a few labelled images per class.

Every train and val image goes once through the backbone (resize, centre crop, no
augmentation); its CLS feature is L2-normalised. For each setting (``--shots N``: N train
images per class; ``--percent P``: P % of each class's train images) and each of
``--splits`` seeded random subsets, a multinomial logistic regression is fitted on the
subset's features and scored (top-1) on all val images: MSN's low-shot protocol, reported
as mean ± std over the splits.

    python eval_lowshot.py --data_path /path/to/imagenet --pretrained_weights checkpoint.pth
    torchrun --nproc_per_node=8 eval_lowshot.py --data_path /path/to/imagenet \\
        --pretrained_weights checkpoint.pth --shots 1 2 5 --percent 1 --output_dir lowshot_out
    python eval_lowshot.py --load_features knn_out/features --shots 1 5 --percent 10

The classifier: softmax over the classes in the subset, weights W and biases b minimising
mean cross-entropy + (L2 / 2) ||W||^2, solved full-batch by L-BFGS (strong-Wolfe line search)
from zero, in float64 on the CPU and float32 on a GPU (one job per process with torchrun).
The L2 strength is chosen per subset from ``--l2_grid``: the last ``--holdout_fraction`` of
each class's subset images (at least one, never all) is held out, a model is fitted on the
rest for every grid value, the value with the best held-out top-1 wins (ties: lower held-out
cross-entropy, then the stronger L2), and the model is refitted on the whole subset. With one
image per class nothing can be held out: the strongest grid value is used, where logistic
regression approaches the nearest-class-mean classifier on features centred on the subset
mean (the usual one-shot baseline).

Subsets are drawn per class from a random order seeded by (--seed, split); a setting takes
the first N (or round(P % of the class), at least 1) images of that order, so within a split
the 1-shot subset is inside the 2-shot one, and so on. Results go to
``OUTPUT_DIR/lowshot_results.json``::

    {"shots=1": {"top1_mean": 41.3, "top1_std": 2.1, "top1_per_split": [...], "l2_per_split":
     [...], "l2_selected": false, "images_per_split": [...]}, "percent=10": {...}, ...,
     "num_train": ..., "num_val": ..., "num_classes": ..., "splits": 3, "checkpoint": ..., ...}

Accuracies are percentages; the std is the sample standard deviation over splits (0 for one).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import distributed
import utils
from evaluation import (TrainValFeatures, add_feature_file_args, check_eval_args, class_counts,
                        class_name, eval_args_parser, finish_run, print_table, run_as_script,
                        start_run, train_val_features)

DEFAULT_L2_GRID = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
RESULTS_FILE = "lowshot_results.json"


def get_args_parser() -> argparse.ArgumentParser:
    parser = eval_args_parser("eval_lowshot", __doc__)
    group = parser.add_argument_group("low-shot")
    group.add_argument("--shots", default=[1, 2, 5, 13], nargs="*", type=int, help="""Train
        images per class of each setting (MSN reports 1, 2, 5; 13 per class is about ImageNet's
        1 %%). Every class must have at least max(--shots) train images. No value: none.""")
    group.add_argument("--percent", default=[1.0, 10.0], nargs="*", type=float, help="""Percent
        of each class's train images of each setting (1 and 10 are the usual semi-supervised
        fractions), at least one image per class. No value: none.""")
    group.add_argument("--splits", default=3, type=int, help="""Random subsets per setting
        (seeded by --seed and the split number); the table shows mean ± std over them.""")
    group.add_argument("--l2_grid", default=DEFAULT_L2_GRID, nargs="+", type=float, help="""L2
        strengths tried on the held-out part of each subset (coefficient of ||W||^2 / 2 added
        to the mean cross-entropy).""")
    group.add_argument("--holdout_fraction", default=0.2, type=float, help="""Fraction of each
        class's subset images held out to choose the L2 strength (rounded, at least one, never
        all of a class).""")
    group.add_argument("--max_iter", default=1000, type=int,
                       help="L-BFGS iterations per fit at most.")
    add_feature_file_args(group)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for bad values, before anything is loaded."""
    problems = []
    if not args.shots and not args.percent:
        problems.append("nothing to evaluate: give --shots and/or --percent values")
    if any(n < 1 for n in args.shots):
        problems.append(f"--shots values must be >= 1, got {args.shots}")
    if any(not 0 < p <= 100 for p in args.percent):
        problems.append(f"--percent values must be in (0, 100], got {args.percent}")
    if args.splits < 1:
        problems.append(f"--splits must be >= 1, got {args.splits}")
    check_eval_args(args, problems + logistic_regression_problems(args))


def logistic_regression_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with --l2_grid, --holdout_fraction and --max_iter (also eval_transfer.py's)."""
    problems = []
    if any(not (l2 > 0 and math.isfinite(l2)) for l2 in args.l2_grid):
        problems.append(f"--l2_grid values must be positive, got {args.l2_grid}")
    if not 0 < args.holdout_fraction < 1:
        problems.append(f"--holdout_fraction must be in (0, 1), got {args.holdout_fraction}")
    if args.max_iter < 1:
        problems.append(f"--max_iter must be >= 1, got {args.max_iter}")
    return problems


# --------------------------------------------------------------------------- subsets


@dataclass(frozen=True)
class Setting:
    kind: str  # "shots" or "percent"
    value: float

    @property
    def name(self) -> str:
        return f"shots={int(self.value)}" if self.kind == "shots" else f"percent={self.value:g}"

    @property
    def label(self) -> str:
        if self.kind == "shots":
            return f"{int(self.value)} shot{'s' if self.value != 1 else ''}/class"
        return f"{self.value:g} % of train"

    def per_class(self, counts: np.ndarray) -> np.ndarray:
        """Subset images per class (0 for classes without train images)."""
        if self.kind == "shots":
            wanted = np.full_like(counts, int(self.value))
        else:
            wanted = np.maximum(1, np.floor(counts * self.value / 100 + 0.5).astype(counts.dtype))
        return np.minimum(wanted, counts)


def settings_of(args: argparse.Namespace) -> list[Setting]:
    listed = [Setting("shots", float(n)) for n in args.shots] + \
             [Setting("percent", float(p)) for p in args.percent]
    return list(dict.fromkeys(listed))  # drop repeats, keep order


def class_orders(labels: np.ndarray, num_classes: int, seed: int, split: int) -> list[np.ndarray]:
    """Per class, its train indices in a random order fixed by (seed, split)."""
    rng = np.random.default_rng([seed, split])
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def holdout_sizes(sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Held-out images per class: round(fraction * size), at least 1, at most size - 1."""
    held = np.maximum(1, np.floor(sizes * fraction + 0.5).astype(sizes.dtype))
    return np.where(sizes >= 2, np.minimum(held, sizes - 1), 0)


def subset_indices(orders: list[np.ndarray], sizes: np.ndarray, held: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) train indices: the first ``size - held`` and the next ``held`` per class."""
    fit = [order[:n - h] for order, n, h in zip(orders, sizes, held)]
    out = [order[n - h:n] for order, n, h in zip(orders, sizes, held)]
    return np.concatenate(fit).astype(np.int64), np.concatenate(out).astype(np.int64)


# --------------------------------------------------------------------------- logistic regression


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_outputs: int, l2: float,
                            max_iter: int, init: tuple[torch.Tensor, torch.Tensor] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy(x W^T + b, y) + l2 / 2 ||W||^2 by full-batch L-BFGS.

    ``y`` holds indices in ``range(num_outputs)``; the bias is not regularised. Starts from
    zero (or ``init``, a previous solution: the problem is convex, only the path changes).
    """
    weight = torch.zeros(num_outputs, x.shape[1], dtype=x.dtype, device=x.device)
    bias = torch.zeros(num_outputs, dtype=x.dtype, device=x.device)
    if init is not None:
        weight.copy_(init[0])
        bias.copy_(init[1])
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    tight = x.dtype == torch.float64
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9 if tight else 1e-6,
                                  tolerance_change=1e-12 if tight else 1e-9,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


@torch.no_grad()
def score(model: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor
          ) -> tuple[float, float]:
    """(top-1 in percent, mean cross-entropy) of a fitted model on (x, y)."""
    logits = x @ model[0].T + model[1]
    top1 = (logits.argmax(1) == y).double().mean().item() * 100
    return top1, F.cross_entropy(logits, y).item()


def choose_l2(x_fit: torch.Tensor, y_fit: torch.Tensor, x_held: torch.Tensor, y_held: torch.Tensor,
              num_outputs: int, grid: list[float], max_iter: int) -> float:
    """The grid value with the best held-out (top-1, then lower cross-entropy); ties go to
    the stronger L2. Fits run from the strongest L2 down, each starting from the last."""
    best, best_key, model = None, None, None
    for l2 in sorted(grid, reverse=True):
        model = fit_logistic_regression(x_fit, y_fit, num_outputs, l2, max_iter, init=model)
        top1, loss = score(model, x_held, y_held)
        key = (top1, -loss)
        if best_key is None or key > best_key:
            best, best_key = l2, key
    return best


def run_job(features: TrainValFeatures, setting: Setting, split: int, args: argparse.Namespace,
            device: torch.device) -> dict:
    """One setting on one split: choose the L2 strength, refit on the subset, score on val."""
    labels = features.train_labels.numpy()
    orders = class_orders(labels, features.num_classes, args.seed, split)
    counts = class_counts(features.train_labels, features.num_classes).numpy()
    sizes = setting.per_class(counts)
    held = holdout_sizes(sizes, args.holdout_fraction)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    present = np.flatnonzero(sizes)  # the classifier's outputs: classes in the subset
    to_output = torch.full((features.num_classes,), -1, dtype=torch.long)
    to_output[torch.from_numpy(present)] = torch.arange(len(present))

    def xy(indices: np.ndarray | torch.Tensor, source: torch.Tensor, targets: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return (source[index.to(source.device)].to(device, dtype),
                to_output[targets[index]].to(device))

    fit_idx, held_idx = subset_indices(orders, sizes, held)
    if held.sum() > 0:
        l2 = choose_l2(*xy(fit_idx, features.train, features.train_labels),
                       *xy(held_idx, features.train, features.train_labels),
                       len(present), args.l2_grid, args.max_iter)
    else:
        l2 = max(args.l2_grid)
    subset = np.concatenate([fit_idx, held_idx])
    model = fit_logistic_regression(*xy(subset, features.train, features.train_labels),
                                    len(present), l2, args.max_iter)
    # Val images of classes outside the subset keep label -1: never predicted, always wrong.
    x_val, y_val = xy(torch.arange(len(features.val_labels)), features.val, features.val_labels)
    top1 = (torch.argmax(x_val @ model[0].T + model[1], 1) == y_val).double().mean().item() * 100
    return {"setting": setting.name, "split": split, "top1": top1, "l2": l2,
            "l2_selected": bool(held.sum() > 0), "images": int(sizes.sum())}


def run_jobs(features: TrainValFeatures, settings: list[Setting], args: argparse.Namespace,
             env: distributed.DistEnv) -> list[dict]:
    """Every (split, setting) once, round-robin over the ranks, gathered on every rank.

    A job's result does not depend on the rank that runs it (its subset is seeded by the
    split alone and every rank holds the same features), so 1 and N processes agree."""
    jobs = [(split, setting) for split in range(args.splits) for setting in settings]
    mine = [run_job(features, setting, split, args, env.device)
            for i, (split, setting) in enumerate(jobs) if i % env.world_size == env.rank]
    return [result for part in distributed.gather_objects(mine) for result in part]


def summarise(done: list[dict], settings: list[Setting], splits: int) -> dict:
    results = {}
    for setting in settings:
        rows = sorted((r for r in done if r["setting"] == setting.name), key=lambda r: r["split"])
        top1 = [r["top1"] for r in rows]
        results[setting.name] = {
            "top1_mean": round(float(np.mean(top1)), 4),
            "top1_std": round(float(np.std(top1, ddof=1)) if splits > 1 else 0.0, 4),
            "top1_per_split": [round(t, 4) for t in top1],
            "l2_per_split": [r["l2"] for r in rows],
            "l2_selected": rows[0]["l2_selected"],
            "images_per_split": [r["images"] for r in rows],
        }
    return results


def print_results(results: dict, settings: list[Setting], header: str) -> None:
    print(f"\n{header}")
    rows = []
    for setting in settings:
        row = results[setting.name]
        l2s = " ".join(f"{l2:.0e}" for l2 in row["l2_per_split"])
        rows.append([setting.label, row["images_per_split"][0],
                     f"{row['top1_mean']:.2f} ± {row['top1_std']:.2f}",
                     l2s + ("" if row["l2_selected"] else " (fixed: one image per class)")])
    print_table(["setting", "images", "top-1 (mean ± std)", "L2 per split"], rows)


# --------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict | None:
    """Run the evaluation; returns the results dict on the main process (None elsewhere)."""
    check_args(args)
    settings = settings_of(args)
    max_shots = max(args.shots, default=0)

    def enough_images(train_labels: torch.Tensor, val_labels: torch.Tensor, num_classes: int,
                      classes: list[str] | None) -> None:
        counts = class_counts(train_labels, num_classes)
        if int(counts.sum()) == 0:
            raise utils.UserError("the train set has no images")
        short = [c for c in range(num_classes) if 0 < counts[c] < max_shots]
        if short:
            c = short[0]
            raise utils.UserError(f"--shots {max_shots}: train class {class_name(classes, c)} has only "
                                  f"{int(counts[c])} images ({len(short)} class(es) have fewer than "
                                  f"{max_shots}); lower --shots")

    env, output_dir = start_run(args)
    features = train_val_features(args, env, check_labels=enough_images)
    done = run_jobs(features, settings, args, env)
    results = None
    if env.is_main:
        results = summarise(done, settings, args.splits)
        results.update({
            "num_train": int(features.train.shape[0]), "num_val": int(features.val.shape[0]),
            "num_classes": features.num_classes, "splits": args.splits, "seed": args.seed,
            "l2_grid": sorted(args.l2_grid), "holdout_fraction": args.holdout_fraction,
            "solver": f"L-BFGS, {'float64' if env.device.type == 'cpu' else 'float32'}, "
                      f"max_iter {args.max_iter}",
            **features.backbone, "world_size": env.world_size,
        })
        print_results(results, settings,
                    f"low-shot logistic regression on {results['num_train']} train / "
                    f"{results['num_val']} val images, {features.num_classes} classes, "
                    f"{args.splits} split(s)")
    finish_run(results, output_dir, RESULTS_FILE)
    return results


if __name__ == "__main__":
    run_as_script(get_args_parser, main)
