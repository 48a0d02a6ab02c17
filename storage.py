"""Writes that never leave half a file (``atomic_path``, ``save_atomic``, ``write_json``),
background checkpoint writes, clear errors for a full disk, and the lock that keeps two runs
out of one output folder (``FolderLock``)."""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from utils import UserError, exception_chain, first_line

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



def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # AttributeError: no statvfs on Windows
        return None
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def _write_failure(exc: BaseException, path: Path) -> UserError | None:
    """A ``UserError`` for a write to ``path`` that failed for lack of space, else None."""
    chain = exception_chain(exc)
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
                  f"the write failed part-way ({first_line(exc)}; disk full, over quota, or an "
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
