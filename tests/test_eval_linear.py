"""eval_linear.py: exact resume after SIGKILL (shuffle and augmentation replayed), the folder
lock shared with training, its own log file, and one-line refusals."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import storage
from test_eval import assert_clean_exit, run_in_process, run_script

PICO = ["--arch", "vit_pico", "--patch_size", "7", "--resize_size", "28", "--crop_size", "28",
        "--batch_size_per_gpu", "50", "--lr", "0.5"]
EPOCHS = 6


def linear_args(data, out, workers=1):
    return ["--data_path", str(data), *PICO, "--num_workers", str(workers), "--epochs", str(EPOCHS),
            "--output_dir", str(out)]


def start(repo_root, args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)}
    return subprocess.Popen([sys.executable, str(repo_root / "eval_linear.py"), *args], cwd=repo_root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_rerun_ends_exactly_as_an_uninterrupted_run(repo_root, fmnist_folder, tmp_path):
    whole = run_script(repo_root, "eval_linear.py", *linear_args(fmnist_folder, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    proc = start(repo_root, linear_args(fmnist_folder, out))
    log = out / "linear_log.txt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-run: no handler, no chance to save anything more
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = torch.load(out / "linear_last.pth", weights_only=True)["epoch"]
    assert 2 <= done < EPOCHS, done

    resumed = run_script(repo_root, "eval_linear.py", *linear_args(fmnist_folder, out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'linear_last.pth'} after epoch {done}" in resumed.stdout
    a = torch.load(tmp_path / "whole" / "linear_last.pth", weights_only=True)
    b = torch.load(out / "linear_last.pth", weights_only=True)
    assert torch.equal(a["head"]["linear.weight"], b["head"]["linear.weight"])
    assert torch.equal(a["head"]["linear.bias"], b["head"]["linear.bias"])
    ra = json.loads((tmp_path / "whole" / "linear_results.json").read_text())
    rb = json.loads((out / "linear_results.json").read_text())
    assert (ra["top1"], ra["top5"], ra["best_top1"]) == (rb["top1"], rb["top5"], rb["best_top1"])
    # The per-epoch lines agree too (the killed run may have written its last line twice
    # at most: epochs are logged after the head is saved).
    lines_a = (tmp_path / "whole" / "linear_log.txt").read_text().splitlines()
    lines_b = list(dict.fromkeys((out / "linear_log.txt").read_text().splitlines()))
    assert lines_a == lines_b


def test_the_seed_changes_the_run(repo_root, fmnist_folder, tmp_path):
    """The per-epoch seeding keeps --seed meaningful (else the exactness test could pass on a
    run that ignores randomness altogether)."""
    heads = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        code, _, err = run_in_process(repo_root, "eval_linear.py",
                                      *linear_args(fmnist_folder, out, workers=0)[:-4], "--epochs",
                                      "1", "--seed", str(seed), "--output_dir", out)
        assert code == 0, err
        heads.append(torch.load(out / "linear_last.pth", weights_only=True)["head"]["linear.weight"])
    assert not torch.equal(*heads)


def test_a_folder_in_use_is_refused_and_a_training_log_is_never_touched(repo_root, fmnist_folder,
                                                                         tmp_path):
    out = tmp_path / "train_out"
    out.mkdir()
    (out / "log.txt").write_text('{"epoch": 1, "train_loss": 5.0}\n')
    lock = storage.FolderLock(out)  # what a running training holds
    lock.acquire()
    try:
        assert_clean_exit(run_in_process(repo_root, "eval_linear.py",
                                         *linear_args(fmnist_folder, out, workers=0)),
                          "in use by another run")
        assert_clean_exit(run_in_process(repo_root, "eval_knn.py", "--data_path", fmnist_folder,
                                         *PICO[:8], "--num_workers", "0", "--output_dir", out),
                          "in use by another run")
    finally:
        lock.release()
    # A finished training's folder: the evaluation writes its own files only.
    args = linear_args(fmnist_folder, out, workers=0)
    args[args.index("--epochs") + 1] = "1"
    code, _, err = run_in_process(repo_root, "eval_linear.py", *args)
    assert code == 0, err
    assert (out / "log.txt").read_text() == '{"epoch": 1, "train_loss": 5.0}\n'
    assert len((out / "linear_log.txt").read_text().splitlines()) == 1
    # ... and left the folder unlocked.
    again = storage.FolderLock(out)
    again.acquire()
    again.release()


@pytest.mark.parametrize("flags, fragment", [
    (["--crop_size", "30"], "--crop_size 30 is not a multiple of the patch size 7: use e.g. 28 or 35"),
    (["--seed", "-1"], "--seed must be in 0.."),
    (["--seed", "99999999999"], "--seed must be in 0.."),
])
def test_bad_flags_are_one_line(repo_root, fmnist_folder, tmp_path, flags, fragment):
    args = linear_args(fmnist_folder, tmp_path / "o", workers=0) + flags
    assert_clean_exit(run_in_process(repo_root, "eval_linear.py", *args), fragment)
    assert_clean_exit(run_in_process(repo_root, "eval_knn.py", "--data_path", fmnist_folder,
                                     *PICO[:6], "--num_workers", "0", "--output_dir",
                                     tmp_path / "k", *flags), fragment)


def test_a_folder_as_pretrained_weights_is_named_a_folder(repo_root, fmnist_folder, tmp_path):
    for script in ("eval_linear.py", "eval_knn.py"):
        assert_clean_exit(run_in_process(repo_root, script, "--data_path", fmnist_folder,
                                         "--pretrained_weights", tmp_path, "--output_dir",
                                         tmp_path / "o"),
                          "is a folder, not a weights file")
