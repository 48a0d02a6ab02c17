"""benchmarks/gpu_summary.py on saved outputs, and benchmarks/gpu_check.sh's contract.

tests/gpu_check_sample/ is a gpu_check.sh folder made on CPU with the same scripts at
--quick sizes (the commands are in its steps.tsv), plus a timed-out step (its log cut), a
failed one (bench_data.py before --compare augment_on existed) and one skipped for time."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "gpu_check_sample"


@pytest.fixture
def gpu_summary(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_summary
    return gpu_summary


def test_summary_of_the_sample_folder(gpu_summary):
    text = gpu_summary.summary(SAMPLE)
    lines = text.splitlines()
    assert lines[2] == ("card: CPU-only: AMD EPYC, 2 cores visible, 1 torch threads | "
                        "torch 2.14.1+cu130 | date 2026-12-06")
    status = {cells[0]: cells[1:] for cells in gpu_summary.table_rows(text) if len(cells) == 4}
    assert status["cuda_tests"] == ["0 (ok)", "28", "12 skipped, 2 deselected in 27.97s"]
    assert status["step_vit_small_fp16_eager"][0] == "124 (timed out)"
    assert status["data_augment_on"] == [
        "2 (failed)", "3", "bench_data.py: error: unrecognized arguments: --compare augment_on"]
    assert status["torchrun_nccl_real_loop"][0] == "skipped (budget spent)"
    rows = [cells for cells in gpu_summary.table_rows(text) if len(cells) == 6]
    # one row per measurement: 2 loss variants, the eager step, the real loop, 2 formulations
    # (a --compare table); the timed-out step measured nothing
    assert [r[0] for r in rows] == ["loss_reference"] * 2 + ["step_vit_small_bf16_eager",
        "real_loop_vit_small_bf16"] + ["formulation_vit_small_bf16"] * 2
    assert rows[2][1:] == ["bf16, SDPA on, compile off, foreach AdamW", "5.439 s", "0.7",
                           "129.6%", "214.5 MiB"]  # as its log says
    loop = rows[3]
    assert loop[1].startswith("real loop: fp32, SDPA on, compile off, foreach AdamW; 2 loader "
                              "workers, 1 process, no process group")
    assert loop[2:] == ["348.20 ms", "11.5", "8.3%", "1.0 GiB"]
    assert rows[5][1:] == ["bf16, SDPA on, compile off, foreach AdamW", "2.256 s", "1.8",
                           "138.4%", "-"]
    assert rows[0][1:] == ["loss forward+backward, naive", "22.53 ms", "-", "-", "0 B"]
    assert "- formulation_vit_small_bf16: ours/authors images/s 1.12x (median of per-round " \
           "ratios; 1.8 vs 1.6 images/s)" in lines
    targets = lines[lines.index("Targets:") + 1:]
    assert targets == [
        "- ViT-S/16 bf16 step, best images/s per GPU: 0.7 (NOT met, target >= 2000)",
        "- ours vs the authors' formulation, images/s ratio: 1.12 (NOT met, target >= 1.5)",
        "- loss at the reference shapes, naive/ours time: 16.57 (met, target >= 3)",
        "- loss at the reference shapes, naive/ours peak memory: not measured"]


def test_compiled_over_eager_and_real_loop_over_step_ratios(gpu_summary, tmp_path):
    """The ratios across steps, from the sample's eager step log and a copy of it with the
    step twice as fast (standing for a compiled run)."""
    eager = (SAMPLE / "03_step_vit_small_bf16_eager.log").read_text()
    (tmp_path / "01_step_vit_small_bf16_eager.log").write_text(eager)
    (tmp_path / "02_step_vit_small_bf16_compiled.log").write_text(
        eager.replace("0.7 images/s", "1.4 images/s"))
    (tmp_path / "03_real_loop_vit_small_bf16.log").write_text(
        eager.replace("0.7 images/s", "0.56 images/s"))
    (tmp_path / "steps.tsv").write_text(
        "step\trc\tseconds\tcommand\nstep_vit_small_bf16_eager\t0\t1\tx\n"
        "step_vit_small_bf16_compiled\t0\t1\tx\nreal_loop_vit_small_bf16\t0\t1\tx\n")
    lines = gpu_summary.summary(tmp_path).splitlines()
    assert "- vit_small_bf16: compiled/eager images/s 2.00x (1.4 vs 0.7)" in lines
    assert "- vit_small_bf16: real loop/synthetic eager step images/s 0.80x (0.56 vs 0.7)" in lines


def test_summary_of_a_folder_that_is_not_one_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_summary.py", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path} has no steps.tsv: not a gpu_check.sh output folder"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    python = fake / "python"  # a python that sees no GPU, whatever this machine has
    python.write_text(f"#!/bin/sh\nCUDA_VISIBLE_DEVICES= exec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(python)})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: no CUDA device")
    assert not out.exists()


def test_gpu_check_runs_the_issue_list_within_nine_minutes():
    """The steps, in order, each with its own limit; the limits add up to < 9 minutes (the
    four (arch, precision) pairs run eager, then compiled)."""
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=REPO).returncode == 0
    calls = re.findall(r"^\s*step (\S+) (\d+) (.*)$", script.replace("\\\n", " "), re.M)
    # the two loops over (arch, precision) spelled out, eager then compiled
    loops = [c for c in calls if "${arch}" in c[0]]
    assert [c[0] for c in loops] == ['"step_${arch}_${precision}_eager"',
                                     '"step_${arch}_${precision}_compiled"']
    assert script.count("for arch in vit_small vit_base; do") == 2
    assert script.count("for precision in bf16 fp16; do") == 2
    names = [c[0] for c in calls if c not in loops]
    assert names == ["cuda_tests", "loss_reference", "real_loop_vit_small_bf16",
                     "formulation_vit_small_bf16", "data_augment_on", "torchrun_nccl_real_loop"]
    assert sum(int(c[1]) for c in calls) + 3 * sum(int(c[1]) for c in loops) <= 540
    commands = dict((c[0], c[2]) for c in calls)
    assert "-m pytest -q -n 0 -m cuda tests" in commands["cuda_tests"]
    assert "bench_loss.py --reference" in commands["loss_reference"]
    eager, compiled = (c[2] for c in loops)
    assert '--arch "$arch" --precision "$precision"' in eager and "--compile" not in eager
    assert compiled.endswith('--arch "$arch" --precision "$precision" --compile true')
    assert "--real_loop" in commands["real_loop_vit_small_bf16"]
    assert "--compare formulation" in commands["formulation_vit_small_bf16"]
    assert "bench_data.py --compare augment_on" in commands["data_augment_on"]
    torchrun = commands["torchrun_nccl_real_loop"]
    assert "MASSL_FORCE_DDP=1" in torchrun and "--nproc-per-node=1" in torchrun
    assert "timeout --kill-after=10" in script and "BUDGET_S=540" in script
