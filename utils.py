"""Helpers shared by the training, evaluation and export scripts (one home for each).

Clean CLI errors and flags; distributed set-up that works with no launcher, ``torchrun`` or
SLURM, and the small rank helpers; schedules; atomic file writes; image loading that names
the bad file; the strict loader of backbone weights from any checkpoint we accept.
"""
from __future__ import annotations

import argparse
import datetime
import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import signal
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

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


def check_device(device: str | None) -> None:
    """Refuse an unknown ``--device`` or CUDA where there is none, before anything starts."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise UserError(f"--device {device}: {user_error_message(e)}") from e
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}, but CUDA is not available here (use --device cpu)")


# --------------------------------------------------------------------------- distributed


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    forced_group: bool = False  # MASSL_FORCE_DDP=1: a process group even for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group is running: DDP, all-reduces and gathers are in use."""
        return self.world_size > 1 or self.forced_group


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
    backend to NCCL on CUDA and gloo on CPU. ``MASSL_FORCE_DDP=1`` (with a launcher, e.g.
    ``torchrun --nproc-per-node=1``) creates the process group for one process too, so one
    GPU or CPU runs the multi-process code path (DDP, ``no_sync``, collectives): for tests.
    """
    world_size = world_size_from_env()
    forced = os.environ.get("MASSL_FORCE_DDP", "") == "1"
    rank = rank_from_env()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    if (world_size > 1 or forced) and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            why = "WORLD_SIZE > 1" if world_size > 1 else "MASSL_FORCE_DDP=1"
            raise UserError(f"{why} but MASTER_ADDR/MASTER_PORT are not set: "
                            "launch with torchrun or run_with_submitit.py")
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        _join_process_group(backend, rank, world_size, **kwargs)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev,
                   forced_group=forced and dist.is_initialized())


# Seconds to wait for all processes to join (and, after that, for any collective call):
# MASSL_DIST_TIMEOUT_S, else 30 minutes. A job whose other tasks never start fails with a
# message after that long instead of hanging silently.
DIST_TIMEOUT_ENV = "MASSL_DIST_TIMEOUT_S"
DEFAULT_DIST_TIMEOUT_S = 1800.0
# A process still waiting for the others after this long (or half the timeout) says so.
_DIST_WAIT_NOTE_AFTER_S = 5.0


def dist_timeout_s() -> float:
    """The rendezvous and collective timeout in seconds (``MASSL_DIST_TIMEOUT_S``)."""
    text = os.environ.get(DIST_TIMEOUT_ENV, "")
    if text == "":
        return DEFAULT_DIST_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{DIST_TIMEOUT_ENV}={text!r}: expected a number of seconds > 0")
    return value


def _join_process_group(backend: str, rank: int, world_size: int, **kwargs: Any) -> None:
    """``dist.init_process_group`` that says whom it waits for and gives up with a clear message."""
    timeout = dist_timeout_s()
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    note = threading.Timer(min(_DIST_WAIT_NOTE_AFTER_S, timeout / 2), lambda: print(
        f"waiting for {world_size} processes at {where} (rank {rank} of {world_size}); giving up "
        f"after {timeout:g} s ({DIST_TIMEOUT_ENV})", file=sys.stderr, flush=True))
    note.daemon = True
    note.start()
    try:
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout), **kwargs)
    except getattr(dist, "DistError", RuntimeError) as e:
        raise UserError(
            f"the {world_size} processes did not meet at {where} (this is rank {rank} of "
            f"{world_size}): {_first_line(e)} Did every task of the job start (SLURM_NTASKS / "
            f"WORLD_SIZE = {world_size})? {DIST_TIMEOUT_ENV} sets how long to wait") from None
    finally:
        note.cancel()


def world_size_from_env() -> int:
    """The world size a launcher announced (what ``init_distributed`` will use)."""
    return _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1


def rank_from_env() -> int:
    """This process's rank as a launcher announced it (0 without a launcher)."""
    return _env_int("RANK", "SLURM_PROCID") or 0


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


