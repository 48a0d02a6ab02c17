"""Benchmark: MaSSL loss + memory lookup, ours against the naive formulation.

Forward + backward of ``massl_loss.MaSSLLoss`` on ``MemoryBank.features``, against a
naive formulation written below the way the authors' code computes it: the full
``(V*B) x K`` student and ``(2*B) x K`` teacher logits, each crop's block columns gathered
from them by index, and a fresh softmax / log-softmax and cross-entropy for every
(student crop, teacher crop) pair. Both sides draw a fresh block permutation each call,
as a training step does, and run in float32 (ours always computes the loss in float32).

Before timing, both are evaluated with the same permutation and the differences in loss
and student gradient are printed, so the comparison is of two computations of the same
number. Timing alternates the two variants round by round (a shared machine's load then
hits both alike); the ratio is the median over rounds of naive/ours.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during one forward+backward above
what was allocated before (inputs and memory bank excluded). On CPU, each variant runs in a
fresh subprocess: peak RSS (/proc's ``VmHWM``, reset just before) during one forward+backward
minus the RSS after imports, a tiny warm-up and input allocation.

    python benchmarks/bench_loss.py                 # CPU-sized shapes (B=16, K=32768, P=4096)
    python benchmarks/bench_loss.py --reference     # B=64, V=12, D=256, K=131072, P=16384
    python benchmarks/bench_loss.py --quick         # tiny shapes, seconds (smoke test)
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_utils as bu  # noqa: E402  (also puts the repo root on sys.path)
import utils  # noqa: E402
from massl_loss import MaSSLLoss  # noqa: E402
from memory import MemoryBank  # noqa: E402

REFERENCE_SHAPES = dict(batch_size=64, n_crops=12, dim=256, memory_size=131072, block_size=16384)
CPU_SHAPES = dict(batch_size=16, n_crops=12, dim=256, memory_size=32768, block_size=4096)
QUICK_SHAPES = dict(batch_size=4, n_crops=4, dim=32, memory_size=1024, block_size=256)
STUDENT_TEMP = 0.1
TEACHER_TEMP = 0.04  # the start of the teacher-temperature warm-up: the sharpest targets


def naive_massl_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor,
                     memory_features: torch.Tensor, block_size: int, student_temp: float,
                     teacher_temp: float, perm: torch.Tensor | None = None,
                     n_global_crops: int = 2) -> torch.Tensor:
    """The loss computed the way the authors' training code does (the baseline).

    Full logits against the whole memory, then for every crop the block columns gathered
    by index and stacked to ``(n_blocks, B, P)``, then a softmax and log-softmax per
    (student crop, teacher crop) pair. Same value as ``MaSSLLoss`` for the same ``perm``.
    """
    G, P = n_global_crops, block_size
    B = teacher_emb.shape[0] // G
    V = student_emb.shape[0] // B
    K = memory_features.shape[0]
    n_blocks = K // P
    if perm is None:
        perm = torch.randperm(K, device=memory_features.device)
    block_ids = perm[: n_blocks * P]

    student_logits = student_emb @ memory_features.T / student_temp        # (V*B, K)
    teacher_logits = teacher_emb.detach() @ memory_features.T / teacher_temp  # (G*B, K)

    def blocks_of(crop_logits: torch.Tensor) -> torch.Tensor:
        gathered = crop_logits[:, block_ids]                     # (B, n_blocks * P)
        return torch.stack(gathered.split(P, dim=1))             # (n_blocks, B, P)

    student_blocks = [blocks_of(c) for c in student_logits.chunk(V)]
    teacher_blocks = [blocks_of(c) for c in teacher_logits.chunk(G)]
    total, n_pairs = 0.0, 0
    for i, s in enumerate(student_blocks):
        for j, t in enumerate(teacher_blocks):
            if i == j:
                continue
            log_p = F.log_softmax(s, dim=-1)
            q = F.softmax(t, dim=-1)
            total = total + torch.sum(-q * log_p, dim=-1).mean()
            n_pairs += 1
    return total / n_pairs


def make_inputs(shapes: dict, device: torch.device, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, MemoryBank]:
    """Unit-norm student ``(V*B, D)`` (a leaf needing grad), teacher ``(2*B, D)``, memory bank."""
    torch.manual_seed(seed)
    B, V, D, K = shapes["batch_size"], shapes["n_crops"], shapes["dim"], shapes["memory_size"]
    student = F.normalize(torch.randn(V * B, D, device=device), dim=1).requires_grad_(True)
    teacher = F.normalize(torch.randn(2 * B, D, device=device), dim=1)
    memory = MemoryBank(K, D).to(device)
    return student, teacher, memory


def make_variants(shapes: dict, student: torch.Tensor, teacher: torch.Tensor,
                  memory: MemoryBank) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a closure running one forward + backward (fresh block permutation each call)."""
    ours = MaSSLLoss(block_size=shapes["block_size"], student_temp=STUDENT_TEMP)

    def run_naive() -> torch.Tensor:
        student.grad = None
        loss = naive_massl_loss(student, teacher, memory.features, shapes["block_size"],
                                STUDENT_TEMP, TEACHER_TEMP)
        loss.backward()
        return loss.detach()

    def run_ours() -> torch.Tensor:
        student.grad = None
        loss = ours(student, teacher, memory.features, TEACHER_TEMP)
        loss.backward()
        return loss.detach()

    return {"naive": run_naive, "ours": run_ours}


