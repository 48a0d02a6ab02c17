"""Benchmark: multi-crop data loading, images/s per DataLoader worker, ours against DINO's.

Runs the training script's own pipeline (``script``) -- ``data.build_pretrain_dataset`` with
``data.DataAugmentationMaSSL`` and the training sampler ``data.PretrainSampler`` (per-image
seeded augmentations), 2 global + 10 local crops -- side by side with DINO's augmentation
(``dino``: torchvision v1 transforms on PIL images with PIL's blur and solarization, written
here from DINO's published description) on the same files, through a ``DataLoader`` with 0,
1, 2, ... workers. It prints images/s, images/s per worker and the ratio ours/DINO, so you
can size ``--num_workers``: a GPU that trains at S images/s needs about S / (images/s per
worker) workers, and as many CPU cores. The pipelines are timed in alternation, ``--rounds``
times each, and the median is reported; the load average before and after says how busy
the machine was (other jobs slow both pipelines, not always equally). With 0 workers it
also reports images per CPU second of the loading process, the pipeline's own cost, which
other jobs on the cores disturb much less than wall time.

Without ``--data_path`` it writes a folder of JPEGs first: crops of scikit-image's sample
colour photos at ImageNet's typical 500x375 when scikit-image is installed, else the shipped
Fashion-MNIST images upscaled (grey, so less realistic; the output says which).

    python benchmarks/bench_data.py                        # generated JPEGs, 0/1/2 workers
    python benchmarks/bench_data.py --data_path /imagenet/train --workers 0,4,8,16
    python benchmarks/bench_data.py --quick                # tiny smoke run
    python benchmarks/bench_data.py --compare augment_on   # workers vs --augment_on device

``--compare augment_on`` times, side by side and alternating, what each ``--augment_on``
path costs a loader worker per image (CPU seconds of a 1-thread, 0-worker loader: decode,
crops or plan, collate), and what the device path's second half costs per image in the
training process (``device_augment.DeviceMultiCrop``, on ``--device_part``: CUDA when a GPU is
there, timed with synchronisation, else the CPU).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Sampler
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402  (also puts the repo root on sys.path)
import data  # noqa: E402
import main_massl  # noqa: E402
import utils  # noqa: E402

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "colorwheel")
QUICK = dict(n_images=24, image_size=(64, 48), global_size=32, local_size=16,
             local_crops_number=2, batch_size=4, workers="0,1", rounds=1)


class DinoGaussianBlur:
    """DINO's blur step: with probability ``p`` (drawn with Python's ``random``, as DINO does),
    PIL's ``ImageFilter.GaussianBlur`` with a radius drawn uniformly in [0.1, 2]."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() > self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class DinoSolarization:
    """DINO's solarization step: ``ImageOps.solarize`` (threshold 128) with probability ``p``."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image) if random.random() < self.p else image


class DataAugmentationDINO:
    """DINO's multi-crop augmentation as its paper and code describe it (torchvision v1
    transforms on PIL images, PIL blur and solarization): the baseline ``dino`` pipeline.

    Each crop: RandomResizedCrop (bicubic), horizontal flip, colour jitter (0.4, 0.4, 0.2,
    0.1) p 0.8, grayscale p 0.2, Gaussian blur p 1.0 / 0.1 / 0.5 (global 1 / global 2 /
    local), solarization p 0.2 (global 2), ToTensor, Normalize (ImageNet mean and std).
    """

    def __init__(self, global_crops_scale: tuple[float, float],
                 local_crops_scale: tuple[float, float], local_crops_number: int,
                 global_size: int = 224, local_size: int = 96):
        bicubic = transforms.InterpolationMode.BICUBIC
        flip_and_color_jitter = transforms.Compose([
            transforms.RandomHorizontalFlip(p=0.5),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ])
        normalize = transforms.Compose([
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])

        def crop(size: int, scale: tuple[float, float]) -> transforms.RandomResizedCrop:
            return transforms.RandomResizedCrop(size, scale=scale, interpolation=bicubic)

        self.global_transfo1 = transforms.Compose([
            crop(global_size, global_crops_scale), flip_and_color_jitter, DinoGaussianBlur(1.0),
            normalize])
        self.global_transfo2 = transforms.Compose([
            crop(global_size, global_crops_scale), flip_and_color_jitter, DinoGaussianBlur(0.1),
            DinoSolarization(0.2), normalize])
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            crop(local_size, local_crops_scale), flip_and_color_jitter, DinoGaussianBlur(0.5),
            normalize])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops.extend(self.local_transfo(image) for _ in range(self.local_crops_number))
        return crops


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
        raise utils.UserError("--source skimage but scikit-image is not installed "
                           "(pip install scikit-image)")
    if photos is not None:
        source = f"scikit-image sample colour photos ({len(photos)}), random crops"
    else:
        from fashion_mnist import EMBEDDED_DIR, write_imagefolder
        # In a folder of its own: PNGs left next to the JPEGs would be timed instead of them.
        with tempfile.TemporaryDirectory(prefix="massl_fmnist_") as tmp:
            folder = write_imagefolder(Path(tmp), source=EMBEDDED_DIR,
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


VARIANTS = ("script", "dino")


def pipeline(variant: str, data_path: str, args: argparse.Namespace
             ) -> tuple[data.PretrainDataset, Sampler | None]:
    """The dataset and sampler of a pipeline: ``script`` is the training script's (seeded
    ``(seed, index)`` keys from ``PretrainSampler``), ``dino`` DINO's (plain shuffled indices)."""
    sizes = (args.global_size, args.local_size)
    if variant == "dino":
        augmentation = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), args.local_crops_number,
                                            *sizes)
        return data.build_pretrain_dataset(data_path, augmentation), None
    built = training_data(data_path, args, "workers", torch.device("cpu"))
    return built.dataset, built.sampler


