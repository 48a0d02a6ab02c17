"""Is the run learning, or collapsing? Health metrics, a collapse detector and the online k-NN.

``main_massl.py`` logs these during pretraining (README, "Monitoring a run"):

* health metrics, every ``--print_freq`` steps, from tensors the training step already has
  (no extra forward pass): block entropies, student-teacher agreement, memory usage and
  spread, gradient norm (the pure functions below, testable on hand-built tensors);
* ``CollapseDetector``: a warning when those metrics look collapsed for several consecutive
  log lines;
* ``OnlineKNN``: the teacher backbone's weighted k-NN top-1 (eval_knn.py's protocol and code,
  k = 20, T = 0.07) on a fixed, class-balanced subset of a labelled ImageFolder, every
  ``--knn_freq`` epochs.

Conventions: block softmaxes come as ``(crops, B, n * P)`` tensors, ``n`` blocks of ``P``
slots side by side on the last axis (``massl_loss.BlockProbs``); slot ``b * P + p`` is memory
row ``perm[b * P + p]`` of that step's permutation.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Subset

import utils
from evaluation import build_train_val, eval_transform, extract_features, knn_classifier

# Elements of the temporary tensor an entropy is computed on at once (64 MB in fp32): the
# block softmaxes are (V * B, K), too big to copy whole at ImageNet scale.
ENTROPY_CHUNK_ELEMENTS = 2 ** 24

# The online k-NN: eval_knn.py's headline setting.
KNN_K = 20
KNN_TEMPERATURE = 0.07


# --------------------------------------------------------------------------- health metrics


def block_entropy(probs: torch.Tensor, block_size: int) -> float:
    """Mean entropy of the block softmaxes in ``probs`` as a fraction of ``ln(block_size)``.

    ``probs`` is ``(..., n * block_size)``; each consecutive run of ``block_size`` values is
    one distribution. 1.0: every block uniform; 0.0: every block one-hot. (A block of one
    slot is always one-hot: 0.0.) Computed in row chunks, so no full-size copy is made.
    """
    if probs.shape[-1] % block_size:
        raise ValueError(f"last dim {probs.shape[-1]} is not a multiple of block_size {block_size}")
    if block_size == 1:
        return 0.0
    rows = probs.reshape(-1, probs.shape[-1])
    chunk = max(1, ENTROPY_CHUNK_ELEMENTS // max(rows.shape[1], 1))
    total = torch.zeros((), dtype=torch.float64, device=probs.device)
    for start in range(0, rows.shape[0], chunk):
        total += torch.special.entr(rows[start:start + chunk].float()).sum(dtype=torch.float64)
    n_distributions = rows.shape[0] * (rows.shape[1] // block_size)
    return total.item() / n_distributions / math.log(block_size)


def block_argmax(probs: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(..., n)``: the index (0..P-1) of the largest value of each block."""
    return probs.unflatten(-1, (-1, block_size)).argmax(dim=-1)


def block_agreement(student: torch.Tensor, teacher: torch.Tensor, block_size: int) -> float:
    """How often the student's argmax slot in a block is the teacher's, over the loss's pairs.

    ``student`` is ``(V, B, n * P)``, ``teacher`` ``(G, B, n * P)``, crop-major; the first G
    student crops are the global crops the teacher saw. For each student crop ``i`` and each
    teacher crop ``j != i`` (the ``G * (V - 1)`` pairs the loss matches), the fraction of
    (image, block) where the two argmax slots are equal; averaged over the pairs (all of the
    same size). 1.0: the student always picks the teacher's slot. The authors log the same
    comparison for block 0 only, as a "pseudo top-1".
    """
    V, G = student.shape[0], teacher.shape[0]
    if G > V or student.shape[1:] != teacher.shape[1:]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "must be (V, B, n*P) and (G, B, n*P) with G <= V")
    s = block_argmax(student, block_size)                      # (V, B, n)
    t = block_argmax(teacher, block_size)                      # (G, B, n)
    match = (s[:, None] == t[None]).flatten(2).float().mean(dim=2)  # (V, G) per pair
    pairs = ~torch.eye(V, G, dtype=torch.bool, device=match.device)
    return match[pairs].mean().item()


def argmax_slots(teacher: torch.Tensor, perm: torch.Tensor, block_size: int) -> torch.Tensor:
    """The memory rows that are the argmax of each teacher view's blocks, flattened.

    ``teacher`` is ``(G, B, n * P)``; block ``b``'s slot ``p`` is memory row
    ``perm[b * P + p]``. Returns ``G * B * n`` row indices.
    """
    local = block_argmax(teacher, block_size)                       # (G, B, n)
    offsets = torch.arange(local.shape[-1], device=local.device) * block_size
    return perm.to(local.device)[(local + offsets).flatten()]


def memory_usage(slots: torch.Tensor, memory_size: int) -> float:
    """Distinct memory rows among ``slots`` (argmax rows of teacher views), normalised by
    ``min(memory_size, len(slots))``: 1.0 when every argmax is on its own row (whatever K and
    the batch), near 0 when they pile onto a few rows (dead memory, or one embedding for all
    images). Two views of one image that agree on a row count once, so a healthy run sits
    below 1."""
    if slots.numel() == 0:
        raise ValueError("no slots")
    return torch.unique(slots).numel() / min(memory_size, slots.numel())


