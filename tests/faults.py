"""Running the scripts as a user would, and reading the one error line a bad input must
give: shared by the fault tests (locked and read-only folders, a full disk, bad --resume files,
a half-started job). Runs use vit_pico with 7 px patches on 28 px images."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "main_massl.py")
TIMEOUT = 300
DIST_TIMEOUT_ENV = "MASSL_DIST_TIMEOUT_S"

# One epoch of a vit_pico on 28 px images: a step takes a fraction of a second on a CPU core.
PICO = ["--arch", "vit_pico", "--patch_size", "7", "--global_crops_size", "28",
        "--local_crops_size", "14", "--local_crops_number", "1", "--out_dim", "16",
        "--partition_size", "16", "--num_workers", "0", "--print_freq", "1",
        "--warmup_teacher_temp_epochs", "0", "--epochs", "1", "--lr", "0.01", "--seed", "0"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", DIST_TIMEOUT_ENV):
        env.pop(name, None)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def run_py(args: list[str], timeout: float = TIMEOUT, env: dict[str, str] | None = None,
           preexec_fn=None) -> subprocess.CompletedProcess:
    """``python ARGS`` from the repository root; a run that outlives ``timeout`` (a hang) fails."""
    try:
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env or _env(),
                              capture_output=True, text=True, timeout=timeout,
                              preexec_fn=preexec_fn)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args[:2])} ... still running after {timeout} s (hung)")


def one_error_line(err: str) -> str:
    """The single ``error: ...`` line a bad input must produce (no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def copy_images(src: Path, dst: Path, count: int) -> Path:
    """The first ``count`` real images under ``src`` (sorted), flat in ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for png in sorted(src.rglob("*.png"))[:count]:
        shutil.copy(png, dst / f"{png.parent.name}_{png.name}")
    return dst


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