def all_reduce_means(values: list[float], device: torch.device) -> list[float]:
    """Mean of each value over ranks, in one collective (the values themselves with one
    process)."""
    if not is_dist():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / get_world_size()).tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    """Max of each value over ranks, so every rank takes the same decision."""
    if not is_dist():
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a one-item list without a process group)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


class StopRequest:
    """SIGTERM/SIGUSR1 (cluster preemption) and SIGINT (Ctrl-C) handlers that only record the
    request; the training loop finishes its step, saves and returns. A second Ctrl-C stops at
    once (``SystemExit`` 130: ``finally`` blocks still run, the last saved checkpoint is kept).
    ``restore()`` puts the previous handlers back."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            return False  # Python only delivers signals to the main thread
        self._pid = os.getpid()
        for name in self.SIGNALS:
            if hasattr(signal, name):
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return  # a forked data worker: its parent decides (Ctrl-C reaches the whole group)
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal_name == "SIGINT":
            print("\nsecond Ctrl-C: stopping now; the last saved checkpoint is kept",
                  file=sys.stderr, flush=True)
            raise SystemExit(130)
        if name == "SIGINT" and self.signal_name is None:
            print("\nCtrl-C: finishing this step and saving (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
        self.signal_name = self.signal_name or name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# Words of the errors gloo and NCCL raise on a surviving rank when a peer died or stalled.
_LOST_PEER_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                    "timed out", "timeout", "nccl", "gloo", "socket")


def lost_peer_message(exc: BaseException, output_dir: str | os.PathLike) -> str | None:
    """One line for a collective that failed because another process of the job died or
    stalled (None when ``exc`` is something else, or there is no job of several processes)."""
    if world_size_from_env() <= 1:
        return None
    dist_error = getattr(dist, "DistError", ())
    text = " ".join(str(e) for e in _exception_chain(exc)).lower()
    if not (isinstance(exc, dist_error) or
            (isinstance(exc, RuntimeError) and any(w in text for w in _LOST_PEER_WORDS))):
        return None
    return (f"rank {rank_from_env()} of {world_size_from_env()}: lost contact with the other "
            f"processes ({_first_line(exc)[:160]}): another rank died or stalled (the launcher's "
            f"report names it). The last checkpoint in {output_dir} is intact: run the same "
            "command again to resume")


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


def respect_umask(path: str | os.PathLike, mode: int = 0o666) -> None:
    """Give ``path`` the permissions a plain ``open()`` (0666) or ``mkdir`` (0777) would get:
    temp files and folders are created private (0600 / 0700), which would hide checkpoints
    and exports from teammates on a shared cluster folder."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, mode & ~mask)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed over ``path``.

    A job killed mid-write leaves the previous file intact (and at worst a hidden
    ``.NAME.*.tmp`` beside it). The file gets the permissions of a plain ``open``
    (0666 minus the umask), not ``mkstemp``'s 0600, so teammates can read shared folders.
    A full disk or quota (also as torch.save's "unexpected pos") is a ``UserError`` saying
    so; the temporary file is removed and the previous file is left as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        respect_umask(tmp)
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - any writer's error; only space problems are reworded
        if isinstance(e, UserError):
            raise
        failure = _write_failure(e, path)
        if failure is None:
            raise
        raise failure from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


# torch.save's C++ file writer reports a failed write with these words and no errno.
_TORCH_WRITE_FAILURES = ("unexpected pos", "iostream error")
# Free space below which a write that failed part-way is put down to a full disk.
_LOW_SPACE_BYTES = 1 << 20


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs on Windows
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _write_failure(exc: BaseException, path: Path) -> UserError | None:
    """A ``UserError`` for a write to ``path`` that failed for lack of space, else None."""
    chain = _exception_chain(exc)
    codes = {e.errno for e in chain if isinstance(e, OSError)}
    texts = " ".join(str(e) for e in chain)  # writers in other languages (safetensors' Rust)
    if errno.ENOSPC in codes or "No space left on device" in texts:
        reason = "no space left on device"
    elif errno.EDQUOT in codes or "Disk quota exceeded" in texts:
        reason = "disk quota exceeded"
    elif any(isinstance(e, RuntimeError) and any(m in str(e) for m in _TORCH_WRITE_FAILURES)
             for e in chain):
        free = _free_bytes(path.parent)
        reason = ("no space left on device" if free is not None and free < _LOW_SPACE_BYTES else
                  f"the write failed part-way ({_first_line(exc)}; disk full, over quota, or an "
                  "I/O error?)")
    else:
        return None
    kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
    return UserError(f"{reason} while writing {path}; {kept}")


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (see ``atomic_path``)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def cpu_copy(obj: Any) -> Any:
    """``obj`` (nested dicts, lists, tuples) with every tensor copied to fresh CPU memory, so
    a background write sees this moment's values while training goes on changing its own."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs write jobs (e.g. ``save_atomic``) one at a time in a background thread.

    ``submit`` first waits for the job in flight, so at most one runs and they land in
    order; ``wait`` blocks until it is done and re-raises its error (a full disk's
    ``UserError``) in the caller's thread. The thread is not a daemon: an interpreter
    exiting (also after SIGTERM's orderly stop) finishes the write before it ends.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name="background-writer")
        self._thread.start()

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON atomically, so a reader never sees half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to a log file; a full disk, a quota or a read-only file is
    a ``UserError`` naming the file (what was written before stays as it was)."""
    path = Path(path)
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        failure = _write_failure(e, path)
        reason = str(failure).split(" while ")[0] if failure else (e.strerror or str(e))
        raise UserError(f"{reason} while appending to {path}: free space (or fix the folder's "
                        "permissions) and run the same command again") from e


# numpy's seed range: --seed must fit it.
MAX_SEED = 2 ** 32 - 1


def seed_problem(seed: int) -> str | None:
    if not 0 <= seed <= MAX_SEED:
        return f"--seed must be in 0..{MAX_SEED}, got {seed}"
    return None


def check_writable_dir(path: str | os.PathLike, flag: str = "--output_dir") -> None:
    """Create the folder ``path`` if needed and prove a file can be written in it, so that a
    read-only or misspelt output folder fails at start-up, not after the work is done."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to {flag} {path}: {e.strerror or e}"
                        + (f" ({e.filename})" if e.filename and str(e.filename) != str(path)
                           else "")) from None


class FolderLock:
    """An exclusive lock on a folder, held until ``release()`` or the process exits.

    ``flock`` on ``FOLDER/.lock``, which records the holder's host and pid. The kernel drops
    the lock when the holder dies (also on SIGKILL), so a crashed run never leaves a stale
    lock behind. Forked children (data workers) close their copy of the descriptor at once
    (``_close_inherited_locks``): otherwise a killed run's workers, which wind down seconds
    later, would hold the lock and refuse the restart. Filesystems without ``flock`` get a
    warning and no lock.
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike, flag: str = "--output_dir"):
        self.folder, self.flag = Path(folder), flag
        self.path = self.folder / self.NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            raise UserError(f"{self.flag} {self.folder} is in use by another run ({holder}): "
                            f"wait for it to end or use another {self.flag}") from None
        except OSError as e:  # e.g. a network filesystem mounted without locking
            os.close(fd)
            print(f"warning: cannot lock {self.path} ({e.strerror}): make sure no other run "
                  f"writes to {self.folder}", file=sys.stderr, flush=True)
            return
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {started}\n"
                 .encode())
        self._fd = fd
        _HELD_LOCK_FDS.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            _HELD_LOCK_FDS.discard(self._fd)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


