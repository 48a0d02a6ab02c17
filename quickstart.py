"""Quick start: from nothing to a trained MaSSL model and a k-NN score, within ten minutes.

    python quickstart.py                 # the whole command within --minutes (default 10)

1. writes Fashion-MNIST (Debian's full set if installed, else the 10k split shipped in
   ``data/fashion_mnist/``) once as an ImageFolder (``train/<class>/*.png``, ``val/<class>/*.png``,
   fixed class-balanced split) into a cache folder;
2. times a few real training steps of the preset on this machine (and the evaluation's speed)
   and turns the ``--minutes`` budget into a number of epochs: a slower machine trains fewer
   epochs instead of taking longer (``plan_epochs``; printed as ``plan: ...``);
3. pretrains MaSSL on its ``train/`` images with ``main_massl.py``, printing a ``progress:``
   line with the whole command's ETA after each epoch;
4. runs ``eval_knn.py`` on the trained teacher and on a randomly initialised backbone of the same
   architecture (the baseline the gain is measured against);
5. ends with one line: ``k-NN top-1 (k=20): trained XX.X% | random init YY.Y% | gain +Z.Z points | N min``
   (N: the whole command's wall time).

Steps 3 and 4 run the training and evaluation scripts as subprocesses, with exactly the
command lines an ImageNet user runs (they are printed). Everything of the run (checkpoints,
log.txt, TensorBoard events, k-NN results, ``plan.json``, ``results.json``, ``quickstart.log``)
goes into one run folder, named at the end. Running again with the same ``--output_dir``
resumes a run that was interrupted (with the epochs its first plan fixed) and only re-evaluates
a finished one.

Presets: ``cpu`` (a 0.8M-parameter ViT on 5,000 images, KoLeo off; see the README's sweep table),
``gpu`` (bigger model, all images; chosen automatically when CUDA is available) and ``smoke``
(a few hundred images, one epoch: seconds; used by the tests).
"""
from __future__ import annotations

import time

PROCESS_START = time.time()  # before the heavy imports (torch): the command's wall time counts them

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, TextIO  # noqa: E402

import distributed  # noqa: E402
import fashion_mnist  # noqa: E402
import storage  # noqa: E402
import utils  # noqa: E402
from device_augment import AUGMENT_ON  # noqa: E402

IMPORTS_DONE = time.time()

REPO = Path(__file__).resolve().parent
KNN_K = 20
DEFAULT_MINUTES = 10.0

# Each preset: how much data, the most epochs the time budget may plan, then main_massl.py
# flags (the plan adds --epochs). The cpu preset was tuned on 2 CPU cores without KoLeo
# (benchmarks/sweep_quickstart.py; README, "What makes it learn, without KoLeo"). "max_epochs" keeps a fast machine from stretching a small preset into a run nobody
# measured (a GPU would otherwise plan hundreds of epochs of the cpu preset): about 3x the
# epochs a 2-core machine fits into 10 minutes for cpu, the preset's schedule for gpu.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "train_per_class": 500, "val_per_class": 200, "max_epochs": 30,
        "train": {
            "arch": "vit_pico", "patch_size": 7, "global_crops_size": 28, "local_crops_size": 14,
            "local_crops_number": 4, "global_crops_scale": (0.6, 1.0),
            "local_crops_scale": (0.25, 0.6), "batch_size_per_gpu": 128,
            "lr": 2e-3, "min_lr": 1e-5, "warmup_epochs": 1, "weight_decay": 0.04,
            "weight_decay_end": 0.1, "drop_path_rate": 0.0, "out_dim": 2048,
            "partition_size": 512, "teacher_temp": 0.05, "warmup_teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 1, "momentum_teacher": 0.98, "use_fp16": False,
            "koleo_loss_weight": 0.0, "use_bn_in_head": True, "num_workers": 1,
            "print_freq": 13, "saveckp_freq": 0,
        },
    },
    # Not measured by us (no GPU at hand when this was written): a plausible bigger preset,
    # with what the cpu preset's sweep found makes 28 px runs learn without KoLeo (BN head,
    # milder crops).
    "gpu": {
        "train_per_class": None, "val_per_class": 200, "max_epochs": 100,
        "train": {
            "arch": "vit_tiny", "patch_size": 4, "global_crops_size": 28, "local_crops_size": 14,
            "local_crops_number": 6, "global_crops_scale": (0.6, 1.0),
            "local_crops_scale": (0.25, 0.6), "batch_size_per_gpu": 256,
            "lr": 1e-3, "min_lr": 1e-6, "warmup_epochs": 10, "weight_decay": 0.04,
            "weight_decay_end": 0.4, "drop_path_rate": 0.1, "out_dim": 8192,
            "partition_size": 2048, "teacher_temp": 0.05, "warmup_teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 10, "momentum_teacher": 0.99, "use_fp16": True,
            "koleo_loss_weight": 0.0, "use_bn_in_head": True, "num_workers": 8,
            "print_freq": 50, "saveckp_freq": 50,
        },
    },
    # For tests: 300 train / 100 val images, always one epoch (max_epochs 1; the budget only
    # matters when it is too small). Shows the plumbing works, learns nothing.
    "smoke": {
        "train_per_class": 30, "val_per_class": 10, "max_epochs": 1,
        "train": {
            "arch": "vit_nano", "patch_size": 7, "global_crops_size": 28, "local_crops_size": 14,
            "local_crops_number": 2, "global_crops_scale": (0.32, 1.0),
            "local_crops_scale": (0.05, 0.32), "batch_size_per_gpu": 32,
            "lr": 2e-3, "min_lr": 1e-5, "warmup_epochs": 0, "weight_decay": 0.04,
            "weight_decay_end": 0.04, "drop_path_rate": 0.0, "out_dim": 128,
            "partition_size": 64, "teacher_temp": 0.05, "warmup_teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 0, "momentum_teacher": 0.98, "use_fp16": False,
            "num_workers": 0, "print_freq": 5, "saveckp_freq": 0,
        },
    },
}

