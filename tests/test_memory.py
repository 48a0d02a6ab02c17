"""MemoryBank: FIFO order, wrap-around, state_dict, and a real 2-process gloo run."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from massl_loss import MaSSLLoss
from memory import MemoryBank


def _keys(n, dim, start):
    """Distinguishable keys: row r holds the value start + r in every coordinate."""
    return torch.arange(start, start + n, dtype=torch.float32).unsqueeze(1).repeat(1, dim)


def test_init_is_unit_norm_and_buffers_are_persistent():
    bank = MemoryBank(32, 8)
    assert bank.features.shape == (32, 8)
    torch.testing.assert_close(bank.features.norm(dim=1), torch.ones(32))
    assert set(bank.state_dict()) == {"bank", "ptr"}
    assert int(bank.ptr) == 0


def test_features_is_a_view_not_a_copy():
    bank = MemoryBank(8, 4)
    assert bank.features.data_ptr() == bank.bank.data_ptr()


def test_fifo_order_and_wrap_around():
    bank = MemoryBank(12, 3)
    initial = bank.features.clone()
    bank.update(_keys(4, 3, 100))
    assert int(bank.ptr) == 4
    torch.testing.assert_close(bank.features[:4], _keys(4, 3, 100))
    torch.testing.assert_close(bank.features[4:], initial[4:])
    bank.update(_keys(4, 3, 200))
    bank.update(_keys(4, 3, 300))
    assert int(bank.ptr) == 0  # wrapped exactly at the end
    bank.update(_keys(4, 3, 400))  # overwrites the oldest batch (100..103)
    assert int(bank.ptr) == 4
    expected = torch.cat([_keys(4, 3, 400), _keys(4, 3, 200), _keys(4, 3, 300)])
    torch.testing.assert_close(bank.features, expected)
    for _ in range(5):  # 5 more batches of 4 on 12 slots: pointer (4 + 20) % 12 = 0
        bank.update(_keys(4, 3, 0))
    assert int(bank.ptr) == 0


def test_misaligned_pointer_wraps_across_the_end():
    # After a resume with another world size the pointer may not be batch-aligned.
    bank = MemoryBank(12, 2)
    bank.ptr.fill_(10)
    bank.update(_keys(6, 2, 50))
    torch.testing.assert_close(bank.features[10:], _keys(2, 2, 50))
    torch.testing.assert_close(bank.features[:4], _keys(6, 2, 50)[2:])
    assert int(bank.ptr) == 4


def test_batch_not_dividing_size_is_refused_with_both_numbers():
    bank = MemoryBank(10, 2)
    with pytest.raises(ValueError, match=r"10.*\b4\b"):
        bank.update(torch.randn(4, 2))


def test_wrong_key_dim_is_refused():
    with pytest.raises(ValueError, match="batch, 8"):
        MemoryBank(16, 8).update(torch.randn(4, 7))


def test_state_dict_round_trip():
    a = MemoryBank(16, 4)
    a.update(_keys(4, 4, 7))
    b = MemoryBank(16, 4)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.features, a.features)
    assert int(b.ptr) == 4
    b.update(_keys(4, 4, 9))
    a.update(_keys(4, 4, 9))
    torch.testing.assert_close(b.features, a.features)


def test_loss_sees_the_bank_without_the_current_batch():
    # The training-step order: logits against the bank, then the FIFO write, then backward.
    torch.manual_seed(0)
    bank = MemoryBank(16, 8)
    before = bank.features.clone()
    student = F.normalize(torch.randn(3 * 4, 8), dim=1).requires_grad_(True)
    teacher = F.normalize(torch.randn(2 * 4, 8), dim=1)
    perm = torch.randperm(16)
    loss_fn = MaSSLLoss(block_size=8)
    loss = loss_fn(student, teacher, bank.features, 0.04, perm=perm)
    current_keys = teacher[4:]
    assert not any((before == k).all(dim=1).any() for k in current_keys)
    bank.update(current_keys)
    loss.backward()  # the in-place write did not invalidate the graph
    # The loss value depended on the old bank only: recomputing on it gives the same.
    student2 = student.detach().clone().requires_grad_(True)
    again = loss_fn(student2, teacher, before, 0.04, perm=perm)
    again.backward()
    assert loss.item() == again.item()
    torch.testing.assert_close(student.grad, student2.grad)
    # and the bank now holds the current batch at the old pointer
    torch.testing.assert_close(bank.features[:4], current_keys)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, queue):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # identical initial banks on every rank, as a shared seed gives
        bank = MemoryBank(12, 2)
        for step in range(4):  # 4 steps x global batch 4 on 12 slots: wraps once
            bank.update(_keys(2, 2, 100 * step + 10 * rank))
        queue.put((rank, bank.features.clone(), int(bank.ptr)))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_ranks_hold_the_same_bank_in_rank_order():
    world_size = 2
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, world_size, port, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results = dict()
    for _ in range(world_size):
        rank, feats, ptr = queue.get(timeout=120)
        results[rank] = (feats, ptr)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1] == results[1][1] == 4
    # slots 0..3 hold step 3 (rank 0's two keys, then rank 1's), 4..7 step 1, 8..11 step 2
    expected = torch.cat([
        _keys(2, 2, 300), _keys(2, 2, 310),
        _keys(2, 2, 100), _keys(2, 2, 110),
        _keys(2, 2, 200), _keys(2, 2, 210),
    ])
    torch.testing.assert_close(results[0][0], expected)
