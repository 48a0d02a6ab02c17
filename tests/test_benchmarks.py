"""The benchmarks run at tiny sizes and print what they promise (no timing assertions)."""
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F


def run_script(repo_root, *argv, expect_rc=0):
    proc = subprocess.run([sys.executable, *map(str, argv)], cwd=repo_root, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == expect_rc, proc.stdout + proc.stderr
    return proc


def line(output: str, prefix: str) -> str:
    found = [x for x in output.splitlines() if x.startswith(prefix)]
    assert len(found) == 1, f"expected one '{prefix}' line in:\n{output}"
    return found[0]


def test_bench_loss_quick_agrees_and_prints_ratio(repo_root):
    out = run_script(repo_root, "benchmarks/bench_loss.py", "--quick", "--device", "cpu",
                     "--threads", "1").stdout
    check = line(out, "check:")
    loss_diff, grad_diff = map(float, re.findall(r"= ([0-9.e+-]+)", check))
    assert loss_diff < 1e-4 and grad_diff < 1e-5  # naive and ours compute the same thing
    ratio = line(out, "ratio:")
    assert re.search(r"naive/ours time [0-9.]+x", ratio), ratio
    assert "peak memory" in ratio


def test_naive_loss_matches_module_on_double_inputs(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    from bench_loss import naive_massl_loss
    from massl_loss import MaSSLLoss

    g = torch.Generator().manual_seed(3)
    B, V, K, P, D = 3, 5, 48, 16, 8
    student = F.normalize(torch.randn(V * B, D, generator=g, dtype=torch.float64), dim=1)
    teacher = F.normalize(torch.randn(2 * B, D, generator=g, dtype=torch.float64), dim=1)
    memory = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)
    perm = torch.randperm(K, generator=g)
    naive = naive_massl_loss(student, teacher, memory, P, 0.1, 0.05, perm=perm)
    ours = MaSSLLoss(P, student_temp=0.1)(student, teacher, memory, 0.05, perm=perm)
    assert naive.item() == pytest.approx(ours.item(), rel=1e-5)


def test_bench_step_quick_trains_and_prints_mfu(repo_root):
    out = run_script(repo_root, "benchmarks/bench_step.py", "--quick", "--device", "cpu",
                     "--threads", "1").stdout
    flops = float(re.search(r"flops: ([0-9.]+) GFLOP", line(out, "flops:")).group(1))
    assert flops > 0
    first, last = map(float, re.search(r"loss ([-0-9.naif]+) -> ([-0-9.naif]+)",
                                       line(out, "step:")).groups())
    assert math.isfinite(first) and math.isfinite(last)
    # 1 warm-up + 2 timed steps of 4 images each went through the memory and the EMA.
    assert line(out, "check:") == "check: memory pointer 12, teacher moved by EMA: yes"
    assert re.search(r"MFU [0-9.]+%", line(out, "ratio:"))


def test_bench_step_real_loop_times_the_training_script(repo_root):
    out = run_script(repo_root, "benchmarks/bench_step.py", "--quick", "--device", "cpu",
                     "--threads", "1", "--real_loop", "--workers", "0").stdout
    # main_massl.train itself ran its two epochs (its own console lines), on written JPEGs
    assert "Epoch [1/2] done" in out and "Epoch [2/2] done" in out
    config = line(out, "config:")
    assert config.startswith("config: real loop: fp32, SDPA on, compile off, foreach AdamW; 0 "
                             "loader workers, 1 process, no process group; 8 JPEGs 32x32")
    assert re.search(r"^step: \S+ m?s \(epoch 2's mean over its 2 steps\), [0-9.]+ images/s, "
                     r"peak memory [0-9.]+ [KMG]iB", line(out, "step:"))
    assert re.search(r"= MFU [0-9.]+%$", line(out, "ratio:"))


def test_bench_step_compare_alternates_variants(repo_root):
    out = run_script(repo_root, "benchmarks/bench_step.py", "--quick", "--device", "cpu",
                     "--threads", "1", "--compare", "sdpa").stdout
    rows = [x for x in out.splitlines() if x.startswith("| fp32, SDPA")]
    assert [r.split(" | ")[0] for r in rows] == ["| fp32, SDPA off, compile off, foreach AdamW",
                                                 "| fp32, SDPA on, compile off, foreach AdamW"]
    # each variant has its own trainer: (1 warm-up + 2 timed steps) x 4 images in its memory
    assert line(out, "check:") == ("check: memory pointer 12, teacher moved by EMA: yes "
                                   "(every variant)")
    assert re.search(r"ratio: speed vs sdpa=False .*: sdpa=True [0-9.]+x$", line(out, "ratio:"))


def test_bench_step_times_the_health_metrics(repo_root):
    out = run_script(repo_root, "benchmarks/bench_step.py", "--quick", "--device", "cpu",
                     "--threads", "1", "--compare", "monitor").stdout
    rows = [x.split(" | ")[0] for x in out.splitlines() if x.startswith("| fp32, SDPA")]
    assert rows == ["| fp32, SDPA on, compile off, foreach AdamW",
                    "| fp32, SDPA on, compile off, foreach AdamW, health metrics"]
    assert re.search(r"^ratio: a step with health metrics .* takes -?[0-9.]+ ms more than one "
                     r"without \([-+][0-9.]+%\); every --print_freq 50 steps that is -?[0-9.]+% of "
                     r"the training time$", line(out, "ratio:")), out


def test_bench_step_times_the_authors_formulation_against_ours(repo_root):
    # float32: the authors' logits then keep the memory bank itself for backward, which the
    # step writes before backward (this crashed before the loss took a snapshot).
    out = run_script(repo_root, "benchmarks/bench_step.py", "--quick", "--device", "cpu",
                     "--threads", "1", "--compare", "formulation", "--precision", "fp32").stdout
    rows = [x.split(" | ")[0] for x in out.splitlines() if x.startswith("| fp32, SDPA")]
    assert rows == ["| fp32, SDPA off, compile off, foreach AdamW, authors' naive loss "
                    "(fp32 logits)", "| fp32, SDPA on, compile off, foreach AdamW"]
    assert line(out, "check:") == ("check: memory pointer 12, teacher moved by EMA: yes "
                                   "(every variant)")
    assert re.search(r"^ratio: ours/authors images/s [0-9.]+x \(median of per-round ratios; "
                     r"[0-9.]+ vs [0-9.]+ images/s\)$", line(out, "ratio:"))


def test_authors_loss_rounds_its_logits_to_16_bits_under_autocast(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    from bench_step import AuthorsLoss
    from massl_loss import MaSSLLoss

    g = torch.Generator().manual_seed(0)
    B, V, K, P, D = 4, 4, 64, 16, 32
    student = F.normalize(torch.randn(V * B, D, generator=g), dim=1)
    teacher = F.normalize(torch.randn(2 * B, D, generator=g), dim=1)
    memory = F.normalize(torch.randn(K, D, generator=g), dim=1)
    perm = torch.randperm(K, generator=g)
    ours = MaSSLLoss(P, student_temp=0.1)(student, teacher, memory, 0.04, perm=perm).item()
    authors = AuthorsLoss(P, 0.1)
    assert authors(student, teacher, memory, 0.04, perm=perm).item() == pytest.approx(ours, rel=1e-5)
    # Inside the step's autocast its logits (up to 1 / 0.04 = 25) are bf16: visibly rounded.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = authors(student, teacher, memory, 0.04, perm=perm).item()
    assert rounded == pytest.approx(ours, rel=0.05) and abs(rounded - ours) > 1e-4 * ours


def test_step_state_bytes_counts_weights_adamw_state_and_memory_once(repo_root, monkeypatch):
    # What --compare charges each variant on a GPU besides its step's peak (checked on CPU).
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    import bench_step

    cpu = torch.device("cpu")
    opts = bench_step.resolve_options(bench_step.get_args_parser().parse_args(
        ["--quick", "--device", "cpu"]))
    variant = {"precision": "fp32", "sdpa": True, "compile": False, "fused_adamw": False,
               "formulation": "ours"}
    trainer = bench_step.build_trainer(opts, cpu, variant)
    trainer.train_step([bench_step.random_crops(opts, cpu)])
    params = list(trainer.student.parameters())
    n = sum(p.numel() for p in params)
    expected = (4 * n * 2                      # student and teacher weights, float32
                + 4 * n * 2 + 4 * len(params)  # AdamW exp_avg, exp_avg_sq and step
                + 4 * 64 * 256 + 8)            # memory bank (--quick: K=64, D=256), pointer
    assert bench_step.state_bytes(trainer) == expected


def test_bench_data_quick_on_real_images(repo_root, fmnist_folder):
    out = run_script(repo_root, "benchmarks/bench_data.py", "--quick", "--workers", "0,1",
                     "--data_path", fmnist_folder / "train").stdout
    rows = [x for x in out.splitlines() if re.match(r"\| (script|dino) \| \d", x)]
    assert [r.split(" | ")[:2] for r in rows] == [["| script", "0"], ["| dino", "0"],
                                                  ["| script", "1"], ["| dino", "1"]], out
    assert all(float(r.split("|")[3]) > 0 for r in rows)
    assert re.search(r"load average before: [0-9.]+ [0-9.]+ [0-9.]+ on \d+ cores",
                     line(out, "load average before:"))
    assert re.search(r"ratio: script/dino images/s: 0 workers [0-9.]+x, 1 workers [0-9.]+x, "
                     r"per CPU second [0-9.]+x$", line(out, "ratio:"))
    assert all(float(r.split("|")[5]) > 0 for r in rows if r.split(" | ")[1] == "0")


def test_bench_data_compare_augment_on(repo_root, fmnist_folder):
    """Both paths' worker CPU per image, the device half's time, and the ratio line."""
    out = run_script(repo_root, "benchmarks/bench_data.py", "--quick", "--compare", "augment_on",
                     "--data_path", fmnist_folder / "train").stdout
    rows = {r.split(" | ")[0][2:]: r for r in out.splitlines() if re.match(r"\| (workers|device) \|", r)}
    assert set(rows) == {"workers", "device"}, out
    per_image = {k: float(re.search(r"\| ([0-9.]+) ms \|", r).group(1)) for k, r in rows.items()}
    assert all(v > 0 for v in per_image.values())
    assert re.search(r"device part on cpu: [0-9.]+ ms per image", out), out
    ratio = float(re.search(r"ratio: worker CPU per image workers/device ([0-9.]+)x$",
                            line(out, "ratio:")).group(1))
    assert ratio == pytest.approx(per_image["workers"] / per_image["device"], rel=0.1)


def test_bench_data_generated_images_are_the_ones_timed(repo_root, monkeypatch, tmp_path):
    # The Fashion-MNIST fallback must not leave its PNGs next to the JPEGs (they would be
    # read as a class folder and timed instead).
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    from bench_data import write_test_images

    import data
    write_test_images(tmp_path, 5, (40, 30), source="fashion_mnist")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"img_{i:05d}.jpg" for i in range(5)]
    dataset = data.build_pretrain_dataset(str(tmp_path), None)
    assert [dataset[i][0].size for i in range(3)] == [(30, 40), (40, 30), (40, 30)]


def test_bench_dino_pipeline_makes_the_multicrop_tensors(repo_root, fmnist_folder, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    from bench_data import DataAugmentationDINO

    import images
    image = images.load_rgb_image(str(next((fmnist_folder / "train").rglob("*.png"))))
    crops = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, 32, 16)(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)


@pytest.mark.parametrize("script,argv,message", [
    ("bench_loss.py", ["--memory_size", "64", "--block_size", "128"], "--block_size"),
    ("bench_step.py", ["--quick", "--arch", "no_such_net"], "unknown --arch"),
    ("bench_step.py", ["--quick", "--real_loop", "--compare", "compile"], "drop --compare"),
    ("bench_data.py", ["--quick", "--workers", "a,b"], "--workers"),
])
def test_bad_options_give_one_line_errors(repo_root, script, argv, message):
    device = [] if script == "bench_data.py" else ["--device", "cpu"]
    proc = run_script(repo_root, f"benchmarks/{script}", *device, *argv, expect_rc=2)
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:")


def test_collapse_toy_contracts_only_when_views_disagree(repo_root, monkeypatch):
    # The mechanism README's troubleshooting states: views that agree spread the embeddings,
    # views further apart than images are pull every embedding into one cone.
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    from collapse_toy import run
    small = dict(teacher_temp=0.05, steps=121, batch=64, memory=1024, block=256, n_views=4)
    agree = run(view_noise=0.3, **small)
    disagree = run(view_noise=1.0, **small)
    assert agree[0][2] == pytest.approx(disagree[0][2], abs=1e-3)  # the same start
    assert agree[-1][2] < agree[0][2] - 0.02
    assert disagree[-1][2] > disagree[0][2] + 0.25