# The pretraining prints k-NN accuracy after every epoch (main_massl.py's online k-NN,
# --knn_freq 1) on a fixed class-balanced subset, small so it costs a few seconds; the plan
# charges each epoch PER_EPOCH_KNN_IMAGES x the measured evaluation time per image. The final
# line's numbers come from eval_knn.py on every image.
ONLINE_KNN_TRAIN, ONLINE_KNN_VAL = 2000, 1000
PER_EPOCH_KNN_IMAGES = ONLINE_KNN_TRAIN + ONLINE_KNN_VAL

# Share of the time left for training that the plan holds back: step times drift (other
# processes, the first epoch's warm-up, checkpoint saves) and the start-up and evaluation
# estimates are rough. Measured (2026-12-06, cpu preset): whole epochs with their online k-NN
# took 8% (2 cores) and 12% (1 core) longer than the timed steps predicted, so 10% left no
# room for a busier machine.
SAFETY_FRACTION = 0.2
# Timing: 1 untimed warm-up step (allocation, loader start), then at least MIN_TIMED_STEPS and
# until MIN_TIMED_S have passed, at most one epoch's steps (a few seconds on any machine).
MIN_TIMED_STEPS = 3
MIN_TIMED_S = 5.0
# Images of the evaluation timing (1 warm-up batch + 2 timed, as eval_knn.py batches them).
EVAL_BATCH = 128


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "quickstart.py", description=__doc__, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None, help="""Run folder (pretraining
        checkpoints and logs, k-NN results, plan.json, results.json, quickstart.log). Default:
        runs/quickstart/<date-time> in the repo. An existing run folder is resumed.""")
    parser.add_argument("--data_dir", default=None, help="""Cache folder for the Fashion-MNIST
        ImageFolder, written once and reused. Default: ~/.cache/massl/fashion_mnist
        (or $XDG_CACHE_HOME/massl/fashion_mnist).""")
    parser.add_argument("--fashion_mnist_source", default=None, help="""Folder with the
        Fashion-MNIST *-ubyte.gz files. Default: Debian's full set in
        /usr/share/datasets/fashion-mnist when installed, else the 10k split shipped in
        data/fashion_mnist.""")
    parser.add_argument("--preset", default="auto", choices=["auto", *PRESETS], help="""Model,
        data and schedule: 'cpu' (a small ViT for CPUs), 'gpu' (bigger model, all images;
        untested), 'smoke' (one epoch, seconds; checks the plumbing only). Default 'auto':
        gpu when the device is CUDA, else cpu.""")
    caps = ", ".join(f"{p['max_epochs']} for {name}" for name, p in PRESETS.items())
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help=f"""Time budget
        of the whole command (data, timing, pretraining, both evaluations) in minutes. A few
        training steps are timed on this machine first and the pretraining gets as many
        epochs as fit (at least 1, at most the preset's max_epochs: {caps}). A resumed run
        keeps the epochs of its first plan.""")
    parser.add_argument("--epochs", type=int, default=None, help="""Pretraining epochs,
        instead of the budget's plan: the time budget is then not enforced (the plan line
        still says how long the run should take).""")
    parser.add_argument("--device", default=None, help="""'cpu' or 'cuda' (default: cuda when
        available, else cpu), passed to both scripts.""")
    parser.add_argument("--augment_on", default="workers", choices=list(AUGMENT_ON), help="""Where
        the crops are made, passed to main_massl.py: 'workers' (PIL in the loader workers,
        the default) or 'device' (the same crops made in batches on the training device).""")
    return parser


