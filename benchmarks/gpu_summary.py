"""The markdown summary of a ``gpu_check.sh`` folder: card, torch, date, each step's exit
status, then one row per measurement (images/s, MFU, peak memory), the ratios, and the
issue's targets against what was measured.

    python benchmarks/gpu_summary.py OUT_DIR            # prints the table (gpu_check.sh saves
                                                        # it as OUT_DIR/summary.md)

It reads ``OUT_DIR/steps.tsv`` (step, exit status, seconds, command) and each step's
``NN_step.log``: the ``device:``, ``config:``, ``step:``, ``ratio:`` lines and the ``| ... |``
tables that bench_step.py, bench_loss.py and bench_data.py print, and pytest's last line.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils  # noqa: E402,F401  (puts the repo root on sys.path)
import utils  # noqa: E402

TARGET_IMAGES_PER_S = 2000.0  # ViT-S/16 bf16 reference step, per H100
TARGET_VS_AUTHORS = 1.5
TARGET_LOSS_SPEED, TARGET_LOSS_MEMORY = 3.0, 2.0
EXIT_MEANING = {"0": "0 (ok)", "124": "124 (timed out)", "137": "137 (killed: time or memory)",
                "skipped": "skipped (budget spent)"}


@dataclass
class Step:
    name: str
    rc: str
    seconds: str
    log: str = ""
    rows: list[dict[str, str]] = field(default_factory=list)
    ratios: list[str] = field(default_factory=list)
    result: str = ""


def parse_device(text: str) -> dict[str, str] | None:
    m = re.search(r"^device: (.*?) \| torch (\S+) \| date (\S+)", text, re.M)
    return {"card": m.group(1), "torch": m.group(2), "date": m.group(3)} if m else None


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the markdown tables in ``text`` (header and separator dropped)."""
    rows, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        if i + 1 < len(lines) and set(lines[i + 1]) <= set("|-: ") and "-" in lines[i + 1]:
            continue  # a header
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def parse_step(step: Step) -> None:
    """Fill ``step.rows``, ``ratios`` and ``result`` from its log."""
    text = step.log
    step.ratios = [x[len("ratio:"):].strip() for x in text.splitlines() if x.startswith("ratio:")]
    pytest_line = [x for x in text.splitlines()
                   if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", x)]
    if pytest_line:
        step.result = pytest_line[-1].strip("= ")
    config = re.search(r"^config: (.*)$", text, re.M)
    single = re.search(r"^step: (\S+ m?s) \(.*?\), ([0-9.]+) images/s, peak memory (.*?) \(",
                       text, re.M)
    mfu = re.search(r"^ratio: achieved .*MFU ([0-9.]+%)", text, re.M)
    if config and single:
        step.rows.append({"configuration": config.group(1), "step time": single.group(1),
                          "images/s": single.group(2), "MFU": mfu.group(1) if mfu else "-",
                          "peak memory": single.group(3)})
    for cells in table_rows(text):
        if len(cells) == 6:  # bench_step --compare: configuration, step, images/s, speed, MFU, memory
            step.rows.append({"configuration": cells[0], "step time": cells[1],
                              "images/s": cells[2], "MFU": cells[4], "peak memory": cells[5]})
    for name in ("naive", "ours"):  # bench_loss
        m = re.search(rf"^\s*{name}: forward\+backward (\S+ m?s) \(.*?\)(?:, peak memory (.*))?$",
                      text, re.M)
        if m:
            step.rows.append({"configuration": f"loss forward+backward, {name}",
                              "step time": m.group(1), "images/s": "-", "MFU": "-",
                              "peak memory": m.group(2) or "-"})
    if not step.result:
        last = [x for x in text.splitlines() if x.strip()]
        failed = step.rc not in ("0", "skipped")
        step.result = (last[-1][:160] if (failed and last) else
                       f"{len(step.rows)} measurement(s)" if step.rows else "")


def read_steps(out_dir: Path) -> list[Step]:
    table = out_dir / "steps.tsv"
    if not table.is_file():
        raise utils.UserError(f"{out_dir} has no steps.tsv: not a gpu_check.sh output folder")
    logs = sorted(out_dir.glob("[0-9][0-9]_*.log"))
    steps = []
    with open(table, newline="") as f:
        for record in csv.DictReader(f, delimiter="\t"):
            step = Step(record["step"], record["rc"], record["seconds"])
            log = next((p for p in logs if p.stem[3:] == step.name), None)
            step.log = log.read_text(errors="replace") if log else ""
            parse_step(step)
            steps.append(step)
    return steps


def pair_ratios(steps: list[Step]) -> list[str]:
    """images/s of compiled over eager for each (arch, precision), and of the real loop over
    the synthetic eager step (what training gets of the step's figure)."""
    rate = {s.name: float(s.rows[0]["images/s"]) for s in steps
            if len(s.rows) == 1 and s.rows[0]["images/s"] != "-"}
    out = []
    for name, value in rate.items():
        if name.endswith("_compiled") and name[:-len("compiled")] + "eager" in rate:
            eager = rate[name[:-len("compiled")] + "eager"]
            out.append(f"{name[len('step_'):-len('_compiled')]}: compiled/eager images/s "
                       f"{value / eager:.2f}x ({value:g} vs {eager:g})")
    for name, value in rate.items():
        if name.startswith("real_loop_") and f"step_{name[len('real_loop_'):]}_eager" in rate:
            eager = rate[f"step_{name[len('real_loop_'):]}_eager"]
            out.append(f"{name[len('real_loop_'):]}: real loop/synthetic eager step images/s "
                       f"{value / eager:.2f}x ({value:g} vs {eager:g})")
    return out


def first_number(pattern: str, texts: list[str]) -> float | None:
    for text in texts:
        m = re.search(pattern, text)
        if m:
            return float(m.group(1))
    return None


def targets(steps: list[Step]) -> list[str]:
    """The issue's targets, each with what was measured (or that it was not)."""
    by_name = {s.name: s for s in steps}

    def verdict(value: float | None, goal: float, what: str) -> str:
        if value is None:
            return f"{what}: not measured"
        return f"{what}: {value:g} ({'met' if value >= goal else 'NOT met'}, target >= {goal:g})"

    small = [float(r["images/s"]) for s in steps if s.name.startswith(("step_vit_small",
                                                                       "real_loop_vit_small"))
             for r in s.rows if "bf16" in r["configuration"] and r["images/s"] != "-"]
    form = by_name.get("formulation_vit_small_bf16")
    loss = by_name.get("loss_reference")
    return [
        verdict(max(small) if small else None, TARGET_IMAGES_PER_S,
                "ViT-S/16 bf16 step, best images/s per GPU"),
        verdict(first_number(r"ours/authors images/s ([0-9.]+)x", form.ratios if form else []),
                TARGET_VS_AUTHORS, "ours vs the authors' formulation, images/s ratio"),
        verdict(first_number(r"naive/ours time ([0-9.]+)x", loss.ratios if loss else []),
                TARGET_LOSS_SPEED, "loss at the reference shapes, naive/ours time"),
        verdict(first_number(r"peak memory ([0-9.]+)x", loss.ratios if loss else []),
                TARGET_LOSS_MEMORY, "loss at the reference shapes, naive/ours peak memory"),
    ]


def summary(out_dir: Path) -> str:
    steps = read_steps(out_dir)
    device = next((d for d in (parse_device(s.log) for s in steps)
                   if d and "CPU-only" not in d["card"]), None) or next(
        (d for d in (parse_device(s.log) for s in steps) if d), None)
    lines = ["# GPU check", ""]
    if device:
        lines += [f"card: {device['card']} | torch {device['torch']} | date {device['date']}", ""]
    else:
        lines += ["card: unknown (no step printed its device line)", ""]
    lines += ["| step | exit | seconds | result |", "|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s.name} | {EXIT_MEANING.get(s.rc, s.rc + ' (failed)')} | {s.seconds} "
                     f"| {s.result.replace('|', '/')} |")
    lines += ["", "| step | configuration | step time | images/s | MFU | peak memory |",
              "|---|---|---|---|---|---|"]
    for s in steps:
        for r in s.rows:
            lines.append(f"| {s.name} | {r['configuration']} | {r['step time']} | "
                         f"{r['images/s']} | {r['MFU']} | {r['peak memory']} |")
    lines += ["", "Ratios:"]
    lines += [f"- {s.name}: {ratio}" for s in steps for ratio in s.ratios
              if not ratio.startswith("achieved")]
    lines += [f"- {line}" for line in pair_ratios(steps)]
    lines += ["", "Targets:"] + [f"- {t}" for t in targets(steps)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("out_dir", help="the folder gpu_check.sh wrote")
    args = p.parse_args(argv)
    print(summary(Path(args.out_dir)), end="")


if __name__ == "__main__":
    try:
        main()
    except utils.UserError as e:
        utils.exit_with_error(str(e))
