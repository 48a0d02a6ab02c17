"""MaSSLLoss against a literal, slow implementation of docs/method.md, "Loss"."""
import math

import pytest
import torch
import torch.nn.functional as F

from massl_loss import KoLeoLoss, MaSSLLoss


def naive_massl_loss(student, teacher, memory, perm, block_size, student_temp, teacher_temp,
                     n_global=2):
    """Straight from the spec: full logits per crop, gather each block, loop over pairs."""
    B = teacher.shape[0] // n_global
    V = student.shape[0] // B
    K = memory.shape[0]
    n_blocks = K // block_size
    s_crops = student.chunk(V)
    t_crops = teacher.chunk(n_global)
    pair_losses = []
    for i in range(V):
        for j in range(n_global):
            if i == j:
                continue
            s_logits = s_crops[i] @ memory.T / student_temp  # (B, K)
            t_logits = t_crops[j].detach() @ memory.T / teacher_temp
            block_losses = []
            for b in range(n_blocks):
                idx = perm[b * block_size:(b + 1) * block_size]
                log_p = F.log_softmax(s_logits[:, idx], dim=1)
                q = F.softmax(t_logits[:, idx], dim=1)
                block_losses.append(-(q * log_p).sum(dim=1).mean())
            pair_losses.append(torch.stack(block_losses).mean())
    return torch.stack(pair_losses).mean()


def _inputs(B, V, K, D, seed, n_global=2):
    g = torch.Generator().manual_seed(seed)
    student = F.normalize(torch.randn(V * B, D, generator=g, dtype=torch.float64), dim=1)
    teacher = F.normalize(torch.randn(n_global * B, D, generator=g, dtype=torch.float64), dim=1)
    memory = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)
    perm = torch.randperm(K, generator=g)
    return student, teacher, memory, perm


@pytest.mark.parametrize("B,V,K,P,D,st,tt", [
    (4, 2, 16, 4, 8, 0.1, 0.04),
    (3, 6, 64, 16, 8, 0.1, 0.07),
    (5, 4, 50, 16, 12, 0.2, 0.05),   # K % P != 0: last 2 slots of the permutation unused
    (2, 12, 32, 32, 16, 0.1, 0.04),  # one block covering the whole memory
    (1, 3, 24, 5, 4, 0.5, 1.0),
])
def test_matches_naive_value_and_gradient(B, V, K, P, D, st, tt):
    student, teacher, memory, perm = _inputs(B, V, K, D, seed=B * 1000 + V * 10 + K)
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    fast = MaSSLLoss(block_size=P, student_temp=st)(s1, teacher, memory, tt, perm=perm)
    slow = naive_massl_loss(s2, teacher, memory, perm, P, st, tt)
    fast.backward()
    slow.backward()
    # float32 math inside the module vs float64 reference
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


def test_matches_naive_with_one_global_crop():
    student, teacher, memory, perm = _inputs(3, 4, 40, 8, seed=7, n_global=1)
    fast = MaSSLLoss(block_size=10, n_global_crops=1)(student, teacher, memory, 0.05, perm=perm)
    slow = naive_massl_loss(student, teacher, memory, perm, 10, 0.1, 0.05, n_global=1)
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)


def test_teacher_gets_no_gradient():
    student, teacher, memory, perm = _inputs(2, 3, 16, 8, seed=1)
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    MaSSLLoss(block_size=8)(student, teacher, memory, 0.04, perm=perm).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_uniform_inputs_give_log_block_size():
    # All embeddings identical: every block's distribution is uniform for both networks.
    D, K, P = 8, 64, 16
    v = F.normalize(torch.ones(1, D), dim=1)
    student = v.repeat(4 * 3, 1)
    teacher = v.repeat(2 * 3, 1)
    memory = v.repeat(K, 1)
    loss = MaSSLLoss(block_size=P)(student, teacher, memory, 0.04)
    # The loss is lse(s) - <s, t> with float32 logits s of size 1 / student_temp = 10: the
    # cross term comes from (z / temp) . (t @ memory), not from the rounded logits, so the
    # two terms cancel to float32's resolution at 10 (1e-6), not exactly.
    assert loss.item() == pytest.approx(math.log(P), abs=1e-5)


def test_teacher_match_lowers_the_loss():
    # Student crops equal to the teacher crops (and sharp) vs unrelated student crops.
    torch.manual_seed(0)
    B, D, K, P = 8, 16, 128, 32
    memory = F.normalize(torch.randn(K, D), dim=1)
    teacher = F.normalize(torch.randn(2 * B, D), dim=1)
    matched = torch.cat([teacher.chunk(2)[1], teacher.chunk(2)[0]])  # crop i sees teacher j != i
    unrelated = F.normalize(torch.randn(2 * B, D), dim=1)
    loss_fn = MaSSLLoss(block_size=P, student_temp=0.1)
    perm = torch.randperm(K)
    assert loss_fn(matched, teacher, memory, 0.1, perm=perm) < loss_fn(unrelated, teacher, memory, 0.1, perm=perm)


def test_fresh_blocks_each_call_and_generator_is_reproducible():
    student, teacher, memory, _ = _inputs(4, 4, 64, 8, seed=3)
    loss_fn = MaSSLLoss(block_size=8)
    a = loss_fn(student, teacher, memory, 0.04, generator=torch.Generator().manual_seed(5))
    b = loss_fn(student, teacher, memory, 0.04, generator=torch.Generator().manual_seed(5))
    c = loss_fn(student, teacher, memory, 0.04, generator=torch.Generator().manual_seed(6))
    assert a.item() == b.item()
    assert a.item() != c.item()


