"""Helpers shared by the training, evaluation and export scripts.

Distributed set-up that works with no launcher, ``torchrun`` or SLURM; schedules;
atomic checkpoint writes; image loading that names the bad file; clean CLI errors.
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

# --------------------------------------------------------------------------- CLI errors


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""


def exit_with_error(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# --------------------------------------------------------------------------- distributed


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return None


def init_distributed(device: str | None = None, backend: str | None = None) -> DistEnv:
    """Initialise ``torch.distributed`` from the environment, or not at all.

    Rank and world size come from torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) or
    SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR`` and
    ``MASTER_PORT`` must then be set, as ``run_with_submitit.py`` does). A plain
    ``python script.py`` is one process with no process group and needs no free port.
    ``device`` defaults to CUDA when available (one GPU per local rank), else CPU; the
    backend to NCCL on CUDA and gloo on CPU.
    """
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise UserError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are not set: "
                            "launch with torchrun or run_with_submitit.py")
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup_distributed() -> None:
    if is_dist():
        dist.destroy_process_group()


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a Python number over ranks (the number itself with one process)."""
    if not is_dist():
        return float(value)
    t = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / get_world_size()


# --------------------------------------------------------------------------- randomness


def fix_random_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- schedules


def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: float = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Per-iteration values: linear warm-up from ``start_warmup_value`` to ``base_value``
    over ``warmup_epochs``, then a half cosine down to ``final_value`` (DINO's schedule)."""
    total = epochs * niter_per_ep
    warmup_iters = min(int(round(warmup_epochs * niter_per_ep)), total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters, endpoint=False) \
        if warmup_iters > 0 else np.array([])
    iters = np.arange(total - warmup_iters)
    if len(iters) > 0:
        cosine = final_value + 0.5 * (base_value - final_value) * (
            1 + np.cos(np.pi * iters / max(len(iters), 1)))
    else:
        cosine = np.array([])
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == total
    return schedule


# --------------------------------------------------------------------------- checkpoints


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``.

    A job killed mid-write leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImageError(UserError):
    """An image file that PIL cannot read."""


def load_rgb_image(path: str) -> Image.Image:
    """Open an image as RGB; raise ``BadImageError`` naming the file if it is unreadable."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadImageError(f"cannot read image {path}: {e}") from e
