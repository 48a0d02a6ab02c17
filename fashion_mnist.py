"""Fashion-MNIST (Zalando, MIT licence) turned into an ImageFolder, offline.

The repo ships the 10,000-image test split in ``data/fashion_mnist/``. When Debian's
``dataset-fashion-mnist`` package is installed (``/usr/share/datasets/fashion-mnist``)
or ``--source`` names a folder with the four ``*-ubyte.gz`` files, the full 70,000 images
are used instead. The output is ``OUT/train/<class>/*.png`` and ``OUT/val/<class>/*.png``
with a fixed, class-balanced split, so training and evaluation read exactly the layout
ImageNet users have.

    python fashion_mnist.py --out ~/.cache/massl/fashion_mnist
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CLASSES", "EMBEDDED_DIR", "DEBIAN_DIR", "find_source", "load_split", "write_imagefolder"]

CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
EMBEDDED_DIR = Path(__file__).resolve().parent / "data" / "fashion_mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def find_source(source: str | Path | None = None) -> Path:
    """The folder to read: ``source`` if given, else Debian's full set, else the shipped split."""
    if source is not None:
        path = Path(source)
        if not any(path.glob("*-images-idx3-ubyte.gz")):
            raise FileNotFoundError(f"no Fashion-MNIST '*-images-idx3-ubyte.gz' files in {path}")
        return path
    if (DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists():
        return DEBIAN_DIR
    return EMBEDDED_DIR


def load_split(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """All images ``(N, 28, 28)`` uint8 and labels ``(N,)`` found in ``source`` (train, then t10k)."""
    images, labels = [], []
    for prefix in ("train", "t10k"):
        img_file = source / f"{prefix}-images-idx3-ubyte.gz"
        if img_file.exists():
            images.append(_read_idx(img_file))
            labels.append(_read_idx(source / f"{prefix}-labels-idx1-ubyte.gz"))
    if not images:
        raise FileNotFoundError(f"no Fashion-MNIST files in {source}")
    return np.concatenate(images), np.concatenate(labels)


def write_imagefolder(out_dir: str | Path, source: str | Path | None = None,
                      train_per_class: int | None = None, val_per_class: int | None = None,
                      val_fraction: float = 1 / 7) -> Path:
    """Write the ImageFolder once; returns ``out_dir``. Re-running with the same settings is free.

    The split is fixed (seed 0) and class-balanced: per class, ``val_per_class`` images
    (default ``val_fraction`` of the class) go to ``val/`` and up to ``train_per_class``
    of the rest to ``train/``.
    """
    out = Path(out_dir)
    src = find_source(source)
    settings = {"source": str(src), "train_per_class": train_per_class,
                "val_per_class": val_per_class, "val_fraction": val_fraction}
    marker = out / "prepared.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return out
    images, labels = load_split(src)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in CLASSES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
            for old in (out / split / name).glob("*.png"):
                old.unlink()
    for c, name in enumerate(CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = val_per_class if val_per_class is not None else int(round(len(idx) * val_fraction))
        splits = {"val": idx[:n_val], "train": idx[n_val:]}
        if train_per_class is not None:
            splits["train"] = splits["train"][:train_per_class]
        for split, ids in splits.items():
            for i in ids:
                Image.fromarray(images[i]).save(out / split / name / f"{i:05d}.png")
    marker.write_text(json.dumps(settings))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    parser.add_argument("--source", default=None,
                        help="folder with the *-ubyte.gz files (default: Debian's full set if "
                             "installed, else the 10k split shipped in data/fashion_mnist)")
    parser.add_argument("--train_per_class", type=int, default=None, help="cap on train images per class")
    parser.add_argument("--val_per_class", type=int, default=None, help="val images per class")
    args = parser.parse_args()
    out = write_imagefolder(args.out, args.source, args.train_per_class, args.val_per_class)
    n_train = sum(1 for _ in (out / "train").rglob("*.png"))
    n_val = sum(1 for _ in (out / "val").rglob("*.png"))
    print(f"Fashion-MNIST ImageFolder in {out}: {n_train} train, {n_val} val images")


if __name__ == "__main__":
    main()