def training_data(data_path: str, args: argparse.Namespace, augment_on: str,
                  device: torch.device) -> data.TrainingData:
    """The training script's data (``data.build_training_data``) for these crops, 0 workers."""
    train_args = main_massl.build_cli_parser().parse_args([
        "--data_path", data_path, "--output_dir", "-", "--augment_on", augment_on,
        "--global_crops_size", str(args.global_size), "--local_crops_size", str(args.local_size),
        "--local_crops_number", str(args.local_crops_number),
        "--batch_size_per_gpu", str(args.batch_size), "--num_workers", "0"])
    dataset = data.build_pretrain_dataset(data_path, data.build_pretrain_transform(train_args))
    return data.build_training_data(train_args, dataset, world_size=1, rank=0, device=device)


def worker_cpu_per_image(built: data.TrainingData, max_batches: int) -> tuple[float, list]:
    """CPU seconds per image of the loader's work (decode, transform, collate) on one thread,
    after a first batch; returns the batches too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each worker process gets
    try:
        it = iter(built.loader)
        batches = [next(it)]
        start = time.process_time()
        for batch in it:
            batches.append(batch)
            if len(batches) > max_batches:
                break
        cpu = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    n = (len(batches) - 1) * built.loader.batch_size
    if n == 0:
        raise utils.UserError(f"need at least {2 * built.loader.batch_size} images for one timed "
                           "batch (--n_images / --batch_size)")
    return cpu / n, batches


def device_seconds_per_image(batches: list, crop_sizes: list[int], device: torch.device) -> float:
    """Wall seconds per image of ``DeviceMultiCrop`` on ``device`` (first batch: warm-up)."""
    from device_augment import DeviceMultiCrop
    augment = DeviceMultiCrop(crop_sizes, utils.IMAGENET_MEAN, utils.IMAGENET_STD, device)
    pinned = [type(b)(*(t.pin_memory() for t in b)) if device.type == "cuda" else b
              for b, _ in batches]
    augment(pinned[0])
    bu.synchronize(device)
    start = time.perf_counter()
    for batch in pinned[1:]:
        augment(batch)
    bu.synchronize(device)
    return (time.perf_counter() - start) / max((len(pinned) - 1) * batches[0][0].params.shape[0], 1)


def compare_augment_on(data_path: str, args: argparse.Namespace) -> None:
    """``--compare augment_on``: worker CPU per image of both paths, device part per image."""
    # auto: CUDA when there is a GPU (the CPU figure takes minutes at the reference sizes)
    devices = [utils.resolve_device(d) for d in args.device_part.split(",")]
    built = {mode: training_data(data_path, args, mode, torch.device("cpu"))
             for mode in ("workers", "device")}
    worker: dict[str, list[float]] = {"workers": [], "device": []}
    device_part: dict[str, list[float]] = {str(d): [] for d in devices}
    for _ in range(args.rounds):
        for mode, training in built.items():
            per_image, batches = worker_cpu_per_image(training, args.max_batches)
            worker[mode].append(per_image)
        sizes = built["device"].dataset.transform.crop_sizes
        for device in devices:
            device_part[str(device)].append(device_seconds_per_image(batches, sizes, device))
    med = {k: statistics.median(v) for k, v in worker.items()}
    print("| path | loader-worker CPU per image | images/s per worker core |")
    print("|---|---|---|")
    for mode, value in med.items():
        print(f"| {mode} | {1000 * value:.2f} ms | {1 / value:.0f} |")
    for device, values in device_part.items():
        value = statistics.median(values)
        print(f"device part on {device}: {1000 * value:.2f} ms per image "
              f"({1 / value:.0f} images/s{', all threads' if device == 'cpu' else ''})")
    print(f"ratio: worker CPU per image workers/device {med['workers'] / med['device']:.1f}x")


def loader_images_per_s(dataset, batch_size: int, workers: int, max_batches: int,
                        sampler: Sampler | None = None) -> tuple[float, float | None]:
    """Images per wall-clock second through a DataLoader, after its first batch (worker
    start-up excluded), and with 0 workers images per CPU second of this process (what the
    pipeline costs, steadier than wall time when other jobs share the cores)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                        num_workers=workers, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)  # what each worker process gets: one core's figure
    try:
        it = iter(loader)
        next(it)
        n, start, cpu_start = 0, time.perf_counter(), time.process_time()
        for n_batches, _ in enumerate(it, start=1):
            n += batch_size
            if n_batches >= max_batches:
                break
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        torch.set_num_threads(threads)
    if n == 0:
        raise utils.UserError(f"need at least {2 * batch_size} images for one timed batch "
                           f"(--n_images / --batch_size)")
    return n / elapsed, (n / cpu if workers == 0 and cpu > 0 else None)


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
    p.add_argument("--variants", default="script,dino",
                   help="comma-separated pipelines to time: script (the training script's "
                        "augmentation and sampler), dino (DINO's torchvision-v1/PIL pipeline)")
    p.add_argument("--compare", choices=["augment_on"], default=None,
                   help="augment_on: worker CPU per image of --augment_on workers vs device, "
                        "and the device part's time per image (CPU; CUDA too if present)")
    p.add_argument("--device_part", default="auto",
                   help="with --compare augment_on: where to time the device half, e.g. cpu or "
                        "cpu,cuda (default: cuda when available, else cpu)")
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
        raise utils.UserError(f"--workers must be comma-separated integers, got '{args.workers}'")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if set(variants) - set(VARIANTS) or not variants:
        raise utils.UserError(f"--variants takes {' and/or '.join(VARIANTS)}, got '{args.variants}'")
    if any(w < 0 for w in worker_counts) or min(args.batch_size, args.max_batches, args.rounds) < 1:
        raise utils.UserError("--workers must be >= 0; --batch_size, --max_batches, --rounds >= 1")

    print(bu.describe_device(torch.device("cpu")) + f" | Pillow {Image.__version__}")
    print(f"load average before: {load_average()}")
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
        if args.compare == "augment_on":
            compare_augment_on(data_path, args)
            print(f"load average after: {load_average()}")
            return
        pipelines = {variant: pipeline(variant, data_path, args) for variant in variants}
        rates: dict[tuple[str, int], list[float]] = {}
        cpu_rates: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for workers in worker_counts:
                for variant, (dataset, sampler) in pipelines.items():
                    wall, cpu = loader_images_per_s(dataset, args.batch_size, workers,
                                                    args.max_batches, sampler)
                    rates.setdefault((variant, workers), []).append(wall)
                    if cpu is not None:
                        cpu_rates.setdefault(variant, []).append(cpu)
    print(f"load average after: {load_average()}")

    print("| pipeline | workers | images/s | images/s per worker | images per CPU s |")
    print("|---|---|---|---|---|")
    med = {key: statistics.median(values) for key, values in rates.items()}
    cpu_med = {key: statistics.median(values) for key, values in cpu_rates.items()}
    for (variant, workers), value in med.items():
        cpu = f"{cpu_med[variant]:.1f}" if workers == 0 else "-"
        print(f"| {variant} | {workers} | {value:.1f} | {value / max(workers, 1):.1f} | {cpu} |")
    if set(VARIANTS) <= set(variants):
        parts = [f"{w} workers {med[('script', w)] / med[('dino', w)]:.2f}x" for w in worker_counts]
        if cpu_med:
            parts.append(f"per CPU second {cpu_med['script'] / cpu_med['dino']:.2f}x")
        print("ratio: script/dino images/s: " + ", ".join(parts))
    else:
        best = max(med.items(), key=lambda kv: kv[1] / max(kv[0][1], 1))
        print(f"ratio: best images/s per worker {best[1] / max(best[0][1], 1):.1f} "
              f"({best[0][0]}, {best[0][1]} workers)")


def load_average() -> str:
    """The 1/5/15-minute load averages (how many cores other jobs kept busy), if known."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    try:
        main()
    except utils.UserError as e:
        utils.exit_with_error(str(e))
