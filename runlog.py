"""What a training run reports: the console lines, TensorBoard scalars and ``log.txt``
(``RunLog``), the per-step scalars summed over a log window and an epoch (``MetricMeter``),
and the time spent waiting for data (``TimedIterator``)."""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

import distributed
import storage
from distributed import is_dist
from monitor import CollapseDetector, format_health

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


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class RunLog:
    """The console lines, TensorBoard scalars and ``log.txt`` of a run (main rank only)."""

    def __init__(self, args: argparse.Namespace, env: distributed.DistEnv, output_dir: Path,
                 steps_per_epoch: int):
        self.is_main, self.epochs, self.steps_per_epoch = env.is_main, args.epochs, steps_per_epoch
        self.print_freq = args.print_freq
        self.output_dir = output_dir
        self.writer = None
        self.run_start = self.window_start = time.time()
        self.first_global_step = 0
        # Collapse warnings: the detector runs on every rank (it sees the same values on
        # all); the epoch's warnings also go into its log.txt line.
        self.detector = CollapseDetector() if args.health_metrics else None
        self.epoch_warnings: list[str] = []
        self.checkpoints = storage.BackgroundWriter()  # checkpoint.pth, written in the background

    def __call__(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def open_tensorboard(self, start_step: int) -> None:
        self.first_global_step = start_step
        if not self.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("warning: tensorboard is not installed: no TensorBoard logs "
                  "(pip install tensorboard)", file=sys.stderr, flush=True)
            return
        self.writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"),
                                    purge_step=start_step)

    def close(self) -> None:
        """Finish the checkpoint write in flight (every exit passes here), then TensorBoard."""
        try:
            self.checkpoints.wait()
        finally:
            if self.writer is not None:
                self.writer.close()

    def step(self, epoch: int, step: int, global_step: int, meter: MetricMeter,
             health: MetricMeter, epoch_start: float, first_step: int,
             n_tensors: int) -> None:
        """One console line (and TensorBoard scalars) for the steps since the last one, and
        one with the health metrics of this step when it computed them."""
        now = time.time()
        values = meter.window_means()
        health_values = health.window_means()
        elapsed = now - self.window_start
        sec_per_step = elapsed / max(meter.window_count, 1)
        values["images_per_sec"] = values.pop("images", 0.0) / max(sec_per_step, 1e-9)
        eta_epoch = (now - epoch_start) / (step - first_step) * (self.steps_per_epoch - step)
        eta_total = (now - self.run_start) / (global_step - self.first_global_step) * (
            self.epochs * self.steps_per_epoch - global_step)
        losses = f"loss {values['loss']:.4f}"
        if "koleo" in values:
            losses += f" (massl {values['massl']:.4f} koleo {values['koleo']:.4f})"
        width = len(str(self.steps_per_epoch))
        self(f"Epoch [{epoch + 1}/{self.epochs}] it [{step:>{width}}/{self.steps_per_epoch}]  "
             f"{losses}  lr {values['lr']:.3e}  wd {values['wd']:.4f}  "
             f"mom {values['momentum']:.5f}  t_temp {values['teacher_temp']:.4f}  "
             f"{values['images_per_sec']:.1f} img/s  {sec_per_step:.3f} s/it "
             f"(data {values.pop('data_s'):.3f})  "
             f"ETA {format_seconds(eta_epoch)} epoch, {format_seconds(eta_total)} total")
        if health_values:
            self(format_health(health_values, n_tensors))
        if self.detector is not None:
            for warning in self.detector.update(health_values):
                self(f"{warning} [epoch {epoch + 1} it {step}]")
                self.epoch_warnings.append(warning)
        if self.writer is not None:
            for key, value in {**values, **health_values}.items():
                self.writer.add_scalar(f"train/{key}", value, global_step)
        meter.reset_window()
        health.reset_window()
        self.window_start = now

    def epoch_scalars(self, entry: dict[str, Any]) -> None:
        """The epoch's means to TensorBoard."""
        if self.writer is not None:
            for key, value in entry.items():
                if key.startswith("train_"):
                    self.writer.add_scalar(f"epoch/{key[len('train_'):]}", value, entry["epoch"])
                elif key.startswith("knn_"):
                    self.writer.add_scalar(f"knn/{key[len('knn_'):]}", value, entry["epoch"])
            self.writer.flush()

    def append_log_line(self, entry: dict[str, Any]) -> None:
        """The epoch's JSON line to log.txt (main rank)."""
        if self.is_main:
            storage.append_line(self.output_dir / "log.txt", json.dumps(entry))


class TimedIterator:
    """Wraps the loader's iterator, adds up the time spent waiting for batches and turns each
    batch into the step's crop list (``TrainingData.crops``: on the device with
    ``--augment_on device``, outside the timed wait)."""

    def __init__(self, iterator: Iterator[Any], to_crops: Callable[[Any], list[Any]]):
        self.iterator, self.to_crops, self.wait = iterator, to_crops, 0.0

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self) -> list[Any]:
        t = time.time()
        batch = next(self.iterator)
        self.wait += time.time() - t
        return self.to_crops(batch)

    def pop_wait(self) -> float:
        wait, self.wait = self.wait, 0.0
        return wait
