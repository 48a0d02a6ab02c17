"""Plot a training run's ``log.txt`` as curves over epochs: loss, learning rate, k-NN accuracy
and the health metrics (README, "Monitoring a run"), in one PNG.

``main_massl.py`` appends one JSON object per epoch to ``<output_dir>/log.txt``, e.g.
``{"epoch": 3, "train_loss": 7.91, "train_lr": 0.0005, "knn_top1": 41.2, ...}``. This script
plots every numeric key whose name contains ``loss`` (one panel), ``lr`` (one panel),
``knn``/``acc`` (one panel; evaluations that ran every few epochs show as points on those
epochs), the block entropies, the agreement and memory usage/spread, the gradient norm and
the tensors clipped (a panel each, only when the log has such keys). Dashed lines mark the
collapse warnings' thresholds (``monitor.COLLAPSE_RULES``).

    python plot_training.py --log output/log.txt --out output/curves.png

A resumed run logs the epochs after its checkpoint again; the last record of an epoch wins.
A half-written last line (a job killed while logging) is skipped with a warning.
Needs matplotlib (``pip install matplotlib``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable

from monitor import COLLAPSE_RULES
from utils import UserError, exit_with_error

# Panel title -> predicate on a log key. A key lands in the first panel that claims it.
# Durations (knn_seconds, epoch_time_s) are not plotted.
PANELS: list[tuple[str, Callable[[str], bool]]] = [
    ("loss", lambda key: "loss" in key),
    ("learning rate", lambda key: "lr" in key.split("_")),
    ("k-NN / accuracy", lambda key: ("knn" in key or "acc" in key) and "seconds" not in key),
    ("block entropy (fraction of ln P)", lambda key: key.endswith("_entropy")),
    ("agreement / memory", lambda key: key.endswith(("agreement", "memory_usage",
                                                     "memory_spread"))),
    ("gradient norm (before clipping)", lambda key: key.endswith("grad_norm")),
    ("tensors clipped per step", lambda key: key.endswith("_clipped")),
]
PANELS_PER_ROW = 4


def read_log(path: str | Path) -> tuple[list[dict[str, float]], int]:
    """Per-epoch records of a JSON-lines log, sorted by epoch; returns ``(records, n_skipped)``.

    Only numeric values are kept. Records without an ``epoch`` key are numbered by position.
    Lines that are not JSON objects are skipped and counted.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no log file at {path}: pass the log.txt in a training --output_dir")
    by_epoch: dict[float, dict[str, float]] = {}
    skipped = 0
    with open(path) as f:
        for position, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(record, dict):
                skipped += 1
                continue
            numeric = {k: float(v) for k, v in record.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            epoch = numeric.get("epoch", float(position))
            by_epoch[epoch] = numeric | {"epoch": epoch}
    return [by_epoch[e] for e in sorted(by_epoch)], skipped


def group_keys(records: list[dict[str, float]]) -> list[tuple[str, list[str]]]:
    """``(panel title, keys)`` for each panel that has at least one key in the log."""
    keys = sorted({k for r in records for k in r} - {"epoch"})
    groups = []
    claimed: set[str] = set()
    for title, wants in PANELS:
        mine = [k for k in keys if k not in claimed and wants(k.lower())]
        claimed.update(mine)
        if mine:
            groups.append((title, mine))
    return groups


def plot_curves(records: list[dict[str, float]], out: str | Path, title: str = "") -> list[str]:
    """Draw one panel per key group into ``out`` (PNG); returns the panel titles drawn."""
    groups = group_keys(records)
    if not groups:
        found = sorted({k for r in records for k in r} - {"epoch"})
        raise UserError(f"nothing to plot: the log has no loss/lr/knn/acc keys (it has {found})")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: works on a head-less node
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot_training.py needs matplotlib: pip install matplotlib") from None
    cols = min(len(groups), PANELS_PER_ROW)
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (panel, keys) in zip(axes.flat, groups):
        for key in keys:
            points = [(r["epoch"], r[key]) for r in records
                      if key in r and math.isfinite(r[key])]
            if not points:
                continue
            epochs, values = zip(*points)
            # Sparse series (k-NN every few epochs) read better with markers.
            marker = "o" if len(points) < 0.5 * len(records) or len(points) < 20 else None
            ax.plot(epochs, values, marker=marker, markersize=3, label=key)
        for rule in COLLAPSE_RULES:
            if any(key.endswith(rule.key) for key in keys):
                ax.axhline(rule.threshold, color="red", linestyle="--", linewidth=0.8,
                           label=f"collapse: {rule.key} {'>' if rule.above else '<'} "
                                 f"{rule.threshold}")
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [panel for panel, _ in groups]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Turn a MaSSL training log.txt into one PNG of loss, learning rate, k-NN "
                    "accuracy and health metrics per epoch.")
    parser.add_argument("--log", required=True,
                        help="The JSON-lines log.txt that main_massl.py writes in its "
                             "--output_dir.")
    parser.add_argument("--out", default=None,
                        help="PNG to write (default: curves.png next to the log).")
    parser.add_argument("--title", default=None,
                        help="Figure title (default: the log's folder name).")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    log = Path(args.log)
    out = Path(args.out) if args.out else log.with_name("curves.png")
    try:
        records, skipped = read_log(log)
        if skipped:
            print(f"warning: skipped {skipped} line(s) of {log} that are not JSON objects",
                  file=sys.stderr)
        if not records:
            raise UserError(f"{log} has no JSON records to plot")
        title = args.title if args.title is not None else log.resolve().parent.name
        panels = plot_curves(records, out, title=title)
    except UserError as e:
        exit_with_error(str(e))
    print(f"wrote {out} ({len(records)} epochs; panels: {', '.join(panels)})")


if __name__ == "__main__":
    main()
