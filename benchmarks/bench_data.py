"""Benchmark: multi-crop data loading, images/s per DataLoader worker.

Runs the training script's own pipeline -- ``data.build_pretrain_dataset`` with
``data.DataAugmentationMaSSL`` (PIL decoding, torchvision transforms v2 on PIL images,
2 global + 10 local crops) -- through a ``DataLoader`` with 0, 1, 2, ... workers, and prints
images/s and images/s per worker, so you can size ``--num_workers``: a GPU that trains at
S images/s needs about S / (images/s per worker) workers, and as many CPU cores.

It times the pipeline twice, with every Gaussian blur done by torchvision's ``GaussianBlur``
(a kernel of about 10% of the crop) and by PIL's ``ImageFilter.GaussianBlur`` (radius =
sigma, as DINO and the authors' code blur): the blur is the one transform whose torchvision
version is much slower than PIL's on PIL images. ``--variants script`` times the training
script's augmentation as it is.

Without ``--data_path`` it writes a folder of JPEGs first: crops of scikit-image's sample
colour photos at ImageNet's typical 500x375 when scikit-image is installed, else the shipped
Fashion-MNIST images upscaled (grey, so less realistic; the output says which).

    python benchmarks/bench_data.py                        # generated JPEGs, 0/1/2 workers
    python benchmarks/bench_data.py --data_path /imagenet/train --workers 0,4,8,16
    python benchmarks/bench_data.py --quick                # tiny smoke run
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402  (also puts the repo root on sys.path)
import data  # noqa: E402

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "colorwheel")
QUICK = dict(n_images=24, image_size=(64, 48), global_size=32, local_size=16,
             local_crops_number=2, batch_size=4, workers="0,1", rounds=1)


class PILGaussianBlur:
    """Gaussian blur by PIL (``ImageFilter.GaussianBlur``, radius = standard deviation),
    sigma drawn uniformly from ``sigma`` with torch's generator (the training script seeds
    every augmentation through it)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = torch.empty(()).uniform_(self.sigma[0], self.sigma[1]).item()
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"PILGaussianBlur(sigma={self.sigma})"


