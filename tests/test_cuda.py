"""The GPU code paths, marked ``cuda``: run them with ``python -m pytest -m cuda tests``.

Without CUDA they are skipped (CI has no GPU). On a GPU: main_massl.py on real Fashion-MNIST
images in fp32, fp16 (gradient scaler) and bf16, eager and ``--compile``d, with data workers
and pinned memory; exact resume after a SIGTERM save, under deterministic settings; DDP with
NCCL in a one-process group (``MASSL_FORCE_DDP=1`` under ``torchrun --nproc-per-node=1``);
eval_knn.py against its CPU result; torch.hub and export.py files on the GPU. The forced
one-process DDP run has a CPU twin with gloo, not marked, so CI tests that path too.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch

import eval_knn
import export
import utils
import vision_transformer as vits
from test_ecosystem import PTH_AND_SAFETENSORS, features, fmnist_batch, make_checkpoint
from test_train import (LOSS_MARGIN, REFERENCE, ROOT, SCRIPT, TIMEOUT, TINY, _env, _free_port,
                        _read_until, epoch_losses, load, tiny_data)  # noqa: F401  (a fixture)

GPU = "cuda"  # the device every test here runs on (one name, so the logic can be dry-run)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = [pytest.mark.cuda, needs_cuda]
COMPILE_TIMEOUT = 600  # torch.compile's first compilations take a while

PRECISION_FLAGS = {
    "fp32": ["--use_fp16", "false", "--use_bf16", "false"],
    "fp16": ["--use_fp16", "true", "--use_bf16", "false"],
    "bf16": ["--use_fp16", "false", "--use_bf16", "true"],
}
AUTOCAST_NOTE = {"fp32": None, "fp16": "float16 autocast", "bf16": "bfloat16 autocast"}

# main_massl.py under deterministic settings, for runs that must agree to float rounding on a
# GPU: deterministic kernels (cuBLAS also needs CUBLAS_WORKSPACE_CONFIG, in the environment),
# and cuDNN off, because the trainer turns on cudnn.benchmark, whose choice of convolution
# algorithm may differ between two processes. Runs using it keep local crops at the global
# size: resampling the position embedding (bicubic) has no deterministic CUDA backward.
DETERMINISTIC_MAIN = """\
import sys
import torch
sys.path.insert(0, {root!r})
torch.use_deterministic_algorithms(True)
torch.backends.cudnn.enabled = False
import main_massl
main_massl.main()
"""
SAME_SIZE_LOCAL_CROPS = ["--local_crops_size", "16"]  # TINY's global crops are 16 px


def deterministic_script(folder: Path) -> str:
    path = folder / "deterministic_main_massl.py"
    path.write_text(DETERMINISTIC_MAIN.format(root=str(ROOT)))
    return str(path)


def deterministic_env() -> dict[str, str]:
    return {**_env(), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def run(cmd: list[str], env: dict[str, str], timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """TF32 off in cuBLAS and cuDNN inside, so GPU float32 results compare with CPU ones."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------- training


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_training_on_gpu_learns_and_saves_a_weights_only_checkpoint(precision, compiled,
                                                                    tiny_data, tmp_path):
    # test_train's 3-epoch reference settings (why the loss reliably drops by LOSS_MARGIN is
    # explained there), with 2 data workers feeding pinned memory. On CPU over seeds 0-1 the
    # loss drops by 0.76-0.81 in fp32, 0.66-0.80 in bf16, and 0.74-0.78 in fp16 autocast with
    # a gradient scaler (emulated on CPU; the scaler skipped one step of 18).
    out = tmp_path / "run"
    args = [*REFERENCE, *PRECISION_FLAGS[precision], "--compile", str(compiled),
            "--device", GPU, "--num_workers", "2", "--data_path", str(tiny_data),
            "--output_dir", str(out)]
    result = run([sys.executable, SCRIPT, *args], _env(),
                 timeout=COMPILE_TIMEOUT if compiled else TIMEOUT)
    data_line = next(x for x in result.stdout.splitlines() if x.startswith("data: "))
    assert f"device {GPU}" in data_line, data_line
    note = AUTOCAST_NOTE[precision]
    assert (note in data_line) if note else ("autocast" not in data_line), data_line

    losses = epoch_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values()), losses
    assert losses[3] < losses[1] - LOSS_MARGIN, losses

    ckpt = load(out / "checkpoint.pth")  # torch.load(weights_only=True)
    assert ckpt["epoch"] == 3
    assert all_finite(ckpt["teacher"]) and all_finite(ckpt["student"])
    assert all_finite(ckpt["memory"])
    assert not any("_orig_mod" in k or k.startswith("module.") for k in ckpt["student"])
    assert ("fp16_scaler" in ckpt) == (precision == "fp16" and GPU == "cuda")
    if "fp16_scaler" in ckpt:
        assert 0 < ckpt["fp16_scaler"]["scale"] < math.inf
    assert ("cuda" in ckpt["rank_states"][0]["rng"]) == (GPU == "cuda")
    backbone, _, info = utils.build_backbone_from_checkpoint(out / "checkpoint.pth")
    assert info["arch"] == "vit_nano" and all_finite(backbone.state_dict())


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_sigterm_on_gpu_saves_and_the_resumed_run_replays_exactly(precision, fmnist_folder,
                                                                  tmp_path):
    # 300 images in batches of 8: 37 steps per epoch, so the signal sent at the first step of
    # epoch 2 lands well before the end of the run even at GPU speed.
    steps_per_epoch = 300 // 8
    script = deterministic_script(tmp_path)
    args = [*TINY, *SAME_SIZE_LOCAL_CROPS, *PRECISION_FLAGS[precision], "--device", GPU,
            "--batch_size_per_gpu", "8", "--epochs", "3", "--lr", "0.01", "--saveckp_freq", "0",
            "--data_path", str(fmnist_folder / "train")]
    reference, out = tmp_path / "reference", tmp_path / "run"
    run([sys.executable, script, *args, "--output_dir", str(reference)], deterministic_env())

    proc = subprocess.Popen([sys.executable, script, *args, "--output_dir", str(out)], cwd=ROOT,
                            env=deterministic_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _read_until(proc, rf"Epoch \[2/3\] it \[\s*1/{steps_per_epoch}\]")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr[-3000:]
    assert "preempted" in stdout and "Traceback" not in stderr, stdout[-2000:] + stderr[-2000:]
    ckpt = load(out / "checkpoint.pth")
    assert 1 <= ckpt["iteration"] < steps_per_epoch, "the stop was not mid-epoch"
    assert ckpt["global_step"] == ckpt["epoch"] * steps_per_epoch + ckpt["iteration"]
    assert ("fp16_scaler" in ckpt) == (precision == "fp16" and GPU == "cuda")

    result = run([sys.executable, script, *args, "--output_dir", str(out)], deterministic_env())
    assert f"{ckpt['epoch']} epochs + {ckpt['iteration']} steps done" in result.stdout
    expected, resumed = epoch_losses(reference), epoch_losses(out)
    assert sorted(resumed) == [1, 2, 3]
    for epoch in (1, 2, 3):
        assert resumed[epoch] == pytest.approx(expected[epoch], rel=1e-5, abs=1e-6), epoch
    a, b = load(reference / "checkpoint.pth"), load(out / "checkpoint.pth")
    for key in ("teacher", "student", "memory"):
        torch.testing.assert_close(b[key], a[key], msg=key)


# --------------------------------------------------------------------------- DDP forced on


@pytest.mark.parametrize("device,deterministic",
                         [("cpu", False), pytest.param(GPU, True, marks=CUDA)], ids=["gloo", "nccl"])
def test_one_process_ddp_forced_on_trains_like_a_plain_run(device, deterministic, tiny_data,
                                                           tmp_path):
    # MASSL_FORCE_DDP=1 under torchrun --nproc-per-node=1: a process group (gloo on CPU, NCCL
    # on CUDA), the DDP-wrapped student, no_sync on the first of 2 micro-batches, the
    # collectives. With one process DDP averages gradients over one rank, so the run must
    # equal a plain one.
    args = [*TINY, "--batch_size_per_gpu", "8", "--gradient_accumulation", "2", "--epochs", "1",
            "--lr", "0.01", "--device", device, "--data_path", str(tiny_data)]
    if deterministic:
        script, env = deterministic_script(tmp_path), deterministic_env()
        args += SAME_SIZE_LOCAL_CROPS
    else:
        script, env = SCRIPT, {**_env(), "OMP_NUM_THREADS": "1"}
    plain, ddp = tmp_path / "plain", tmp_path / "ddp"
    run([sys.executable, script, *args, "--output_dir", str(plain)], env)
    result = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
                  f"--master-port={_free_port()}", script, *args, "--output_dir", str(ddp)],
                 {**env, "MASSL_FORCE_DDP": "1"})
    assert "1 process(es) x 8 images x 2 micro-batches" in result.stdout

    # main_massl.py logs per-rank fingerprints (an all-gather) only with a process group.
    plain_entry = epoch_log_entry(plain)
    ddp_entry = epoch_log_entry(ddp)
    assert "rank_fingerprints" not in plain_entry
    assert len(ddp_entry.get("rank_fingerprints", [])) == 1, "no process group: MASSL_FORCE_DDP ignored"
    assert ddp_entry["train_loss"] == pytest.approx(plain_entry["train_loss"], rel=1e-5)
    a, b = load(plain / "checkpoint.pth"), load(ddp / "checkpoint.pth")
    assert not any(k.startswith("module.") for k in b["student"])
    for key in ("teacher", "student", "memory"):
        torch.testing.assert_close(b[key], a[key], msg=key)


