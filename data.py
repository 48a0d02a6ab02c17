"""Pretraining data: DINO's multi-crop augmentation, the image folder, the resumable sampler.

* ``DataAugmentationMaSSL``: an image -> [global crop 1, global crop 2, local crops...]
  (docs/method.md, "Multi-crop").
* ``build_pretrain_dataset``: every image under a folder (ImageFolder classes or not).
* ``PretrainSampler``: the same shuffled order on every rank, whole optimizer steps per
  epoch, startable mid-epoch, and a per-image augmentation seed mixed from (seed, epoch,
  image): an image's crops do not depend on the worker, the rank or the resume point.
* ``build_loader``: the DataLoader over those, with workers that leave stop signals to the
  training process (``shutdown_loader_workers`` stops them when training ends).
* ``build_pretrain_transform`` / ``build_training_data``: the one place that builds the
  training data from the command line's arguments (``--augment_on workers``: the crops made
  here in the workers; ``device``: the workers decode and draw, ``device_augment`` crops).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms

import images
import utils
from device_augment import DeviceMultiCrop, MultiCropPlan, collate_plans

# Bad images tried in a row (with --skip_bad_images) before giving up on a sample.
MAX_CONSECUTIVE_BAD_IMAGES = 100
# Images opened at start-up to prove the data is readable (never the whole dataset).
MAX_STARTUP_PROBES = 100




class RandomGaussianBlur:
    """With probability ``p``, PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` with sigma
    drawn uniformly in ``sigma`` (0.1-2): the authors' (and DINO's) blur, no kernel-size cap.

    Both draws come from torch's global generator (the training seeds it per image); DINO
    draws the same distributions from Python's ``random``.
    """

    def __init__(self, p: float, sigma: tuple[float, float] = (0.1, 2.0)):
        self.p = float(p)
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand((), dtype=torch.float64).item() > self.p:
            return image
        lo, hi = self.sigma
        sigma = lo + (hi - lo) * torch.rand((), dtype=torch.float64).item()
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, sigma={self.sigma})"


class ToNormalizedTensor:
    """PIL RGB image -> float32 ``(3, H, W)`` tensor, ``(x / 255 - mean) / std``.

    Bit for bit torchvision's ``ToTensor()`` then ``Normalize(mean, std)`` (DINO's last two
    steps): the same float32 operations in the same order, done in place on one buffer,
    which is faster.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean_std = (tuple(mean), tuple(std))
        # float32, as Normalize converts them
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(image, dtype=np.float32)  # a new array: uint8 values, exactly
        if array.ndim == 2:
            array = array[:, :, None]
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        return tensor.div_(255).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean_std[0]}, std={self.mean_std[1]})"


class DataAugmentationMaSSL:
    """DINO's multi-crop augmentation (docs/method.md, "Multi-crop"): an image -> [global 1, global 2, locals...].

    Global crops: RandomResizedCrop(``global_crops_size``, ``global_crops_scale``), flip,
    colour jitter (0.4, 0.4, 0.2, 0.1) p 0.8, grayscale p 0.2, Gaussian blur (PIL, sigma
    0.1-2) p 1.0 (crop 1) / p 0.1 (crop 2), solarization p 0.2 (crop 2 only). Local crops:
    the same at ``local_crops_size`` with blur p 0.5. Bicubic resizing, ImageNet
    normalisation. Works on PIL images with torchvision's v1 transforms, the ones DINO uses
    (their PIL arithmetic is v2's, with less overhead per call); all randomness comes from
    torch's global generator.

    ``color_jitter_prob``, ``grayscale_prob`` and ``solarization_prob`` default to the
    authors' 0.8 / 0.2 / 0.2, which the quick start keeps (turning them off cost it 2 points;
    README, "What makes it learn, without KoLeo").
    """

    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 local_crops_number: int, global_crops_size: int = 224, local_crops_size: int = 96,
                 color_jitter_prob: float = 0.8, grayscale_prob: float = 0.2,
                 solarization_prob: float = 0.2):
        flip_and_color_jitter: list[Callable] = [transforms.RandomHorizontalFlip(p=0.5)]
        if color_jitter_prob > 0:
            flip_and_color_jitter.append(transforms.RandomApply(
                [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                p=color_jitter_prob))
        if grayscale_prob > 0:
            flip_and_color_jitter.append(transforms.RandomGrayscale(p=grayscale_prob))
        solarize = ([transforms.RandomSolarize(threshold=128, p=solarization_prob)]
                    if solarization_prob > 0 else [])
        to_tensor = ToNormalizedTensor(utils.IMAGENET_MEAN, utils.IMAGENET_STD)

        def crop(size: int, scale: Sequence[float]) -> transforms.RandomResizedCrop:
            return transforms.RandomResizedCrop(size, scale=tuple(scale),
                                                interpolation=transforms.InterpolationMode.BICUBIC)

        self.global_transfo1 = transforms.Compose([
            crop(global_crops_size, global_crops_scale),
            *flip_and_color_jitter,
            RandomGaussianBlur(p=1.0),
            to_tensor,
        ])
        self.global_transfo2 = transforms.Compose([
            crop(global_crops_size, global_crops_scale),
            *flip_and_color_jitter,
            RandomGaussianBlur(p=0.1),
            *solarize,
            to_tensor,
        ])
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose([
            crop(local_crops_size, local_crops_scale),
            *flip_and_color_jitter,
            RandomGaussianBlur(p=0.5),
            to_tensor,
        ])

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops.extend(self.local_transfo(image) for _ in range(self.local_crops_number))
        return crops


def _image_files(folder: str, seen: set[str] | None = None) -> list[str]:
    """Image files under ``folder``, recursively, in sorted order (``images.iter_image_files``:
    links followed, each real folder once, so symlink loops neither repeat nor hang)."""
    return list(images.iter_image_files(folder, seen))


def _has_image(folder: str, outside: str) -> bool:
    """Whether ``folder`` holds an image, never looking back into ``outside`` (the data root)."""
    return next(images.iter_image_files(folder, {os.path.realpath(outside)}), None) is not None


def _is_within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


# Sub-folder names of an evaluation layout (DATA/train + DATA/val): not classes to pretrain on.
EVAL_SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


class PretrainDataset(Dataset):
    """Images of an ImageFolder tree or of a plain folder, as multi-crop lists.

    ``dataset[i]`` -> ``(crops, label)``. ``dataset[(seed, i)]`` (what ``PretrainSampler``
    yields) draws the augmentations from a generator seeded with ``seed``, so an image's
    crops depend only on (run seed, epoch, image) -- not on the worker, rank or resume point.
    """

    def __init__(self, root: str, samples: list[tuple[str, int]], classes: list[str],
                 transform: Callable | None, skip_bad_images: bool):
        self.root = root
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int):
        """The PIL image at ``index`` (or, skipping bad files, the next readable one) and its label."""
        for attempt in range(MAX_CONSECUTIVE_BAD_IMAGES):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                return images.load_rgb_image(path), label
            except images.BadImageError as e:
                if not self.skip_bad_images:
                    raise images.BadImageError(
                        f"{e} (--skip_bad_images true skips unreadable images)") from None
                if path not in self._warned:
                    self._warned.add(path)
                    print(f"warning: skipping unreadable image: {e}", file=sys.stderr, flush=True)
        raise utils.UserError(
            f"{MAX_CONSECUTIVE_BAD_IMAGES} unreadable images in a row after "
            f"{self.samples[index][0]}: is the dataset corrupt?")

    def __getitem__(self, key: int | tuple[int, int]):
        seed, index = key if isinstance(key, tuple) else (None, key)
        image, label = self.load(index)
        if self.transform is None:
            return image, label
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            return self.transform(image), label


def build_pretrain_dataset(data_path: str, transform: Callable | None,
                           skip_bad_images: bool = False) -> PretrainDataset:
    """The training images under ``data_path``.

    With class sub-folders holding images (ImageFolder layout, e.g. ``imagenet/train``) the
    samples and labels are ImageFolder's; otherwise every image under ``data_path``
    (recursively) is a sample with label 0. Symbolic links are followed, each real folder
    once. Files are listed, not opened, except the first few to prove the data is readable.
    Raises ``utils.UserError`` for a missing or empty folder or an evaluation layout
    (``train/`` and ``val/`` side by side), ``images.BadImageError`` naming an unreadable
    first image.
    """
    root = os.path.expanduser(str(data_path))
    if not os.path.exists(root):
        raise utils.UserError(f"data folder {root} does not exist (--data_path)")
    if not os.path.isdir(root):
        raise utils.UserError(f"--data_path {root} is not a folder")
    real_root = os.path.realpath(root)
    # A linked sub-folder that leads back to the root (``self -> .``) is a loop, not a class.
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
                     and not _is_within(real_root, os.path.realpath(e.path)))
    classes = [d for d in subdirs if _has_image(os.path.join(root, d), outside=root)]
    if "train" in classes and len(classes) > 1 and set(classes) <= set(EVAL_SPLIT_NAMES):
        raise utils.UserError(
            f"--data_path {root} holds {' and '.join(c + '/' for c in classes)}: an evaluation "
            f"layout, whose splits would be pretrained on together as {len(classes)} classes; "
            f"pretrain on the training split: --data_path {os.path.join(root, 'train')}")
    if classes:
        seen = {real_root}  # an image reachable through several links is listed once
        samples = [(path, label) for label, name in enumerate(classes)
                   for path in _image_files(os.path.join(root, name), seen)]
        loose = [f for f in os.listdir(root) if images.is_image_file(f)]
        if loose:
            print(f"warning: {len(loose)} images directly in {root} are outside the class "
                  "folders and are not used", file=sys.stderr, flush=True)
    else:
        samples = [(path, 0) for path in _image_files(root)]
    if not samples:
        raise utils.UserError(
            f"no images found in {root} (looked recursively for "
            f"{', '.join(images.IMAGE_EXTENSIONS)} files)")
    dataset = PretrainDataset(root, samples, classes, transform, skip_bad_images)
    _check_some_image_readable(dataset)
    return dataset


def _check_some_image_readable(dataset: PretrainDataset) -> None:
    errors = []
    for path, _ in dataset.samples[:MAX_STARTUP_PROBES]:
        try:
            images.load_rgb_image(path)
            return
        except images.BadImageError as e:
            if not dataset.skip_bad_images:
                raise images.BadImageError(
                    f"{e} (--skip_bad_images true skips unreadable images)") from None
            errors.append(e)
    raise utils.UserError(
        f"no readable image in {dataset.root}: the first {len(errors)} files all failed "
        f"(first: {errors[0]})")


class PretrainSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch, same order on every rank) that

    * yields ``(augmentation seed, index)`` with the seed mixed from (seed, epoch, index),
    * yields whole optimizer steps of ``step_samples`` (per rank) only, at most
      ``samples_per_epoch`` (the rest of the epoch is dropped),
    * can start mid-epoch at any sample (``set_start``) to resume after a preemption.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int,
                 samples_per_epoch: int, step_samples: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        if samples_per_epoch > self.num_samples:
            raise ValueError(f"samples_per_epoch {samples_per_epoch} > {self.num_samples}")
        self.samples_per_epoch = samples_per_epoch
        self.step_samples = step_samples
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    @property
    def stop(self) -> int:
        whole_steps = max(self.samples_per_epoch - self.start, 0) // self.step_samples
        return self.start + whole_steps * self.step_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(super().__iter__())[self.start:self.stop]
        return ((utils.mix_seed(self.seed, 1, self.epoch, index), index) for index in order)

    def __len__(self) -> int:
        return self.stop - self.start


def build_loader(dataset: PretrainDataset, sampler: PretrainSampler, batch_size: int,
                 num_workers: int, device: torch.device, seed: int,
                 collate_fn: Callable | None = None) -> DataLoader:
    """The training DataLoader: persistent workers that defer stop signals, pinned memory on
    CUDA, and its own seeded generator so DataLoader seeding never touches the global RNG."""
    generator = torch.Generator()
    generator.manual_seed(seed % (2 ** 63))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=device.type == "cuda", drop_last=True,
                      persistent_workers=num_workers > 0, worker_init_fn=_defer_stop_signals,
                      generator=generator, collate_fn=collate_fn)


def build_pretrain_transform(args: argparse.Namespace) -> DataAugmentationMaSSL | MultiCropPlan:
    """The per-image transform ``--augment_on`` asks for: the PIL crops (``workers``) or the
    crop plan whose crops ``device_augment.DeviceMultiCrop`` makes (``device``); both draw the
    same random decisions from an image's seed."""
    kind = MultiCropPlan if args.augment_on == "device" else DataAugmentationMaSSL
    return kind(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                args.global_crops_size, args.local_crops_size, args.color_jitter_prob,
                args.grayscale_prob, args.solarization_prob)


@dataclass
class TrainingData:
    """What a training process draws its crops from (``build_training_data``)."""
    dataset: PretrainDataset
    sampler: PretrainSampler
    loader: DataLoader
    steps_per_epoch: int
    augment: DeviceMultiCrop | None  # the device half of --augment_on device, else None

    def crops(self, batch: Any) -> list[torch.Tensor]:
        """A loader batch -> the crop list ``[global 1, global 2, locals...]`` for the step."""
        crops, _ = batch
        return crops if self.augment is None else self.augment(crops)


def build_training_data(args: argparse.Namespace, dataset: PretrainDataset, world_size: int,
                        rank: int, device: torch.device) -> TrainingData:
    """Sampler, loader and steps per epoch for ``dataset`` (built with
    ``build_pretrain_transform(args)``) in process ``rank`` of ``world_size``; raises
    ``utils.UserError`` when the dataset is smaller than one optimizer step."""
    B, accum = args.batch_size_per_gpu, args.gradient_accumulation
    steps_per_epoch = len(dataset) // world_size // B // accum
    if steps_per_epoch == 0:
        raise utils.UserError(
            f"the dataset has {len(dataset)} images, fewer than one optimizer step uses "
            f"(batch_size_per_gpu {B} x {world_size} processes x gradient_accumulation {accum} = "
            f"{B * world_size * accum})")
    sampler = PretrainSampler(dataset, num_replicas=world_size, rank=rank, seed=args.seed,
                              samples_per_epoch=steps_per_epoch * accum * B, step_samples=accum * B)
    device_side = isinstance(dataset.transform, MultiCropPlan)
    loader = build_loader(dataset, sampler, B, args.num_workers, device,
                          seed=utils.mix_seed(args.seed, 3, rank),
                          collate_fn=collate_plans if device_side else None)
    augment = (DeviceMultiCrop(dataset.transform.crop_sizes, utils.IMAGENET_MEAN,
                               utils.IMAGENET_STD, device) if device_side else None)
    return TrainingData(dataset, sampler, loader, steps_per_epoch, augment)


WORKER_STOP_GRACE_S = 120


def _defer_stop_signal(signum: int, frame: Any) -> None:
    # The first stop signal arms a SIGALRM (default action: end the process) for
    # WORKER_STOP_GRACE_S; later ones leave the running countdown as it is.
    remaining = signal.alarm(0)
    signal.alarm(remaining or WORKER_STOP_GRACE_S)


def _defer_stop_signals(worker_id: int) -> None:
    """Data-worker init: leave SIGTERM/SIGUSR1/SIGINT to the training process.

    SLURM signals every process of the job at once. A worker that died at once would make the
    training process fail ("DataLoader worker exited unexpectedly") before it could save, so
    workers let the training process save and then stop them (shutdown_loader_workers). They
    do not ignore the signal for good: a worker nobody stops (the training process is exiting
    without having shut it down, and multiprocessing's exit-time terminate() is all that is
    left) ends WORKER_STOP_GRACE_S later instead of keeping the job, and its GPUs, alive.
    """
    if not hasattr(signal, "alarm"):  # Windows: no SIGUSR1/SIGALRM; keep the defaults
        return
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):  # Ctrl-C reaches the workers too
        signal.signal(getattr(signal, name), _defer_stop_signal)


def shutdown_loader_workers(loader: DataLoader) -> None:
    """Stop a DataLoader's persistent workers now, not whenever its iterator is collected.

    After an exception the iterator lives on in the traceback, and its workers with it, until
    interpreter exit, where multiprocessing terminates and joins them."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()  # private, but the only way that does not wait for gc
    loader._iterator = None