def torchvision_kernel_size(crop_size: int) -> int:
    """Odd kernel of about 10% of the crop (23 px at 224, 9 at 96), for torchvision's blur."""
    return max(3, int(0.1 * crop_size) // 2 * 2 + 1)


def _blur_steps(augmentation) -> list[tuple[list, int, str]]:
    """(transform list, index, which crop) of every RandomApply wrapping a Gaussian blur."""
    found = []
    for name in ("global_transfo1", "global_transfo2", "local_transfo"):
        steps = getattr(augmentation, name).transforms
        for i, step in enumerate(steps):
            inner = getattr(step, "transforms", None)
            if (isinstance(step, v2.RandomApply) and inner
                    and type(inner[0]).__name__.endswith("GaussianBlur")):
                found.append((steps, i, name))
    return found


def blur_kind(augmentation) -> str:
    """``torchvision`` or ``pil``: how the augmentation's Gaussian blurs are computed."""
    kinds = {"torchvision" if isinstance(steps[i].transforms[0], v2.GaussianBlur) else "pil"
             for steps, i, _ in _blur_steps(augmentation)}
    return "/".join(sorted(kinds)) or "none"


def set_blur(augmentation, kind: str, global_size: int, local_size: int) -> int:
    """Make every Gaussian blur of the augmentation a ``kind`` one (``pil`` or
    ``torchvision``), keeping its probability and sigma range (0.1-2 in the paper); returns
    how many blurs there were."""
    blurs = _blur_steps(augmentation)
    for steps, i, name in blurs:
        old = steps[i].transforms[0]
        sigma = tuple(old.sigma) if hasattr(old, "sigma") else (old.sigma_min, old.sigma_max)
        if kind == "pil":
            new = PILGaussianBlur(sigma)
        else:
            size = local_size if name == "local_transfo" else global_size
            new = v2.GaussianBlur(torchvision_kernel_size(size), sigma=sigma)
        steps[i] = v2.RandomApply([new], p=steps[i].p)
    return len(blurs)


def _skimage_photos() -> list[np.ndarray] | None:
    try:
        import skimage.data
        return [getattr(skimage.data, name)()[..., :3] for name in SKIMAGE_PHOTOS]
    except Exception:  # not installed, or its data files missing
        return None


def write_test_images(out_dir: Path, n_images: int, size: tuple[int, int], source: str = "auto",
                      seed: int = 0) -> str:
    """``n_images`` JPEGs of ``size`` (w, h; portrait for a third) in ``out_dir`` from
    ``source`` (auto, skimage or fashion_mnist); returns a description of the images."""
    rng = np.random.default_rng(seed)
    photos = _skimage_photos() if source in ("auto", "skimage") else None
    if photos is None and source == "skimage":
        raise bu.UserError("--source skimage but scikit-image is not installed "
                           "(pip install scikit-image)")
    if photos is not None:
        source = f"scikit-image sample colour photos ({len(photos)}), random crops"
    else:
        from fashion_mnist import EMBEDDED_DIR, write_imagefolder
        folder = write_imagefolder(out_dir / "_fmnist", source=EMBEDDED_DIR,
                                   train_per_class=max(1, n_images // 10), val_per_class=1)
        files = sorted((folder / "train").rglob("*.png"))
        photos = [np.array(Image.open(f).convert("RGB")) for f in files]
        source = "Fashion-MNIST 28x28 grey images upscaled" + (
            " (scikit-image not installed)" if source == "auto" else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        # A random crop of 60-100% of each side, so every file differs.
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        out_size = size if i % 3 else (size[1], size[0])
        image = Image.fromarray(photo[y:y + ch, x:x + cw]).resize(out_size, Image.BICUBIC)
        image.save(out_dir / f"img_{i:05d}.jpg", quality=90)
    return f"{n_images} JPEGs {size[0]}x{size[1]} (quality 90) from {source}"


def loader_images_per_s(dataset, batch_size: int, workers: int, max_batches: int) -> float:
    """Images/s through a DataLoader, after its first batch (worker start-up excluded)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        drop_last=True, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)  # what each worker process gets: one core's figure
    try:
        it = iter(loader)
        next(it)
        n, start = 0, time.perf_counter()
        for n_batches, _ in enumerate(it, start=1):
            n += batch_size
            if n_batches >= max_batches:
                break
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    if n == 0:
        raise bu.UserError(f"need at least {2 * batch_size} images for one timed batch "
                           f"(--n_images / --batch_size)")
    return n / elapsed


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Figures depend on the CPU and on the images (size, JPEG quality): measure on "
               "your own data with --data_path. Reference crops: 2x224 + 10x96.")
    p.add_argument("--data_path", default=None,
                   help="folder of images (ImageFolder or flat); default: generate JPEGs")
    p.add_argument("--source", choices=["auto", "skimage", "fashion_mnist"], default="auto",
                   help="what to generate images from: scikit-image's photos (auto: when "
                        "installed) or the shipped Fashion-MNIST images, upscaled")
    p.add_argument("--n_images", type=int, default=256, help="images to generate (default 256)")
    p.add_argument("--image_size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"),
                   help="generated image size (default 500 375, ImageNet's most common)")
    p.add_argument("--global_size", type=int, default=224,
                   help="global crop size (224 in the paper)")
    p.add_argument("--local_size", type=int, default=96, help="local crop size (96 in the paper)")
    p.add_argument("--local_crops_number", type=int, default=10,
                   help="local crops (10 in the paper)")
    p.add_argument("--batch_size", type=int, default=16,
                   help="DataLoader batch size (default 16)")
    p.add_argument("--workers", default="0,1,2",
                   help="comma-separated DataLoader worker counts to time (default 0,1,2)")
    p.add_argument("--max_batches", type=int, default=12,
                   help="timed batches per measurement at most (default 12)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measurements per setting, round-robin; the median is reported")
    p.add_argument("--variants", default="torchvision_blur,pil_blur",
                   help="comma-separated pipelines: torchvision_blur / pil_blur (the training "
                        "script's augmentation with every Gaussian blur done by torchvision's "
                        "GaussianBlur / by PIL's ImageFilter), script (as the script has it)")
    p.add_argument("--quick", action="store_true",
                   help="a few tiny images and crops: checks the script runs, measures nothing")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    explicit = set(a.lstrip("-").split("=")[0] for a in (argv if argv is not None else sys.argv[1:])
                   if a.startswith("--"))
    if args.quick:
        for key, value in QUICK.items():
            if key not in explicit:
                setattr(args, key, value)
    try:
        worker_counts = [int(w) for w in str(args.workers).split(",")]
    except ValueError:
        raise bu.UserError(f"--workers must be comma-separated integers, got '{args.workers}'")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - {"script", "pil_blur", "torchvision_blur"}
    if unknown or not variants:
        raise bu.UserError("--variants takes torchvision_blur, pil_blur and/or script, got "
                           f"'{args.variants}'")
    if any(w < 0 for w in worker_counts) or min(args.batch_size, args.max_batches, args.rounds) < 1:
        raise bu.UserError("--workers must be >= 0; --batch_size, --max_batches, --rounds >= 1")

    print(bu.describe_device(torch.device("cpu")) + f" | Pillow {Image.__version__}")
    with tempfile.TemporaryDirectory(prefix="massl_bench_data_") as tmp:
        if args.data_path:
            data_path, source = args.data_path, f"images in {args.data_path}"
        else:
            data_path = os.path.join(tmp, "images")
            source = write_test_images(Path(data_path), args.n_images, tuple(args.image_size),
                                       args.source)
        print(f"data: {source}")
        print(f"crops: 2x{args.global_size} + {args.local_crops_number}x{args.local_size}, "
              f"batch {args.batch_size}, up to {args.max_batches} timed batches after the first, "
              f"{args.rounds} round(s); 0 workers = loading in the main process on 1 thread")
        datasets = {}
        for variant in variants:
            augmentation = data.DataAugmentationMaSSL(
                (0.32, 1.0), (0.05, 0.32), args.local_crops_number, args.global_size,
                args.local_size)
            if variant == "script":
                print(f"script: data.DataAugmentationMaSSL blurs with "
                      f"{blur_kind(augmentation)}")
            else:
                set_blur(augmentation, variant.split("_")[0], args.global_size, args.local_size)
            datasets[variant] = data.build_pretrain_dataset(data_path, augmentation)
        rates: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for workers in worker_counts:
                for variant, dataset in datasets.items():
                    rates.setdefault((variant, workers), []).append(loader_images_per_s(
                        dataset, args.batch_size, workers, args.max_batches))

    print("| pipeline | workers | images/s | images/s per worker |")
    print("|---|---|---|---|")
    med = {key: statistics.median(values) for key, values in rates.items()}
    for (variant, workers), value in med.items():
        print(f"| {variant} | {workers} | {value:.1f} | {value / max(workers, 1):.1f} |")
    if "torchvision_blur" in datasets and "pil_blur" in datasets:
        parts = [f"{w} workers {med[('pil_blur', w)] / med[('torchvision_blur', w)]:.2f}x"
                 for w in worker_counts]
        print("ratio: pil_blur/torchvision_blur images/s: " + ", ".join(parts))
    else:
        best = max(med.items(), key=lambda kv: kv[1] / max(kv[0][1], 1))
        print(f"ratio: best images/s per worker {best[1] / max(best[0][1], 1):.1f} "
              f"({best[0][0]}, {best[0][1]} workers)")


if __name__ == "__main__":
    try:
        main()
    except bu.UserError as e:
        bu.exit_with_error(str(e))
