"""trainer.MaSSLTrainer in-process: one optimizer step against literal re-computations, and
its state written in the background (run_folder.save_checkpoint)."""
from __future__ import annotations

import copy

import pytest
import torch

import distributed
import main_massl
import run_folder
import storage
import utils
from trainer import MaSSLTrainer

# A 28 px ViT with 7 px patches; memory of 32 slots in blocks of 16; no drop-path and no
# clipping so a step's gradient is a plain function of its inputs.
TINY = ["--data_path", "unused", "--arch", "vit_pico", "--patch_size", "7",
        "--global_crops_size", "28", "--local_crops_size", "14", "--local_crops_number", "2",
        "--out_dim", "32", "--partition_size", "16", "--bottleneck_dim", "32",
        "--drop_path_rate", "0", "--clip_grad", "0", "--num_workers", "0", "--epochs", "2",
        "--warmup_teacher_temp_epochs", "1", "--lr", "0.01", "--seed", "3",
        "--batch_size_per_gpu", "4"]
STEPS_PER_EPOCH = 5


def make_args(*extra: str) -> object:
    return main_massl.get_args_parser().parse_args([*TINY, *extra])


def make_trainer(*extra: str) -> MaSSLTrainer:
    env = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    args = make_args(*extra)
    main_massl.check_args(args, 1)
    return MaSSLTrainer(args, env, STEPS_PER_EPOCH, log=lambda message: None)


def crops(seed: int, batch: int = 4, locals_: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(batch, 3, 28, 28, generator=g) for _ in range(2)]
            + [torch.randn(batch, 3, 14, 14, generator=g) for _ in range(locals_)])


def capture_grads(trainer: MaSSLTrainer) -> dict[str, torch.Tensor]:
    """The student's gradients as the optimizer sees them at its step."""
    seen: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in trainer.student.named_parameters()}

    def hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    seen[names[id(p)]] = p.grad.detach().clone()

    trainer.optimizer.register_step_pre_hook(hook)
    return seen


def test_accumulation_sums_micro_batch_gradients_and_advances_schedules_once():
    trainer = make_trainer("--gradient_accumulation", "2")
    student, teacher = copy.deepcopy(trainer.student), copy.deepcopy(trainer.teacher)
    memory = copy.deepcopy(trainer.memory)
    seen = capture_grads(trainer)
    batches = [crops(0), crops(1)]
    ptr_before = int(trainer.memory.ptr)

    metrics = trainer.train_step(batches)

    # Literal re-computation: each micro-batch's loss against the memory as it was, its
    # own random blocks (seeded by micro-batch index), then the memory update; loss / 2.
    temp = float(trainer.schedules["teacher_temp"][0])
    losses = []
    for micro, batch in enumerate(batches):
        generator = torch.Generator().manual_seed(utils.mix_seed(3, 4, micro) % (2 ** 63))
        perm = torch.randperm(memory.size, generator=generator)
        s, t = student(batch), teacher(batch[:2]).detach()
        losses.append(trainer.criterion(s, t, memory.features.clone(), temp, perm=perm))
        memory.update(t[4:8])
    (sum(losses) / 2).backward()
    assert seen, "the optimizer step hook saw no gradient"
    for name, p in student.named_parameters():
        torch.testing.assert_close(seen[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert metrics["loss"] == pytest.approx(sum(x.item() for x in losses) / 2, rel=1e-5)
    # one optimizer step: schedules advanced once, at their first values
    assert trainer.global_step == 1
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.schedules["lr"][0])
    assert metrics["teacher_temp"] == pytest.approx(temp)
    # the memory pointer advanced by the global batch once per micro-batch
    assert int(trainer.memory.ptr) == (ptr_before + 2 * 4) % 32
    torch.testing.assert_close(trainer.memory.bank, memory.bank)


def test_memory_pointer_advances_by_the_batch_per_micro_batch_and_wraps():
    trainer = make_trainer("--gradient_accumulation", "3")
    trainer.train_step([crops(i) for i in range(3)])
    assert int(trainer.memory.ptr) == 12
    trainer.train_step([crops(i) for i in range(3, 6)])
    assert int(trainer.memory.ptr) == 24
    trainer.train_step([crops(i) for i in range(6, 9)])
    assert int(trainer.memory.ptr) == (36 % 32)
    assert trainer.global_step == 3


def test_wrong_number_of_micro_batches_is_an_error():
    trainer = make_trainer("--gradient_accumulation", "2")
    with pytest.raises(ValueError, match="expected 2"):
        trainer.train_step([crops(0)])


def test_teacher_is_the_ema_of_the_student():
    trainer = make_trainer()
    teacher_before = [p.detach().clone() for p in trainer.teacher.parameters()]
    metrics = trainer.train_step([crops(0)])
    m = metrics["momentum"]
    for before, t, s in zip(teacher_before, trainer.teacher.parameters(),
                            trainer.student.parameters()):
        torch.testing.assert_close(t, m * before + (1 - m) * s.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("extra", [
    ["--use_bf16", "true"],
    ["--optimizer", "sgd"],
    ["--use_bn_in_head", "true"],
    ["--koleo_loss_weight", "0.5"],
])
def test_step_variants_are_finite_and_move_the_student(extra):
    trainer = make_trainer(*extra)
    before = [p.detach().clone() for p in trainer.student.parameters()]
    for i in range(2):
        metrics = trainer.train_step([crops(i)])
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    moved = sum(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    assert moved > len(before) // 2
    if "--koleo_loss_weight" in extra:
        assert metrics["loss"] == pytest.approx(metrics["massl"] + 0.5 * metrics["koleo"],
                                                rel=1e-5)


def test_state_dict_round_trip_continues_identically(tmp_path):
    a = make_trainer()
    a.train_step([crops(0)])
    torch.save(a.state_dict({"meter": {"sums": {"loss": 1.0}, "count": 1}}), tmp_path / "s.pth")
    b = make_trainer()
    mine = b.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=True))
    assert mine == {"meter": {"sums": {"loss": 1.0}, "count": 1}}
    b.global_step = a.global_step
    ma, mb = a.train_step([crops(1)]), b.train_step([crops(1)])
    assert ma == mb
    for pa, pb in zip(a.teacher.parameters(), b.teacher.parameters()):
        assert torch.equal(pa, pb)


# --------------------------------------------------------------------------- the lean step


def test_clip_gradients_equals_the_per_tensor_loop():
    """The foreach clipping against DINO's loop as this project wrote it before (literal)."""
    from trainer import clip_gradients
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2), (1,), (6, 6)]
    scales = [0.01, 10.0, 1.0, 100.0, 0.5]  # some tensors below max_norm, some above
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    for p, scale in zip(params, scales):
        p.grad = torch.randn(p.shape, generator=g) * scale
    expected = [p.grad.clone() for p in params]
    n_clipped = 0
    for grad in expected:  # the old implementation, literally
        norm = torch._foreach_norm([grad])[0]
        n_clipped += int(3.0 / (norm + 1e-6) < 1)
        grad.mul_(torch.clamp(3.0 / (norm + 1e-6), max=1.0))
    assert 0 < n_clipped < len(params)
    stats = clip_gradients(params, 3.0, stats=True)
    for p, e in zip(params, expected):
        assert torch.equal(p.grad, e)
        assert p.grad.norm() <= 3.0 + 1e-5  # DINO's bound, per tensor
    assert stats[1] == n_clipped


