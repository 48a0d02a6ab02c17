"""Benchmark: one full MaSSL training step -- images/s, peak memory and MFU.

The step is the training script's own: ``trainer.MaSSLTrainer.train_step`` (student on 2
global + L local crops, teacher on the 2 global crops, the MaSSL loss on the memory before its
update, the memory update, backward with a gradient scaler for fp16, clipping, AdamW, EMA),
built from ``main_massl``'s flags and defaults. Input crops are random tensors already on the
device: the data pipeline is measured by ``bench_data.py``.

FLOPs of one step are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls
and attention of the student forward + backward, the teacher forward and the loss; the
optimizer and elementwise work are not counted, as usual for MFU). The peak is a large
matmul in the step's compute dtype, measured in the same process before and after the timed
steps (the better of the two); MFU is achieved FLOP/s over that peak.

``--real_loop`` times what training gets instead: ``main_massl.train`` itself for two short
epochs on a folder of JPEGs (``--data_path``, else photos written to a temporary folder as
``bench_data.py`` writes them) -- the loader and its workers, the host-to-device copies, the
process group when launched by torchrun (``MASSL_FORCE_DDP=1`` forms one for a single
process), the trainer and the background checkpoint at the first epoch's end. The figure is
the second epoch's (the first one compiles, warms up and starts the workers), as log.txt
reports it; MFU counts the same FLOPs per step as the synthetic step.

``--compare KNOB`` times the variants of one setting (precision, sdpa, compile, fused_adamw,
formulation) from the same initial weights, alternating them step by step, so that on a shared
machine a burst of load slows every variant alike. ``--compare formulation`` times the same
step in the authors' formulation -- explicit softmax(QK^T)V attention instead of SDPA, and the
naive loss of ``bench_loss.py`` run inside the step's autocast, so its ``(V*B) x K`` logits are
16-bit as in their code -- against ours; its ``ratio:`` line is our images/s over theirs.

    python benchmarks/bench_step.py                   # GPU: the ViT-S/16 reference step (bf16)
    python benchmarks/bench_step.py --arch vit_base   # ViT-B/16, batch 64 (--batch_size 32: the
                                                      # authors' per-GPU batch)
    python benchmarks/bench_step.py --compare formulation   # ours vs the authors' formulation
    python benchmarks/bench_step.py --compare precision   # fp32 vs fp16 vs bf16 (also: sdpa,
                                                          # compile, fused_adamw)
    python benchmarks/bench_step.py --real_loop           # the training loop's own figure
    MASSL_FORCE_DDP=1 torchrun --nproc-per-node=1 benchmarks/bench_step.py --real_loop
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402  (also puts the repo root on sys.path)
import main_massl  # noqa: E402
from bench_loss import naive_massl_loss  # noqa: E402
import distributed  # noqa: E402
import utils  # noqa: E402
from massl_loss import MaSSLLoss  # noqa: E402
from memory import MemoryBank  # noqa: E402
from trainer import MaSSLTrainer, get_params_groups  # noqa: E402

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# name -> (GPU default, CPU default). The GPU defaults are the ViT-S/16 reference step.
DEFAULTS = {
    "arch": ("vit_small", "vit_tiny"),
    "patch_size": (16, 16),
    "batch_size": (64, 8),
    "global_size": (224, 96),
    "local_size": (96, 48),
    "local_crops_number": (10, 10),
    "memory_size": (131072, 16384),
    "block_size": (16384, 4096),
    "precision": ("bf16", "fp32"),
    "steps": (20, 10),
    "warmup": (5, 3),
    "peak_size": (8192, 2048),
}
QUICK = dict(arch="vit_nano", patch_size=4, batch_size=4, global_size=16, local_size=8,
             local_crops_number=2, memory_size=64, block_size=16, steps=2, warmup=1,
             peak_size=256)


# --------------------------------------------------------------------------- the step


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switch timm attention between SDPA (True) and explicit softmax(QK^T)V; returns the
    number of attention layers switched."""
    n = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled
            n += 1
    return n


