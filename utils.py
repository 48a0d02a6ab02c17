"""Small helpers shared by the training, evaluation and export scripts (one home for each).

Clean CLI errors and flags, the ``--device`` flag, seeds and schedules. The larger themes have
their own modules: ``distributed`` (process groups, rank helpers, stop signals), ``storage``
(atomic writes, folder locks), ``images`` (image files and decoding) and ``checkpoints``
(reading checkpoints and building backbones from them).
"""
from __future__ import annotations

import argparse
import random
import sys
from typing import NoReturn

import numpy as np
import torch

# The normalisation of every transform here (training crops, evaluation, attention maps).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --------------------------------------------------------------------------- CLI errors


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2, no traceback."""


def exit_with_error(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def bool_flag(value: str) -> bool:
    """argparse type for ``--flag true/false`` (DINO's ``bool_flag``)."""
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{value}'")


def resolve_device(device: str | None) -> torch.device:
    """The device a ``--device`` flag names, checked before anything starts: CUDA when it is
    available and CPU otherwise for None (or ``auto``); an unknown device, or CUDA where there
    is none, is a ``UserError``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device}: {user_error_message(e)}") from e
    if resolved.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}, but CUDA is not available here (use --device cpu)")
    return resolved



def first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def user_error_message(exc: BaseException) -> str:
    """One line for ``exc``, also when a DataLoader worker re-raised it.

    A worker re-raises an exception with the whole worker traceback as its message
    ("Caught BadImageError in DataLoader worker process 0. Original Traceback ...");
    the original message is the text after ``Name:`` on its last line.
    """
    text = str(exc).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        name = type(exc).__name__ + ": "
        return last.split(name, 1)[1] if name in last else last
    return " ".join(text.split()) or type(exc).__name__


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during, innermost last."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


# --------------------------------------------------------------------------- randomness


def fix_random_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def mix_seed(*values: int) -> int:
    """A well-mixed 64-bit seed from integers (splitmix64 chained), cheap enough per image."""
    mask = (1 << 64) - 1
    x = 0
    for v in values:
        x = (x + (v & mask) + 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        x ^= x >> 31
    return x


# numpy's seed range: --seed must fit it.
MAX_SEED = 2 ** 32 - 1


def seed_problem(seed: int) -> str | None:
    if not 0 <= seed <= MAX_SEED:
        return f"--seed must be in 0..{MAX_SEED}, got {seed}"
    return None


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
