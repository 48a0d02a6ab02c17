"""Shared fixtures: real Fashion-MNIST images from the shipped split, in temp folders, and
training checkpoints fabricated in the layout main_massl.py writes."""
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project is flat scripts, not an installed package

from fabricated import make_checkpoint  # noqa: E402
from faults import copy_images  # noqa: E402
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


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (and the Hub must stay offline)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# Training checkpoints fabricated in main_massl.py's layout (fabricated.make_checkpoint), each
# with the teacher backbone it holds.


@pytest.fixture(scope="session")
def vits16_checkpoint(tmp_path_factory):
    """ViT-S/16 trained (fabricated) on 224 px global crops: timm's vit_small_patch16_224."""
    path = tmp_path_factory.mktemp("vits16") / "checkpoint.pth"
    return path, make_checkpoint(path, "vit_small", 16, 224)


@pytest.fixture(scope="session")
def vitt16_checkpoint(tmp_path_factory):
    """ViT-Ti/16 trained (fabricated) on 64 px crops: the cheapest model a hub entry builds."""
    path = tmp_path_factory.mktemp("vitt16") / "checkpoint.pth"
    return path, make_checkpoint(path, "vit_tiny", 16, 64, seed=2)


@pytest.fixture(scope="session")
def nano_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("nano") / "checkpoint.pth"
    return path, make_checkpoint(path, "vit_nano", 4, 28, seed=1)


@pytest.fixture
def tiny_images(fmnist_folder, tmp_path):
    """32 real Fashion-MNIST images, 2 steps of 16 per epoch: a run of a few seconds."""
    root = tmp_path / "images"
    for src in sorted((fmnist_folder / "train").rglob("*.png"))[::300 // 32][:32]:
        dst = root / src.parent.name / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    return root


@pytest.fixture(scope="module")
def flat50(fmnist_folder, tmp_path_factory) -> Path:
    """50 real images, flat (unlabelled data)."""
    return copy_images(fmnist_folder / "train", tmp_path_factory.mktemp("flat50") / "images", 50)


@pytest.fixture(scope="module")
def tiny_data(fmnist_folder, tmp_path_factory) -> Path:
    """An ImageFolder with the first 10 real images of each class (100 images)."""
    root = tmp_path_factory.mktemp("tiny") / "train"
    for class_dir in sorted((fmnist_folder / "train").iterdir()):
        (root / class_dir.name).mkdir(parents=True)
        for png in sorted(class_dir.glob("*.png"))[:10]:
            shutil.copy(png, root / class_dir.name / png.name)
    return root


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); run them "
                                       "with python -m pytest -n 0 -m cuda tests")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        # pytest.ini runs the files in parallel workers (pytest-xdist): a worker's in-process
        # tensors on every core would oversubscribe the cores the other workers use.
        import torch
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


LEFTOVER_KEY = "leftover_child_processes"


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fail the run when a test leaves worker processes behind, and end them.

    A leftover data worker that defers SIGTERM would otherwise keep pytest from exiting
    (multiprocessing joins its children at exit), and CI would hang instead of failing.
    In an xdist worker the finding goes back to the controller (``pytest_testnodedown``)."""
    import multiprocessing

    leftover = multiprocessing.active_children()
    for process in leftover:
        process.kill()
        process.join(10)
    names = ", ".join(f"{p.name} (pid {p.pid})" for p in leftover)
    if hasattr(session.config, "workeroutput"):  # an xdist worker
        session.config.workeroutput[LEFTOVER_KEY] = names
    elif names:
        _leftover_found(session.config, names)
    if getattr(session.config, "_massl_leftover", False):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown without pytest-xdist
def pytest_testnodedown(node, error) -> None:
    """The controller's side of an xdist worker's leftover check (only called under xdist)."""
    names = getattr(node, "workeroutput", {}).get(LEFTOVER_KEY)
    if names:
        _leftover_found(node.config, names)


def _leftover_found(config, names: str) -> None:
    print(f"\nerror: tests left child process(es) running: {names}", file=sys.stderr)
    config._massl_leftover = True