def count_step_flops(student: nn.Module, teacher: nn.Module, memory: MemoryBank,
                     criterion: MaSSLLoss, crops: list[torch.Tensor],
                     amp_dtype: torch.dtype | None) -> dict[str, int]:
    """FLOPs of the student forward, teacher forward, loss forward and the backward pass.

    Counted with explicit attention: FlopCounterMode has formulas for matmuls and CUDA SDPA
    kernels but not for every backend's fused attention (CPU's), and the arithmetic is the
    same either way.
    """
    saved = {m: m.fused_attn for m in itertools.chain(student.modules(), teacher.modules())
             if hasattr(m, "fused_attn")}
    set_fused_attention(student, False)
    set_fused_attention(teacher, False)
    counts = {}
    try:
        autocast = torch.autocast(crops[0].device.type, dtype=amp_dtype,
                                  enabled=amp_dtype is not None)
        with autocast:
            with FlopCounterMode(display=False) as fc:
                student_out = student(crops)
            counts["student forward"] = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                teacher_out = teacher(crops[:2])
            counts["teacher forward"] = fc.get_total_flops()
            with FlopCounterMode(display=False) as fc:
                loss = criterion(student_out, teacher_out, memory.features, 0.04)
            counts["loss forward"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            loss.backward()
        counts["backward"] = fc.get_total_flops()
    finally:
        for module, value in saved.items():
            module.fused_attn = value
        student.zero_grad(set_to_none=True)
    return counts


def measure_peak_flops(device: torch.device, amp_dtype: torch.dtype | None, n: int,
                       repeats: int = 5) -> tuple[float, str]:
    """Best FLOP/s of a large square matmul in a compute dtype, measured now: the MFU
    denominator."""
    dtype = amp_dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = bu.interleaved_times({"mm": lambda: a @ b}, device, repeats=repeats, warmup=2)["mm"]
    note = ""
    if device.type == "cuda" and dtype == torch.float32:
        note = f", TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
    return 2 * n ** 3 / min(times), f"{str(dtype).replace('torch.', '')} {n}x{n} matmul{note}"


class AuthorsLoss(nn.Module):
    """``MaSSLLoss``'s interface over ``bench_loss.naive_massl_loss``: the loss as the authors'
    code computes it. The trainer calls its criterion inside the step's autocast, so here the
    logits matmuls run in bf16/fp16 (16-bit ``(V*B) x K`` logits, as in their code); ours
    computes them in float32."""

    def __init__(self, block_size: int, student_temp: float):
        super().__init__()
        self.block_size, self.student_temp = block_size, student_temp

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor,
                memory_features: torch.Tensor, teacher_temp: float,
                perm: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_autocast_enabled(memory_features.device.type):
            # A float32 matmul saves the memory bank itself for backward, and the step
            # writes the bank before backward: a snapshot, as the autocast cast makes one.
            memory_features = memory_features.clone()
        return naive_massl_loss(student_emb, teacher_emb, memory_features, self.block_size,
                                self.student_temp, teacher_temp, perm=perm)


# --------------------------------------------------------------------------- set-up

COMPARE = {  # knob -> values compared, first is the baseline
    "precision": ["fp32", "fp16", "bf16"],
    "sdpa": [False, True],
    "compile": [False, True],
    "fused_adamw": [False, True],
    "formulation": ["authors", "ours"],
    "monitor": [False, True],  # main_massl.py's logging steps: health metrics (monitor.py)
}


def compared_variant(base: dict, knob: str, value: object) -> dict:
    """``base`` with ``knob`` set to ``value``. The authors' formulation is explicit attention
    and the naive loss, never compiled (compiling explicit attention would fuse it, which
    their code does not do); precision and AdamW stay the base's."""
    variant = {**base, knob: value}
    if knob == "formulation" and value == "authors":
        variant.update(sdpa=False, compile=False)
    return variant


def training_args(opts: argparse.Namespace, precision: str, compile: bool,
                  data_path: str = "unused-by-the-benchmark", extra: tuple[str, ...] = ()
                  ) -> argparse.Namespace:
    """The training script's arguments (all its defaults) for this benchmark's shapes."""
    return main_massl.get_args_parser().parse_args([
        "--data_path", data_path, *extra,
        "--arch", opts.arch, "--patch_size", str(opts.patch_size),
        "--global_crops_size", str(opts.global_size), "--local_crops_size", str(opts.local_size),
        "--local_crops_number", str(opts.local_crops_number),
        "--batch_size_per_gpu", str(opts.batch_size),
        "--out_dim", str(opts.memory_size), "--partition_size", str(opts.block_size),
        "--use_fp16", str(precision == "fp16"), "--use_bf16", str(precision == "bf16"),
        "--compile", str(compile),
    ])


def build_trainer(opts: argparse.Namespace, device: torch.device, variant: dict
                  ) -> MaSSLTrainer:
    """The training script's trainer for one variant; every variant starts from the same
    weights and memory (the trainer seeds them from --seed)."""
    args = training_args(opts, variant["precision"], variant["compile"])
    main_massl.check_args(args, world_size=1)
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    try:
        trainer = MaSSLTrainer(args, env, steps_per_epoch=opts.warmup + opts.steps,
                               log=lambda message: None)
    except utils.UserError as e:
        raise utils.UserError(str(e)) from None
    if variant["fused_adamw"] != (device.type == "cuda"):  # the trainer fuses on CUDA
        trainer.optimizer = torch.optim.AdamW(get_params_groups(trainer.student), lr=0.0,
                                              weight_decay=0.0, fused=variant["fused_adamw"])
    if variant["formulation"] == "authors":
        trainer.criterion = AuthorsLoss(args.partition_size, args.student_temp)
    return trainer


def state_bytes(trainer: MaSSLTrainer) -> int:
    """Bytes a trainer holds on its device between steps: student and teacher weights and
    buffers, optimizer state, memory bank (gradients are freed after each step). Each
    storage is counted once."""
    tensors = itertools.chain(
        trainer.student.state_dict().values(), trainer.teacher.state_dict().values(),
        trainer.memory.state_dict().values(),
        (v for state in trainer.optimizer.state.values() for v in state.values()
         if torch.is_tensor(v)))
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
              if t.device.type == trainer.device.type}
    return sum(unique.values())


