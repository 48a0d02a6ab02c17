"""Quick start: from nothing to a trained MaSSL model and a k-NN score, in about ten minutes on CPU.

    python quickstart.py

1. writes Fashion-MNIST (Debian's full set if installed, else the 10k split shipped in
   ``data/fashion_mnist/``) once as an ImageFolder (``train/<class>/*.png``, ``val/<class>/*.png``,
   fixed class-balanced split) into a cache folder;
2. pretrains MaSSL on its ``train/`` images with ``main_massl.py``;
3. runs ``eval_knn.py`` on the trained teacher and on a randomly initialised backbone of the same
   architecture (the baseline the gain is measured against);
4. ends with one line: ``k-NN top-1 (k=20): trained XX.X% | random init YY.Y% | gain +Z.Z points | N min``.

Steps 2 and 3 run the training and evaluation scripts as subprocesses, with exactly the
command lines an ImageNet user runs (they are printed). Everything of the run (checkpoints,
log.txt, TensorBoard events, k-NN results, ``results.json``, ``quickstart.log``) goes into one
run folder, named at the end. Running again with the same ``--output_dir`` resumes a run that
was interrupted and only re-evaluates a finished one.

Presets: ``cpu`` (measured: see the README's tuning table), ``gpu`` (bigger model, more epochs;
chosen automatically when CUDA is available) and ``smoke`` (a few hundred images, one epoch:
seconds; used by the tests).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fashion_mnist
import utils

REPO = Path(__file__).resolve().parent
KNN_K = 20

# Each preset: how much data, then main_massl.py flags. The cpu preset was tuned for ~10 minutes
# in total on 2 CPU cores (README: "what we tried"); "minutes" is its measured training time,
# used to turn --minutes into epochs.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "train_per_class": 500, "val_per_class": 200, "minutes": 5.5,
        "train": {
            "arch": "vit_pico", "patch_size": 7, "global_crops_size": 28, "local_crops_size": 14,
            "local_crops_number": 4, "global_crops_scale": (0.32, 1.0),
            "local_crops_scale": (0.05, 0.32), "batch_size_per_gpu": 128, "epochs": 10,
            "lr": 2e-3, "min_lr": 1e-5, "warmup_epochs": 1, "weight_decay": 0.04,
            "weight_decay_end": 0.1, "drop_path_rate": 0.0, "out_dim": 2048,
            "partition_size": 512, "teacher_temp": 0.05, "warmup_teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 1, "momentum_teacher": 0.98, "use_fp16": False,
            "koleo_loss_weight": 0.3, "num_workers": 1, "print_freq": 13, "saveckp_freq": 0,
        },
    },
    # Not measured by us (no GPU at hand when this was written): a plausible bigger preset.
    "gpu": {
        "train_per_class": None, "val_per_class": 200, "minutes": 10.0,
        "train": {
            "arch": "vit_tiny", "patch_size": 4, "global_crops_size": 28, "local_crops_size": 14,
            "local_crops_number": 6, "global_crops_scale": (0.32, 1.0),
            "local_crops_scale": (0.05, 0.32), "batch_size_per_gpu": 256, "epochs": 100,
            "lr": 1e-3, "min_lr": 1e-6, "warmup_epochs": 10, "weight_decay": 0.04,
            "weight_decay_end": 0.4, "drop_path_rate": 0.1, "out_dim": 8192,
            "partition_size": 2048, "teacher_temp": 0.05, "warmup_teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 10, "momentum_teacher": 0.99, "use_fp16": True,
            "koleo_loss_weight": 0.3, "num_workers": 8, "print_freq": 50, "saveckp_freq": 50,
        },
    },
    # For tests: 300 train / 100 val images, one epoch. Shows the plumbing works, learns nothing.
    "smoke": {
        "train_per_class": 30, "val_per_class": 10, "minutes": 0.2,
        "train": {
            "arch": "vit_nano", "patch_size": 7, "global_crops_size": 28, "local_crops_size": 14,
            "local_crops_number": 2, "global_crops_scale": (0.32, 1.0),
            "local_crops_scale": (0.05, 0.32), "batch_size_per_gpu": 32, "epochs": 1,
            "lr": 2e-3, "min_lr": 1e-5, "warmup_epochs": 0, "weight_decay": 0.04,
            "weight_decay_end": 0.04, "drop_path_rate": 0.0, "out_dim": 128,
            "partition_size": 64, "teacher_temp": 0.05, "warmup_teacher_temp": 0.04,
            "warmup_teacher_temp_epochs": 0, "momentum_teacher": 0.98, "use_fp16": False,
            "num_workers": 0, "print_freq": 5, "saveckp_freq": 0,
        },
    },
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "quickstart.py", description=__doc__, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None, help="""Run folder (pretraining
        checkpoints and logs, k-NN results, results.json, quickstart.log). Default:
        runs/quickstart/<date-time> in the repo. An existing run folder is resumed.""")
    parser.add_argument("--data_dir", default=None, help="""Cache folder for the Fashion-MNIST
        ImageFolder, written once and reused. Default: ~/.cache/massl/fashion_mnist
        (or $XDG_CACHE_HOME/massl/fashion_mnist).""")
    parser.add_argument("--fashion_mnist_source", default=None, help="""Folder with the
        Fashion-MNIST *-ubyte.gz files. Default: Debian's full set in
        /usr/share/datasets/fashion-mnist when installed, else the 10k split shipped in
        data/fashion_mnist.""")
    parser.add_argument("--preset", default="auto", choices=["auto", *PRESETS], help="""Model,
        data and schedule: 'cpu' (tuned for about 10 minutes on 2 cores), 'gpu' (bigger model,
        more epochs; untested), 'smoke' (seconds; checks the plumbing only). Default 'auto':
        gpu when the device is CUDA, else cpu.""")
    parser.add_argument("--epochs", type=int, default=None, help="""Pretraining epochs
        (overrides the preset's; the cpu preset uses 20).""")
    parser.add_argument("--minutes", type=float, default=None, help="""Approximate pretraining
        time: scales the preset's epochs by minutes / the preset's measured training minutes
        (7 for cpu on 2 cores). Ignored when --epochs is given.""")
    parser.add_argument("--device", default=None, help="""'cpu' or 'cuda' (default: cuda when
        available, else cpu), passed to both scripts.""")
    return parser


def default_data_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "massl" / "fashion_mnist"


def resolve_device(device: str | None) -> str:
    import torch  # imported here so --help stays instant
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise utils.UserError(f"--device {device}, but CUDA is not available here (use --device cpu)")
    if not (device == "cpu" or device.startswith("cuda")):
        raise utils.UserError(f"--device must be 'cpu' or 'cuda', got {device!r}")
    return device


def epochs_for(preset: dict[str, Any], epochs: int | None, minutes: float | None) -> int:
    """--epochs, else the preset's epochs scaled to --minutes, else the preset's epochs."""
    if epochs is not None:
        if epochs < 1:
            raise utils.UserError("--epochs must be >= 1")
        return epochs
    if minutes is not None:
        if minutes <= 0:
            raise utils.UserError("--minutes must be > 0")
        return max(1, round(preset["train"]["epochs"] * minutes / preset["minutes"]))
    return preset["train"]["epochs"]


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


def run_step(step: str, command: list[str], log_file) -> None:
    """Run one script, streaming its output to the console and to quickstart.log."""
    shown = " ".join(command[1:])
    header = f"\n=== {step}: python {shown}"
    print(header, flush=True)
    log_file.write(header + "\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert process.stdout is not None
    try:
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log_file.write(line)
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


def quickstart(args: argparse.Namespace) -> dict[str, Any]:
    """Data, pretraining, two k-NN runs; prints and returns the results (also results.json)."""
    start = time.time()
    device = resolve_device(args.device)
    preset_name = args.preset if args.preset != "auto" else ("gpu" if device.startswith("cuda") else "cpu")
    preset = PRESETS[preset_name]
    epochs = epochs_for(preset, args.epochs, args.minutes)

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
    print(f"[1/4] Fashion-MNIST from {source} -> ImageFolder in {data_dir} "
          "(written once, then reused)", flush=True)
    try:
        fashion_mnist.write_imagefolder(data_dir, source, train_per_class=preset["train_per_class"],
                                        val_per_class=preset["val_per_class"])
    except OSError as e:
        raise utils.UserError(f"cannot write the dataset to {data_dir}: {e}") from None
    n_train = sum(1 for _ in (data_dir / "train").rglob("*.png"))
    n_val = sum(1 for _ in (data_dir / "val").rglob("*.png"))
    print(f"      {n_train} train / {n_val} val images ({time.time() - start:.0f} s)", flush=True)

    python = sys.executable
    train_options = dict(preset["train"], epochs=epochs)
    if not device.startswith("cuda"):
        train_options["use_fp16"] = False
    arch, patch, size = train_options["arch"], train_options["patch_size"], train_options["global_crops_size"]
    pretrain_dir = run_dir / "pretrain"
    knn_common = ["--data_path", str(data_dir), "--resize_size", str(size), "--crop_size", str(size),
                  "--nb_knn", str(KNN_K), "--device", device,
                  "--num_workers", str(min(4, os.cpu_count() or 1))]

    with open(run_dir / "quickstart.log", "a") as log_file:
        print(f"[2/4] MaSSL pretraining: {arch} (patch {patch}), {epochs} epochs on {device}, "
              f"preset '{preset_name}'", flush=True)
        run_step("pretraining", [python, str(REPO / "main_massl.py"), *to_flags(train_options),
                                 "--data_path", str(data_dir / "train"),
                                 "--output_dir", str(pretrain_dir), "--device", device], log_file)
        print("[3/4] k-NN evaluation of the trained teacher", flush=True)
        run_step("k-NN (trained)", [python, str(REPO / "eval_knn.py"),
                                    "--pretrained_weights", str(pretrain_dir / "checkpoint.pth"),
                                    "--checkpoint_key", "teacher", *knn_common,
                                    "--output_dir", str(run_dir / "knn_trained")], log_file)
        print("[4/4] k-NN evaluation of a randomly initialised backbone (the baseline)", flush=True)
        run_step("k-NN (random init)", [python, str(REPO / "eval_knn.py"), "--arch", arch,
                                        "--patch_size", str(patch), *knn_common,
                                        "--output_dir", str(run_dir / "knn_random")], log_file)

        trained = knn_top1(run_dir / "knn_trained" / "knn_results.json", KNN_K)
        random_init = knn_top1(run_dir / "knn_random" / "knn_results.json", KNN_K)
        minutes = (time.time() - start) / 60
        results = {
            "knn_k": KNN_K, "trained_top1": trained, "random_init_top1": random_init,
            "gain_points": round(trained - random_init, 4), "minutes": round(minutes, 2),
            "preset": preset_name, "device": device, "epochs": epochs,
            "fashion_mnist_source": str(source), "data_dir": str(data_dir),
            "num_train": n_train, "num_val": n_val, "train_options": train_options,
            "checkpoint": str(pretrain_dir / "checkpoint.pth"), "run_dir": str(run_dir),
            "cpu_count": os.cpu_count(),
        }
        line = summary_line(trained, random_init, minutes)
        results["summary"] = line
        tmp = run_dir / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(run_dir / "results.json")
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
        quickstart(args)
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
