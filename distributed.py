"""Distributed set-up that works with no launcher, ``torchrun`` or SLURM; the small rank and
collective helpers; the stop-signal handler and the message for a lost peer process."""
from __future__ import annotations

import datetime
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from utils import UserError, exception_chain, first_line

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
            f"{world_size}): {first_line(e)} Did every task of the job start (SLURM_NTASKS / "
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
    text = " ".join(str(e) for e in exception_chain(exc)).lower()
    if not (isinstance(exc, dist_error) or
            (isinstance(exc, RuntimeError) and any(w in text for w in _LOST_PEER_WORDS))):
        return None
    return (f"rank {rank_from_env()} of {world_size_from_env()}: lost contact with the other "
            f"processes ({first_line(exc)[:160]}): another rank died or stalled (the launcher's "
            f"report names it). The last checkpoint in {output_dir} is intact: run the same "
            "command again to resume")