def check_agreement(shapes: dict, student: torch.Tensor, teacher: torch.Tensor,
                    memory: MemoryBank) -> tuple[float, float, float]:
    """(loss value, |loss difference|, max |student-gradient difference|) for one shared perm."""
    perm = torch.randperm(shapes["memory_size"], device=memory.features.device)
    results = []
    for fn in (lambda: naive_massl_loss(student, teacher, memory.features, shapes["block_size"],
                                        STUDENT_TEMP, TEACHER_TEMP, perm=perm),
               lambda: MaSSLLoss(shapes["block_size"], STUDENT_TEMP)(
                   student, teacher, memory.features, TEACHER_TEMP, perm=perm)):
        student.grad = None
        loss = fn()
        loss.backward()
        results.append((loss.item(), student.grad.clone()))
    student.grad = None
    (naive_loss, naive_grad), (our_loss, our_grad) = results
    return naive_loss, abs(naive_loss - our_loss), (naive_grad - our_grad).abs().max().item()


def child_peak_memory(variant: str, shapes: dict) -> int:
    """Run in a fresh process: RSS growth during one forward+backward of ``variant``."""
    device = torch.device("cpu")
    # Load the kernels and thread pools both variants use, at a negligible size, so their
    # one-time cost lands in the baseline and not in the measured peak.
    tiny = make_variants(QUICK_SHAPES, *make_inputs(QUICK_SHAPES, device))
    tiny[variant]()
    fn = make_variants(shapes, *make_inputs(shapes, device))[variant]
    base = bu.reset_peak_rss()
    fn()
    return bu.peak_rss_bytes() - base


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Shapes: --reference is the spec's B=64 per process, V=12 (2 global + 10 local "
               "crops), D=256, K=131072, P=16384. Without it, CPU-sized defaults "
               f"{CPU_SHAPES} unless overridden; --quick is a seconds-long smoke run.")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--reference", action="store_true",
                   help="the reference-run shapes (B=64, V=12, D=256, K=131072, P=16384)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and few repeats: checks the script runs, measures nothing")
    p.add_argument("--batch_size", type=int, default=None, help="B, images per process")
    p.add_argument("--n_crops", type=int, default=None,
                   help="V, crops per image seen by the student (2 global + local crops; "
                        "12 in the paper)")
    p.add_argument("--dim", type=int, default=None, help="D, embedding size (256 in the paper)")
    p.add_argument("--memory_size", type=int, default=None,
                   help="K, memory slots (131072 in the paper)")
    p.add_argument("--block_size", type=int, default=None,
                   help="P, slots per block (16384 in the paper)")
    p.add_argument("--repeats", type=int, default=7,
                   help="timed rounds per variant; the median is reported (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--tf32", type=utils.bool_flag, default=True,
                   help="CUDA only: the loss's float32 matmuls in TF32, as training does by "
                        "default (main_massl.py --tf32_logits true; both variants get the same "
                        "setting); false for IEEE float32, as --tf32_logits false")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory measurement")
    bu.add_common_args(p)
    p.add_argument("--_child", choices=["naive", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--_shapes", help=argparse.SUPPRESS)
    return p


def resolve_shapes(args: argparse.Namespace) -> dict:
    if args.reference and args.quick:
        raise utils.UserError("--reference and --quick are exclusive")
    shapes = dict(REFERENCE_SHAPES if args.reference
                  else QUICK_SHAPES if args.quick else CPU_SHAPES)
    for key in shapes:
        if getattr(args, key) is not None:
            shapes[key] = getattr(args, key)
    for key, value in shapes.items():
        if value <= 0:
            raise utils.UserError(f"--{key} must be positive, got {value}")
    if shapes["n_crops"] < 2:
        raise utils.UserError("--n_crops must be at least 2 (the two global crops)")
    if shapes["block_size"] > shapes["memory_size"]:
        raise utils.UserError("--block_size must not exceed --memory_size")
    if args.repeats < 1 or args.warmup < 0:
        raise utils.UserError("--repeats must be >= 1 and --warmup >= 0")
    return shapes


def main(args: argparse.Namespace) -> None:
    bu.apply_threads(args.threads)
    if args._child:
        shapes = {k: int(v) for k, v in (kv.split("=") for kv in args._shapes.split(","))}
        bu.child_result({"peak_bytes": child_peak_memory(args._child, shapes)})
        return
    shapes = resolve_shapes(args)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
    device = utils.resolve_device(args.device)
    precision = "float32"
    if device.type == "cuda":  # the one global switch: ours and the naive loss alike
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        precision += (f" (TF32 matmuls {'on' if args.tf32 else 'off'}, as main_massl.py "
                      f"--tf32_logits {str(args.tf32).lower()})")
    print(bu.describe_device(device))
    print("shapes: " + ", ".join(f"{k}={v}" for k, v in shapes.items()) +
          f" | student_temp={STUDENT_TEMP} teacher_temp={TEACHER_TEMP} | {precision}")

    student, teacher, memory = make_inputs(shapes, device)
    loss_value, loss_diff, grad_diff = check_agreement(shapes, student, teacher, memory)
    print(f"check: loss {loss_value:.6f}, |naive - ours| = {loss_diff:.2e}, "
          f"max |grad difference| = {grad_diff:.2e}")

    variants = make_variants(shapes, student, teacher, memory)
    times = bu.interleaved_times(variants, device, args.repeats, args.warmup)
    med = {name: statistics.median(t) for name, t in times.items()}

    peaks: dict[str, int] = {}
    if not args.no_memory:
        if device.type == "cuda":
            peaks = {name: bu.cuda_peak_bytes(fn, device) for name, fn in variants.items()}
            method = "torch.cuda.max_memory_allocated above the inputs"
        else:
            del variants, student, teacher, memory
            encoded = ",".join(f"{k}={v}" for k, v in shapes.items())
            threads = ["--threads", str(args.threads)] if args.threads else []
            peaks = {name: bu.run_child(__file__, ["--_child", name, "--_shapes", encoded,
                                                   *threads])["peak_bytes"]
                     for name in ("naive", "ours")}
            method = "peak-RSS growth in a fresh subprocess per variant"

    for name in ("naive", "ours"):
        mem = f", peak memory {bu.fmt_bytes(peaks[name])}" if peaks else ""
        print(f"{name:>5}: forward+backward {bu.fmt_seconds(med[name])} "
              f"(median of {args.repeats}){mem}")
    line = f"ratio: naive/ours time {bu.paired_ratio(times['naive'], times['ours']):.2f}x"
    if peaks and min(peaks.values()) < 2 ** 20:  # RSS moves by pages: tiny shapes are noise
        line += f", peak memory n/a (under 1 MiB: too small to measure; {method})"
    elif peaks:
        line += f", peak memory {peaks['naive'] / peaks['ours']:.2f}x ({method})"
    print(line)


if __name__ == "__main__":
    parser = get_args_parser()
    arguments = parser.parse_args()
    try:
        main(arguments)
    except utils.UserError as e:
        utils.exit_with_error(str(e))