def default_data_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "massl" / "fashion_mnist"


def check_budget_args(args: argparse.Namespace) -> None:
    if args.epochs is not None and args.epochs < 1:
        raise utils.UserError("--epochs must be >= 1")
    if not args.minutes > 0:  # also refuses nan
        raise utils.UserError(f"--minutes must be > 0, got {args.minutes}")


# --------------------------------------------------------------------------- time budget


@dataclass
class Calibration:
    """This machine's speed, measured on the preset's real model and data (``calibrate``)."""
    step_s: float         # one training step, steady state, data loading included
    first_step_s: float   # the untimed warm-up step (allocations, loader start)
    timed_steps: int
    steps_per_epoch: int
    eval_image_s: float   # evaluation: one image read, transformed and embedded
    import_s: float       # python + torch + the scripts' modules: what each script pays first
    setup_s: float        # listing the images and building the model
    seconds: float        # the whole measurement (counted in the budget)

    @property
    def startup_s(self) -> float:
        """Estimated start-up of one training or evaluation script, before its real work."""
        return self.import_s + self.setup_s

    def eval_s(self, n_images: int) -> float:
        """Estimated wall time of one ``eval_knn.py`` run over ``n_images`` images."""
        return self.startup_s + n_images * self.eval_image_s

    def fixed_s(self, n_eval_images: int) -> float:
        """Everything but the epochs still to come: the training script's start-up and first
        (warm-up) step, and the two k-NN evaluations."""
        return (self.startup_s + max(self.first_step_s - self.step_s, 0.0)
                + 2 * self.eval_s(n_eval_images))


@dataclass
class Plan:
    """How many epochs the pretraining gets, and what the whole command should take."""
    epochs: int
    steps_per_epoch: int
    step_s: float
    epoch_s: float        # one epoch: steps x step_s + its per-epoch evaluation
    epoch_eval_s: float   # per-epoch online k-NN (PER_EPOCH_KNN_IMAGES; 0 when off)
    fixed_s: float        # start-ups and the final evaluations (Calibration.fixed_s)
    elapsed_s: float      # spent before training: data, imports, the timing itself
    budget_s: float
    max_epochs: int
    fit_epochs: int       # epochs that fit the budget (before the 1-epoch floor and the cap)
    enforced: bool        # False: --epochs chose the epochs

    @property
    def train_s(self) -> float:
        return self.epochs * self.epoch_s

    @property
    def total_s(self) -> float:
        """Estimated wall time of the whole command."""
        return self.elapsed_s + self.fixed_s + self.train_s

    @property
    def capped(self) -> bool:
        return self.enforced and self.fit_epochs > self.max_epochs

    @property
    def over_budget(self) -> bool:
        """Even the planned epochs (1 when nothing fits) are expected to overrun the budget."""
        return self.total_s > self.budget_s

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "train_s": self.train_s, "total_s": self.total_s,
                "capped": self.capped, "over_budget": self.over_budget}


