"""A run's output folder: its lock, checkpoint.pth (written atomically, in the background)
and what a restarted run reads back from it (``resume``: where to start, exactly)."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import checkpoints
import distributed
import storage
import utils
from runlog import MetricMeter, RunLog
from trainer import MaSSLTrainer

# Settings a checkpoint must share with the run resuming it (the weights' shapes): the name
# in ``args`` -> the command-line flag (``--out_dim`` is the authors' name for the memory size).
RESUME_MUST_MATCH = {"arch": "arch", "patch_size": "patch_size", "memory_size": "out_dim",
                     "bottleneck_dim": "bottleneck_dim", "use_bn_in_head": "use_bn_in_head",
                     "global_crops_size": "global_crops_size"}
CHECKPOINT_KEYS = ("student", "teacher", "optimizer", "memory", "epoch", "images_per_step",
                   "epoch_images_done")


@dataclass
class ResumePoint:
    """Where a run starts: epoch, optimizer step and first image (per rank) within it, and
    the epoch's partial metrics when it starts mid-epoch."""
    epoch: int = 0
    step: int = 0
    sample: int = 0
    meter: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    epoch_time_s: float = 0.0


def load_checkpoint(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A training checkpoint that this run can resume from (``UserError`` otherwise)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated/corrupt file, not a checkpoint, ...
        raise utils.UserError(f"cannot load checkpoint: {checkpoints.checkpoint_load_error(path, e)}"
                              ) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise utils.UserError(f"{path} is not a MaSSL training checkpoint (no {', '.join(missing)})")
    saved = ckpt.get("args", {})
    for key, flag in RESUME_MUST_MATCH.items():
        value = saved.get(key, saved.get(flag))  # args saved before the rename used the flag's
        if value is not None and value != getattr(args, key):
            raise utils.UserError(
                f"{path} was trained with --{flag} {value}, this run has --{flag} "
                f"{getattr(args, key)}: use a new --output_dir or the same settings")
    return ckpt


def prepare_output_dir(output_dir: Path) -> storage.FolderLock:
    """Create ``--output_dir``, prove it writable, lock it for this run (a second run into it
    stops with an error naming the first), then drop temporary files a killed save left
    behind (only once locked: until then they could be another run's save in progress)."""
    storage.check_writable_dir(output_dir)
    lock = storage.FolderLock(output_dir)
    lock.acquire()
    for stale in output_dir.glob(".checkpoint*.pth.*.tmp"):
        stale.unlink(missing_ok=True)
    return lock


def remove_if_unused(output_dir: Path) -> None:
    """Remove ``output_dir`` if it holds nothing but our lock file (the run created it)."""
    try:
        if {p.name for p in output_dir.iterdir()} <= {storage.FolderLock.NAME}:
            (output_dir / storage.FolderLock.NAME).unlink(missing_ok=True)
            output_dir.rmdir()
    except OSError:
        pass  # someone else is using it now: leave it


def check_resume_file(args: argparse.Namespace, output_dir: Path) -> None:
    """Refuse a ``--resume`` that is missing or cannot be a checkpoint, before any folder is
    made (it is only used when ``output_dir`` has no checkpoint.pth yet)."""
    if not args.resume or (output_dir / "checkpoint.pth").exists():
        return
    source = Path(args.resume)
    if not source.is_file():
        raise utils.UserError(f"--resume {source} does not exist" if not source.exists()
                              else f"--resume {source} is not a file")
    problem = checkpoints.checkpoint_file_problem(source)
    if problem is not None:
        raise utils.UserError(f"cannot load checkpoint: --resume {source} {problem}")


def save_checkpoint(trainer: MaSSLTrainer, output_dir: Path, epoch: int, step: int,
                    rank_state: dict[str, Any], numbered: bool = False,
                    log_entry: dict[str, Any] | None = None,
                    writer: storage.BackgroundWriter | None = None,
                    then: Callable[[], None] | None = None) -> None:
    """Atomically write checkpoint.pth (and checkpointNNNN.pth) on rank 0; collective.

    ``epoch`` epochs and ``step`` optimizer steps of the next one are done; ``rank_state``
    (``epoch_state``: e.g. the partial epoch's metrics) travels per rank so a resumed epoch
    reports the same means. ``then`` runs on rank 0 once the files are in place.

    With ``writer`` the files are written in its background thread: this waits for the
    previous write, copies the state to CPU memory and returns while the write goes on
    (the other ranks do not wait for it either). Each file still appears by an atomic
    rename, so a kill mid-write leaves the previous checkpoint; ``writer.wait()`` (RunLog's
    close, on every exit) finishes it."""
    ckpt = trainer.state_dict(rank_state)
    ckpt.update(epoch=epoch, iteration=step, epoch_images_done=step * trainer.images_per_step)
    if log_entry is not None:
        ckpt["log_entry"] = json.dumps(log_entry)  # a string: weights_only-safe
    if trainer.env.is_main:
        paths = [output_dir / "checkpoint.pth"]
        if numbered:
            paths.append(output_dir / f"checkpoint{epoch:04d}.pth")

        def write(state: dict[str, Any]) -> None:
            for path in paths:
                storage.save_atomic(state, path)
            if then is not None:
                then()

        if writer is None:
            write(ckpt)
        else:
            writer.wait()  # one checkpoint in host memory at a time
            state = storage.cpu_copy(ckpt)
            writer.submit(lambda: write(state))
    distributed.barrier()


def resume(trainer: MaSSLTrainer, args: argparse.Namespace, output_dir: Path,
           log: RunLog) -> ResumePoint:
    """Load ``output_dir/checkpoint.pth`` (else ``--resume``) into ``trainer``; where to start.

    A checkpoint saved mid-epoch resumes at the first image not yet trained on, also when
    the global batch changed since (the epoch then finishes with the new number of steps).
    """
    ckpt_path = output_dir / "checkpoint.pth"
    source = ckpt_path if ckpt_path.exists() else (Path(args.resume) if args.resume else None)
    if source is not None and not source.exists():
        raise utils.UserError(f"--resume {source} does not exist")
    found = distributed.all_reduce_max([float(source is not None)], trainer.device)[0]
    if found != float(source is not None):
        raise utils.UserError(f"{ckpt_path} is visible on some ranks only: --output_dir must be "
                              "on a filesystem shared by all nodes")
    if source is None:
        return ResumePoint()
    ckpt = load_checkpoint(source, args)
    rank_state = trainer.load_state_dict(ckpt, source=str(source))
    epoch, spe = int(ckpt["epoch"]), trainer.steps_per_epoch
    saved_step = int(ckpt.get("iteration", 0))
    saved_per_step = int(ckpt["images_per_step"])
    done = int(ckpt["epoch_images_done"])
    world, step_samples = trainer.env.world_size, args.batch_size_per_gpu * trainer.accum
    sample = done // world  # the first images of an epoch's order, whatever the world size
    steps_left = max(spe * step_samples - sample, 0) // step_samples
    point = ResumePoint(epoch=epoch, step=spe - steps_left, sample=sample)
    if steps_left == 0 or done == 0:
        point = ResumePoint(epoch=epoch + (done > 0))
    elif saved_per_step != trainer.images_per_step:
        log(f"note: {source} was saved after {done} images of epoch {epoch + 1} at "
            f"{saved_per_step} images per step; this run takes {trainer.images_per_step}: it "
            f"goes on from image {done} with the remaining {steps_left} steps of the epoch "
            "(no image replayed or skipped; schedules continue from step "
            f"{epoch * spe + point.step})")
    if rank_state is None:
        log(f"note: {source} was saved by {len(ckpt.get('rank_states', []))} processes, this run "
            f"has {world}: random streams are reseeded, so the run will not replay exactly")
    elif log.detector is not None and "collapse" in rank_state:
        log.detector.load_state_dict(rank_state["collapse"])
    if rank_state is not None and point.step > 0:
        point.meter = rank_state.get("meter") or {}
        point.health = rank_state.get("health") or {}
        point.warnings = list(rank_state.get("warnings") or [])
        point.epoch_time_s = float(rank_state.get("epoch_time_s", 0.0))
    trainer.global_step = point.epoch * spe + point.step
    if trainer.env.is_main and "log_entry" in ckpt:
        restore_log_line(output_dir / "log.txt", json.loads(ckpt["log_entry"]))
    log(f"resumed from {source}: {epoch} epochs" + (f" + {saved_step} steps" if saved_step else "")
        + " done")
    return point


def restore_log_line(path: Path, entry: dict[str, Any]) -> None:
    """Append the checkpoint's last epoch line to log.txt unless it is there already (a run
    killed between saving the checkpoint and writing log.txt)."""
    logged = set()
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                logged.add(json.loads(line).get("epoch"))
            except (ValueError, AttributeError):
                continue
    if entry.get("epoch") not in logged:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def epoch_state(meter: MetricMeter | None, health: MetricMeter | None,
                epoch_time_s: float, log: RunLog) -> dict[str, Any]:
    """What each rank saves of the run's progress besides the training state: the partial
    epoch's metric sums (mid-epoch), and the collapse detector's streaks, so a resumed run
    reports the same epoch means and warnings as one that was never stopped."""
    state: dict[str, Any] = {}
    if meter is not None:
        state.update(meter=meter.state_dict(), epoch_time_s=epoch_time_s,
                     warnings=list(log.epoch_warnings))
    if health is not None:
        state["health"] = health.state_dict()
    if log.detector is not None:
        state["collapse"] = log.detector.state_dict()
    return state