def memory_spread(bank: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct memory rows (exact, no sampling).

    ~0: the memory is spread over the sphere; 1.0: every row is the same direction. With
    unit rows ``v_k``, ``sum_{k != l} <v_k, v_l> = |sum_k v_k|^2 - K``: one pass over the bank.
    """
    K = bank.shape[0]
    if K < 2:
        return 1.0
    unit = F.normalize(bank.float(), dim=1)
    total = unit.sum(dim=0, dtype=torch.float64)
    return ((total.square().sum() - K) / (K * (K - 1))).item()


def gradient_stats(norms: list[torch.Tensor], max_norm: float) -> tuple[float, int]:
    """``(norm of all gradients together, tensors clipped)`` from per-tensor gradient norms
    taken before clipping; a tensor is clipped when ``trainer.clip_gradients`` scales it
    (``max_norm / (norm + 1e-6) < 1``; never when ``max_norm`` is 0)."""
    if not norms:
        return 0.0, 0
    stacked = torch.stack([n.float() for n in norms])
    clipped = int((max_norm / (stacked + 1e-6) < 1.0).sum().item()) if max_norm > 0 else 0
    return stacked.double().norm().item(), clipped


# The per-step health metrics, in the order of the console line.
HEALTH_KEYS = ("teacher_entropy", "student_entropy", "agreement", "memory_usage",
               "memory_spread", "grad_norm", "clipped")


def format_health(values: dict[str, float], n_tensors: int) -> str:
    """The console's health line (empty when the step logged none)."""
    if "teacher_entropy" not in values:
        return ""
    return (f"  health: entropy teacher {values['teacher_entropy']:.3f} student "
            f"{values['student_entropy']:.3f} (of ln P)  agreement {values['agreement']:.3f}  "
            f"memory usage {values['memory_usage']:.3f} spread {values['memory_spread']:.3f}  "
            f"grad norm {values['grad_norm']:.3g} ({values['clipped']:.0f}/{n_tensors} "
            "tensors clipped)")


# --------------------------------------------------------------------------- collapse warnings


@dataclass(frozen=True)
class CollapseRule:
    """A health value on the wrong side of ``threshold`` is one collapsed log line."""
    key: str
    above: bool  # collapsed when value > threshold (else when value < threshold)
    threshold: float
    meaning: str
    advice: str  # what to try (README, "Troubleshooting")


# Thresholds (README, "Monitoring a run"). Teacher entropy: a block of P slots at 0.98 ln P is
# as flat as a uniform distribution over P^0.98 slots (~ 0.83 P for P = 16384): the teacher
# barely prefers any slot. Usage: fewer than 1 in 20 argmaxes on a row of its own. Spread: the
# contraction that flattens the block distributions shows here first; on the quick start's
# data, runs that learned stayed at or below 0.84, runs that drifted to uniform passed 0.9
# within their first epoch and never came back (README, "Troubleshooting").
COLLAPSE_RULES = (
    CollapseRule("teacher_entropy", True, 0.98,
                 "the teacher's block distributions are nearly uniform",
                 "lower --teacher_temp / --warmup_teacher_temp or lengthen "
                 "--warmup_teacher_temp_epochs"),
    CollapseRule("memory_usage", False, 0.05,
                 "the teacher views' argmax slots pile onto a few memory rows",
                 "on small data use a smaller --out_dim and --momentum_teacher"),
    CollapseRule("memory_spread", True, 0.9,
                 "the stored teacher embeddings point nearly the same way, which flattens "
                 "every block distribution",
                 "--use_bn_in_head true, views that agree more (milder --global_crops_scale / "
                 "--local_crops_scale), or --koleo_loss_weight"),
)
# Consecutive collapsed log lines before a warning; while it lasts, repeated every REPEAT lines.
COLLAPSE_PATIENCE = 3
COLLAPSE_REPEAT = 20


class CollapseDetector:
    """Counts consecutive collapsed log lines per rule; ``update`` returns the warnings due.

    Every rank may run one (the values it sees are the same on all ranks); its state travels
    in the checkpoint so a resumed run warns as an uninterrupted one would.
    """

    def __init__(self, rules: tuple[CollapseRule, ...] = COLLAPSE_RULES,
                 patience: int = COLLAPSE_PATIENCE, repeat: int = COLLAPSE_REPEAT):
        self.rules, self.patience, self.repeat = rules, patience, repeat
        self.streaks: dict[str, int] = {rule.key: 0 for rule in rules}

    def update(self, values: dict[str, float]) -> list[str]:
        warnings = []
        for rule in self.rules:
            if rule.key not in values:
                continue
            value = values[rule.key]
            bad = value > rule.threshold if rule.above else value < rule.threshold
            self.streaks[rule.key] = self.streaks[rule.key] + 1 if bad else 0
            streak = self.streaks[rule.key]
            if streak == self.patience or (streak > self.patience
                                           and (streak - self.patience) % self.repeat == 0):
                warnings.append(
                    f"warning: the run may be collapsing: {rule.key} {value:.3f} "
                    f"{'>' if rule.above else '<'} {rule.threshold} for {streak} consecutive "
                    f"log lines ({rule.meaning}). See README.md, \"Troubleshooting\" "
                    f"(Collapse): {rule.advice}")
        return warnings

    def state_dict(self) -> dict[str, Any]:
        return {"streaks": dict(self.streaks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streaks.update({k: int(v) for k, v in state.get("streaks", {}).items()
                             if k in self.streaks})


# --------------------------------------------------------------------------- online k-NN


def balanced_subset(labels: list[int], max_items: int, seed: int) -> list[int]:
    """At most ``max_items`` indices, as class-balanced as the classes allow, in dataset order.

    Each class's indices are shuffled by a generator seeded with ``seed`` (no global RNG is
    touched), then classes are taken round-robin: counts differ by at most one between classes
    that have enough images. ``max_items`` 0, or at least ``len(labels)``: every index.
    """
    if max_items <= 0 or max_items >= len(labels):
        return list(range(len(labels)))
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    shuffled = [[members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
                for _, members in sorted(by_class.items())]
    chosen: list[int] = []
    for rank in range(max(len(m) for m in shuffled)):
        for members in shuffled:
            if rank < len(members):
                chosen.append(members[rank])
                if len(chosen) == max_items:
                    return sorted(chosen)
    return sorted(chosen)


def default_knn_resize(crop_size: int) -> int:
    """DINO's evaluation ratio: resize to 256/224 of the crop (256 for a 224 crop)."""
    return int(round(crop_size * 256 / 224))


@dataclass
class KNNResult:
    top1: float  # percent
    seconds: float
    k: int
    num_train: int
    num_val: int


class OnlineKNN:
    """The teacher backbone's weighted k-NN top-1 during pretraining.

    The same code as ``eval_knn.py`` (``evaluation.eval_transform``, ``extract_features``
    sharded across ranks and gathered in dataset order, ``knn_classifier`` with k = 20, T =
    0.07), on a fixed class-balanced subset of ``DATA/train`` and ``DATA/val`` chosen once
    from ``seed``. Nothing here draws from the global Python, NumPy or torch RNGs (the
    feature loaders have their own generators), so training replays identically with or
    without it. With the whole dataset (``max_train = max_val = 0``) it gives eval_knn.py's
    k=20 top-1 for the same resize and crop sizes.
    """

    def __init__(self, data_path: str, resize_size: int, crop_size: int, max_train: int = 0,
                 max_val: int = 0, batch_size: int = 128, num_workers: int = 0, seed: int = 0):
        if not Path(data_path).is_dir():
            raise utils.UserError(f"--knn_data_path {data_path} does not exist (it must be an "
                                  "ImageFolder with train/<class>/* and val/<class>/*)")
        self.data_path, self.resize_size, self.crop_size = data_path, resize_size, crop_size
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        transform = eval_transform(resize_size, crop_size)
        train, val = build_train_val(data_path, transform, transform)
        self.num_classes = len(train.classes)
        self.train = Subset(train, balanced_subset(train.targets, max_train, seed))
        self.val = Subset(val, balanced_subset(val.targets, max_val, seed + 1))
        self.train_labels = torch.tensor([train.targets[i] for i in self.train.indices])
        self.val_labels = torch.tensor([val.targets[i] for i in self.val.indices])
        self.k = min(KNN_K, len(self.train))

    def describe(self) -> str:
        note = f" (clipped to the {len(self.train)} train images)" if self.k < KNN_K else ""
        return (f"online k-NN: {len(self.train)} train / {len(self.val)} val images of "
                f"{self.data_path} ({self.num_classes} classes), resize {self.resize_size} crop "
                f"{self.crop_size}, k={self.k}{note}, T={KNN_TEMPERATURE}")

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, feature_dim: int, device: torch.device) -> KNNResult:
        """k-NN top-1 of ``backbone`` (collective: every rank extracts its shard of the
        images). The backbone runs in eval mode and is given back in the mode it was in."""
        start = time.time()
        was_training = backbone.training
        backbone.eval()
        try:
            common = dict(feature_dim=feature_dim, batch_size=self.batch_size,
                          num_workers=self.num_workers, device=device)
            train = F.normalize(extract_features(
                backbone, self.train, generator=torch.Generator().manual_seed(self.seed),
                progress_label="online k-NN train features", **common), dim=1)
            val = F.normalize(extract_features(
                backbone, self.val, generator=torch.Generator().manual_seed(self.seed + 1),
                progress_label="online k-NN val features", **common), dim=1)
        finally:
            backbone.train(was_training)
        top1, _ = knn_classifier(train, self.train_labels, val, self.val_labels, self.k,
                                 KNN_TEMPERATURE, self.num_classes)
        return KNNResult(top1=top1, seconds=time.time() - start, k=self.k,
                         num_train=len(self.train), num_val=len(self.val))