def epoch_log_entry(output_dir: Path) -> dict:
    return json.loads((output_dir / "log.txt").read_text().splitlines()[-1])


# --------------------------------------------------------------------------- evaluation, hub


@pytest.mark.cuda
@needs_cuda
def test_eval_knn_on_gpu_equals_the_cpu_result(fmnist_folder, tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    make_checkpoint(ckpt, "vit_nano", 4, 28, seed=1)
    results = {}
    for device in ("cpu", GPU):
        args = eval_knn.get_args_parser().parse_args([
            "--data_path", str(fmnist_folder), "--pretrained_weights", str(ckpt),
            "--resize_size", "28", "--crop_size", "28", "--num_workers", "0",
            "--batch_size_per_gpu", "64", "--nb_knn", "5", "20", "--device", device,
            "--output_dir", str(tmp_path / device), "--dump_features", str(tmp_path / device)])
        with full_fp32():
            results[device] = eval_knn.main(args)
    assert results[GPU] == results["cpu"]  # same accuracies for every k
    for name in ("trainfeat.pth", "valfeat.pth"):
        gpu = torch.load(tmp_path / GPU / name, weights_only=True)
        cpu = torch.load(tmp_path / "cpu" / name, weights_only=True)
        torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=0, msg=name)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("suffix", PTH_AND_SAFETENSORS)