def plan_epochs(*, budget_s: float, elapsed_s: float, step_s: float, steps_per_epoch: int,
                fixed_s: float, max_epochs: int, epoch_eval_s: float = 0.0,
                epochs: int | None = None) -> Plan:
    """As many epochs as fit ``budget_s`` once ``elapsed_s`` and ``fixed_s`` are paid and
    SAFETY_FRACTION of the rest is held back; at least 1 (``over_budget`` then says it will
    overrun), at most ``max_epochs``. ``epochs`` (--epochs) overrides the budget."""
    epoch_s = steps_per_epoch * step_s + epoch_eval_s
    left = max(budget_s - elapsed_s - fixed_s, 0.0) * (1 - SAFETY_FRACTION)
    fit = math.floor(left / epoch_s) if epoch_s > 0 else max_epochs
    chosen = epochs if epochs is not None else min(max(fit, 1), max_epochs)
    return Plan(epochs=chosen, steps_per_epoch=steps_per_epoch, step_s=step_s, epoch_s=epoch_s,
                epoch_eval_s=epoch_eval_s, fixed_s=fixed_s, elapsed_s=elapsed_s,
                budget_s=budget_s, max_epochs=max_epochs, fit_epochs=fit,
                enforced=epochs is None)


def n_epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def plan_lines(plan: Plan) -> list[str]:
    """The plan as printed before training: the plan line, then any warning."""
    minutes = plan.budget_s / 60
    line = (f"plan: {n_epochs(plan.epochs)} of {plan.steps_per_epoch} steps, about "
            f"{plan.train_s / 60:.1f} minutes of training "
            f"(measured {plan.step_s:.3g} s/step on this machine); whole command about "
            f"{plan.total_s / 60:.1f} of {minutes:g} minutes")
    lines = [line]
    if not plan.enforced:
        lines.append(f"      --epochs {plan.epochs} given: the {minutes:g}-minute budget is not "
                     "enforced")
    elif plan.over_budget:
        lines.append(f"warning: even 1 epoch overruns the {minutes:g}-minute budget on this "
                     f"machine: training 1 epoch anyway (about {plan.total_s / 60:.1f} minutes "
                     "in all); raise --minutes, or use a faster machine")
    elif plan.capped:
        lines.append(f"      capped at the preset's {n_epochs(plan.max_epochs)} (the budget would "
                     f"fit {plan.fit_epochs}): this machine finishes early")
    return lines


def calibrate(train_options: dict[str, Any], data_dir: Path, device: str) -> Calibration:
    """Time real training steps of the preset (main_massl.py's dataset, loader and
    ``MaSSLTrainer.train_step``) and the evaluation's per-image cost, in this process."""
    start = time.time()
    import torch  # noqa: F401  (already imported by utils)
    import evaluation
    import main_massl
    from data import (build_pretrain_dataset, build_pretrain_transform, build_training_data,
                      shutdown_loader_workers)
    from trainer import MaSSLTrainer
    import_s = (IMPORTS_DONE - PROCESS_START) + (time.time() - start)

    setup_start = time.time()
    args = main_massl.build_cli_parser().parse_args(
        [*to_flags(train_options), "--data_path", str(data_dir / "train"), "--output_dir", "-",
         "--device", device])
    main_massl.check_args(args, world_size=1)
    dataset = build_pretrain_dataset(args.data_path, build_pretrain_transform(args))
    train_data = build_training_data(args, dataset, world_size=1, rank=0,
                                     device=torch.device(device))
    steps_per_epoch, accum = train_data.steps_per_epoch, args.gradient_accumulation
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    trainer = MaSSLTrainer(args, env, steps_per_epoch, log=lambda message: None)
    sampler, loader = train_data.sampler, train_data.loader
    setup_s = time.time() - setup_start

    def crops_forever():
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            for batch in loader:
                yield train_data.crops(batch)

    def sync() -> None:
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)

    batches = crops_forever()
    try:
        t = time.time()
        trainer.train_step(itertools.islice(batches, accum))
        sync()
        first_step_s = time.time() - t
        t, n = time.time(), 0
        while n < MIN_TIMED_STEPS or (time.time() - t < MIN_TIMED_S and n < steps_per_epoch):
            trainer.global_step = 0  # within the schedules, whatever the number of epochs
            trainer.train_step(itertools.islice(batches, accum))
            n += 1
        sync()
        step_s = (time.time() - t) / n
    finally:
        batches.close()
        shutdown_loader_workers(loader)

    # Evaluation: eval_knn.py's transform and batches through the backbone, reading included.
    size = args.global_crops_size
    transform = evaluation.eval_transform(size, size)
    _, val_set = evaluation.build_train_val(str(data_dir), transform, transform)
    n_eval = min(len(val_set), 3 * EVAL_BATCH)
    eval_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(val_set, range(n_eval)),
                                              batch_size=EVAL_BATCH, num_workers=0)
    backbone = trainer.teacher.backbone.eval()
    timed_images, t = 0, time.time()
    with torch.no_grad():
        for i, (images, _) in enumerate(eval_loader):
            backbone(images.to(env.device))
            sync()
            if i == 0 and n_eval > EVAL_BATCH:  # the first batch warms up
                t = time.time()
            else:
                timed_images += images.shape[0]
    eval_image_s = (time.time() - t) / max(timed_images, 1)
    del trainer, backbone
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
    return Calibration(step_s=step_s, first_step_s=first_step_s, timed_steps=n,
                       steps_per_epoch=steps_per_epoch, eval_image_s=eval_image_s,
                       import_s=import_s, setup_s=setup_s, seconds=time.time() - start)