# Descriptors of the FolderLocks this process holds.
_HELD_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    """In a forked child: close the inherited lock descriptors (not unlock: LOCK_UN would free
    the parent's lock too). The lock then lives exactly as long as the process that took it."""
    for fd in _HELD_LOCK_FDS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


# --------------------------------------------------------------------------- images

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    """The one rule for what counts as an image, in training and in evaluation: an image
    extension, and not a dot-file (e.g. macOS "._x.jpg" resource forks are never images)."""
    name = os.path.basename(name)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def iter_image_files(folder: str, seen: set[str] | None = None) -> Iterator[str]:
    """Image files (``is_image_file``) under ``folder``, recursively: folders depth-first in
    sorted order, files sorted, dot-folders skipped.

    Symbolic links are followed, but each real folder is entered once: a ``self -> .`` link
    neither multiplies the data nor loops forever. ``seen`` holds the real paths entered so
    far and may be shared between calls (folders listed by an earlier call are skipped).
    """
    seen = set() if seen is None else seen
    top = os.path.realpath(folder)
    if top in seen:
        return
    seen.add(top)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, name))
            if not name.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(name)
        dirnames[:] = kept  # os.walk descends only into these
        yield from (os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))


class BadImageError(UserError):
    """An image file that PIL cannot read."""