def test_nonfinite_loss_raises_after_its_step_naming_it():
    trainer = make_trainer()
    real = trainer.criterion.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    trainer.criterion.forward = poisoned
    trainer.train_step([crops(0)])
    with pytest.raises(main_massl.NonFiniteLossError,
                       match=r"global step 2\): loss=nan, massl=nan; the last good checkpoint"):
        trainer.train_step([crops(1)])
    assert trainer.global_step == 1  # the step that failed is not counted as done


# --------------------------------------------------------------------------- background checkpoints


def test_background_checkpoint_is_the_state_at_save_time(tmp_path):
    """The write goes on while training changes the weights: the file holds the state of
    the moment save_checkpoint returned (a CPU copy), exactly what a synchronous save holds."""
    trainer = make_trainer()
    trainer.train_step([crops(0)])
    sync_dir, async_dir = tmp_path / "sync", tmp_path / "async"
    sync_dir.mkdir(), async_dir.mkdir()
    run_folder.save_checkpoint(trainer, sync_dir, 0, 1, {})
    writer, done = storage.BackgroundWriter(), []
    run_folder.save_checkpoint(trainer, async_dir, 0, 1, {}, numbered=True, writer=writer,
                               then=lambda: done.append((async_dir / "checkpoint.pth").exists()))
    trainer.train_step([crops(1)])  # changes weights, memory and optimizer state in place
    writer.wait()
    assert done == [True]  # ``then`` ran after the file was in place
    a = torch.load(sync_dir / "checkpoint.pth", weights_only=True)
    for name in ("checkpoint.pth", "checkpoint0000.pth"):
        b = torch.load(async_dir / name, weights_only=True)
        for part in ("student", "teacher", "memory"):
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), (part, key)
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        for i, s in a["optimizer"]["state"].items():
            for key in s:
                assert torch.equal(s[key], b["optimizer"]["state"][i][key]), (i, key)
        assert (b["epoch"], b["iteration"], b["global_step"]) == (0, 1, 1)
    assert not list(async_dir.glob(".*.tmp"))


def test_background_writer_runs_jobs_in_order_and_reports_errors(tmp_path):
    import threading
    writer, order, release = storage.BackgroundWriter(), [], threading.Event()
    writer.submit(lambda: (release.wait(10), order.append(1)))
    threading.Timer(0.2, release.set).start()
    writer.submit(lambda: order.append(2))  # waits for the first job
    writer.wait()
    assert order == [1, 2]

    # A failed write: the error surfaces in the caller's thread at the next wait, and the
    # atomic rename leaves the previous file as it was.
    path = tmp_path / "checkpoint.pth"
    storage.save_atomic({"good": torch.ones(2)}, path)
    writer.submit(lambda: storage.save_atomic({"bad": lambda: None}, path))  # cannot pickle
    with pytest.raises(Exception, match="pickle|lambda"):
        writer.wait()
    writer.wait()  # reported once
    assert torch.equal(torch.load(path, weights_only=True)["good"], torch.ones(2))
    assert not list(tmp_path.glob(".*.tmp"))
