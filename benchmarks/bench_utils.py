"""Timing and memory helpers shared by the benchmark scripts.

GPU: CUDA events around the timed call, ``torch.cuda.max_memory_allocated`` for the peak.
CPU: ``time.perf_counter`` and the growth of the peak resident set size (/proc's
``VmHWM``) in a fresh subprocess per variant, so no variant inherits another's high-water
mark or allocator cache.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # flat project: the benchmarks import the top-level modules
    sys.path.insert(0, str(REPO_ROOT))

from utils import UserError  # noqa: E402


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, one per core). On a "
                             "machine shared with other jobs, 1 gives steadier CPU figures")


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by ``fn()``; on CUDA measured with events after a synchronize."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved_times(variants: dict[str, Callable[[], object]], device: torch.device,
                      repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time every variant ``repeats`` times, alternating variants within each round.

    Alternating matters on a shared machine: a burst of load from another process then
    slows both sides of a comparison alike instead of only one.
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(time_call(fn, device))
    return times


def paired_ratio(slow: Sequence[float], fast: Sequence[float]) -> float:
    """Median over rounds of slow/fast: each round's two timings saw the same load."""
    return statistics.median(s / f for s, f in zip(slow, fast))


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak CUDA memory allocated by ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _proc_status_bytes(field: str) -> int | None:
    """``VmHWM``/``VmRSS`` of this process from /proc (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Start a fresh peak-RSS window; returns the baseline to subtract from ``peak_rss_bytes``.

    On Linux, writing 5 to /proc/self/clear_refs resets the high-water mark to the current
    RSS. Elsewhere (or if that fails) the baseline is the peak so far: ``ru_maxrss`` only
    grows, and a child started by ``subprocess`` begins with its parent's value, which is
    why we read /proc's per-process ``VmHWM`` where we can.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_bytes("VmRSS") or 0
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``, else ``ru_maxrss``)."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def run_child(script: str, argv: Sequence[str]) -> dict:
    """Run ``python script *argv`` and parse the JSON object on its last stdout line."""
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True,
                          cwd=str(REPO_ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"child {' '.join(argv)} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_result(payload: dict) -> None:
    """The last stdout line of a measuring child (read back by ``run_child``)."""
    print(json.dumps(payload), flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> str:
    """One line naming the hardware and software a figure was measured with."""
    if device.type == "cuda":
        hw = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        hw = (f"CPU-only: {cpu_name()}, {os.cpu_count()} cores visible, "
              f"{torch.get_num_threads()} torch threads")
    return (f"device: {hw} | torch {torch.__version__} | "
            f"date {datetime.date.today().isoformat()}")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_seconds(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"