# Pillow modes with 16-bit samples: their nominal range is 0..65535.
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth grayscale (Pillow modes I;16*, I, F) as 8-bit ``L``, scaled, not clipped.

    ``convert("RGB")`` clips these at 255, which turns 16-bit images black and white.
    * ``I;16*`` (16-bit PNG/TIFF): value / 257, the nominal 16-bit range onto 0..255, so a
      dark image stays dark and all images of a dataset are scaled alike.
    * ``I`` (32-bit integers: Pillow's mode for 16-bit PGM/PPM, and 32-bit TIFFs): values in
      0..65535 are read on the same 16-bit scale; an image with values outside it has no
      nominal range and is stretched from its minimum to its maximum.
    * ``F`` (32-bit floats): values in 0..1 are read as 0..255 (the float convention);
      otherwise stretched from the image's minimum to its maximum. NaN becomes 0.
    Pillow already reduces 16-bit RGB(A) and LA images to 8 bits itself. Other modes are
    returned unchanged.
    """
    if img.mode not in _16BIT_MODES + ("I", "F"):
        return img
    values = np.asarray(img, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if img.mode in _16BIT_MODES or (img.mode == "I" and low >= 0 and high <= 65535):
        low, top = 0.0, 65535.0
    elif img.mode == "F" and low >= 0 and high <= 1:
        low, top = 0.0, 1.0
    else:
        top = high if high > low else low + 1.0  # a constant image becomes black
    scaled = np.nan_to_num((values - low) * (255.0 / (top - low)), nan=0.0)
    return Image.fromarray(np.rint(np.clip(scaled, 0, 255)).astype(np.uint8))  # mode L


def load_rgb_image(path: str) -> Image.Image:
    """Open an image as 8-bit RGB (high bit depths scaled, see ``to_8bit``); raise
    ``BadImageError`` naming the file if it is unreadable.

    Pixels are taken as stored: an EXIF orientation tag (phone photos) is not applied, as in
    DINO's and torchvision's ImageNet pipelines, so our numbers stay comparable with theirs.
    Training and every evaluation read images through here, so they agree. For photos that
    should be upright, rotate them once beforehand (e.g. ``PIL.ImageOps.exif_transpose``)."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return to_8bit(img).convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadImageError(f"cannot read image {path}: {e}") from e


# --------------------------------------------------------------------------- weights loading

# Parameters that exist only for pretraining and that no evaluation backbone has:
# iBOT's learned mask token. Dropped by name; everything else must match exactly.
TRAINING_ONLY_BACKBONE_KEYS = ("masked_embed",)

# How many key names an error message lists before saying "(+N more)".
_MAX_KEYS_IN_ERROR = 8


def strip_prefix(key: str, prefix: str) -> str:
    """``key`` without ``prefix`` when it starts with it (e.g. DDP's ``module.``)."""
    return key[len(prefix):] if key.startswith(prefix) else key


def _first_line(exc: BaseException) -> str:
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


def checkpoint_file_problem(path: str | os.PathLike) -> str | None:
    """What makes ``path`` no torch.save file, judged from its size and first bytes, or None
    when it could be one (a zip archive, or a pickle of the legacy format)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"cannot be opened ({e.strerror})"
    if not head:
        return "is empty (0 bytes): a copy or a save that was cut short?"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    return f"is not a PyTorch checkpoint (torch.save writes a zip archive; this file starts {head!r})"


def checkpoint_load_error(path: str | os.PathLike, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words: what the file is not.

    Never suggests ``weights_only=False``: that would run whatever code the file holds."""
    problem = checkpoint_file_problem(path)
    if problem is not None:
        return f"{path} {problem}"
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"{path} holds Python objects{what} besides tensors and plain containers; they "
                "are not loaded, since unpickling them could run code: it is not a checkpoint "
                "written by these scripts")
    return (f"{path} is truncated or corrupt: {type(exc).__name__}: "
            f"{_first_line(exc).split('. This is')[0]}")


