"""monitor.py and the monitoring of main_massl.py: health metrics on hand-built tensors, the
collapse warning, the online k-NN (eval_knn.py's number, 1 = 2 processes), and training that
replays exactly with the monitor on or off, stopped or not."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval_knn
import main_massl
import monitor
import plot_training
import utils
import vision_transformer as vits
from massl_loss import MaSSLLoss
from test_eval import free_port
from trainer import MaSSLTrainer, clip_gradients

ROOT = Path(__file__).resolve().parents[1]

# 100 images, batch 16 -> 6 steps per epoch; a memory of 32 slots in 2 blocks of 16.
TINY = ["--arch", "vit_nano", "--patch_size", "4", "--global_crops_size", "16",
        "--local_crops_size", "8", "--local_crops_number", "2", "--out_dim", "32",
        "--partition_size", "16", "--koleo_loss_weight", "1.0", "--num_workers", "0",
        "--warmup_teacher_temp_epochs", "0", "--teacher_temp", "0.04",
        "--momentum_teacher", "0.99", "--seed", "0", "--batch_size_per_gpu", "16",
        "--lr", "0.01", "--saveckp_freq", "0"]
# Odd subset sizes: the two ranks' shards differ in size.
KNN = ["--knn_freq", "1", "--knn_max_train", "101", "--knn_max_val", "37"]


# --------------------------------------------------------------------------- metrics


def test_block_entropy_of_hand_built_distributions(monkeypatch):
    P = 4
    uniform = torch.full((3, 2, 2 * P), 1 / P)
    assert monitor.block_entropy(uniform, P) == pytest.approx(1.0)
    one_hot = F.one_hot(torch.tensor([[1, 3], [0, 2]]), P).float().view(2, 2 * P)
    assert monitor.block_entropy(one_hot, P) == pytest.approx(0.0)
    # Two blocks: [1/2, 1/2, 0, 0] has entropy ln 2 = 0.5 ln 4; one-hot 0: mean 0.25.
    mixed = torch.tensor([[0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    assert monitor.block_entropy(mixed, P) == pytest.approx(0.25)
    # Random distributions against a literal loop, also when computed in small chunks.
    probs = torch.rand(5, 3, 3 * P).unflatten(-1, (3, P)).softmax(-1).flatten(-2)
    literal = np.mean([-sum(p * math.log(p) for p in block.tolist()) / math.log(P)
                       for block in probs.reshape(-1, P)])
    assert monitor.block_entropy(probs, P) == pytest.approx(literal, rel=1e-6)
    monkeypatch.setattr(monitor, "ENTROPY_CHUNK_ELEMENTS", 7)
    assert monitor.block_entropy(probs, P) == pytest.approx(literal, rel=1e-6)
    assert monitor.block_entropy(torch.ones(2, 5), 1) == 0.0


def probs_with_argmax(argmax: torch.Tensor, P: int) -> torch.Tensor:
    """Block softmaxes (crops, B, n * P) whose argmax in each block is ``argmax`` (crops, B, n)."""
    return (F.one_hot(argmax, P).float() * 0.5 + 0.5 / P).flatten(-2)


def test_agreement_of_hand_built_argmaxes():
    P, G = 4, 2
    teacher_idx = torch.tensor([[[0, 1], [2, 3]], [[1, 1], [0, 0]]])       # (G=2, B=2, n=2)
    teacher = probs_with_argmax(teacher_idx, P)
    # Identical student and teacher views: agreement 1.0 with 2 crops.
    same = probs_with_argmax(torch.tensor([[[0, 0]] * 2] * 2), P)
    assert monitor.block_agreement(same, same, P) == 1.0
    # Student crops 0, 1 are the teacher's crops 1, 0 (the pairs i != j match: 1.0); local crop
    # 2 agrees with teacher 0 on 1 of 4 (image, block) and with teacher 1 on 2 of 4.
    local = torch.tensor([[[0, 0], [0, 0]]])
    student = probs_with_argmax(torch.cat([teacher_idx.flip(0), local]), P)
    assert monitor.block_agreement(student, teacher, P) == pytest.approx((1 + 1 + 0.25 + 0.5) / 4)
    # Random inputs against a literal loop over pairs, images and blocks.
    V, B, n = 5, 3, 4
    s, t = torch.rand(V, B, n * P), torch.rand(G, B, n * P)
    hits = [[float(s[i, b, k * P:(k + 1) * P].argmax() == t[j, b, k * P:(k + 1) * P].argmax())
             for b in range(B) for k in range(n)] for i in range(V) for j in range(G) if i != j]
    assert monitor.block_agreement(s, t, P) == pytest.approx(np.mean(hits))


def test_memory_usage_counts_distinct_argmax_rows():
    P = 4
    perm = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])                         # K = 8, 2 blocks
    idx = torch.tensor([[[0, 1], [0, 2]], [[0, 1], [3, 1]]])               # (G=2, B=2, n=2)
    slots = monitor.argmax_slots(probs_with_argmax(idx, P), perm, P)
    # block 0 slot p -> row perm[p]; block 1 slot p -> row perm[4 + p]
    assert slots.tolist() == [7, 2, 7, 1, 7, 2, 4, 2]
    assert monitor.memory_usage(slots, 8) == pytest.approx(4 / 8)          # rows 7, 2, 1, 4
    assert monitor.memory_usage(torch.zeros(100, dtype=torch.long), 1000) == pytest.approx(1 / 100)
    assert monitor.memory_usage(torch.arange(100) % 10, 10) == 1.0        # K < argmaxes


def test_memory_spread_is_the_mean_pairwise_cosine():
    assert monitor.memory_spread(torch.eye(6)) == pytest.approx(0.0, abs=1e-12)
    assert monitor.memory_spread(torch.ones(5, 3)) == pytest.approx(1.0)
    bank = F.normalize(torch.randn(40, 8) + 0.5, dim=1)
    sims = bank @ bank.T
    literal = (sims.sum() - sims.diagonal().sum()) / (40 * 39)
    assert monitor.memory_spread(bank) == pytest.approx(literal.item(), rel=1e-5)


def test_clip_gradients_reports_the_norm_before_clipping_and_the_tensors_clipped():
    def params(*norms):
        ps = [torch.nn.Parameter(torch.zeros(2)) for _ in norms]
        for p, n in zip(ps, norms):
            p.grad = torch.tensor([n * 0.6, n * 0.8])
        return ps

    ps = params(3.0, 4.0, 12.0)
    total, clipped = clip_gradients(ps, 3.5, stats=True)
    assert total == pytest.approx(13.0) and clipped == 2                   # sqrt(9+16+144)
    assert [p.grad.norm().item() for p in ps] == pytest.approx([3.0, 3.5, 3.5], rel=1e-5)
    ps = params(3.0, 4.0)
    assert clip_gradients(ps, 0.0, stats=True) == pytest.approx((5.0, 0))  # no clipping
    assert ps[1].grad.norm().item() == pytest.approx(4.0)
    assert clip_gradients(params(3.0), 1.0) is None


def test_loss_gives_its_block_softmaxes_and_the_same_loss_and_gradient():
    V, G, B, D, K, P, tt, ts = 4, 2, 3, 8, 12, 4, 0.05, 0.1
    z = F.normalize(torch.randn(V * B, D), dim=1)
    t_emb = F.normalize(torch.randn(G * B, D), dim=1)
    memory = F.normalize(torch.randn(K, D), dim=1)
    perm = torch.randperm(K)
    loss_fn = MaSSLLoss(P, student_temp=ts)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    plain = loss_fn(za, t_emb, memory, tt, perm=perm)
    loss, probs = loss_fn(zb, t_emb, memory, tt, perm=perm, return_probs=True)
    plain.backward()
    loss.backward()
    assert loss.item() == plain.item()
    assert torch.equal(za.grad, zb.grad)
    blocks = memory[perm]
    for crops, emb, temp in ((probs.student, z, ts), (probs.teacher, t_emb, tt)):
        literal = (emb @ blocks.T / temp).view(-1, K // P, P).softmax(-1).view(-1, B, K)
        torch.testing.assert_close(crops, literal)


# --------------------------------------------------------------------------- collapse warning


def test_collapse_detector_warns_after_patience_and_resets():
    detector = monitor.CollapseDetector(patience=3, repeat=2)
    bad = {"teacher_entropy": 0.99, "memory_usage": 0.5}
    fired = [bool(detector.update(bad)) for _ in range(7)]
    assert fired == [False, False, True, False, True, False, True]   # at 3, then every 2
    message = detector.update(bad) or detector.update(bad)
    assert "teacher_entropy 0.990 > 0.98" in message[0] and "Troubleshooting" in message[0]
    detector.update({"teacher_entropy": 0.5, "memory_usage": 0.5})     # healthy: streak reset
    assert [bool(detector.update(bad)) for _ in range(3)] == [False, False, True]
    low = monitor.CollapseDetector(patience=1).update({"memory_usage": 0.01})
    assert len(low) == 1 and "memory_usage 0.010 < 0.05" in low[0] and "--out_dim" in low[0]
    alike = monitor.CollapseDetector(patience=1).update({"memory_spread": 0.95})
    assert len(alike) == 1 and "memory_spread 0.950 > 0.9" in alike[0]
    assert "--use_bn_in_head true" in alike[0]
    assert monitor.CollapseDetector(patience=1).update({"memory_spread": 0.85}) == []
    assert detector.update({}) == []                                   # a line without health
    clone = monitor.CollapseDetector(patience=3, repeat=2)
    clone.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert clone.streaks == detector.streaks


# --------------------------------------------------------------------------- online k-NN


def test_balanced_subset_is_fixed_class_balanced_and_seeded():
    labels = [0] * 50 + [1] * 30 + [2] * 4
    subset = monitor.balanced_subset(labels, 20, seed=3)
    counts = np.bincount([labels[i] for i in subset], minlength=3)
    assert counts.tolist() == [8, 8, 4]                  # class 2 has only 4: the rest share
    assert subset == sorted(subset) and len(set(subset)) == 20
    assert monitor.balanced_subset(labels, 20, seed=3) == subset
    assert monitor.balanced_subset(labels, 20, seed=4) != subset
    assert monitor.balanced_subset(labels, 0, seed=3) == list(range(84))
    assert monitor.balanced_subset(labels, 500, seed=3) == list(range(84))


def rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_online_knn_is_eval_knn_and_leaves_the_global_rngs_alone(fmnist_folder, tmp_path):
    utils.fix_random_seeds(5)
    backbone, dim = vits.build_backbone("vit_pico", 7, img_size=28)
    weights = tmp_path / "pico.pth"
    torch.save(backbone.state_dict(), weights)
    knn = monitor.OnlineKNN(str(fmnist_folder), resize_size=28, crop_size=28, batch_size=64)
    before = rng_states()
    result = knn.evaluate(backbone.train(), dim, torch.device("cpu"))
    after = rng_states()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1])
    assert before[2] == after[2]
    assert backbone.training                            # given back in the mode it was in
    assert (result.num_train, result.num_val, result.k) == (300, 100, 20)

    args = eval_knn.get_args_parser().parse_args([
        "--data_path", str(fmnist_folder), "--pretrained_weights", str(weights), "--arch",
        "vit_pico", "--patch_size", "7", "--resize_size", "28", "--crop_size", "28",
        "--nb_knn", "20", "--num_workers", "0", "--output_dir", str(tmp_path / "knn")])
    assert eval_knn.main(args)["k=20"]["top1"] == pytest.approx(result.top1, abs=1e-4)


# --------------------------------------------------------------------------- training runs


def train(tiny_data: Path, out: Path, *extra: str, stop_at_call: int | None = None,
          monkeypatch=None) -> str:
    """main_massl.train in this process (one thread, as the torchrun runs); with
    ``stop_at_call``, a stop request (what SIGTERM makes) arrives at that train_step call."""
    argv = [*TINY, "--data_path", str(tiny_data), "--output_dir", str(out), *extra]
    args = main_massl.build_cli_parser().parse_args(argv)
    if stop_at_call is not None:
        real_step, calls = MaSSLTrainer.train_step, {"n": 0}

        def stepping(self, micro_batches, stop_requested=False, **kwargs):
            calls["n"] += 1
            return real_step(self, micro_batches, stop_requested=calls["n"] == stop_at_call,
                             **kwargs)

        monkeypatch.setattr(MaSSLTrainer, "train_step", stepping)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main_massl.train(args, install_signal_handlers=False)
    finally:
        torch.set_num_threads(threads)
        if stop_at_call is not None:
            monkeypatch.undo()


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


# Keys that measure time, not training.
TIMING = {"time", "train_epoch_time_s", "train_images_per_sec", "knn_seconds"}


def test_monitored_run_logs_knn_and_health_and_trains_as_an_unmonitored_one(
        tiny_data, fmnist_folder, tmp_path, capsys, monkeypatch):
    monitored = tmp_path / "monitored"
    assert train(tiny_data, monitored, "--epochs", "2", "--print_freq", "2",
                 "--knn_data_path", str(fmnist_folder), *KNN) == "finished"
    out = capsys.readouterr().out
    assert "online k-NN: 101 train / 37 val images" in out
    assert out.count("online k-NN top-1 (k=20, 101 train / 37 val images)") == 2
    assert out.count("  health: entropy teacher") == 6       # steps 2, 4, 6 of both epochs
    assert "may be collapsing" not in out
    lines = log_lines(monitored)
    assert [e["epoch"] for e in lines] == [1, 2]
    for entry in lines:
        assert 0 <= entry["knn_top1"] <= 100 and entry["knn_seconds"] > 0
        for key in monitor.HEALTH_KEYS:
            assert math.isfinite(entry[f"train_{key}"]), key
        assert 0 < entry["train_teacher_entropy"] < 0.98 and 0 <= entry["train_agreement"] <= 1
        assert 0 < entry["train_memory_usage"] <= 1 and -1 <= entry["train_memory_spread"] <= 1

    # The same run without any monitoring trains identically (the k-NN and the metrics take
    # nothing from the training's random streams) ...
    plain = tmp_path / "plain"
    assert train(tiny_data, plain, "--epochs", "2", "--print_freq", "2",
                 "--health_metrics", "false") == "finished"
    for a, b in zip(lines, log_lines(plain)):
        assert a["train_loss"] == b["train_loss"] and "train_grad_norm" not in b
    ckpt = {d: torch.load(d / "checkpoint.pth", weights_only=True) for d in (monitored, plain)}
    for key, value in ckpt[monitored]["teacher"].items():
        assert torch.equal(value, ckpt[plain]["teacher"][key]), key

    # ... and, stopped after step 4 of epoch 2 and resumed, logs what the whole run logged.
    cut = tmp_path / "cut"
    flags = ["--epochs", "2", "--print_freq", "2", "--knn_data_path", str(fmnist_folder), *KNN]
    assert train(tiny_data, cut, *flags, stop_at_call=6 + 4, monkeypatch=monkeypatch) == "preempted"
    assert [e["epoch"] for e in log_lines(cut)] == [1]
    assert train(tiny_data, cut, *flags) == "finished"
    resumed = log_lines(cut)
    assert [e["epoch"] for e in resumed] == [1, 2]
    for a, b in zip(lines, resumed):
        assert {k: v for k, v in a.items() if k not in TIMING} == \
            {k: v for k, v in b.items() if k not in TIMING}


@pytest.mark.parametrize("print_freq", [1, 2])
def test_collapsing_run_prints_the_warning(tiny_data, tmp_path, capsys, print_freq):
    out = tmp_path / "collapse"
    # A teacher temperature of 10 makes every teacher block distribution almost uniform, on
    # every step; with --print_freq 2 the steps in between measure nothing and must not count
    # (the console lines and the epoch mean are means over the measured steps only).
    assert train(tiny_data, out, "--epochs", "1", "--print_freq", str(print_freq),
                 "--teacher_temp", "10", "--warmup_teacher_temp", "10") == "finished"
    console = capsys.readouterr().out
    warnings = [line for line in console.splitlines() if "may be collapsing" in line]
    assert warnings and warnings[0].startswith("warning: the run may be collapsing: "
                                               "teacher_entropy ")
    assert "Troubleshooting" in warnings[0] and "--teacher_temp" in warnings[0]
    assert f"[epoch 1 it {3 * print_freq}]" in warnings[0]       # after 3 collapsed lines
    health = [line for line in console.splitlines() if line.startswith("  health: ")]
    assert len(health) == 6 // print_freq
    assert all(float(line.split()[3]) > 0.98 for line in health)  # "entropy teacher X"
    (entry,) = log_lines(out)
    assert entry["train_teacher_entropy"] > 0.98 and entry["warnings"]


def test_one_and_two_processes_give_the_same_online_knn(tiny_data, fmnist_folder, tmp_path):
    """With --lr 0 the teacher stays at its initialisation, the same whatever the number of
    processes, so the k-NN value must be too: features sharded over 2 ranks (51 + 50 train
    images, 19 + 18 val) and gathered back in order."""
    flags = ["--epochs", "1", "--print_freq", "6", "--lr", "0", "--min_lr", "0",
             "--knn_data_path", str(fmnist_folder), *KNN]
    assert train(tiny_data, tmp_path / "one", *flags) == "finished"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    argv = list(TINY)
    argv[argv.index("--batch_size_per_gpu") + 1] = "8"          # 2 x 8: the same global batch
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
         f"--master-port={free_port()}", str(ROOT / "main_massl.py"), *argv, *flags,
         "--data_path", str(tiny_data), "--output_dir", str(tmp_path / "two")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert "2 process(es) x 8 images" in two.stdout
    (one_entry,), (two_entry,) = log_lines(tmp_path / "one"), log_lines(tmp_path / "two")
    assert two_entry["knn_top1"] == one_entry["knn_top1"]


def test_bad_monitor_flags_give_one_line_errors(tiny_data, tmp_path, capsys):
    base = [*TINY, "--data_path", str(tiny_data), "--output_dir", str(tmp_path / "out")]
    cases = [(["--knn_freq", "0"], "--knn_freq must be at least 1"),
             (["--knn_max_val", "-1"], "--knn_max_train and --knn_max_val must be >= 0"),
             (["--knn_crop_size", "2"], "--knn_crop_size 2 is smaller than --patch_size 4"),
             (["--knn_data_path", str(tmp_path / "nope")], "--knn_data_path"),
             (["--knn_data_path", str(tiny_data)], "no folder")]   # no train/ and val/ inside
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            main_massl.main([*base, *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("error: ") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- plot


def test_plot_training_draws_knn_and_health_panels(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    records = []
    for epoch in range(1, 9):
        r = {"epoch": epoch, "train_loss": 6 - 0.3 * epoch, "train_lr": 1e-3,
             "train_teacher_entropy": 0.5 + 0.01 * epoch, "train_student_entropy": 0.6,
             "train_agreement": 0.05 * epoch, "train_memory_usage": 0.4,
             "train_memory_spread": 0.1, "train_grad_norm": 2.0, "train_clipped": 3.0,
             "train_epoch_time_s": 10.0}
        if epoch % 2 == 0:
            r.update(knn_top1=30.0 + epoch, knn_seconds=4.0)
        records.append(r)
    log = tmp_path / "log.txt"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "curves.png"
    plot_training.main(["--log", str(log), "--out", str(out)])
    assert out.stat().st_size > 0 and "wrote" in capsys.readouterr().out
    groups = dict(plot_training.group_keys(plot_training.read_log(log)[0]))
    assert groups == {
        "loss": ["train_loss"], "learning rate": ["train_lr"], "k-NN / accuracy": ["knn_top1"],
        "block entropy (fraction of ln P)": ["train_student_entropy", "train_teacher_entropy"],
        "agreement / memory": ["train_agreement", "train_memory_spread", "train_memory_usage"],
        "gradient norm (before clipping)": ["train_grad_norm"],
        "tensors clipped per step": ["train_clipped"]}
