"""FIFO memory bank of teacher embeddings (docs/method.md, "Memory" and "Memory update")."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MemoryBank", "gather_across_ranks"]


def gather_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order (no gradient).

    Returns ``x`` itself when no process group is running, so one process needs no
    launcher (a one-process group, ``MASSL_FORCE_DDP=1``, still runs the collective). Every
    rank must pass a tensor of the same shape.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class MemoryBank(nn.Module):
    """A FIFO queue of ``size`` unit vectors of dimension ``dim``.

    The bank and its write pointer are persistent buffers, so they travel with
    ``state_dict()`` and ``.to(device)``. ``update`` overwrites the oldest entries with a
    new batch; under ``torch.distributed`` it first gathers the batch of every rank (rank
    order) so all ranks hold the same bank.

    Read ``features`` *before* calling ``update`` in a training step: the loss compares
    the current views with past batches only.
    """

    bank: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size <= 0 or dim <= 0:
            raise ValueError(f"memory size and dim must be positive, got size={size}, dim={dim}")
        self.size = size
        self.dim = dim
        self.register_buffer("bank", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def features(self) -> torch.Tensor:
        """The bank, ``(size, dim)``. A view, not a copy: do not modify it in place."""
        return self.bank

    @torch.no_grad()
    def update(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (``(B, dim)`` on this rank) at the pointer, oldest entries first."""
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (batch, {self.dim}), got {tuple(keys.shape)}")
        keys = gather_across_ranks(keys.detach())
        n = keys.shape[0]
        if self.size % n != 0:
            raise ValueError(
                f"memory size {self.size} is not a multiple of the global batch {n} "
                "(batch per process x world size): choose a memory size divisible by it")
        # Modular indices keep the FIFO exact even if a resumed run changed the world
        # size and the pointer is no longer a multiple of the new global batch.
        slots = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.bank[slots] = keys.to(self.bank.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"
