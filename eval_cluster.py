"""k-means clustering of frozen features, scored against the labels: NMI, ARI, clustering accuracy.

Every train and val image goes once through the backbone (resize, centre crop, no
augmentation); its CLS feature is L2-normalised. k-means (Euclidean, k-means++ seeding,
Lloyd iterations; ``--restarts`` seeded runs, the one with the lowest inertia kept) is fitted
on the ``--fit_on`` features with k = number of classes by default; every image of the fit
set and of the other set is then assigned to its nearest centroid, and the assignments are
compared with the labels:

- NMI: mutual information / arithmetic mean of the two entropies (scikit-learn's default);
- ARI: the Rand index adjusted for chance (Hubert & Arabie);
- accuracy: the best one-to-one matching of clusters to classes (Hungarian algorithm),
  matched images / all images. Each set is matched on its own labels.

    python eval_cluster.py --data_path /path/to/imagenet --pretrained_weights checkpoint.pth
    torchrun --nproc_per_node=8 eval_cluster.py --data_path /path/to/imagenet \\
        --pretrained_weights checkpoint.pth --fit_on val --output_dir cluster_out
    python eval_cluster.py --load_features knn_out/features --restarts 20

k-means runs on the GPU when there is one; with torchrun the restarts are spread over the
processes (each restart is seeded by --seed and its number alone, so 1 and N processes
give the same clustering). Results go to ``OUTPUT_DIR/cluster_results.json``::

    {"val": {"nmi": 61.2, "ari": 45.0, "accuracy": 58.3, "num_images": ...}, "train": {...},
     "k": 1000, "fit_on": "train", "restarts": 10, "inertia": ..., "best_restart": ...,
     "num_classes": ..., "checkpoint": ..., ...}

All three scores are percentages (x 100).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import distributed
import utils
from evaluation import (SIMILARITY_ELEMENTS_PER_CHUNK, add_feature_file_args, check_eval_args,
                        eval_args_parser, finish_run, print_table, run_as_script, start_run,
                        train_val_features)

RESULTS_FILE = "cluster_results.json"


def get_args_parser() -> argparse.ArgumentParser:
    parser = eval_args_parser("eval_cluster", __doc__)
    group = parser.add_argument_group("k-means")
    group.add_argument("--k", default=None, type=int,
                       help="Number of clusters. Default: the number of classes.")
    group.add_argument("--restarts", default=10, type=int, help="""Independent k-means++
        seedings; the run with the lowest inertia (sum of squared distances) is kept.""")
    group.add_argument("--max_iter", default=300, type=int,
                       help="Lloyd iterations per restart at most (stops earlier when no point moves).")
    group.add_argument("--fit_on", default="train", choices=["train", "val"], help="""Which
        features k-means is fitted on; both sets are then assigned and scored.""")
    add_feature_file_args(group)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for bad values, before anything is loaded."""
    problems = []
    if args.k is not None and args.k < 1:
        problems.append(f"--k must be >= 1, got {args.k}")
    if args.restarts < 1:
        problems.append(f"--restarts must be >= 1, got {args.restarts}")
    if args.max_iter < 1:
        problems.append(f"--max_iter must be >= 1, got {args.max_iter}")
    check_eval_args(args, problems)


# --------------------------------------------------------------------------- k-means