def test_autocast_still_computes_in_float32():
    student, teacher, memory, perm = _inputs(2, 4, 32, 8, seed=4)
    ref = MaSSLLoss(block_size=8)(student.float(), teacher.float(), memory.float(), 0.04, perm=perm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = MaSSLLoss(block_size=8)(student.bfloat16(), teacher.bfloat16(), memory.float(), 0.04, perm=perm)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)


@pytest.mark.parametrize("kwargs,shapes,match", [
    ({"block_size": 64}, ((8, 4), (4, 4), (32, 4)), "larger than the memory"),
    ({"block_size": 8}, ((2, 4), (4, 4), (32, 4)), "at least 2 student crops"),
    ({"block_size": 8}, ((8, 4), (4, 5), (32, 4)), "dims differ"),
    ({"block_size": 8}, ((7, 4), (4, 4), (32, 4)), "not a multiple"),
    ({"block_size": 8}, ((8, 4), (3, 4), (32, 4)), "n_global_crops"),
])
def test_bad_shapes_raise(kwargs, shapes, match):
    s, t, m = (torch.randn(*shape) for shape in shapes)
    with pytest.raises(ValueError, match=match):
        MaSSLLoss(**kwargs)(s, t, m, 0.04)


def test_bad_perm_shape_raises():
    s, t, m = torch.randn(8, 4), torch.randn(4, 4), torch.randn(32, 4)
    with pytest.raises(ValueError, match="perm"):
        MaSSLLoss(block_size=8)(s, t, m, 0.04, perm=torch.arange(16))


def test_koleo_prefers_spread_embeddings():
    torch.manual_seed(0)
    spread = torch.eye(8)
    clumped = F.normalize(torch.ones(8, 8) + 0.01 * torch.randn(8, 8), dim=1)
    koleo = KoLeoLoss()
    assert koleo(spread) < koleo(clumped)


# --------------------------------------------------------------------------- TF32 for the logits


def _clustered(n, D, centers, g):
    """Embeddings near a few directions (a trained network's, not uniform noise)."""
    pick = torch.randint(0, centers.shape[0], (n,), generator=g)
    return F.normalize(centers[pick] + 0.5 * torch.randn(n, D, generator=g), dim=1)


def test_tf32_logits_error_bound(monkeypatch):
    """TF32 emulated on CPU: every matmul of the loss (forward and backward) sees inputs with
    the mantissa cut to 10 bits (truncation, the worst case). The bound that decided
    --tf32_logits (docs/method.md, section 10): the gradient moves by < 3e-3 relative (measured
    1.4e-3, no more than the bf16 rounding of the head output already does), the loss by
    < 5e-4 relative (measured <= 1.4e-4)."""
    from massl_loss import round_to_tf32
    g = torch.Generator().manual_seed(0)
    B, V, K, P, D = 8, 12, 4096, 1024, 64
    centers = F.normalize(torch.randn(64, D, generator=g), dim=1)
    student, teacher, memory = (_clustered(n, D, centers, g) for n in (V * B, 2 * B, K))
    perm = torch.randperm(K, generator=g)

    def loss_and_grad(z):
        z = z.clone().requires_grad_(True)
        loss = MaSSLLoss(block_size=P)(z, teacher, memory, 0.07, perm=perm)
        loss.backward()
        return loss.item(), z.grad

    exact, exact_grad = loss_and_grad(student)
    bf16, bf16_grad = loss_and_grad(student.bfloat16().float())  # what autocast's head gives
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__",
                        lambda a, b: real_matmul(round_to_tf32(a), round_to_tf32(b)))
    tf32, tf32_grad = loss_and_grad(student)
    monkeypatch.undo()

    def rel(grad):
        return ((grad - exact_grad).norm() / exact_grad.norm()).item()

    assert tf32 != exact and rel(tf32_grad) > 0  # the emulation did round
    assert abs(tf32 - exact) / exact < 5e-4
    assert rel(tf32_grad) < 3e-3
    assert rel(tf32_grad) < 2 * rel(bf16_grad)


def test_round_to_tf32_keeps_ten_mantissa_bits():
    x = torch.tensor([1.0 + 2 ** -10, 1.0 + 2 ** -11, -3.0 - 2 ** -12, 1e30])
    from massl_loss import round_to_tf32
    out = round_to_tf32(x).tolist()
    assert out[:3] == [1.0 + 2 ** -10, 1.0, -3.0]  # toward zero, sign kept
    assert 0 < 1e30 - out[3] < 1e30 * 2 ** -10  # float32's range (not fp16's)


def test_tf32_flag_changes_nothing_off_cuda_and_restores_the_setting():
    from massl_loss import tf32_matmuls
    student, teacher, memory, perm = (t.float() if t.is_floating_point() else t
                                      for t in _inputs(3, 4, 64, 8, seed=9))
    a = MaSSLLoss(block_size=16, tf32=True)(student, teacher, memory, 0.04, perm=perm)
    b = MaSSLLoss(block_size=16)(student, teacher, memory, 0.04, perm=perm)
    assert a.item() == b.item()
    before = torch.backends.cuda.matmul.allow_tf32
    with tf32_matmuls(True):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before
    with tf32_matmuls(False):
        assert torch.backends.cuda.matmul.allow_tf32 == before


def test_device_resize_turns_tf32_off_on_cuda_only_and_restores_the_setting():
    import device_augment
    from massl_loss import cuda_matmul_tf32
    before = torch.backends.cuda.matmul.allow_tf32
    with cuda_matmul_tf32(True):
        with device_augment._ieee_matmul(torch.device("cuda")):
            assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
        with device_augment._ieee_matmul(torch.device("cpu")):
            assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before
