"""Why a small MaSSL run drifts to uniform block distributions: a toy you can run in a minute.

The real loss (``massl_loss.MaSSLLoss``), an EMA teacher and a FIFO memory, but the network is
one linear map shared by all images, ``z = normalize(W h)``, over fixed positive features ``h``
(as GELU outputs are), and a "view" of an image is ``h`` plus Gaussian noise of size
``--view_noise`` (how far apart augmentation puts two views of one image). It prints the mean
cosine between the teacher embeddings of different images as training goes:

    python benchmarks/collapse_toy.py                          # view noise 0.3, 0.6, 1.0
    python benchmarks/collapse_toy.py --view_noise 1.0 --teacher_temp 0.05,0.02,0.01

What it shows (README, "Troubleshooting"): the student is pulled towards the memory slots the
*other* view's teacher distribution picks. When views of one image agree, that pull is
specific to the image and the embeddings spread (the mean cosine falls). When views disagree
more than images differ, the pulls of all images share one component, the shared map follows
it, and every embedding moves into one narrow cone: the block softmaxes flatten and the loss
climbs to ln P. Lower teacher temperatures, a bigger memory, a slower teacher or a smaller lr
change how fast this happens, not whether: only views that agree (or something that removes
the shared component: centering, KoLeo) stop it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from massl_loss import MaSSLLoss  # noqa: E402


def run(view_noise: float, teacher_temp: float, steps: int = 200, n_images: int = 5000,
        feat_dim: int = 64, dim: int = 32, batch: int = 128, memory: int = 2048,
        block: int = 512, n_views: int = 6, lr: float = 1e-3, momentum: float = 0.98,
        seed: int = 0) -> list[tuple[int, float, float]]:
    """(step, loss, mean cosine between images' teacher embeddings), every 40 steps."""
    g = torch.Generator().manual_seed(seed)
    features = F.gelu(torch.randn(n_images, feat_dim, generator=g))
    W = torch.nn.Parameter(torch.randn(dim, feat_dim, generator=g) * 0.1)
    W_teacher = W.detach().clone()
    bank = F.normalize(torch.randn(memory, dim, generator=g), dim=1)
    pointer = 0
    optimizer = torch.optim.AdamW([W], lr=lr, weight_decay=0.04)
    criterion = MaSSLLoss(block, student_temp=0.1, n_global_crops=2)
    probe = features[:1000]
    history = []
    for step in range(steps):
        h = features[torch.randint(0, n_images, (batch,), generator=g)]
        views = [h + view_noise * torch.randn(h.shape, generator=g) for _ in range(n_views)]
        student = torch.cat([F.normalize(v @ W.T, dim=1) for v in views])
        with torch.no_grad():
            teacher = torch.cat([F.normalize(v @ W_teacher.T, dim=1) for v in views[:2]])
        loss = criterion(student, teacher, bank, teacher_temp)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            W_teacher.mul_(momentum).add_(W.detach(), alpha=1 - momentum)
            bank[pointer:pointer + batch] = teacher[batch:]  # FIFO, global crop 2
            pointer = (pointer + batch) % memory
            if step % 40 == 0 or step == steps - 1:
                z = F.normalize(probe @ W_teacher.T, dim=1)
                history.append((step, loss.item(), (z @ z.T).mean().item()))
    return history


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--view_noise", default="0.3,0.6,1.0", help="comma-separated values")
    p.add_argument("--teacher_temp", default="0.05", help="comma-separated values")
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| view noise | teacher temp | mean cosine between images: start → end | loss: start → end |")
    print("|---|---|---|---|")
    for noise in (float(v) for v in args.view_noise.split(",")):
        for temp in (float(v) for v in args.teacher_temp.split(",")):
            h = run(noise, temp, steps=args.steps)
            print(f"| {noise:g} | {temp:g} | {h[0][2]:.2f} → {h[-1][2]:.2f} | "
                  f"{h[0][1]:.2f} → {h[-1][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
