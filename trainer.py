"""The MaSSL model-and-loss object: one training step, and everything exact resume needs.

``MaSSLTrainer`` owns the student (raw and DDP-wrapped), the EMA teacher, the memory bank,
the loss (plus optional KoLeo), the optimizer, the gradient scaler and the per-step
schedules. ``train_step`` is one optimizer step (docs/method.md, "One training step");
``state_dict``/``load_state_dict`` are the checkpoint. ``main_massl.py`` drives it over
epochs; the benchmarks and the tests call the same ``train_step``.

    trainer = MaSSLTrainer(args, env, steps_per_epoch)
    metrics = trainer.train_step(micro_batches)   # an iterable of crop lists, one per micro-batch
"""
from __future__ import annotations

import argparse
import json
import math
import random
from contextlib import nullcontext
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn

import checkpoints
import distributed
import utils
from massl_loss import KoLeoLoss, MaSSLLoss
from memory import MemoryBank, gather_across_ranks
from monitor import (argmax_slots, block_agreement, block_entropy, gradient_stats,
                     memory_spread, memory_usage)
from vision_transformer import VIT_ARCHS, MaSSLHead, MultiCropWrapper, build_backbone

class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops and keeps its last good checkpoint."""


# --------------------------------------------------------------------------- building


def build_networks(args: argparse.Namespace) -> tuple[MultiCropWrapper, MultiCropWrapper, int]:
    """Student and teacher (same weights; drop-path only in the student), on CPU."""
    student_backbone, embed_dim = build_backbone(
        args.arch, args.patch_size, img_size=args.global_crops_size,
        drop_path_rate=args.drop_path_rate)
    teacher_backbone, _ = build_backbone(
        args.arch, args.patch_size, img_size=args.global_crops_size, drop_path_rate=0.0)
    student = MultiCropWrapper(student_backbone, MaSSLHead(
        embed_dim, bottleneck_dim=args.bottleneck_dim, hidden_dim=2048, use_bn=args.use_bn_in_head))
    teacher = MultiCropWrapper(teacher_backbone, MaSSLHead(
        embed_dim, bottleneck_dim=args.bottleneck_dim, hidden_dim=2048, use_bn=args.use_bn_in_head))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher, embed_dim


def check_backbone_accepts_crops(backbone: nn.Module, arch: str, sizes: Sequence[int],
                                 device: torch.device) -> None:
    """One tiny no-grad forward per crop size, so e.g. a fixed-size timm ViT with 96 px
    local crops fails at start-up with a clear message, not at step 1 with a traceback."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            for size in sorted(set(sizes)):
                try:
                    backbone(torch.zeros(2, 3, size, size, device=device))
                except (RuntimeError, AssertionError, ValueError) as e:
                    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise utils.UserError(
                        f"--arch {arch} cannot take {size} px crops ({reason}); set "
                        "--global_crops_size/--local_crops_size to sizes it accepts or use one "
                        f"of {', '.join(VIT_ARCHS)}") from None
    finally:
        backbone.train(was_training)


def get_params_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight-decayed matrices first; biases and 1-D parameters (norms, tokens' ... ) undecayed."""
    decayed, undecayed = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (undecayed if name.endswith(".bias") or param.ndim <= 1 else decayed).append(param)
    return [{"params": decayed}, {"params": undecayed, "weight_decay": 0.0}]


def build_optimizer(name: str, params_groups: list[dict[str, Any]],
                    device: torch.device) -> torch.optim.Optimizer:
    """lr and weight decay start at 0: the schedules set them every step."""
    if name == "adamw":
        return torch.optim.AdamW(params_groups, lr=0.0, weight_decay=0.0,
                                 fused=device.type == "cuda")
    if name == "sgd":
        return torch.optim.SGD(params_groups, lr=0.0, momentum=0.9, weight_decay=0.0)
    raise utils.UserError(f"unknown --optimizer {name}")


def build_schedules(args: argparse.Namespace, steps_per_epoch: int,
                    base_lr: float) -> dict[str, np.ndarray]:
    """Per-optimizer-step values of lr, weight decay, teacher momentum and temperature."""
    total = args.epochs * steps_per_epoch
    warmup_steps = args.warmup_teacher_temp_epochs * steps_per_epoch
    # Linear ramp at a rate set by --warmup_teacher_temp_epochs even when the run is shorter.
    ramp = np.minimum(np.arange(total) / warmup_steps, 1.0) if warmup_steps > 0 else np.ones(total)
    return {
        "lr": utils.cosine_scheduler(base_lr, args.min_lr, args.epochs, steps_per_epoch,
                                     warmup_epochs=args.warmup_epochs),
        "wd": utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs,
                                     steps_per_epoch),
        "momentum": utils.cosine_scheduler(args.momentum_teacher, 1.0, args.epochs,
                                           steps_per_epoch),
        "teacher_temp": args.warmup_teacher_temp + ramp * (args.teacher_temp
                                                            - args.warmup_teacher_temp),
    }


