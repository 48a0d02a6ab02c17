"""Sweep: which small-scale settings make MaSSL learn on CPU without KoLeo (the quick start).

Each variant is the quick start's ``cpu`` preset with some ``main_massl.py`` flags changed; it
is pretrained for ``--epochs`` on the quick start's Fashion-MNIST split and its teacher is
scored by ``eval_knn.py`` (k = 20) against one randomly initialised backbone of each
architecture. Everything runs through the real scripts, as the quick start does, and the
table reports the k-NN gain, the first and last epoch losses (ln P is the uniform-collapse
level), the health metrics of the first and last epochs (teacher entropy as a fraction of ln P,
memory usage and spread), and the training minutes.

    python benchmarks/sweep_quickstart.py --epochs 3                      # every variant
    python benchmarks/sweep_quickstart.py --epochs 10 --variants preset,paper_crops_no_bn_head
    python benchmarks/sweep_quickstart.py --list                          # what each variant sets

Results are appended to ``--output_dir/sweep.jsonl`` (one line per variant, so an interrupted
sweep keeps what it measured) and printed as a Markdown table. Time one variant at a time,
on an otherwise idle machine: the minutes are only comparable within one sweep.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import fashion_mnist  # noqa: E402
import quickstart  # noqa: E402
import utils  # noqa: E402

# The health metrics the table shows, first and last epoch means (monitor.py).
HEALTH_KEYS = ("teacher_entropy", "memory_usage", "memory_spread")

# name -> main_massl.py flags changed from the quick start's cpu preset (KoLeo off, crops
# 0.6-1 / 0.25-0.6, BatchNorm in the head). Each variant undoes or changes one ingredient; the
# "paper_crops_no_bn_head" variant is the earlier KoLeo preset without its KoLeo (the run that
# drifted to uniform distributions), "..._koleo_0.3" that preset itself.
PAPER_CROPS = {"global_crops_scale": (0.32, 1.0), "local_crops_scale": (0.05, 0.32)}
VARIANTS: dict[str, dict[str, Any]] = {
    "preset": {},
    "paper_crops": PAPER_CROPS,
    "no_bn_head": {"use_bn_in_head": False},
    "paper_crops_no_bn_head": {**PAPER_CROPS, "use_bn_in_head": False},
    "paper_crops_no_bn_head_koleo_0.3": {**PAPER_CROPS, "use_bn_in_head": False,
                                         "koleo_loss_weight": 0.3},
    "koleo_0.3": {"koleo_loss_weight": 0.3},
    "teacher_temp_0.07": {"teacher_temp": 0.07},
    "memory_8192": {"out_dim": 8192, "partition_size": 2048},
    "momentum_0.996": {"momentum_teacher": 0.996},
    "lr_1e-3": {"lr": 1e-3},
    "no_photometric": {"color_jitter_prob": 0.0, "grayscale_prob": 0.0, "solarization_prob": 0.0},
    "no_locals": {"local_crops_number": 0},
    "batch_256": {"batch_size_per_gpu": 256},
}


def run(command: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("\n$ " + " ".join(command) + "\n")
        f.flush()
        code = subprocess.call(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise utils.UserError(f"{' '.join(command[:2])} failed (exit {code}); see {log}")


def knn(weights: list[str], data_dir: Path, size: int, out: Path, log: Path) -> float:
    run([sys.executable, str(ROOT / "eval_knn.py"), *weights, "--data_path", str(data_dir),
         "--resize_size", str(size), "--crop_size", str(size), "--nb_knn", "20",
         "--device", "cpu", "--num_workers", "1", "--output_dir", str(out)], log)
    return json.loads((out / "knn_results.json").read_text())["k=20"]["top1"]


def epoch_log(output_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()
            if line.strip()]


def sweep_variant(name: str, options: dict[str, Any], data_dir: Path, out: Path,
                  baselines: dict[str, float]) -> dict[str, Any]:
    """Pretrain one variant and score it; returns its table row."""
    run_dir = out / name
    log = out / f"{name}.log"
    start = time.time()
    run([sys.executable, str(ROOT / "main_massl.py"), *quickstart.to_flags(options),
         "--data_path", str(data_dir / "train"), "--output_dir", str(run_dir),
         "--device", "cpu"], log)
    minutes = (time.time() - start) / 60
    arch, patch, size = options["arch"], options["patch_size"], options["global_crops_size"]
    key = f"{arch}/{patch}/{size}"
    if key not in baselines:
        baselines[key] = knn(["--arch", arch, "--patch_size", str(patch)], data_dir, size,
                             out / f"random_{arch}_{patch}_{size}", log)
    trained = knn(["--pretrained_weights", str(run_dir / "checkpoint.pth")], data_dir, size,
                  run_dir / "knn", log)
    epochs = epoch_log(run_dir)
    first, last = epochs[0], epochs[-1]
    # first -> last epoch: the drift to uniform shows as a teacher entropy that climbs
    health = {k: [first[f"train_{k}"], last[f"train_{k}"]] for k in HEALTH_KEYS
              if f"train_{k}" in last}
    return {"variant": name, "changes": {k: v for k, v in options.items()
                                         if VARIANTS.get(name, {}).get(k) == v},
            "epochs": len(epochs), "trained": trained, "random_init": baselines[key],
            "gain": round(trained - baselines[key], 2), "loss_first": epochs[0]["train_loss"],
            "loss_last": last["train_loss"], "ln_P": round(math.log(options["partition_size"]), 3),
            "health": health, "train_minutes": round(minutes, 2)}


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| variant | changes | epochs | k-NN trained | random | gain | loss first → last (ln P) "
          "| health (epoch 1 → last) | train min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        changes = ", ".join(f"{k}={v}" for k, v in r["changes"].items()) or "-"
        health = ", ".join(f"{k} {a:.2f} → {b:.2f}" for k, (a, b) in r["health"].items()) or "-"
        print(f"| {r['variant']} | {changes} | {r['epochs']} | {r['trained']:.1f} | "
              f"{r['random_init']:.1f} | {r['gain']:+.1f} | {r['loss_first']:.3f} → "
              f"{r['loss_last']:.3f} ({r['ln_P']:.2f}) | {health} | {r['train_minutes']:.1f} |")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="pretraining epochs per variant")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated names among: {', '.join(VARIANTS)}")
    p.add_argument("--output_dir", default=str(ROOT / "runs" / "sweep"),
                   help="where runs, logs and sweep.jsonl go")
    p.add_argument("--data_dir", default=None,
                   help="the quick start's ImageFolder cache (default: the quick start's)")
    p.add_argument("--fashion_mnist_source", default=None,
                   help="Fashion-MNIST files (default: as the quick start)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.list:
        for name, changes in VARIANTS.items():
            print(f"{name}: {changes or 'the cpu preset as it is'}")
        return
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or args.epochs < 1:
        raise utils.UserError(f"unknown variant(s) {', '.join(unknown)}; --list shows them"
                              if unknown else "--epochs must be >= 1")
    preset = quickstart.PRESETS["cpu"]
    data_dir = Path(args.data_dir) if args.data_dir else quickstart.default_data_dir()
    fashion_mnist.write_imagefolder(data_dir, fashion_mnist.find_source(args.fashion_mnist_source),
                                    train_per_class=preset["train_per_class"],
                                    val_per_class=preset["val_per_class"])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, baselines = [], {}
    for name in names:
        options = {**preset["train"], **VARIANTS[name], "epochs": args.epochs}
        try:
            row = sweep_variant(name, options, data_dir, out, baselines)
        except utils.UserError as e:  # one failed variant does not end the sweep
            print(f"{name}: failed: {e}", flush=True)
            continue
        with open(out / "sweep.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        print(f"{name}: gain {row['gain']:+.1f} points, loss {row['loss_first']:.3f} -> "
              f"{row['loss_last']:.3f}, {row['train_minutes']:.1f} min", flush=True)
    print_table(rows)


if __name__ == "__main__":
    try:
        main()
    except utils.UserError as e:
        utils.exit_with_error(str(e))