def _rows_per_chunk(num_columns: int) -> int:
    return max(1, SIMILARITY_ELEMENTS_PER_CHUNK // max(1, num_columns))


@torch.no_grad()
def assign(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row and its squared Euclidean distance (chunked)."""
    c_sq = centroids.pow(2).sum(1)
    labels, dists = [], []
    for start in range(0, x.shape[0], _rows_per_chunk(centroids.shape[0])):
        chunk = x[start:start + _rows_per_chunk(centroids.shape[0])]
        d = (chunk.pow(2).sum(1, keepdim=True) - 2 * chunk @ centroids.T + c_sq).clamp_min_(0)
        dist, label = d.min(1)
        labels.append(label), dists.append(dist)
    return torch.cat(labels), torch.cat(dists)


@torch.no_grad()
def cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums of rows and counts, as one-hot matrix products (deterministic on
    GPUs too, unlike atomic scatter-adds)."""
    sums = x.new_zeros(k, x.shape[1])
    for start in range(0, x.shape[0], _rows_per_chunk(k)):
        part = labels[start:start + _rows_per_chunk(k)]
        one_hot = torch.nn.functional.one_hot(part, k).to(x.dtype)
        sums += one_hot.T @ x[start:start + len(part)]
    return sums, torch.bincount(labels, minlength=k)


@torch.no_grad()
def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centroid is a row drawn with probability ∝ its squared
    distance to the nearest centroid so far. Randomness comes from a CPU ``generator`` (one
    uniform number per draw), so the seeding is the same on any device."""
    n = x.shape[0]
    x_sq = x.pow(2).sum(1)

    def squared_distances(index: int) -> torch.Tensor:  # to row ``index``, without an n x d temporary
        return (x_sq + x_sq[index] - 2 * (x @ x[index])).clamp_min_(0)

    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    closest = squared_distances(first)
    for _ in range(1, k):
        cumulative = closest.double().cumsum(0)
        total = cumulative[-1]
        if total <= 0:  # fewer distinct rows than k: take any not yet chosen
            index = len(centroids) % n
        else:
            target = torch.rand((), generator=generator, dtype=torch.float64).item() * total
            index = min(int(torch.searchsorted(cumulative, target, right=True)), n - 1)
        centroids.append(x[index])
        closest = torch.minimum(closest, squared_distances(index))
    return torch.stack(centroids)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, max_iter: int, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """One k-means run: (centroids, assignments, inertia, iterations).

    An emptied cluster is moved onto the row farthest from its centroid (deterministic)."""
    centroids = kmeans_plus_plus(x, k, generator)
    labels, dists = assign(x, centroids)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        sums, counts = cluster_sums(x, labels, k)
        empty = torch.nonzero(counts == 0).flatten()
        centroids = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        if len(empty):
            far = dists.topk(len(empty)).indices
            centroids[empty] = x[far]
        new_labels, dists = assign(x, centroids)
        moved = bool((new_labels != labels).any())
        labels = new_labels
        if not moved and not len(empty):
            break
    return centroids, labels, float(dists.double().sum()), iterations


def best_of_restarts(x: torch.Tensor, k: int, restarts: int, max_iter: int, seed: int,
                     env: distributed.DistEnv) -> dict:
    """``restarts`` seeded runs, spread round-robin over the ranks; the lowest inertia wins
    (ties: the lower restart number). Returns the winner's centroids on every rank."""
    mine = []
    for restart in range(env.rank, restarts, env.world_size):
        generator = torch.Generator().manual_seed(seed * 100_003 + restart)
        centroids, _, inertia, iterations = kmeans(x, k, max_iter, generator)
        mine.append({"restart": restart, "inertia": inertia, "iterations": iterations,
                     "centroids": centroids.cpu()})
    runs = [run for part in distributed.gather_objects(mine) for run in part]
    return min(runs, key=lambda run: (run["inertia"], run["restart"]))


# --------------------------------------------------------------------------- metrics


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``table[i, j]``: how many items have the i-th distinct value of ``a`` and the j-th
    distinct value of ``b`` (values in sorted order; absent values get no row or column)."""
    _, a_index = np.unique(a, return_inverse=True)
    _, b_index = np.unique(b, return_inverse=True)
    table = np.zeros((a_index.max() + 1, b_index.max() + 1), dtype=np.int64)
    np.add.at(table, (a_index, b_index), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def normalized_mutual_info(labels: np.ndarray, clusters: np.ndarray) -> float:
    """I(labels; clusters) / ((H(labels) + H(clusters)) / 2); 1 when both are one block."""
    table = contingency(labels, clusters).astype(np.float64)
    n = table.sum()
    h_labels, h_clusters = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_labels == 0 and h_clusters == 0:
        return 1.0
    nz = table > 0
    outer = np.outer(table.sum(1), table.sum(0))
    mutual = float((table[nz] / n * np.log(table[nz] * n / outer[nz])).sum())
    return mutual / ((h_labels + h_clusters) / 2)


def adjusted_rand_index(labels: np.ndarray, clusters: np.ndarray) -> float:
    """(pairs together in both - expected) / (mean pairs together in each - expected)."""
    table = contingency(labels, clusters).astype(np.float64)

    def pairs(counts: np.ndarray) -> float:  # sum of C(count, 2)
        return float((counts * (counts - 1) / 2).sum())

    both, rows, cols = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    total = pairs(np.array([table.sum()]))
    expected = rows * cols / total if total else 0.0
    best = (rows + cols) / 2
    if best == expected:  # both partitions trivial (one block, or all singletons): same
        return 1.0
    return float((both - expected) / (best - expected))


def linear_sum_assignment_max(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of a one-to-one matching with the largest total weight
    (min(rows, cols) pairs): the Hungarian method with potentials, O(n^2 m).

    Shortest augmenting paths on the cost ``-weights``: row by row, columns get
    tentative distances ``minv``; the nearest free column is reached and the path is
    flipped along ``way``. Potentials ``u``, ``v`` keep reduced costs non-negative.
    """
    w = np.asarray(weights, dtype=np.float64)
    transposed = w.shape[0] > w.shape[1]
    cost = -(w.T if transposed else w)
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    row_of = np.zeros(m + 1, dtype=np.int64)  # row_of[j]: 1-based row matched to column j
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of[j0]
            free = ~used[1:]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[row_of[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    cols = np.flatnonzero(row_of[1:])
    rows = row_of[1:][cols] - 1
    order = np.argsort(rows)
    rows, cols = rows[order], cols[order]
    return (cols, rows) if transposed else (rows, cols)


def hungarian_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Fraction of items whose cluster is matched to their class by the best one-to-one
    cluster-to-class matching (clusters left unmatched count as wrong)."""
    table = contingency(clusters, labels)
    rows, cols = linear_sum_assignment_max(table)
    return float(table[rows, cols].sum() / len(labels))


def clustering_scores(labels: np.ndarray, clusters: np.ndarray) -> dict:
    return {"nmi": round(100 * normalized_mutual_info(labels, clusters), 4),
            "ari": round(100 * adjusted_rand_index(labels, clusters), 4),
            "accuracy": round(100 * hungarian_accuracy(labels, clusters), 4),
            "num_images": int(len(labels))}


# --------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> dict | None:
    """Run the evaluation; returns the results dict on the main process (None elsewhere)."""
    check_args(args)

    def enough_images(train_labels: torch.Tensor, val_labels: torch.Tensor, num_classes: int,
                      classes: list[str] | None) -> None:
        k = args.k or num_classes
        fit_size = len(train_labels if args.fit_on == "train" else val_labels)
        if k > fit_size:
            raise utils.UserError(f"k={k} clusters but only {fit_size} {args.fit_on} images "
                                  "to fit them on; lower --k")

    env, output_dir = start_run(args)
    features = train_val_features(args, env, check_labels=enough_images)
    k = args.k or features.num_classes
    fit = features.train if args.fit_on == "train" else features.val
    if env.is_main:
        print(f"k-means: k={k} on {fit.shape[0]} {args.fit_on} features, {args.restarts} "
              f"restart(s) on {env.device}", flush=True)
    best = best_of_restarts(fit, k, args.restarts, args.max_iter, args.seed, env)
    results = None
    if env.is_main:
        centroids = best["centroids"].to(env.device)
        results = {}
        for name, x, labels in (("val", features.val, features.val_labels),
                                ("train", features.train, features.train_labels)):
            clusters = assign(x, centroids)[0].cpu().numpy()
            results[name] = clustering_scores(labels.numpy(), clusters)
        results.update({
            "k": k, "fit_on": args.fit_on, "restarts": args.restarts, "max_iter": args.max_iter,
            "seed": args.seed, "inertia": round(best["inertia"], 6),
            "best_restart": best["restart"], "iterations": best["iterations"],
            "num_train": int(features.train.shape[0]), "num_val": int(features.val.shape[0]),
            "num_classes": features.num_classes, **features.backbone,
            "world_size": env.world_size,
        })
        print(f"\nk-means (k={k}, fitted on {args.fit_on}, best of {args.restarts} restarts: "
              f"#{best['restart']}, inertia {best['inertia']:.4f}), {features.num_classes} classes")
        print_table(["set", "images", "NMI", "ARI", "accuracy"],
                    [[name, *(results[name][key] for key in ("num_images", "nmi", "ari", "accuracy"))]
                     for name in ("val", "train")])
    finish_run(results, output_dir, RESULTS_FILE)
    return results


if __name__ == "__main__":
    run_as_script(get_args_parser, main)