class Progress:
    """After each ``Epoch [e/N] done`` line of main_massl.py: a line with the whole
    command's ETA (epochs left x the epoch time seen so far, then the evaluations)."""

    DONE = re.compile(r"^Epoch \[(\d+)/(\d+)\] done: .*?(\d+(?:\.\d+)?) s, checkpoint saved")

    def __init__(self, start: float, plan: Plan, evals_s: float):
        self.start, self.plan, self.evals_s = start, plan, evals_s
        self.done_at: list[float] = []

    def __call__(self, line: str) -> str | None:
        match = self.DONE.match(line)
        if not match:
            return None
        now = time.time()
        self.done_at.append(now)
        epoch, epochs, epoch_time = int(match[1]), int(match[2]), float(match[3])
        if len(self.done_at) >= 2:  # wall clock between epochs: saves, evaluations included
            per_epoch = (self.done_at[-1] - self.done_at[0]) / (len(self.done_at) - 1)
        else:
            per_epoch = epoch_time + self.plan.epoch_eval_s
        left = (epochs - epoch) * per_epoch + self.evals_s
        elapsed = now - self.start
        budget = (f" of {self.plan.budget_s / 60:g}" if self.plan.enforced else "")
        return (f"progress: epoch {epoch}/{epochs} done at {elapsed / 60:.1f} min; ETA "
                f"{left / 60:.1f} min more, whole command about {(elapsed + left) / 60:.1f}"
                f"{budget} min")


# --------------------------------------------------------------------------- the steps


