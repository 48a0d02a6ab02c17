"""t-SNE of the frozen CLS features of a labelled ImageFolder, coloured by class (as Mugs' Fig. 4).

    python visualize_features.py --pretrained_weights output/checkpoint.pth \\
        --data_path /path/to/imagenet/val --output_dir tsne/
    python visualize_features.py --pretrained_weights checkpoint.pth --data_path DATA/val \\
        --resize_size 28 --crop_size 28 --max_images 2000 --output_dir tsne/   # 28-px images

``--data_path`` is an ImageFolder root: ``<class>/<image>`` (e.g. the ``val/`` split of an
eval dataset). At most ``--max_images`` images (class-balanced, seeded) go once through the
backbone with the evaluation transform (resize, centre crop); their CLS features (the
teacher's by default), L2-normalised, are embedded in 2-D by scikit-learn's t-SNE
(``--perplexity``, PCA initialisation, seeded) and drawn one colour per class with a legend:
``OUTPUT_DIR/tsne.png``. Needs the optional extras scikit-learn and matplotlib
(``pip install scikit-learn matplotlib``); without them it says so and stops before any work.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from torch.utils.data import Subset

import images
import storage
import utils
from evaluation import (ImageFolder, build_eval_backbone, check_eval_args, describe_backbone,
                        eval_args_parser, eval_transform, extract_features, run_as_script,
                        usable_workers)
from monitor import balanced_subset

OUTPUT_FILE = "tsne.png"


def get_args_parser() -> argparse.ArgumentParser:
    parser = eval_args_parser("visualize_features", __doc__)
    parser.set_defaults(dump_features=None)
    group = parser.add_argument_group("t-SNE")
    group.add_argument("--max_images", default=2000, type=int, help="""At most this many
        images, class-balanced (0: all). t-SNE time grows quickly with the number of points.""")
    group.add_argument("--perplexity", default=30.0, type=float, help="""t-SNE perplexity (about
        the number of neighbours each point keeps close; must be below the number of images).""")
    return parser


def require_extras() -> None:
    """scikit-learn and matplotlib, or one line saying how to install them."""
    for module, package in (("sklearn.manifold", "scikit-learn"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError:
            raise utils.UserError(f"visualize_features.py needs {package} (an optional extra): "
                                  f"pip install {package}") from None


def tsne_2d(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed
                ).fit_transform(features)


def plot(points: np.ndarray, labels: np.ndarray, classes: list[str], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.0), dpi=80)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c, name in enumerate(classes):
        at = labels == c
        ax.scatter(points[at, 0], points[at, 1], s=4, color=cmap(c % cmap.N), label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    if len(classes) <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=3,
                  frameon=False)
    fig.tight_layout()
    with storage.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def main(args: argparse.Namespace) -> Path:
    require_extras()
    problems = []
    if args.max_images < 0:
        problems.append(f"--max_images must be >= 0, got {args.max_images}")
    if not args.perplexity > 0:
        problems.append(f"--perplexity must be > 0, got {args.perplexity}")
    check_eval_args(args, problems)
    if not args.data_path or not Path(args.data_path).is_dir():
        raise utils.UserError(f"--data_path {args.data_path} is not a folder (an ImageFolder "
                              "root: <class>/<image>)")
    try:
        transform = eval_transform(args.resize_size, args.crop_size)
        dataset = ImageFolder(args.data_path, transform=transform, loader=images.load_rgb_image)
    except FileNotFoundError as e:
        raise utils.UserError(f"no images in {args.data_path}: expected <class>/<image> files "
                              f"({utils.user_error_message(e)})") from e
    chosen = balanced_subset(dataset.targets, args.max_images, args.seed)
    if args.perplexity >= len(chosen):
        raise utils.UserError(f"--perplexity {args.perplexity} must be below the number of "
                              f"images ({len(chosen)})")
    device = utils.resolve_device(args.device)
    model, feature_dim, info = build_eval_backbone(
        args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size, args.crop_size,
        args.seed)
    model.to(device)
    print(f"backbone: {describe_backbone(info)}")
    print(f"features of {len(chosen)} images of {len(dataset.classes)} classes ...", flush=True)
    features = F.normalize(extract_features(
        model, Subset(dataset, chosen), feature_dim, args.batch_size_per_gpu,
        usable_workers(args.num_workers), device), dim=1).cpu().numpy()
    labels = np.asarray(dataset.targets)[chosen]
    points = tsne_2d(features, args.perplexity, args.seed)
    output = Path(args.output_dir) / OUTPUT_FILE
    where = "/".join(Path(args.data_path).resolve().parts[-2:])  # e.g. imagenet/val
    title = f"t-SNE of {info['arch']} CLS features ({len(chosen)} images of {where})"
    plot(points, labels, dataset.classes, title, output)
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    run_as_script(get_args_parser, main)