def autocast_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the flags ask for on this device (None: fp32)."""
    if args.use_bf16:
        return torch.bfloat16
    if args.use_fp16 and device.type == "cuda":
        return torch.float16
    return None


@torch.no_grad()
def clip_gradients(params: list[nn.Parameter], max_norm: float,
                   stats: bool = False) -> tuple[float, int] | None:
    """Scale each parameter's gradient to norm <= max_norm, separately (DINO's clipping;
    ``max_norm`` 0: no clipping). With ``stats``: returns (the norm of all gradients together
    before clipping, the number of tensors clipped), which costs a device sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or (max_norm <= 0 and not stats):
        return (0.0, 0) if stats else None
    norms = torch._foreach_norm(grads)
    if max_norm > 0:
        # All the per-tensor factors in three kernels (not two per tensor), then one
        # multi-tensor multiply: same arithmetic as clamp(max_norm / (norm + 1e-6), max=1).
        scales = torch.stack(norms).add_(1e-6).reciprocal_().mul_(max_norm).clamp_(max=1.0)
        torch._foreach_mul_(grads, scales.to(grads[0].dtype).unbind())
    return gradient_stats(norms, max_norm) if stats else None


@torch.no_grad()
def ema_update(teacher_params: list[torch.Tensor], student_params: list[torch.Tensor],
               momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student."""
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


# --------------------------------------------------------------------------- RNG and checkpoints


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states as types ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *[x for x in np_state[2:]]],
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {checkpoints.strip_prefix(k, "module."): v for k, v in state_dict.items()}


# --------------------------------------------------------------------------- the trainer


class MaSSLTrainer:
    """Student, teacher, memory, loss, optimizer and schedules of one MaSSL run.

    Built identically on every rank from ``args.seed``; after building, each rank reseeds
    with ``seed + rank`` so drop-path differs across ranks. ``global_step`` counts the
    optimizer steps done and indexes the schedules; the memory blocks of each micro-batch
    are drawn from a generator seeded with (seed, micro-batch index), so a resumed run
    draws the same blocks.
    """

    def __init__(self, args: argparse.Namespace, env: distributed.DistEnv, steps_per_epoch: int,
                 log: Callable[[str], None] = print):
        self.args, self.env, self.device = args, env, env.device
        self.steps_per_epoch = steps_per_epoch
        self.accum = args.gradient_accumulation
        self.images_per_step = args.batch_size_per_gpu * env.world_size * self.accum
        device = self.device

        self.amp_dtype = autocast_dtype(args, device)
        if args.use_bf16 and device.type == "cpu":
            log("warning: --use_bf16 on CPU works but is slow")
        elif args.use_fp16 and not args.use_bf16 and device.type != "cuda":
            log(f"note: --use_fp16 needs CUDA; training in fp32 on {device.type}")
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        if device.type == "cuda":
            # TF32 stays off globally (PyTorch's default); the loss turns it on for the memory
            # logits' matmuls only, with --tf32_logits (docs/method.md, section 10).
            torch.backends.cudnn.benchmark = True

        utils.fix_random_seeds(args.seed)  # identical weights and memory on every rank
        student, teacher, self.embed_dim = build_networks(args)
        self.memory = MemoryBank(args.memory_size, args.bottleneck_dim).to(device)
        student, teacher = student.to(device), teacher.to(device)
        sizes = [args.global_crops_size] + [args.local_crops_size] * (args.local_crops_number > 0)
        if getattr(args, "knn_data_path", ""):  # the online k-NN's images, checked now too
            sizes.append(args.knn_crop_size or args.global_crops_size)
        check_backbone_accepts_crops(teacher.backbone, args.arch, sizes, device)
        if args.use_bn_in_head and env.distributed and device.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        if args.compile:
            student.backbone.compile()
            teacher.backbone.compile()
        self.student, self.teacher = student, teacher  # the raw student module
        self.ddp_student: nn.Module = student
        if env.distributed:
            self.ddp_student = nn.parallel.DistributedDataParallel(
                student, device_ids=[device.index] if device.type == "cuda" else None)
        utils.fix_random_seeds(args.seed + env.rank)  # drop-path differs across ranks

        self.criterion = MaSSLLoss(args.partition_size, student_temp=args.student_temp,
                                   n_global_crops=2, tf32=args.tf32_logits)
        self.koleo = KoLeoLoss() if args.koleo_loss_weight > 0 else None
        self.params = [p for p in student.parameters() if p.requires_grad]
        self._ema_pairs = (list(teacher.parameters()), list(student.parameters()))
        self.optimizer = build_optimizer(args.optimizer, get_params_groups(student), device)
        self.base_lr = args.lr * self.images_per_step / 256.0
        self.schedules = build_schedules(args, steps_per_epoch, self.base_lr)
        self.perm_generator = torch.Generator(device=device)
        self.global_step = 0

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.student.parameters())

    def schedule_values(self, step: int | None = None) -> dict[str, float]:
        """lr, wd, momentum and teacher temperature at optimizer step ``step`` (default: next)."""
        step = self.global_step if step is None else step
        return {name: float(values[step]) for name, values in self.schedules.items()}

    def _blocks_permutation(self, micro_step: int) -> torch.Tensor:
        self.perm_generator.manual_seed(utils.mix_seed(self.args.seed, 4, micro_step) % (2 ** 63))
        return torch.randperm(self.memory.size, generator=self.perm_generator, device=self.device)

    def train_step(self, micro_batches: Iterable[Sequence[torch.Tensor]],
                   stop_requested: bool = False, monitor: bool = False) -> dict[str, float]:
        """One optimizer step over ``gradient_accumulation`` micro-batches of crops.

        Each micro-batch is a list of crop tensors ``[global 1, global 2, locals...]`` of
        ``(B, 3, H, W)``. Per micro-batch: forward (autocast), loss against the memory as it
        was, memory update with the teacher's global crop 2, backward of loss / N (DDP
        synchronises on the last one only). Then clipping, the optimizer step at this
        step's lr and weight decay, and the teacher EMA. Returns the step's metrics (means
        over its micro-batches, this rank) and ``stop``: 1.0 when any rank asked to stop
        (``stop_requested``), agreed in the same collective as the non-finite check. That
        check is the step's only host sync when ``monitor`` is off, and it comes after the
        whole update is queued (not between forward and backward); a non-finite loss raises
        ``NonFiniteLossError`` then, before anything is saved (docs/method.md, section 10).

        ``monitor``: also return the health metrics of ``monitor.HEALTH_KEYS`` (averaged over
        micro-batches and ranks; collective, so every rank must pass the same value), read
        off the block softmaxes the loss computes anyway. Training is the same either way.
        """
        it = self.global_step
        values = self.schedule_values(it)
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = values["lr"]
            if i == 0:  # only the first group is decayed
                group["weight_decay"] = values["wd"]
        ddp = self.ddp_student is not self.student
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype,
                                  enabled=self.amp_dtype is not None)
        keys = ["loss", "massl", *(["koleo"] if self.koleo else [])]
        per_micro: list[torch.Tensor] = []  # each micro-batch's (loss, massl[, koleo]), on device
        n_micro = 0
        health: dict[str, float] = {}
        for micro, crops in enumerate(micro_batches):
            crops = [c.to(self.device, non_blocking=True) for c in crops]
            B = crops[0].shape[0]
            perm = self._blocks_permutation(it * self.accum + micro)
            last = micro == self.accum - 1
            with nullcontext() if (not ddp or last) else self.ddp_student.no_sync():
                with autocast:
                    student_out = self.ddp_student(crops)
                    with torch.no_grad():
                        teacher_out = self.teacher(crops[:2])
                    if monitor:
                        massl, probs = self.criterion(
                            student_out, teacher_out, self.memory.features,
                            values["teacher_temp"], perm=perm, return_probs=True)
                    else:
                        massl = self.criterion(student_out, teacher_out, self.memory.features,
                                               values["teacher_temp"], perm=perm)
                    parts = [massl]
                    loss = massl
                    if self.koleo is not None:
                        parts.append(sum(self.koleo(c) for c in student_out[:2 * B].chunk(2)) / 2)
                        loss = loss + self.args.koleo_loss_weight * parts[-1]
                per_micro.append(torch.stack([loss, *parts]).detach().float())
                if monitor:  # before backward: the student softmaxes are the loss's buffer
                    self._add_block_health(health, probs, perm)
                # No host sync here: the loss is checked once, after the optimizer step.
                self.memory.update(teacher_out[B:2 * B])  # teacher embeddings of global crop 2
                scaled = loss / self.accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            n_micro += 1
        if n_micro != self.accum:
            raise ValueError(f"train_step got {n_micro} micro-batches, expected {self.accum}")

        if self.scaler is not None and (self.args.clip_grad or monitor):
            self.scaler.unscale_(self.optimizer)  # scaler.step() then skips its own unscale
        grads = clip_gradients(self.params, self.args.clip_grad, stats=monitor)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(*self._ema_pairs, values["momentum"])
        totals, stop = self._check_step(it, keys, per_micro, stop_requested)
        self.global_step += 1
        if monitor:
            # Per-rank values are averaged over ranks; usage is already global, the memory
            # and the (synchronised) gradients are the same on every rank.
            per_rank = ("teacher_entropy", "student_entropy", "agreement")
            means = distributed.all_reduce_means([health[k] / self.accum for k in per_rank],
                                           self.device)
            totals.update(zip(per_rank, means))
            totals["memory_usage"] = health["memory_usage"] / self.accum
            totals["memory_spread"] = memory_spread(self.memory.features)
            totals["grad_norm"], totals["clipped"] = grads
        return {**totals, **values, "stop": stop}

    def _check_step(self, it: int, keys: list[str], per_micro: list[torch.Tensor],
                    stop_requested: bool) -> tuple[dict[str, float], float]:
        """The step's one host sync, after its whole update is queued: every rank learns
        whether any rank's loss was non-finite or asked to stop (one all-reduce of two
        flags), and this rank's losses come back as floats. A non-finite loss raises
        ``NonFiniteLossError`` naming step ``it``: the weights in memory then hold that
        step's update, but nothing was saved, so the last checkpoint is the last good step."""
        values = torch.stack(per_micro)                                 # (accum, len(keys))
        flags = torch.stack([(~torch.isfinite(values)).any().float(),
                             torch.tensor(float(stop_requested), device=values.device)])
        if distributed.is_dist():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        nonfinite, stop, *flat = torch.cat([flags, values.flatten()]).tolist()
        rows = [flat[i:i + len(keys)] for i in range(0, len(flat), len(keys))]
        if nonfinite:
            bad = next((r for r in rows if not all(map(math.isfinite, r))), rows[0])
            raise NonFiniteLossError(self._nonfinite_message(it, dict(zip(keys, bad))))
        totals = {k: 0.0 for k in keys}
        for row in rows:  # in Python floats, as the per-micro-batch .item() sums were
            for key, value in zip(keys, row):
                totals[key] += value / self.accum
        return totals, stop

    def _add_block_health(self, health: dict[str, float], probs: Any, perm: torch.Tensor) -> None:
        """Add one micro-batch's block metrics (monitor.py) to the sums in ``health``."""
        P = self.criterion.block_size
        slots = gather_across_ranks(argmax_slots(probs.teacher, perm, P))  # every rank's views
        for key, value in (("teacher_entropy", block_entropy(probs.teacher, P)),
                           ("student_entropy", block_entropy(probs.student, P)),
                           ("agreement", block_agreement(probs.student, probs.teacher, P)),
                           ("memory_usage", memory_usage(slots, self.memory.size))):
            health[key] = health.get(key, 0.0) + value

    def _nonfinite_message(self, it: int, items: dict[str, float]) -> str:
        epoch, step = divmod(it, self.steps_per_epoch)
        parts = ", ".join(f"{k}={v}" for k, v in items.items())
        hint = ", or --use_fp16 false)" if self.amp_dtype == torch.float16 else ")"
        return (f"non-finite loss at epoch {epoch + 1} iteration {step + 1}/{self.steps_per_epoch} "
                f"(global step {it + 1}): {parts}; the last good checkpoint is kept (try a lower "
                f"--lr{hint}")

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self, rank_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole training state (collective: every rank contributes its RNG states and
        ``rank_state``, e.g. its partial epoch metrics, gathered in rank order)."""
        rank_states = distributed.gather_objects({"rng": rng_state(self.device), **(rank_state or {})})
        state = {
            "student": strip_module_prefix(self.student.state_dict()),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "memory": self.memory.state_dict(),
            "global_step": self.global_step,
            "images_per_step": self.images_per_step,
            "args": plain_args(self.args),
            "rank_states": rank_states,
        }
        if self.scaler is not None:
            state["fp16_scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, ckpt: dict[str, Any], source: str = "the checkpoint"
                        ) -> dict[str, Any] | None:
        """Restore weights, optimizer, memory, scaler and this rank's RNG states.

        Returns this rank's saved ``rank_state`` (without the RNG), or ``None`` when the
        checkpoint was saved by another number of processes: random streams are then
        reseeded and the run no longer replays exactly. ``global_step`` is left to the
        caller, which knows where in the epoch the run resumes.
        """
        # AdamW groups have 'betas', SGD groups 'momentum': loading one into the other would
        # fail at the first step (KeyError 'momentum'). Other keys may differ across torch
        # versions, which load_state_dict handles.
        saved_groups = (ckpt.get("optimizer") or {}).get("param_groups") or [{}]
        if ("betas" in saved_groups[0]) != ("betas" in self.optimizer.defaults):
            saved = "adamw" if "betas" in saved_groups[0] else "sgd"
            raise utils.UserError(
                f"{source} holds the state of --optimizer {saved}, not of --optimizer "
                f"{self.args.optimizer}: resume with --optimizer {saved}, or start a new run in "
                "another --output_dir")
        try:
            self.student.load_state_dict(strip_module_prefix(ckpt["student"]))
            self.teacher.load_state_dict(strip_module_prefix(ckpt["teacher"]))
            self.memory.load_state_dict(ckpt["memory"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise utils.UserError(f"{source} does not fit this model: "
                                  f"{utils.user_error_message(e).split('. ')[0]}") from None
        if self.scaler is not None and "fp16_scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["fp16_scaler"])
        rank_states = ckpt.get("rank_states", [])
        if len(rank_states) != self.env.world_size:
            utils.fix_random_seeds(utils.mix_seed(self.args.seed, 2, self.env.rank,
                                                  int(ckpt["epoch"]),
                                                  int(ckpt.get("iteration", 0))) % (2 ** 32))
            return None
        mine = dict(rank_states[self.env.rank])
        set_rng_state(mine.pop("rng"), self.device)
        return mine

    @torch.no_grad()
    def fingerprint(self) -> list[float]:
        """Cheap checksums of the teacher and memory (compared across ranks in log.txt)."""
        params = [p.detach().double() for p in self.teacher.parameters()]
        return [sum(p.sum().item() for p in params), sum(p.square().sum().item() for p in params),
                self.memory.bank.double().sum().item(), float(self.memory.ptr.item())]


def plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """``vars(args)`` as JSON types only (tuples -> lists, paths -> str): safe for
    ``torch.load(weights_only=True)`` and for json."""
    return json.loads(json.dumps(vars(args), default=str))
