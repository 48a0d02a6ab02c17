"""The GPU code paths, marked ``cuda``: run them with ``python -m pytest -n 0 -m cuda tests``.

Without CUDA they are skipped (CI has no GPU). On a GPU: main_massl.py on real Fashion-MNIST
images in fp32, fp16 (gradient scaler) and bf16, eager and ``--compile``d, with data workers
and pinned memory; exact resume after a SIGTERM save, under deterministic settings; DDP with
NCCL in a one-process group (``MASSL_FORCE_DDP=1`` under ``torchrun --nproc-per-node=1``), also
compiled and with the SyncBatchNorm head; the non-monitored step's host syncs; the loss and a
ViT-S/16 step at the reference shapes (K = 131072, head dim 64);
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
import checkpoints
import distributed
import vision_transformer as vits
from fabricated import PTH_AND_SAFETENSORS, features, fmnist_batch, make_checkpoint
from test_main_massl import (LOSS_MARGIN, REFERENCE, ROOT, SCRIPT, TIMEOUT, TINY, _env,
                             _free_port, _read_until, epoch_losses, load)

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
    # test_main_massl's 3-epoch reference settings (why the loss reliably drops by LOSS_MARGIN is
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
    backbone, _, info = checkpoints.build_backbone_from_checkpoint(out / "checkpoint.pth")
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


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("variant", ["compile", "bn_head"])
def test_one_process_nccl_ddp_with_compile_or_the_sync_bn_head(variant, tiny_data, tmp_path):
    # The DDP paths a plain GPU run does not take: the DDP-wrapped compiled student (DDP's
    # bucket hooks around compiled graphs), and --use_bn_in_head, which a process group on
    # CUDA turns into SyncBatchNorm. With one process, SyncBatchNorm's statistics are the
    # plain BatchNorm's, so the run must train like a plain one (to kernel rounding).
    extra = (["--compile", "true"] if variant == "compile" else ["--use_bn_in_head", "true"])
    args = [*TINY, *extra, "--batch_size_per_gpu", "8", "--gradient_accumulation", "2",
            "--epochs", "1", "--lr", "0.01", "--device", GPU, "--data_path", str(tiny_data),
            "--use_fp16", "false", "--use_bf16", "true"]
    timeout = COMPILE_TIMEOUT if variant == "compile" else TIMEOUT
    plain, ddp = tmp_path / "plain", tmp_path / "ddp"
    run([sys.executable, SCRIPT, *args, "--output_dir", str(plain)], _env(), timeout=timeout)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
         f"--master-port={_free_port()}", SCRIPT, *args, "--output_dir", str(ddp)],
        {**_env(), "MASSL_FORCE_DDP": "1"}, timeout=timeout)
    plain_entry, ddp_entry = epoch_log_entry(plain), epoch_log_entry(ddp)
    assert len(ddp_entry.get("rank_fingerprints", [])) == 1, "no process group"
    assert math.isfinite(ddp_entry["train_loss"])
    assert ddp_entry["train_loss"] == pytest.approx(plain_entry["train_loss"], rel=2e-2)
    a, b = load(plain / "checkpoint.pth"), load(ddp / "checkpoint.pth")
    assert a["student"].keys() == b["student"].keys()  # SyncBatchNorm saves BatchNorm's keys
    assert not any("_orig_mod" in k or k.startswith("module.") for k in b["student"])
    if variant == "bn_head":
        assert any(k.endswith("running_mean") for k in b["student"])
    assert all_finite(b["teacher"]) and all_finite(b["memory"])


# --------------------------------------------------------------------------- the lean step


def gpu_trainer(*extra: str):
    from main_massl import check_args, get_args_parser
    from trainer import MaSSLTrainer
    args = get_args_parser().parse_args([*TINY, "--data_path", "unused", "--device", GPU,
                                         "--batch_size_per_gpu", "8", "--use_fp16", "false",
                                         "--use_bf16", "true", *extra])
    check_args(args, 1)
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device(GPU))
    return MaSSLTrainer(args, env, steps_per_epoch=10, log=lambda message: None)


def gpu_crops(seed: int, size: int = 16, local: int = 8, n_local: int = 2, batch: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [t.to(GPU) for t in [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]
            + [torch.randn(batch, 3, local, local, generator=g) for _ in range(n_local)]]


@pytest.mark.cuda
@needs_cuda
def test_the_non_monitored_step_syncs_with_the_host_only_in_its_check():
    """train_step(monitor=False), main_massl.py's step between logging steps: no host sync
    from its forward, loss, memory update, backward, clipping, AdamW or EMA (CUDA's sync
    debug mode reports each one with the Python line that caused it); only the check after
    the update is queued. And it trains as the monitored step does."""
    import inspect
    import warnings
    import trainer as trainer_module
    # no drop-path: the two trainers share the global RNG, drawn in turn
    flags = ("--clip_grad", "3", "--drop_path_rate", "0")
    a, b = gpu_trainer(*flags), gpu_trainer(*flags)
    a.train_step([gpu_crops(0)])  # first step: lazy allocations, optimizer state
    b.train_step([gpu_crops(0)], monitor=True)
    lines, first = inspect.getsourcelines(trainer_module.MaSSLTrainer._check_step)
    allowed = range(first, first + len(lines))
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            metrics = a.train_step([gpu_crops(1)])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    outside = [(Path(w.filename).name, w.lineno) for w in syncs
               if not (Path(w.filename).name == "trainer.py" and w.lineno in allowed)]
    assert not outside, outside
    assert math.isfinite(metrics["loss"])
    monitored = b.train_step([gpu_crops(1)], monitor=True)
    assert monitored["loss"] == pytest.approx(metrics["loss"], rel=1e-3)
    for pa, pb in zip(a.teacher.parameters(), b.teacher.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@needs_cuda
def test_the_loss_at_the_reference_shapes_against_float64():
    """B=64, 12 crops, D=256, K=131072 in blocks of 16384 (the paper's): ours in float32
    (IEEE) and with TF32 logits (--tf32_logits, the default) against the naive loss in
    float64, within the bound docs/method.md states for TF32."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_loss import naive_massl_loss
    from massl_loss import MaSSLLoss
    g = torch.Generator(device=GPU).manual_seed(0)
    B, V, D, K, P = 64, 12, 256, 131072, 16384
    student = torch.nn.functional.normalize(torch.randn(V * B, D, device=GPU, generator=g), dim=1)
    teacher = torch.nn.functional.normalize(torch.randn(2 * B, D, device=GPU, generator=g), dim=1)
    memory = torch.nn.functional.normalize(torch.randn(K, D, device=GPU, generator=g), dim=1)
    perm = torch.randperm(K, device=GPU, generator=g)
    s64 = student.double().requires_grad_(True)
    with full_fp32():
        exact = naive_massl_loss(s64, teacher.double(), memory.double(), P, 0.1, 0.04, perm=perm)
    exact.backward()
    for tf32, loss_rel, grad_rel in ((False, 1e-5, 1e-4), (True, 5e-4, 3e-3)):
        z = student.clone().requires_grad_(True)
        with full_fp32():  # TF32 only where the loss itself turns it on
            loss = MaSSLLoss(P, student_temp=0.1, tf32=tf32)(z, teacher, memory, 0.04, perm=perm)
            loss.backward()
        assert abs(loss.item() - exact.item()) / exact.item() < loss_rel, tf32
        err = ((z.grad.double() - s64.grad).norm() / s64.grad.norm()).item()
        assert err < grad_rel, (tf32, err)


@pytest.mark.cuda
@needs_cuda
def test_a_vit_small_step_at_the_reference_shapes():
    """ViT-S/16 (head dim 64, SDPA) on 2x224 + 10x96 crops, memory 131072 in blocks of 16384,
    bf16: one step is finite, advances the memory and moves the teacher (batch 16 to keep the
    test's memory small; the benchmarks time batch 64)."""
    trainer = gpu_trainer("--arch", "vit_small", "--patch_size", "16",
                          "--global_crops_size", "224", "--local_crops_size", "96",
                          "--local_crops_number", "10", "--out_dim", "131072",
                          "--partition_size", "16384", "--bottleneck_dim", "256",
                          "--batch_size_per_gpu", "16")
    assert trainer.student.backbone.blocks[0].attn.head_dim == 64
    before = next(trainer.teacher.parameters()).detach().clone()
    for seed in range(2):
        metrics = trainer.train_step([gpu_crops(seed, 224, 96, 10, 16)])
        assert math.isfinite(metrics["loss"]), metrics
    assert int(trainer.memory.ptr) == 32
    assert not torch.equal(before, next(trainer.teacher.parameters()))


# --------------------------------------------------------------------------- evaluation, hub


@pytest.mark.cuda
@needs_cuda
def test_device_augmentation_on_gpu_equals_the_cpu_crops(fmnist_folder):
    """--augment_on device on CUDA, from pinned batches: the CPU's crops (PIL's, bit for bit)
    within one level (the resize's float32 sums)."""
    import device_augment as da
    import utils as u
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image
    photos = [Image.fromarray(skimage_data.astronaut()), Image.fromarray(skimage_data.coffee())]
    plan = da.MultiCropPlan((0.32, 1.0), (0.05, 0.32), 10, 224, 96)
    samples = []
    for seed, photo in enumerate(photos):
        torch.manual_seed(seed)
        samples.append((plan(photo), 0))
    batch, _ = da.collate_plans(samples)
    pinned = da.PlannedBatch(*(t.pin_memory() for t in batch))
    crops = {d: da.DeviceMultiCrop(plan.crop_sizes, u.IMAGENET_MEAN, u.IMAGENET_STD, d)(pinned)
             for d in ("cpu", GPU)}
    step = 1 / 255 / min(u.IMAGENET_STD)  # one uint8 level after normalisation
    for cpu, gpu in zip(crops["cpu"], crops[GPU]):
        assert (gpu.cpu() - cpu).abs().max().item() <= step * 1.001


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