def test_hub_and_exported_files_run_on_gpu(suffix, repo_root, fmnist_folder, tmp_path, capsys,
                                           no_network):
    ckpt = tmp_path / "checkpoint.pth"
    teacher = make_checkpoint(ckpt, "vit_tiny", 16, 64, seed=2)
    x = fmnist_batch(fmnist_folder, 64)
    expected = features(teacher, x)
    out = tmp_path / f"vitt16{suffix}"
    export.main(["--checkpoint", str(ckpt), "--out", str(out)])
    timm_line = capsys.readouterr().out.strip().splitlines()[-1].strip()
    if suffix == ".pth":
        state = torch.load(out, map_location=GPU, weights_only=True)
    else:
        from safetensors.torch import load_file
        state = load_file(str(out), device=GPU)
    assert all(v.device.type == GPU for v in state.values())
    ours, _ = vits.build_backbone("vit_tiny", 16, img_size=64)
    ours.to(GPU).load_state_dict(state)
    namespace: dict = {}
    exec(timm_line, namespace)  # the line export.py prints, building timm's model
    models = {"hub": torch.hub.load(str(repo_root), "massl_vitt16", source="local",
                                    pretrained=str(ckpt)),
              "exported file": ours, "timm line": namespace["model"]}
    for name, model in models.items():
        model.to(GPU)
        with full_fp32():
            got = features(model, x.to(GPU))
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=0, msg=name)
        with torch.autocast(GPU, dtype=torch.bfloat16):
            half = features(model, x.to(GPU)).float()
        assert torch.isfinite(half).all()
        cosine = torch.nn.functional.cosine_similarity(half.cpu(), expected).min().item()
        assert cosine > 0.99, (name, cosine)


def test_cuda_marker_is_registered(pytestconfig):
    # A typo'd or unregistered marker would silently select nothing with -m cuda.
    markers = pytestconfig.getini("markers")
    assert any(m.startswith("cuda:") for m in markers), markers