def random_crops(opts: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    B = opts.batch_size
    return ([torch.randn(B, 3, opts.global_size, opts.global_size, device=device)
             for _ in range(2)]
            + [torch.randn(B, 3, opts.local_size, opts.local_size, device=device)
               for _ in range(opts.local_crops_number)])


def make_step(trainer: MaSSLTrainer, crops: list[torch.Tensor], sdpa: bool,
              losses: list[float], monitor: bool = False) -> Callable[[], None]:
    """A closure running one ``train_step`` of this variant on ``crops``."""
    def step() -> None:
        set_fused_attention(trainer.student, sdpa)
        set_fused_attention(trainer.teacher, sdpa)
        trainer.global_step = 0  # the schedules' first values, whatever the number of steps
        losses.append(trainer.train_step([crops], monitor=monitor)["loss"])

    return step


def variant_name(v: dict) -> str:
    name = (f"{v['precision']}, SDPA {'on' if v['sdpa'] else 'off'}, compile "
            f"{'on' if v['compile'] else 'off'}, {'fused' if v['fused_adamw'] else 'foreach'} "
            "AdamW")
    if v["formulation"] == "authors":
        logits = "fp32" if v["precision"] == "fp32" else "16-bit"
        name += f", authors' naive loss ({logits} logits)"
    if v["monitor"]:
        name += ", health metrics"
    return name


# --------------------------------------------------------------------------- measurement


def run(opts: argparse.Namespace) -> dict:
    """Time one configuration, or every value of ``opts.compare``, alternating step by step."""
    device = utils.resolve_device(opts.device)
    rss_base = bu.peak_rss_bytes() if device.type == "cpu" else 0
    base = {"precision": opts.precision, "sdpa": opts.sdpa, "compile": opts.compile,
            "fused_adamw": device.type == "cuda" if opts.fused_adamw is None else opts.fused_adamw,
            "formulation": "ours", "monitor": False}
    variants = [base] if not opts.compare else [
        compared_variant(base, opts.compare, value) for value in COMPARE[opts.compare]
        if not (opts.compare == "precision" and value == "fp16" and device.type != "cuda")]
    crops = random_crops(opts, device)
    trainers = {variant_name(v): build_trainer(opts, device, v) for v in variants}
    first = next(iter(trainers.values()))
    # MFU counts the work of our step for every variant (the authors' loss does the same
    # arithmetic less efficiently; counting its extra copies would flatter it).
    ours = next(t for v, t in zip(variants, trainers.values()) if v["formulation"] == "ours")
    flops = count_step_flops(first.student, first.teacher, first.memory, ours.criterion, crops,
                             first.amp_dtype)
    teacher_before = {name: next(t.teacher.parameters()).detach().clone()
                      for name, t in trainers.items()}
    losses: list[float] = []
    peaks: dict[str, int] = {}

    def timed(name: str, fn: Callable[[], None]) -> Callable[[], None]:
        def call() -> None:  # allocator statistics are host-side: no synchronisation needed
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            fn()
            if device.type == "cuda":
                step_peak = torch.cuda.max_memory_allocated(device) - before
                peaks[name] = max(peaks.get(name, 0), step_peak)
        return call

    steps = {name: timed(name, make_step(t, crops, v["sdpa"], losses, v["monitor"]))
             for v, (name, t) in zip(variants, trainers.items())}
    dtypes = sorted({v["precision"] for v in variants})
    peak_flops = {d: measure_peak_flops(device, DTYPES[d], opts.peak_size) for d in dtypes}
    if device.type == "cpu":
        bu.reset_peak_rss()
    times = bu.interleaved_times(steps, device, repeats=opts.steps, warmup=opts.warmup)
    if device.type == "cpu":
        rss_peak = bu.peak_rss_bytes() - rss_base
    for d in dtypes:  # again after: on a shared machine keep the better (less disturbed) one
        again = measure_peak_flops(device, DTYPES[d], opts.peak_size)
        peak_flops[d] = max(peak_flops[d], again, key=lambda x: x[0])
    total_flops = sum(flops.values())
    rows = []
    for v, (name, t) in zip(variants, times.items()):
        step_s = statistics.median(t)
        flops_peak, peak_what = peak_flops[v["precision"]]
        if device.type == "cuda":
            # Other variants' trainers share the GPU in --compare: count only this one's.
            memory = peaks[name] + state_bytes(trainers[name])
            memory_what = ("the variant's weights, AdamW state and memory + its step's "
                           "max_memory_allocated above them; inputs excluded")
        elif len(variants) == 1:
            memory, memory_what = rss_peak, "peak RSS above the process after imports"
        else:
            memory, memory_what = None, "not measured per variant on CPU in --compare"
        label = f"{opts.compare}={v[opts.compare]}" if opts.compare else name
        rows.append({"variant": name, "label": label, "step_s": step_s, "step_times": t,
                     "images_per_s": opts.batch_size / step_s,
                     "speedup": bu.paired_ratio(times[variant_name(variants[0])], t),
                     "mfu": total_flops / step_s / flops_peak, "peak_flops": flops_peak,
                     "peak_what": peak_what, "peak_memory": memory, "memory_what": memory_what})
    return {
        "device": bu.describe_device(device), "shapes": describe_shapes(first.args),
        "flops": flops, "total_flops": total_flops, "rows": rows,
        "steps": opts.steps, "compare": opts.compare,
        "loss_first": losses[0], "loss_last": losses[-1],
        "teacher_moved": all(bool((next(t.teacher.parameters()) != teacher_before[name]).any())
                             for name, t in trainers.items()),
        "memory_ptrs": sorted({int(t.memory.ptr) for t in trainers.values()}),
    }


def describe_shapes(a: argparse.Namespace) -> str:
    return (f"{a.arch}/{a.patch_size}, batch {a.batch_size_per_gpu}, crops "
            f"2x{a.global_crops_size} + {a.local_crops_number}x{a.local_crops_size}, "
            f"memory {a.memory_size}/{a.partition_size}")


def run_real_loop(opts: argparse.Namespace) -> dict | None:
    """Two epochs of ``main_massl.train`` (same shapes and flags as the synthetic step); the
    second epoch's figures, on rank 0 (``None`` on the other ranks)."""
    device = utils.resolve_device(opts.device)
    world = distributed.world_size_from_env()
    steps = max(opts.steps, opts.warmup)  # per epoch
    variant = {"precision": opts.precision, "sdpa": True, "compile": opts.compile,
               "fused_adamw": device.type == "cuda", "formulation": "ours", "monitor": False}
    counting = build_trainer(opts, device, variant)  # the FLOPs of one step, as in run()
    flops = sum(count_step_flops(counting.student, counting.teacher, counting.memory,
                                 counting.criterion, random_crops(opts, device),
                                 counting.amp_dtype).values())
    del counting
    peak_flops, peak_what = measure_peak_flops(device, DTYPES[opts.precision], opts.peak_size)
    with tempfile.TemporaryDirectory(prefix="massl_bench_loop_") as tmp:
        data_path, images = opts.data_path, f"the images in {opts.data_path}"
        if not data_path:
            from bench_data import write_test_images
            data_path = str(Path(tmp) / "images")  # every rank writes the same images
            images = write_test_images(Path(data_path) / "train",
                                       steps * opts.batch_size * world, tuple(opts.image_size))
        args = training_args(opts, opts.precision, opts.compile, data_path, (
            "--output_dir", str(Path(tmp) / "run"), "--epochs", "2",
            "--num_workers", str(opts.workers), "--saveckp_freq", "0", "--device", str(device)))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif world == 1:
            bu.reset_peak_rss()
        try:
            main_massl.train(args, install_signal_handlers=False)
        except utils.UserError as e:
            raise utils.UserError(str(e)) from None
        if distributed.rank_from_env() != 0:
            return None
        log = [json.loads(line) for line in (Path(tmp) / "run" / "log.txt").read_text().splitlines()]
    epoch = log[-1]
    spe = round(epoch["train_epoch_time_s"] * epoch["train_images_per_sec"]
                / (opts.batch_size * world))
    step_s = epoch["train_epoch_time_s"] / spe
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device)
        memory_what = "max_memory_allocated over both epochs (weights, state, memory, step)"
    else:
        memory = bu.peak_rss_bytes() if world == 1 else None
        memory_what = "peak RSS of the process (workers excluded)"
    forced = os.environ.get("MASSL_FORCE_DDP", "") == "1"
    group = (f"{world} process(es), process group on" if world > 1 or forced
             else "1 process, no process group")
    name = (f"real loop: {variant_name(variant)}; {opts.workers} loader workers, {group}; "
            f"{images}")
    row = {"variant": name, "label": "real loop", "step_s": step_s, "step_times": [step_s],
           "images_per_s": opts.batch_size / step_s, "speedup": 1.0,
           "mfu": flops / step_s / peak_flops, "peak_flops": peak_flops, "peak_what": peak_what,
           "peak_memory": memory, "memory_what": memory_what}
    return {"device": bu.describe_device(device), "shapes": describe_shapes(args),
            "flops": {"step": flops}, "total_flops": flops, "rows": [row], "steps": spe,
            "compare": None, "loss_first": log[0]["train_loss"], "loss_last": epoch["train_loss"],
            "teacher_moved": True, "memory_ptrs": [], "real_loop": True}


