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


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (and the Hub must stay offline)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); run them "
                                       "with python -m pytest -m cuda tests")


def pytest_sessionfinish(session, exitstatus) -> None:
    """Fail the run when a test leaves worker processes behind, and end them.

    A leftover data worker that defers SIGTERM would otherwise keep pytest from exiting
    (multiprocessing joins its children at exit), and CI would hang instead of failing."""
    import multiprocessing

    leftover = multiprocessing.active_children()
    if not leftover:
        return
    for process in leftover:
        process.kill()
        process.join(10)
    names = ", ".join(f"{p.name} (pid {p.pid})" for p in leftover)
    print(f"\nerror: tests left {len(leftover)} child process(es) running: {names}",
          file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
