"""main_massl.py end to end on CPU: a tiny ViT on real Fashion-MNIST images.

The runs are subprocesses (the way researchers launch the script); one 3-epoch reference
run is shared by several tests. Error cases run in-process through ``main(argv)``. Also:
Ctrl-C saves and stops (a second one at once), bad settings refused up front, another
optimizer's state and a full disk at the log write as one line.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import distributed
import main_massl
from faults import PICO, _env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "main_massl.py")

# 100 images (10 per class), batch 16 -> 6 steps per epoch. 16 px global / 8 px local crops
# with 4 px patches keep a step well under a second on a laptop core.
# Why these settings: in 18 steps a randomly initialised tiny ViT barely leaves its
# near-collapsed start, and a memory of near-identical teacher embeddings pins the MaSSL
# term near log(block size) whatever the weights. A memory of one global batch (refilled
# every step) and KoLeo (weight 1) to push embeddings apart give training room to lower the
# loss: over seeds 0-3 the last epoch's mean is 0.59-0.81 below the first (MaSSL term alone
# 0.26-0.48 lower), while with --lr 0 it changes by -0.13..+0.37 (seeds 0-1). Hence the 0.3 margin.
TINY = ["--arch", "vit_nano", "--patch_size", "4", "--global_crops_size", "16",
        "--local_crops_size", "8", "--local_crops_number", "2", "--out_dim", "16",
        "--partition_size", "16", "--koleo_loss_weight", "1.0", "--num_workers", "0",
        "--print_freq", "1", "--warmup_teacher_temp_epochs", "0", "--teacher_temp", "0.04",
        "--momentum_teacher", "0.99", "--seed", "0"]
LOSS_MARGIN = 0.3
REFERENCE = TINY + ["--batch_size_per_gpu", "16", "--epochs", "3", "--lr", "0.01",
                    "--saveckp_freq", "2"]
STEPS_PER_EPOCH = 6
TIMEOUT = 300


def run_script(args: list[str], timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def epoch_losses(output_dir: Path) -> dict[int, float]:
    """Per-epoch mean loss from log.txt (the last line wins if an epoch was logged twice)."""
    losses = {}
    for line in (output_dir / "log.txt").read_text().splitlines():
        entry = json.loads(line)
        losses[entry["epoch"]] = entry["train_loss"]
    return losses


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference_run(tiny_data, tmp_path_factory):
    """One uninterrupted 3-epoch run, shared by the tests below."""
    out = tmp_path_factory.mktemp("reference")
    result = run_script(REFERENCE + ["--data_path", str(tiny_data), "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr
    return out, result


def test_training_run_writes_checkpoints_logs_and_learns(reference_run):
    out, result = reference_run
    assert "Training time" in result.stdout  # the authors' script crashed on this last line
    assert re.search(r"Epoch \[1/3\] it \[1/6\]  loss [0-9.]+ \(massl [0-9.]+ koleo -?[0-9.]+\)  "
                     r"lr .* img/s .* ETA", result.stdout), result.stdout[:3000]

    ckpt = load(out / "checkpoint.pth")  # weights_only=True: plain types only
    for key in ("student", "teacher", "optimizer", "memory", "epoch", "args", "iteration",
                "rank_states"):
        assert key in ckpt, key
    assert "fp16_scaler" not in ckpt  # fp16 is ignored on CPU: no scaler
    assert ckpt["epoch"] == 3 and ckpt["iteration"] == 0
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["arch"] == "vit_nano"
    assert ckpt["args"]["global_crops_scale"] == [0.32, 1.0]
    assert set(ckpt["memory"]) == {"bank", "ptr"}
    assert ckpt["memory"]["bank"].shape == (16, 256)
    assert set(ckpt["student"]) == set(ckpt["teacher"])
    assert all(k.startswith(("backbone.", "head.")) for k in ckpt["teacher"])
    assert "backbone.blocks.0.attn.qkv.weight" in ckpt["teacher"]
    diff = max((ckpt["student"][k].float() - ckpt["teacher"][k].float()).abs().max().item()
               for k in ckpt["teacher"])
    assert diff > 1e-4, "the teacher must be an EMA of the student, not a copy"

    # checkpointNNNN.pth every --saveckp_freq 2 epochs, named by finished epochs
    assert (out / "checkpoint0002.pth").exists()
    assert not (out / "checkpoint0001.pth").exists() and not (out / "checkpoint0003.pth").exists()
    assert load(out / "checkpoint0002.pth")["epoch"] == 2
    assert not list(out.glob("*.tmp"))

    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in lines] == [1, 2, 3]
    for key in ("train_loss", "train_massl", "train_koleo", "train_lr", "train_wd", "train_momentum", "train_teacher_temp",
                "train_images_per_sec", "train_epoch_time_s"):
        assert all(math.isfinite(entry[key]) for entry in lines), key
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    losses = epoch_losses(out)
    assert losses[3] < losses[1] - LOSS_MARGIN, losses


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float = TIMEOUT) -> str:
    """Stdout of ``proc`` up to the first line matching ``pattern``."""
    seen = []
    deadline = time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return "".join(seen)
        if time.time() > deadline:
            break
    proc.kill()
    raise AssertionError(f"never printed {pattern!r}:\n{''.join(seen)}\n{proc.stderr.read()}")


def kill_after_first_checkpoint(cmd: list[str], out: Path) -> None:
    """Run ``cmd`` and SIGKILL it as soon as ``out/checkpoint.pth`` appears."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + TIMEOUT
    while not (out / "checkpoint.pth").exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_after_first_checkpoint_then_restart_replays_exactly(reference_run, tiny_data,
                                                                     tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "run"
    cmd = [sys.executable, SCRIPT, *REFERENCE, "--data_path", str(tiny_data),
           "--output_dir", str(out)]
    kill_after_first_checkpoint(cmd, out)
    assert load(out / "checkpoint.pth")["epoch"] < 3, "killed too late to test resuming"

    result = run_script(REFERENCE + ["--data_path", str(tiny_data), "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout

    reference, resumed = epoch_losses(ref_out), epoch_losses(out)
    assert sorted(resumed) == [1, 2, 3]
    for epoch in (1, 2, 3):
        assert resumed[epoch] == pytest.approx(reference[epoch], rel=1e-5, abs=1e-6), epoch
    a, b = load(ref_out / "checkpoint.pth"), load(out / "checkpoint.pth")
    torch.testing.assert_close(b["teacher"], a["teacher"])
    torch.testing.assert_close(b["memory"], a["memory"])


def test_augment_on_device_is_the_reference_run_and_resumes_exactly(reference_run, tiny_data,
                                                                   tmp_path):
    """On the CPU the device crops are the PIL crops bit for bit, so the run is the reference
    (workers) run; killed after its first checkpoint (SIGKILL) and restarted, it ends with the
    reference's teacher and memory exactly."""
    ref_out, _ = reference_run
    out = tmp_path / "device"
    argv = REFERENCE + ["--data_path", str(tiny_data), "--output_dir", str(out),
                        "--augment_on", "device", "--num_workers", "2"]
    kill_after_first_checkpoint([sys.executable, SCRIPT, *argv], out)
    assert load(out / "checkpoint.pth")["epoch"] < 3, "killed too late to test resuming"
    result = run_script(argv)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stdout and "crops made on the training device" in result.stdout
    a, b = load(ref_out / "checkpoint.pth"), load(out / "checkpoint.pth")
    for key in ("teacher", "memory"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_sigterm_mid_epoch_saves_exits_0_and_resumes_exactly(reference_run, tiny_data, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "run"
    cmd = [sys.executable, SCRIPT, *REFERENCE, "--data_path", str(tiny_data),
           "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _read_until(proc, r"Epoch \[2/3\] it \[1/6\]")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr
    assert "preempted" in stdout and "Traceback" not in stderr

    ckpt = load(out / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and 1 <= ckpt["iteration"] < STEPS_PER_EPOCH, \
        (ckpt["epoch"], ckpt["iteration"])
    assert ckpt["global_step"] == STEPS_PER_EPOCH + ckpt["iteration"]
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [1]

    result = run_script(REFERENCE + ["--data_path", str(tiny_data), "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr
    assert f"1 epochs + {ckpt['iteration']} steps done" in result.stdout
    reference, resumed = epoch_losses(ref_out), epoch_losses(out)
    for epoch in (1, 2, 3):
        assert resumed[epoch] == pytest.approx(reference[epoch], rel=1e-5, abs=1e-6), epoch
    torch.testing.assert_close(load(out / "checkpoint.pth")["teacher"],
                               load(ref_out / "checkpoint.pth")["teacher"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(reference_run, tiny_data,
                                                                  tmp_path):
    ref_out, _ = reference_run
    shutil.copy(ref_out / "checkpoint.pth", tmp_path / "checkpoint.pth")
    before = (tmp_path / "checkpoint.pth").read_bytes()
    # An absurd learning rate blows the weights up after the first step of epoch 4.
    args = [a for a in REFERENCE]
    args[args.index("--epochs") + 1] = "4"
    args[args.index("--lr") + 1] = "1e30"
    result = run_script(args + ["--data_path", str(tiny_data), "--output_dir", str(tmp_path)])
    assert result.returncode == 1
    assert re.search(r"^error: non-finite loss at epoch 4 iteration \d+/6 \(global step \d+\): "
                     r"loss=(nan|-?inf), massl=\S+, koleo=\S+; the last good checkpoint is kept", result.stderr,
                     re.MULTILINE), result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_stay_in_sync(tiny_data, tmp_path):
    # A flat folder of images (no class sub-folders) as unlabelled data.
    flat = tmp_path / "flat"
    flat.mkdir()
    for png in sorted(tiny_data.rglob("*.png")):
        shutil.copy(png, flat / f"{png.parent.name}_{png.name}")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={_free_port()}", SCRIPT, *TINY, "--batch_size_per_gpu", "8",
           "--epochs", "1", "--lr", "0.01", "--data_path", str(flat), "--output_dir", str(out)]
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es) x 8 images" in result.stdout

    ckpt = load(out / "checkpoint.pth")
    assert ckpt["epoch"] == 1 and len(ckpt["rank_states"]) == 2
    assert not any(k.startswith("module.") for k in ckpt["student"])
    entry = json.loads((out / "log.txt").read_text().splitlines()[-1])
    rank0, rank1 = entry["rank_fingerprints"]
    assert rank0 == rank1, "teacher or memory differ across ranks"
    # ... and rank 0's fingerprint is that of the saved teacher and memory
    teacher = [t.double() for t in ckpt["teacher"].values()]
    assert rank0[0] == pytest.approx(sum(t.sum().item() for t in teacher), rel=1e-9)
    assert rank0[2] == pytest.approx(ckpt["memory"]["bank"].double().sum().item(), rel=1e-9)


# --------------------------------------------------------------------------- bad input


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main_massl.main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def _write_bad_image(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")


@pytest.fixture()
def small_args(tiny_data, tmp_path):
    def make(data_path: Path | str, *extra: str) -> list[str]:
        return [*TINY, "--batch_size_per_gpu", "16", "--epochs", "1", "--lr", "0.01",
                "--data_path", str(data_path), "--output_dir", str(tmp_path / "out"), *extra]
    return make


def test_bad_input_gives_one_line_errors(small_args, tiny_data, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "some_class").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("a.png", "b.jpg"):
        _write_bad_image(broken / name)
    few = tmp_path / "few"
    few.mkdir()
    for png in sorted(tiny_data.rglob("*.png"))[:10]:
        shutil.copy(png, few / png.name)

    cases = [
        (small_args(tmp_path / "missing"), "does not exist"),
        (small_args(empty), "no images found in"),
        (small_args(broken), r"cannot read image .*a\.png.*--skip_bad_images"),
        (small_args(broken, "--skip_bad_images", "true"), "no readable image in"),
        (small_args(tiny_data, "--arch", "not_a_model"), "unknown --arch 'not_a_model'"),
        (small_args(tiny_data, "--out_dim", "72"),
         "--out_dim \\(memory size\\) 72 is not a multiple of the global batch 16"),
        (small_args(tiny_data, "--partition_size", "128"),
         "--partition_size \\(block size\\) 128 is larger than the memory size --out_dim 16"),
        (small_args(few), "the dataset has 10 images, fewer than one optimizer step uses"),
        (small_args(tiny_data, "--gradient_accumulation", "7"),
         "fewer than one optimizer step uses .* = 112"),
    ]
    for argv, pattern in cases:
        code, _, err = run_main(argv, capsys)
        assert code == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(pattern, lines[0]), (pattern, err)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_error_exit_has_no_traceback(small_args, tiny_data, tmp_path):
    result = run_script(small_args(tiny_data, "--arch", "not_a_model"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        result.stderr.strip().splitlines()[0]] and result.stderr.startswith("error: unknown --arch")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_unreadable_image_mid_training_is_named_or_skipped(small_args, tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    _write_bad_image(data / "trouser" / "zz_broken.png")  # not the first file: found in training

    code, _, err = run_main(small_args(data, "--num_workers", "1"), capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: cannot read image .*zz_broken\.png", lines[0]), err
    # The data worker was stopped with the run, not left for interpreter exit (where it would
    # defer multiprocessing's terminate() and hold the process for minutes).
    assert multiprocessing.active_children() == []

    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    code, out, err = run_main(small_args(data, "--skip_bad_images", "true"), capsys)
    assert code == 0, err
    assert "warning: skipping unreadable image" in err and "zz_broken.png" in err
    assert load(tmp_path / "out" / "checkpoint.pth")["epoch"] == 1


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups")
def test_stop_signal_to_the_whole_job_with_data_workers_saves_and_leaves_nothing(
        small_args, tiny_data, tmp_path):
    # SLURM signals every process of a job, data workers included: they must neither die
    # first (the run would fail before saving) nor outlive the run.
    argv = small_args(tiny_data, "--num_workers", "2")
    argv[argv.index("--epochs") + 1] = "3"
    proc = subprocess.Popen([sys.executable, SCRIPT, *argv], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _read_until(proc, r"Epoch \[1/3\] it \[2/6\]")
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr
    assert "preempted" in stdout and "Traceback" not in stderr, stderr
    assert load(tmp_path / "out" / "checkpoint.pth")["global_step"] >= 2
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)  # anyone left in the job's process group?
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("data workers outlived the training process")


def _worker_after_stop_signal(grace_s: int, pipe) -> None:
    data.WORKER_STOP_GRACE_S = grace_s
    data._defer_stop_signals(0)
    os.kill(os.getpid(), signal.SIGTERM)
    pipe.send("survived SIGTERM")
    time.sleep(60)


@pytest.mark.skipif(not hasattr(signal, "alarm"), reason="needs SIGALRM")
def test_data_worker_outlives_a_stop_signal_only_for_the_grace_period():
    ctx = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    worker = ctx.Process(target=_worker_after_stop_signal, args=(1, sender), daemon=True)
    start = time.monotonic()
    worker.start()
    assert receiver.poll(30) and receiver.recv() == "survived SIGTERM"
    worker.join(30)
    assert worker.exitcode == -signal.SIGALRM  # ended by the grace-period alarm, not sleep
    assert time.monotonic() - start < 30


# --------------------------------------------------------------------------- command line

AUTHORS_VIT_S = (
    "torchrun --nproc-per-node=2 main_massl.py --arch vit_small --batch_size_per_gpu 64 "
    "--num_workers 10 --local_crops_number 10 --patch_size 16 --weight_decay 0.04 "
    "--weight_decay_end 0.4 --lr 5e-4 --min_lr 1e-06 --print_freq 50 --global_crops_scale 0.32 1 "
    "--local_crops_scale 0.05 0.32 --epochs 800 --gradient_accumulation 1 --optimizer adamw "
    "--momentum_teacher 0.992 --drop_path_rate 0.1 --use_bn_in_head false --out_dim 131072 "
    "--partition_size 16384 --warmup_teacher_temp_epochs 30 --warmup_teacher_temp 0.04 "
    "--clip_grad 3 --warmup_epochs 0 --koleo_loss_weight 0.0 --data_path <path/to/imagenet/train>")
AUTHORS_VIT_B = (
    "torchrun --nproc-per-node=4 main_massl.py --arch vit_base --batch_size_per_gpu 32 "
    "--num_workers 6 --local_crops_number 10 --patch_size 16 --weight_decay 0.04 "
    "--weight_decay_end 0.4 --lr 0.00075 --min_lr 2e-06 --print_freq 50 --global_crops_scale 0.32 1 "
    "--local_crops_scale 0.05 0.32 --epochs 400 --gradient_accumulation 1 --optimizer adamw "
    "--momentum_teacher 0.996 --drop_path_rate 0.1 --use_bn_in_head false --out_dim 131072 "
    "--partition_size 16384 --warmup_teacher_temp_epochs 50 --warmup_teacher_temp 0.04 "
    "--teacher_temp 0.07 --clip_grad 3 --warmup_epochs 10 --koleo_loss_weight 0.0 "
    "--data_path <path/to/imagenet/train>")


def _parse_readme_line(line: str):
    words = shlex.split(line.replace("<path/to/imagenet/train>", "/data/imagenet/train"))
    return main_massl.build_cli_parser().parse_args(words[words.index("main_massl.py") + 1:])


def test_the_authors_readme_command_lines_parse_and_mean_what_they_say():
    vits = _parse_readme_line(AUTHORS_VIT_S)
    assert (vits.arch, vits.patch_size, vits.batch_size_per_gpu, vits.epochs) == ("vit_small", 16, 64, 800)
    assert (vits.memory_size, vits.partition_size, vits.gradient_accumulation) == (131072, 16384, 1)
    assert (vits.lr, vits.min_lr, vits.warmup_epochs, vits.momentum_teacher) == (5e-4, 1e-6, 0, 0.992)
    assert vits.global_crops_scale == [0.32, 1.0] and vits.local_crops_scale == [0.05, 0.32]
    assert (vits.local_crops_number, vits.drop_path_rate, vits.clip_grad) == (10, 0.1, 3.0)
    assert (vits.weight_decay, vits.weight_decay_end) == (0.04, 0.4)
    assert vits.use_bn_in_head is False and vits.koleo_loss_weight == 0.0
    assert (vits.warmup_teacher_temp, vits.teacher_temp, vits.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert vits.use_fp16 is True and vits.data_path == "/data/imagenet/train"

    vitb = _parse_readme_line(AUTHORS_VIT_B)
    assert (vitb.arch, vitb.batch_size_per_gpu, vitb.epochs, vitb.lr, vitb.min_lr) == (
        "vit_base", 32, 400, 7.5e-4, 2e-6)
    assert (vitb.warmup_epochs, vitb.momentum_teacher, vitb.warmup_teacher_temp_epochs) == (10, 0.996, 50)


def test_aliases_and_bool_flags():
    parse = main_massl.build_cli_parser().parse_args
    args = parse(["--data_path", "x", "--memory_size", "4096", "--block_size", "512",
                  "--gradient_accumulation_steps", "4", "--drop_path", "0.2", "--local-rank", "3",
                  "--use_fp16", "False", "--use_bn_in_head", "yes"])
    assert (args.memory_size, args.partition_size, args.gradient_accumulation) == (4096, 512, 4)
    assert (args.drop_path_rate, args.use_fp16, args.use_bn_in_head) == (0.2, False, True)
    assert parse(["--data_path", "x", "--local_rank", "1"]).local_rank == 1
    with pytest.raises(SystemExit):
        parse(["--data_path", "x", "--use_fp16", "maybe"])


def test_help_teaches_reference_values(capsys):
    with pytest.raises(SystemExit) as exc:
        main_massl.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out_dim", "--memory_size", "--partition_size", "--block_size",
                 "--gradient_accumulation", "--use_fp16", "--use_bf16", "--global_crops_size",
                 "--skip_bad_images", "--resume", "--local-rank"):
        assert flag in text, flag
    assert text.count("Reference runs") >= 20


# --------------------------------------------------------------------------- stopping, refusing, failing cleanly


def args_for(tiny_data, out, *extra):
    return [*TINY, "--batch_size_per_gpu", "16", "--epochs", "1", "--lr", "0.01",
            "--data_path", str(tiny_data), "--output_dir", str(out), *extra]


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def start_in_own_group(argv):
    return subprocess.Popen([sys.executable, SCRIPT, *argv], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def group_gone(pid):
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    return False


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups")
def test_ctrl_c_saves_mid_epoch_and_the_same_command_resumes(tiny_data, tmp_path, capsys):
    # A terminal's Ctrl-C reaches the whole foreground group: the run and its data workers.
    argv = args_for(tiny_data, tmp_path / "out", "--num_workers", "2")
    argv[argv.index("--epochs") + 1] = "3"
    proc = start_in_own_group(argv)
    _read_until(proc, r"Epoch \[1/3\] it \[2/6\]")
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "interrupted (Ctrl-C): state saved in" in stderr and "run the same command" in stderr
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] >= 2  # mid-epoch, not lost
    assert group_gone(proc.pid)  # no data worker left behind
    argv[argv.index("--num_workers") + 1] = "0"
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    assert "resumed from" in out


def test_a_second_ctrl_c_stops_at_once(capsys):
    stop = distributed.StopRequest()
    assert stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: recorded, the run goes on to save
        assert stop.signal_name == "SIGINT"
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode
        assert exc.value.code == 130
    finally:
        stop.restore()
    err = capsys.readouterr().err
    assert "Ctrl-C again to stop at once" in err and "second Ctrl-C: stopping now" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("flags, fragment", [
    (["--warmup_epochs", "5"], "--warmup_epochs 5 is more than --epochs 1"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    (["--weight_decay_end", "-0.1"], "--weight_decay_end must be >= 0"),
    (["--seed", "-1"], "--seed must be in 0..4294967295"),
    (["--seed", "99999999999"], "--seed must be in 0..4294967295"),
    (["--out_dim", "2000000000", "--partition_size", "16"], "--out_dim 2000000000 needs at least"),
])
def test_bad_settings_are_refused_up_front(tmp_path, capsys, flags, fragment):
    argv = args_for(tmp_path / "no_data", tmp_path / "out", *flags)
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert fragment in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_memory_need_is_a_lower_bound_of_the_bank_and_logits():
    args = main_massl.get_args_parser().parse_args(["--data_path", "x", "--out_dim", "65536", "--bottleneck_dim", "256",
                                                    "--batch_size_per_gpu", "64",
                                                    "--local_crops_number", "10"])
    assert main_massl.memory_need_bytes(args) == 4 * 65536 * (256 + 3 * 64 * 12)


def test_resuming_another_optimizers_state_is_one_line(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_main(args_for(tiny_data, out), capsys)
    assert code == 0, err
    argv = args_for(tiny_data, out, "--optimizer", "sgd")
    argv[argv.index("--epochs") + 1] = "2"
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert "holds the state of --optimizer adamw, not of --optimizer sgd" in one_error_line(err)


def test_a_full_disk_at_the_log_write_is_one_line_and_the_checkpoint_is_kept(tiny_data, tmp_path,
                                                                              capsys, monkeypatch):
    import builtins
    import errno

    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith("log.txt") and "a" in mode:  # the disk fills exactly here
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    out = tmp_path / "out"
    code, _, err = run_main(args_for(tiny_data, out), capsys)
    assert code == 2
    line = one_error_line(err)
    assert f"no space left on device while appending to {out / 'log.txt'}" in line
    assert "run the same command again" in line
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_stop_request_ignores_signals_in_forked_children():
    stop = distributed.StopRequest()
    stop._pid = os.getpid() + 1  # as seen from a forked data worker
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGINT, None)
    assert stop.signal_name is None


def test_a_lost_rank_gives_one_line_naming_the_rank_and_how_to_resume(tiny_data, tmp_path):
    from test_eval import free_port

    argv = args_for(tiny_data, tmp_path / "out", "--batch_size_per_gpu", "8")
    argv[argv.index("--epochs") + 1] = "20"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "MASSL_DIST_TIMEOUT_S": "60",
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, SCRIPT, *argv], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _read_until(procs[0], r"Epoch \[1/20\] it \[2/")
        procs[1].kill()  # SIGKILL: the rank vanishes mid-step
        _, stderr = procs[0].communicate(timeout=120)
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert procs[0].returncode == 1, stderr
    line = one_error_line(stderr)
    assert "rank 0 of 2: lost contact with the other processes" in line
    assert "run the same command again to resume" in line


# --------------------------------------------------------------------------- argument checks


def test_non_finite_float_flags_are_refused_at_start(flat50, tmp_path, capsys):
    parser = main_massl.build_cli_parser()
    floats = [a.option_strings[0] for a in parser._actions if a.type is float]
    assert "--weight_decay" in floats and len(floats) >= 10
    for flag in floats:
        nargs = parser._option_string_actions[flag].nargs or 1
        for value in ("nan", "inf"):
            out = tmp_path / "out"
            code, stdout, err = run_main(PICO + ["--batch_size_per_gpu", "16", "--data_path",
                                                 str(flat50), "--output_dir", str(out),
                                                 flag, *[value] * nargs], capsys)
            assert code == 2, (flag, value, err)
            assert flag in one_error_line(err), (flag, err)
            assert "training from" not in stdout and not out.exists()
    code, _, err = run_main(PICO + ["--batch_size_per_gpu", "16", "--data_path", str(flat50),
                                    "--weight_decay", "nan"], capsys)
    assert one_error_line(err) == "error: --weight_decay nan: must be a finite number"


def test_augmentation_probabilities_outside_0_1_are_refused(flat50, tmp_path, capsys):
    for flag in ("--color_jitter_prob", "--grayscale_prob", "--solarization_prob"):
        code, _, err = run_main(PICO + ["--batch_size_per_gpu", "16", "--data_path", str(flat50),
                                        "--output_dir", str(tmp_path / "out"), flag, "1.5"], capsys)
        assert code == 2 and f"{flag} must be in [0, 1]" in one_error_line(err), (flag, err)
        assert not (tmp_path / "out").exists()