def print_result(r: dict) -> None:
    print(r["device"])
    print(f"shapes: {r['shapes']}")
    parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in r["flops"].items())
    print(f"flops: {r['total_flops'] / 1e9:.2f} GFLOP per step ({parts}; FlopCounterMode)")
    for what, flops in sorted({(row["peak_what"], row["peak_flops"]) for row in r["rows"]}):
        print(f"peak: {flops / 1e12:.3f} TFLOP/s ({what}, best of before and after the steps)")
    if not r["compare"]:
        row = r["rows"][0]
        print(f"config: {row['variant']}")
        how = (f"epoch 2's mean over its {r['steps']} steps" if r.get("real_loop")
               else f"median of {r['steps']}")
        memory = bu.fmt_bytes(row["peak_memory"]) if row["peak_memory"] is not None else "-"
        print(f"step: {bu.fmt_seconds(row['step_s'])} ({how}), "
              f"{row['images_per_s']:.1f} images/s, peak memory {memory}"
              f" ({row['memory_what']}); loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}")
    else:
        print(f"compare: {r['compare']}, variants alternated step by step, {r['steps']} timed "
              f"steps each; loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}")
        print("| configuration | step | images/s | speed vs first | MFU | peak memory |")
        print("|---|---|---|---|---|---|")
        for row in r["rows"]:
            memory = bu.fmt_bytes(row["peak_memory"]) if row["peak_memory"] is not None else "-"
            print(f"| {row['variant']} | {bu.fmt_seconds(row['step_s'])} | "
                  f"{row['images_per_s']:.1f} | {row['speedup']:.2f}x | {100 * row['mfu']:.1f}% "
                  f"| {memory} |")
        print(f"peak memory: {r['rows'][0]['memory_what']}")
    every = " (every variant)" if r["compare"] else ""
    if not r.get("real_loop"):  # the real loop's checks are main_massl.py's own
        print(f"check: memory pointer {', '.join(map(str, r['memory_ptrs']))}, teacher moved "
              f"by EMA: {'yes' if r['teacher_moved'] else 'NO'}{every}")
    if not r["compare"]:
        row = r["rows"][0]
        print(f"ratio: achieved {r['total_flops'] / row['step_s'] / 1e12:.3f} TFLOP/s / peak "
              f"{row['peak_flops'] / 1e12:.3f} TFLOP/s = MFU {100 * row['mfu']:.1f}%")
    elif r["compare"] == "monitor":
        plain, monitored = r["rows"]
        extra = monitored["step_s"] - plain["step_s"]
        share = extra / plain["step_s"]
        print(f"ratio: a step with health metrics (main_massl.py's logging steps) takes "
              f"{bu.fmt_seconds(extra)} more than one without ({100 * share:+.1f}%); every "
              f"--print_freq 50 steps that is {100 * share / 50:.2f}% of the training time")
    elif r["compare"] == "formulation":
        authors, ours = r["rows"]
        print(f"ratio: ours/authors images/s {ours['speedup']:.2f}x (median of per-round "
              f"ratios; {ours['images_per_s']:.1f} vs {authors['images_per_s']:.1f} images/s)")
    else:
        print(f"ratio: speed vs {r['rows'][0]['label']} (median of per-round ratios): "
              + ", ".join(f"{row['label']} {row['speedup']:.2f}x" for row in r["rows"][1:]))


