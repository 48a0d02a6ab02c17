"""The MaSSL loss: view-to-memory distributions matched across crops (docs/method.md,
"View–memory similarities", "Random memory blocks" and "Loss")."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import ContextManager, Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["MaSSLLoss", "KoLeoLoss", "BlockProbs", "tf32_matmuls", "cuda_matmul_tf32",
           "round_to_tf32"]


@contextmanager
def cuda_matmul_tf32(allow: bool) -> Iterator[None]:
    """CUDA float32 matmuls with TF32 (inputs rounded to 10 mantissa bits, float32 sums)
    allowed or not inside the block, whatever the process chose; the previous setting is
    restored after. The legacy flag, the one API this project uses (mixing it with
    ``fp32_precision`` is an error in PyTorch)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def tf32_matmuls(enabled: bool) -> ContextManager[None]:
    """The loss's CUDA float32 matmuls in TF32 inside the block when ``enabled``; nothing
    changes when it is false or off CUDA."""
    return cuda_matmul_tf32(True) if enabled else nullcontext()


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) with its mantissa cut to TF32's 10 bits (toward zero, the worst case
    of the tensor cores' input rounding): emulates a TF32 matmul's inputs on any device."""
    return (x.float().contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


class BlockProbs(NamedTuple):
    """The block softmaxes a loss call computed, for monitoring (``monitor.py``); no gradient.

    ``student`` is ``(V, B, n * P)``: the loss's own buffer (not a copy), valid until the
    next loss call; ``teacher`` is ``(G, B, n * P)``. Slot ``b * P + p`` of the last axis is
    memory row ``perm[b * P + p]``.
    """
    student: torch.Tensor
    teacher: torch.Tensor


class MaSSLLoss(nn.Module):
    """Cross-entropy between teacher and student similarity distributions over memory blocks.

    Every step the ``K`` memory slots are shuffled by a permutation and cut into
    ``n = K // block_size`` blocks of ``block_size`` slots; when ``K`` is not a multiple of
    ``block_size`` the ``K - n * block_size`` slots at the end of the permutation are
    unused that step. For every crop and every block, the logits restricted to that
    block form one softmax. The loss is

        mean over pairs (student crop i, teacher crop j), i != j, of
        mean over images and blocks of  -sum_p softmax(t_j / teacher_temp)_p
                                               * log_softmax(s_i / student_temp)_p

    with ``2 * (V - 1)`` pairs for 2 global crops. The teacher side carries no gradient.

    Shapes: ``student_emb`` is ``(V * B, D)`` crop-major (all images of crop 0, then crop
    1, ...; the first ``n_global_crops`` crops are the global ones), ``teacher_emb`` is
    ``(n_global_crops * B, D)`` in the same order, ``memory_features`` is ``(K, D)``.

    Implementation: the memory rows are permuted once (not every logits matrix), and the
    sum over pairs is regrouped so each student crop's log-partition and each teacher
    softmax are computed once: with ``lse`` the per-block log-sum-exp of a student crop,
    ``H(t, s) = lse(s) - <t, s>`` because teacher probabilities sum to one per block, and
    the teacher targets of a student crop are summed before the dot product. No
    ``(pairs, B, K)`` tensor is ever built. The gradient is written out (``_BlockCrossEntropy``)
    so that one ``(V * B, K)`` buffer -- the logits, turned into block softmaxes in place --
    is all that is kept for the backward pass. The logits are computed in float32 even under
    autocast: a 16-bit softmax over thousands of slots loses the signal.
    """

    def __init__(self, block_size: int, student_temp: float = 0.1, n_global_crops: int = 2,
                 tf32: bool = False):
        super().__init__()
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if student_temp <= 0:
            raise ValueError(f"student_temp must be positive, got {student_temp}")
        if n_global_crops < 1:
            raise ValueError(f"n_global_crops must be >= 1, got {n_global_crops}")
        self.block_size = block_size
        self.student_temp = student_temp
        self.n_global_crops = n_global_crops
        self.tf32 = tf32  # the memory logits' matmuls in TF32 on CUDA (docs/method.md, 10)

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, student_temp={self.student_temp}, "
                f"n_global_crops={self.n_global_crops}")

    def _check(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor,
               memory_features: torch.Tensor) -> tuple[int, int]:
        """Validate shapes; returns (number of student crops V, images per crop B)."""
        for name, t in (("student_emb", student_emb), ("teacher_emb", teacher_emb),
                        ("memory_features", memory_features)):
            if t.dim() != 2:
                raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        G = self.n_global_crops
        dims = {student_emb.shape[1], teacher_emb.shape[1], memory_features.shape[1]}
        if len(dims) != 1:
            raise ValueError(
                f"embedding dims differ: student {student_emb.shape[1]}, teacher "
                f"{teacher_emb.shape[1]}, memory {memory_features.shape[1]}")
        if teacher_emb.shape[0] % G != 0 or teacher_emb.shape[0] == 0:
            raise ValueError(
                f"teacher_emb has {teacher_emb.shape[0]} rows, not a positive multiple of "
                f"n_global_crops={G}")
        B = teacher_emb.shape[0] // G
        if student_emb.shape[0] % B != 0:
            raise ValueError(
                f"student_emb has {student_emb.shape[0]} rows, not a multiple of the batch "
                f"{B} implied by teacher_emb")
        V = student_emb.shape[0] // B
        if V < 2 or V < G:
            raise ValueError(
                f"need at least 2 student crops including the {G} global ones, got {V}")
        K = memory_features.shape[0]
        if self.block_size > K:
            raise ValueError(f"block size {self.block_size} is larger than the memory size {K}")
        return V, B

    def forward(self, student_emb: torch.Tensor, teacher_emb: torch.Tensor,
                memory_features: torch.Tensor, teacher_temp: float,
                perm: torch.Tensor | None = None,
                generator: torch.Generator | None = None,
                return_probs: bool = False) -> torch.Tensor | tuple[torch.Tensor, BlockProbs]:
        """Scalar loss. ``perm`` (a permutation of ``range(K)``) fixes the random blocks;
        when ``None`` a fresh one is drawn with ``generator`` (on the memory's device).
        ``return_probs``: return ``(loss, BlockProbs)``, the block softmaxes the loss already
        computed (no extra copy; the loss and its gradient are the same either way)."""
        V, B = self._check(student_emb, teacher_emb, memory_features)
        G, P = self.n_global_crops, self.block_size
        K = memory_features.shape[0]
        n_blocks = K // P
        if perm is None:
            perm = torch.randperm(K, generator=generator, device=memory_features.device)
        elif perm.shape != (K,):
            raise ValueError(f"perm must have shape ({K},), got {tuple(perm.shape)}")

        tf32 = self.tf32 and student_emb.device.type == "cuda"
        with torch.autocast(device_type=student_emb.device.type, enabled=False), \
                tf32_matmuls(tf32):
            # One gather of the memory rows gives every block as a contiguous slice.
            blocks = memory_features.detach()[perm[: n_blocks * P].to(memory_features.device)]
            blocks = blocks.float()
            with torch.no_grad():
                t = (teacher_emb.detach().float() @ blocks.T).div_(teacher_temp)
                t = t.view(G, B * n_blocks, P).softmax(dim=-1).view(G, B, n_blocks * P)
            sink: list[torch.Tensor] | None = [] if return_probs else None
            loss = _BlockCrossEntropy.apply(student_emb.float(), blocks, t, P, self.student_temp,
                                            sink, tf32)
        if return_probs:
            return loss, BlockProbs(student=sink[0].view(V, B, n_blocks * P), teacher=t)
        return loss


class _BlockCrossEntropy(torch.autograd.Function):
    """The MaSSL loss from the student embeddings ``z`` (``(V*B, D)``), the permuted memory
    ``blocks`` (``(n*P, D)``) and the teacher block softmaxes ``t`` (``(G, B, n*P)``).

    With ``s_i = z_i @ blocks.T / temp`` and ``T_i`` the sum of the teacher distributions
    crop i is matched with (``n_i`` of them), the summed cross-entropy is
    ``sum_i n_i * lse(s_i) - <s_i, T_i>`` (teacher distributions sum to one per block) and its
    gradient ``(n_i * softmax(s_i) - T_i) @ blocks / temp``. Writing the gradient out lets
    the logits buffer be turned into the block softmax in place and be the only
    ``(V*B, n*P)`` tensor kept for backward; ``T_i @ blocks`` is a small ``(B, D)`` matrix,
    which also gives the cross term ``<s_i, T_i> = <z_i / temp, T_i @ blocks>`` without
    reading the logits (the buffer is read only by the softmax).
    """

    @staticmethod
    def forward(ctx, z, blocks, t, block_size, temp, sink=None, tf32=False):
        G, B, KP = t.shape
        V = z.shape[0] // B
        z_scaled = z * (1.0 / temp)
        logits = z_scaled @ blocks.T                                  # (V*B, n*P)
        s = logits.view(V * B, -1, block_size)
        peak = s.amax(dim=-1, keepdim=True)
        s.sub_(peak).exp_()
        total = s.sum(dim=-1, keepdim=True)
        s.div_(total)                                                 # logits now hold softmax
        if sink is not None:  # a reference to the buffer for monitoring, not a copy
            sink.append(logits.detach())
        lse = (peak + total.log()).view(V, -1).double().sum(dim=1)    # per crop
        n_teachers = torch.full((V,), float(G), device=z.device)
        n_teachers[:G] = G - 1
        n_pairs, n_blocks = V * G - G, KP // block_size
        norm = n_pairs * B * n_blocks
        # T_i @ blocks from each teacher crop's probability-weighted memory mean, (B, D)
        t_means = (t.view(G * B, KP) @ blocks).view(G, B, -1)
        others = t_means.sum(dim=0, keepdim=True).expand(V, B, -1).clone()
        others[:G] -= t_means  # global crop i is not matched with teacher crop i
        # sum_i <s_i, T_i> = sum_i <z_i / temp, T_i @ blocks>: from (V*B, D) matrices, with
        # no pass over the (V*B, n*P) logits buffer.
        # The two sums cancel to a few units: added up in float64 (small tensors, cheap).
        cross = (z_scaled.double() * others.view(V * B, -1)).sum()
        ctx.save_for_backward(logits, blocks, others.view(V * B, -1),
                              n_teachers.repeat_interleave(B))
        ctx.scale, ctx.tf32 = 1.0 / (norm * temp), tf32
        return (((n_teachers * lse).sum() - cross) / norm).float()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        probs, blocks, others, n_rows = ctx.saved_tensors
        with torch.autocast(device_type=probs.device.type, enabled=False), \
                tf32_matmuls(ctx.tf32):
            grad_z = (n_rows[:, None] * (probs @ blocks) - others) * (grad * ctx.scale)
        return grad_z, None, None, None, None, None, None


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy regulariser (Sablayrolles et al., 2019), as in DINOv2.

    ``-mean(log(min distance to another sample))`` over L2-normalised embeddings; it
    spreads the batch. Optional in MaSSL (weight 0 in the reference runs).
    """

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] < 2:
            raise ValueError("KoLeo needs at least 2 samples")
        x = F.normalize(x.float(), dim=-1, eps=self.eps)
        with torch.no_grad():
            sim = x @ x.T
            sim.fill_diagonal_(-2.0)
            nearest = sim.argmax(dim=1)
        dist = (x - x[nearest]).norm(dim=-1)
        return -torch.log(dist + self.eps).mean()