def _torch_load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)`` that also accepts DINO/iBOT checkpoints, whose
    ``args`` is an ``argparse.Namespace`` (a plain attribute bag, safe to rebuild)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5
        return torch.load(path, map_location="cpu", weights_only=True)
    with safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _is_flat_state_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()))


def _plain_args(args: Any) -> dict | None:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, dict):
        return dict(args)
    return None


def _safetensors_args(path: Path) -> dict | None:
    """Training args stored in a ``.safetensors`` header (strings, JSON-decoded when they parse)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "arch" not in metadata:
        return None
    args = {}
    for key, value in metadata.items():
        try:
            args[key] = json.loads(value)
        except (TypeError, ValueError):
            args[key] = value
    return args


def read_checkpoint_backbone(path: str | os.PathLike, checkpoint_key: str = "teacher"
                             ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The backbone state dict in ``path`` and the training ``args`` stored with it, if any.

    Accepts our training checkpoints and DINO/iBOT ones (``checkpoint_key`` picks
    ``teacher`` or ``student``, whose keys are ``backbone.*``/``head.*``, possibly under
    ``module.``), a dict with ``model`` or ``state_dict``, a bare backbone state dict, and
    exported files (``.pth`` flat dict, or ``.safetensors`` whose header may carry the
    args). ``module.`` then ``backbone.`` are stripped only at the start of a key, the
    projection head (``head.*``) and iBOT's ``masked_embed`` are dropped. Never downloads.
    Raises ``UserError`` for a missing or unreadable file or a missing ``checkpoint_key``.
    """
    path = Path(path)
    problem = pretrained_path_problem(path)
    if problem is not None:
        raise UserError(problem)
    args = None
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise UserError(f"{path} is a .safetensors file: pip install safetensors") from e
        try:
            ckpt = load_file(str(path), device="cpu")
            args = _safetensors_args(path)
        except Exception as e:
            raise UserError(f"cannot read {path}: {_first_line(e)}") from e
    else:
        try:
            ckpt = _torch_load_weights_only(path)
        except Exception as e:
            raise UserError(f"cannot read checkpoint: {checkpoint_load_error(path, e)}") from e
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict or a state dict")

    if isinstance(ckpt.get(checkpoint_key), dict):
        state = ckpt[checkpoint_key]
    elif _is_flat_state_dict(ckpt):
        state = ckpt  # a bare or exported backbone: there is only one set of weights
    elif isinstance(ckpt.get("model"), dict):
        state = ckpt["model"]
    elif isinstance(ckpt.get("state_dict"), dict):
        state = ckpt["state_dict"]
    else:
        raise UserError(f"{path} has no '{checkpoint_key}' entry; it has: "
                        f"{', '.join(map(str, ckpt)) or 'nothing'} (choose one with --checkpoint_key)")
    if state is not ckpt:
        args = _plain_args(ckpt.get("args"))

    backbone: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue
        key = strip_prefix(strip_prefix(key, "module."), "backbone.")
        if key.startswith("head.") or key in TRAINING_ONLY_BACKBONE_KEYS:
            continue
        backbone[key] = value
    if not backbone:
        raise UserError(f"{path} ('{checkpoint_key}') holds no backbone weights")
    return backbone, args


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: the identity of a set of
    weights, whichever file (training checkpoint, export) they were read from."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def pretrained_path_problem(path: str | os.PathLike) -> str | None:
    """Why ``--pretrained_weights path`` cannot be read as a file, or None."""
    path = Path(path)
    if path.is_dir():
        return (f"--pretrained_weights {path} is a folder, not a weights file: name the file in "
                "it (e.g. checkpoint.pth, or model.safetensors of an export.py folder)")
    if not path.is_file():
        return (f"no such file: {path} (--pretrained_weights must be a local file; nothing is "
                "downloaded)")
    return None


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_IN_ERROR])
    more = len(keys) - _MAX_KEYS_IN_ERROR
    return f"[{shown}{f', ... (+{more} more)' if more > 0 else ''}]"