# --------------------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults depend on the device: on a GPU the ViT-S/16 reference step (batch 64, "
               "2x224 + 10x96 crops, memory 131072 in blocks of 16384, bf16; --arch vit_base for "
               "ViT-B/16); on a CPU a small one (vit_tiny/16, batch 8, 2x96 + 10x48, memory "
               "16384/4096, fp32).")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--arch", default=None,
                   help="backbone (vit_small for the ViT-S/16 reference runs, vit_base for "
                        "ViT-B/16)")
    p.add_argument("--patch_size", type=int, default=None, help="ViT patch size (16 in the paper)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="images per GPU (default 64 on GPU, for ViT-S and ViT-B alike; the "
                        "authors' runs used 64 for ViT-S and 32 for ViT-B)")
    p.add_argument("--global_size", type=int, default=None,
                   help="global crop size (224 in the paper)")
    p.add_argument("--local_size", type=int, default=None,
                   help="local crop size (96 in the paper)")
    p.add_argument("--local_crops_number", type=int, default=None,
                   help="local crops (10 in the paper)")
    p.add_argument("--memory_size", type=int, default=None,
                   help="K, memory slots (131072 in the paper)")
    p.add_argument("--block_size", type=int, default=None,
                   help="P, slots per block (16384 in the paper)")
    p.add_argument("--precision", choices=list(DTYPES), default=None,
                   help="autocast dtype of the networks (the loss always computes in float32); "
                        "fp16 uses a gradient scaler. Default bf16 on GPU, fp32 on CPU")
    p.add_argument("--sdpa", type=utils.bool_flag, default=True,
                   help="fused scaled-dot-product attention (true) or explicit softmax(QK^T)V")
    p.add_argument("--compile", type=utils.bool_flag, default=False,
                   help="torch.compile the backbones, as main_massl.py --compile does")
    p.add_argument("--fused_adamw", type=utils.bool_flag, default=None,
                   help="AdamW(fused=...); default as the training script: fused on CUDA")
    p.add_argument("--compare", choices=list(COMPARE), default=None,
                   help="time every value of one setting, alternating step by step on the same "
                        "model: precision (fp32/fp16/bf16; fp16 on GPU only), sdpa, compile, "
                        "fused_adamw, formulation (the authors': explicit attention, naive "
                        "loss with 16-bit logits, not compiled; vs ours), or monitor (a step "
                        "without / with the health metrics of main_massl.py's logging steps)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (per variant); the median is reported (default 20 on GPU, "
                        "10 on CPU)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first, per variant (default 5 on GPU, 3 on CPU; "
                        "compilation happens here with --compile)")
    p.add_argument("--peak_size", type=int, default=None,
                   help="N of the N x N matmul that measures the peak (default 8192 on GPU, "
                        "2048 on CPU)")
    p.add_argument("--real_loop", action="store_true",
                   help="time main_massl.train itself (loader, copies, process group under "
                        "torchrun, trainer, background checkpoint) for two epochs of "
                        "max(--steps, --warmup) steps; reports the second")
    p.add_argument("--data_path", default="",
                   help="--real_loop: an image folder (default: photos written to a temporary "
                        "folder, --image_size each)")
    p.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="--real_loop: size of the written photos (default 500 375 on GPU, "
                        "ImageNet's typical size; 2 x the global crop on CPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="--real_loop: data loader workers (default 8 on GPU, 2 on CPU)")
    p.add_argument("--quick", action="store_true",
                   help="vit_nano/4 on 16 px crops, 2 steps: checks the script runs, "
                        "measures nothing")
    bu.add_common_args(p)
    return p


def resolve_options(opts: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset: --quick's tiny values, else the device's defaults."""
    gpu = utils.resolve_device(opts.device).type == "cuda"
    for key, (gpu_default, cpu_default) in DEFAULTS.items():
        if getattr(opts, key) is None:
            value = QUICK[key] if opts.quick and key in QUICK else (
                gpu_default if gpu else cpu_default)
            setattr(opts, key, value)
    for key in ("batch_size", "global_size", "local_size", "memory_size", "block_size",
                "steps", "patch_size", "peak_size"):
        if getattr(opts, key) < 1:
            raise utils.UserError(f"--{key} must be at least 1")
    if opts.local_crops_number < 0:
        raise utils.UserError("--local_crops_number must be >= 0")
    if opts.image_size is None:
        opts.image_size = [500, 375] if gpu and not opts.quick else [2 * opts.global_size] * 2
    if opts.workers is None:
        opts.workers = 8 if gpu else 2
    if opts.real_loop and opts.compare:
        raise utils.UserError("--real_loop times one configuration: drop --compare")
    if opts.warmup < 1:
        raise utils.UserError("--warmup must be at least 1 (the first step allocates and compiles)")
    return opts


def main(argv: list[str] | None = None) -> None:
    opts = resolve_options(get_args_parser().parse_args(argv))
    bu.apply_threads(opts.threads)
    if opts.real_loop:
        result = run_real_loop(opts)
        if result is not None:  # rank 0
            print_result(result)
        return
    print_result(run(opts))


if __name__ == "__main__":
    try:
        main()
    except utils.UserError as e:
        utils.exit_with_error(str(e))
