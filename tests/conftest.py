"""Shared fixtures: real Fashion-MNIST images from the shipped split, in temp folders."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project is flat scripts, not an installed package

from fashion_mnist import EMBEDDED_DIR, write_imagefolder  # noqa: E402


@pytest.fixture(scope="session")
def fmnist_folder(tmp_path_factory) -> Path:
    """ImageFolder with 300 train (30/class) and 100 val (10/class) real 28x28 images,
    always from the shipped split so every machine tests the same pictures."""
    return write_imagefolder(tmp_path_factory.mktemp("fmnist"), source=EMBEDDED_DIR,
                             train_per_class=30, val_per_class=10)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