def load_backbone_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                             source: str = "the checkpoint") -> None:
    """``model.load_state_dict(state_dict, strict=True)``, or a ``UserError`` that lists
    the missing and unexpected keys and the shape mismatches on one line."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys {_listed(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys {_listed(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches {_listed(mismatched)}")
        raise UserError(f"weights in {source} do not fit the {type(model).__name__} that was built: "
                        f"{'; '.join(problems)}. Check --arch and --patch_size "
                        "(and --checkpoint_key)")
    model.load_state_dict(state_dict, strict=True)


def load_pretrained_weights(model: torch.nn.Module, path: str | os.PathLike,
                            checkpoint_key: str = "teacher") -> None:
    """Load the backbone weights found in ``path`` into ``model``, strictly.

    See ``read_checkpoint_backbone`` for the accepted formats. Any missing, unexpected or
    wrongly shaped key is a ``UserError``: a model is never left partly random.
    """
    state_dict, _ = read_checkpoint_backbone(path, checkpoint_key)
    load_backbone_state_dict(model, state_dict, source=str(path))


def _infer_vit_arch(state_dict: dict[str, torch.Tensor], vit_archs: dict) -> str | None:
    """Our ViT whose width and depth match the weights (the head count cannot be read off
    the weights; each width has one standard head count)."""
    if "cls_token" not in state_dict:
        return None
    width = state_dict["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    matches = [name for name, (dim, d, _) in vit_archs.items() if (dim, d) == (width, depth)]
    return matches[0] if len(matches) == 1 else None


def _pos_embed_grid(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Side of the square position-embedding grid (CLS token excluded), if there is one."""
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is None or pos_embed.ndim != 3:
        return None
    side = math.isqrt(pos_embed.shape[1] - 1)
    return side if side * side == pos_embed.shape[1] - 1 else None