def to_flags(options: dict[str, Any]) -> list[str]:
    """{'lr': 0.002, 'global_crops_scale': (0.32, 1.0)} -> ['--lr', '0.002', '--global_crops_scale', ...]."""
    flags: list[str] = []
    for name, value in options.items():
        values = value if isinstance(value, (tuple, list)) else [value]
        flags += [f"--{name}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return flags


class StepFailed(Exception):
    def __init__(self, step: str, code: int):
        super().__init__(step)
        self.step, self.code = step, code


def say(message: str, log_file: TextIO) -> None:
    """Print a line and write it to quickstart.log."""
    print(message, flush=True)
    log_file.write(message + "\n")


def run_step(step: str, command: list[str], log_file: TextIO,
             on_line: Callable[[str], str | None] | None = None) -> None:
    """Run one script, streaming its output to the console and to quickstart.log; ``on_line``
    sees each line and may answer a line of its own (printed and logged after it)."""
    shown = " ".join(command[1:])
    say(f"\n=== {step}: python {shown}", log_file)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert process.stdout is not None
    try:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log_file.write(line)
            answer = on_line(line) if on_line is not None else None
            if answer:
                say(answer, log_file)
        code = process.wait()
    finally:  # interrupted (Ctrl-C, SIGTERM): the script saves its state and stops with us
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
    log_file.flush()
    if code != 0:
        raise StepFailed(step, code)


def knn_top1(results_file: Path, k: int) -> float:
    results = json.loads(results_file.read_text())
    return float(results[f"k={k}"]["top1"])


def summary_line(trained: float, random_init: float, minutes: float) -> str:
    return (f"k-NN top-1 (k={KNN_K}): trained {trained:.1f}% | random init {random_init:.1f}% | "
            f"gain {trained - random_init:+.1f} points | {minutes:.1f} min")


def run_folder(output_dir: str | None) -> Path:
    """--output_dir, or a new runs/quickstart/<date-time> in the repo."""
    path = Path(output_dir) if output_dir else (
        REPO / "runs" / "quickstart" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return path.expanduser().resolve()


def make_plan(args: argparse.Namespace, preset: dict[str, Any], train_options: dict[str, Any],
              data_dir: Path, device: str, n_eval_images: int, run_dir: Path, start: float,
              log_file: TextIO) -> tuple[Plan, Calibration | None]:
    """Time this machine and plan the epochs (or reuse the plan of the run being resumed);
    prints the plan and writes it to plan.json."""
    plan_file = run_dir / "plan.json"
    if args.epochs is None and plan_file.exists():
        saved = json.loads(plan_file.read_text())
        plan = Plan(**{f.name: saved["plan"][f.name] for f in dataclasses.fields(Plan)})
        say(f"plan: resuming this run folder's plan of {n_epochs(plan.epochs)} (its schedules are "
            f"fixed; the budget is not applied again)", log_file)
        return plan, None
    say(f"[2/5] timing training steps on {device} (counted in the budget)", log_file)
    calibration = calibrate(train_options, data_dir, device)
    say(f"      {calibration.timed_steps} steps of {calibration.step_s:.3g} s after a "
        f"{calibration.first_step_s:.3g} s warm-up step; evaluation "
        f"{1000 * calibration.eval_image_s:.2g} ms/image; start-up about "
        f"{calibration.startup_s:.0f} s per script ({calibration.seconds:.0f} s in all)", log_file)
    plan = plan_epochs(budget_s=60 * args.minutes, elapsed_s=time.time() - start,
                       step_s=calibration.step_s, steps_per_epoch=calibration.steps_per_epoch,
                       fixed_s=calibration.fixed_s(n_eval_images), max_epochs=preset["max_epochs"],
                       epoch_eval_s=PER_EPOCH_KNN_IMAGES * calibration.eval_image_s,
                       epochs=args.epochs)
    for line in plan_lines(plan):
        say(line, log_file)
    storage.write_json({"plan": plan.as_dict(), "calibration": dataclasses.asdict(calibration)},
                     plan_file)
    return plan, calibration


def quickstart(args: argparse.Namespace, start: float | None = None) -> dict[str, Any]:
    """Data, timing and plan, pretraining, two k-NN runs; prints and returns the results (also
    results.json). ``start``: when the command started (default: now)."""
    start = time.time() if start is None else start
    check_budget_args(args)
    device = str(utils.resolve_device(args.device))
    preset_name = args.preset if args.preset != "auto" else ("gpu" if device.startswith("cuda") else "cpu")
    preset = PRESETS[preset_name]

    run_dir = run_folder(args.output_dir)
    data_dir = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise utils.UserError(f"cannot create the run folder {run_dir}: {e.strerror}") from None

    # ---- 1. data
    try:
        source = fashion_mnist.find_source(args.fashion_mnist_source)
    except FileNotFoundError as e:
        raise utils.UserError(f"--fashion_mnist_source: {e}") from None
    print(f"[1/5] Fashion-MNIST from {source} -> ImageFolder in {data_dir} "
          "(written once, then reused)", flush=True)
    try:
        fashion_mnist.write_imagefolder(data_dir, source, train_per_class=preset["train_per_class"],
                                        val_per_class=preset["val_per_class"])
    except OSError as e:
        raise utils.UserError(f"cannot write the dataset to {data_dir}: {e}") from None
    n_train = sum(1 for _ in (data_dir / "train").rglob("*.png"))
    n_val = sum(1 for _ in (data_dir / "val").rglob("*.png"))
    print(f"      {n_train} train / {n_val} val images ({time.time() - start:.0f} s since the "
          "start)", flush=True)

    python = sys.executable
    train_options = dict(preset["train"], augment_on=args.augment_on)
    if not device.startswith("cuda"):
        train_options["use_fp16"] = False
    arch, patch, size = train_options["arch"], train_options["patch_size"], train_options["global_crops_size"]
    pretrain_dir = run_dir / "pretrain"
    knn_common = ["--data_path", str(data_dir), "--resize_size", str(size), "--crop_size", str(size),
                  "--nb_knn", str(KNN_K), "--device", device,
                  "--num_workers", str(min(4, os.cpu_count() or 1))]

    with open(run_dir / "quickstart.log", "a") as log_file:
        # ---- 2. timing and plan
        plan, calibration = make_plan(args, preset, train_options, data_dir, device,
                                      n_train + n_val, run_dir, start, log_file)
        train_options["epochs"] = plan.epochs
        # main_massl refuses a warm-up longer than the run: a short plan warms up for all of it
        train_options["warmup_epochs"] = min(train_options["warmup_epochs"], plan.epochs)
        evals_s = calibration.eval_s(n_train + n_val) * 2 if calibration else 0.0
        say(f"[3/5] MaSSL pretraining: {arch} (patch {patch}), {n_epochs(plan.epochs)} on "
            f"{device}, preset '{preset_name}'", log_file)
        run_step("pretraining", [python, str(REPO / "main_massl.py"), *to_flags(train_options),
                                 "--data_path", str(data_dir / "train"),
                                 "--knn_data_path", str(data_dir), "--knn_freq", "1",
                                 "--knn_max_train", str(ONLINE_KNN_TRAIN),
                                 "--knn_max_val", str(ONLINE_KNN_VAL),
                                 "--knn_resize_size", str(size), "--knn_crop_size", str(size),
                                 "--output_dir", str(pretrain_dir), "--device", device], log_file,
                 on_line=Progress(start, plan, evals_s))
        say("[4/5] k-NN evaluation of the trained teacher", log_file)
        run_step("k-NN (trained)", [python, str(REPO / "eval_knn.py"),
                                    "--pretrained_weights", str(pretrain_dir / "checkpoint.pth"),
                                    "--checkpoint_key", "teacher", *knn_common,
                                    "--output_dir", str(run_dir / "knn_trained")], log_file)
        say("[5/5] k-NN evaluation of a randomly initialised backbone (the baseline)", log_file)
        run_step("k-NN (random init)", [python, str(REPO / "eval_knn.py"), "--arch", arch,
                                        "--patch_size", str(patch), *knn_common,
                                        "--output_dir", str(run_dir / "knn_random")], log_file)

        trained = knn_top1(run_dir / "knn_trained" / "knn_results.json", KNN_K)
        random_init = knn_top1(run_dir / "knn_random" / "knn_results.json", KNN_K)
        minutes = (time.time() - start) / 60
        results = {
            "knn_k": KNN_K, "trained_top1": trained, "random_init_top1": random_init,
            "gain_points": round(trained - random_init, 4), "minutes": round(minutes, 2),
            "preset": preset_name, "device": device, "epochs": plan.epochs,
            "budget_minutes": args.minutes, "plan": plan.as_dict(),
            "calibration": dataclasses.asdict(calibration) if calibration else None,
            "fashion_mnist_source": str(source), "data_dir": str(data_dir),
            "num_train": n_train, "num_val": n_val, "train_options": train_options,
            "checkpoint": str(pretrain_dir / "checkpoint.pth"), "run_dir": str(run_dir),
            "cpu_count": os.cpu_count(),
        }
        line = summary_line(trained, random_init, minutes)
        results["summary"] = line
        storage.write_json(results, run_dir / "results.json")
        log_file.write(line + "\n")
    print(f"\nrun folder: {run_dir}  (TensorBoard: tensorboard --logdir {pretrain_dir / 'tensorboard'})")
    print(line, flush=True)
    return results


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so the running script is stopped too (see run_step)


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args.output_dir = str(run_folder(args.output_dir))  # fixed now, so it can be named on Ctrl-C
    try:
        quickstart(args, start=PROCESS_START)
    except utils.UserError as e:
        utils.exit_with_error(str(e))
    except StepFailed as e:
        print(f"error: quick start step '{e.step}' failed (exit code {e.code}); its output is above",
              file=sys.stderr, flush=True)
        sys.exit(e.code if e.code > 0 else 1)
    except KeyboardInterrupt:
        print(f"\ninterrupted; to resume: python quickstart.py --output_dir {args.output_dir}",
              file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