def build_backbone_from_checkpoint(path: str | os.PathLike, arch: str | None = None,
                                   patch_size: int | None = None, checkpoint_key: str = "teacher",
                                   img_size: int | None = None
                                   ) -> tuple[torch.nn.Module, int, dict]:
    """Build the backbone a checkpoint was trained with and load its weights strictly.

    ``arch`` and ``patch_size`` default to the checkpoint's stored args; without args
    (a bare or exported state dict) the patch size is read off ``patch_embed`` and the
    arch off the width and depth of the weights. The position-embedding grid is the one
    stored in ``pos_embed`` (= training ``global_crops_size`` / patch size), so the
    weights load unchanged; the ViT resamples it on the fly for other input sizes. An
    explicit ``img_size`` with another grid gets ``pos_embed`` resampled once, with DINO's
    interpolation (``vision_transformer.interpolate_pos_embed``).
    Returns ``(model, feature_dim, info)``; ``info`` says what was used and why.
    """
    import vision_transformer as vits  # here, not at the top: utils must stay import-light

    state_dict, args = read_checkpoint_backbone(path, checkpoint_key)
    stored = args or {}
    notes: list[str] = []
    if arch is None:
        arch = stored.get("arch")
        if arch is None:
            arch = _infer_vit_arch(state_dict, vits.VIT_ARCHS)
            if arch is None:
                raise UserError(f"{path} stores no training args and its weights match none of "
                                f"{', '.join(vits.VIT_ARCHS)}: pass --arch (and --patch_size)")
            notes.append(f"arch {arch} inferred from the weights' width and depth")
    if arch in vits.VIT_ARCHS:
        if patch_size is None:
            patch_size = stored.get("patch_size")
            if patch_size is None and "patch_embed.proj.weight" in state_dict:
                patch_size = int(state_dict["patch_embed.proj.weight"].shape[-1])
                notes.append(f"patch size {patch_size} read off patch_embed")
        patch_size = int(patch_size or 16)
        grid = _pos_embed_grid(state_dict)
        trained_img_size = grid * patch_size if grid else stored.get("global_crops_size")
        if img_size is None:
            img_size = int(trained_img_size or 224)
        elif grid and img_size // patch_size != grid:
            new_grid = img_size // patch_size
            state_dict = dict(state_dict)
            state_dict["pos_embed"] = vits.interpolate_pos_embed(  # DINO's, as in training
                state_dict["pos_embed"], (new_grid, new_grid))
            notes.append(f"pos_embed resampled from {grid}x{grid} to {new_grid}x{new_grid}")
    try:
        model, feature_dim = vits.build_backbone(arch, patch_size or 16, img_size=img_size or 224)
    except vits.UnknownArchError as e:
        raise UserError(str(e)) from e
    try:
        load_backbone_state_dict(model, state_dict, source=f"{path} ('{checkpoint_key}')")
    except UserError as e:
        if "arch" in stored:
            raise UserError(f"{e} The checkpoint was trained with --arch {stored['arch']} "
                            f"--patch_size {stored.get('patch_size', '?')}.") from e
        raise
    info = {"path": str(path), "checkpoint_key": checkpoint_key, "arch": arch,
            "patch_size": patch_size, "img_size": img_size, "feature_dim": feature_dim,
            "weights_sha256": state_dict_sha256(model.state_dict()), "args": args, "notes": notes}
    return model, feature_dim, info


# --------------------------------------------------------------------------- metrics


class MetricMeter:
    """Running sums of named per-step scalars, for a log window and for the epoch.

    ``update(loss=..., lr=...)`` once per step; ``window_means()`` averages the steps since
    the last ``reset_window()`` (this rank); ``epoch_means(device)`` averages the epoch over
    all steps and all ranks (collective). ``state_dict`` holds the epoch sums, so a run
    resumed mid-epoch reports the same epoch means as one that was never stopped.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self._window: dict[str, float] = {}
        self._window_count = 0

    def update(self, **values: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self._window[key] = self._window.get(key, 0.0) + float(value)
        self.count += 1
        self._window_count += 1

    @property
    def window_count(self) -> int:
        return self._window_count

    def window_means(self) -> dict[str, float]:
        return {k: v / max(self._window_count, 1) for k, v in self._window.items()}

    def reset_window(self) -> None:
        self._window, self._window_count = {}, 0

    def epoch_means(self, device: torch.device) -> dict[str, float]:
        keys = sorted(self.sums)
        totals = torch.tensor([self.sums[k] for k in keys] + [self.count], dtype=torch.float64,
                              device=device)
        if is_dist():
            dist.all_reduce(totals)
        values = totals.tolist()
        return {k: v / max(values[-1], 1) for k, v in zip(keys, values[:-1])}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.count = dict(state["sums"]), int(state["count"])
