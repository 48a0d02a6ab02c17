"""ViT backbones, the MaSSL projection head and the multi-crop wrapper.

The backbone is timm's ``VisionTransformer`` (SDPA attention, drop-path, any input size),
configured so that its state-dict keys are exactly those of DINO's and timm's ViT: a
backbone trained here loads with ``strict=True`` into
``timm.create_model("vit_small_patch16_224", num_classes=0)``. Two things are DINO's (and
so the authors') rather than timm's, so that the network trained here is theirs at every
crop size:

* position embeddings for another input grid (96 px local crops, evaluation sizes,
  attention maps) come from DINO's ``interpolate_pos_encoding`` (``interpolate_pos_embed``
  below), not from timm's ``resample_abs_pos_embed`` (exact size, antialiased). At the
  native size (``img_size``) both use ``pos_embed`` unchanged, so an exported backbone
  gives the same features in timm there; at other sizes timm's embedding, and so its
  features, differ slightly from the network that was trained;
* initialisation: trunc-normal std 0.02 for ``pos_embed``, ``cls_token`` and every Linear
  weight, zero biases, LayerNorm 1/0, PyTorch's default Conv2d init for the patch embedding
  (timm draws ``cls_token`` with std 1e-6).

On top of timm we add the two DINO interfaces evaluation code relies on:
``get_intermediate_layers`` (normed outputs of the last blocks, CLS token included) and
``get_last_selfattention``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer as _TimmViT

__all__ = [
    "interpolate_pos_embed",
    "VisionTransformer",
    "vit_pico",
    "vit_nano",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_large",
    "VIT_ARCHS",
    "build_backbone",
    "MaSSLHead",
    "MultiCropWrapper",
]


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int],
                          num_prefix_tokens: int = 1) -> torch.Tensor:
    """Position embeddings for a ``grid`` = (rows, columns) of patches, as DINO computes them.

    ``pos_embed`` is ``(1, num_prefix_tokens + n * n, D)``: the prefix (CLS) embeddings, kept
    as they are, then an n x n grid, returned unchanged when ``grid`` is (n, n) and otherwise
    resized bicubically (no antialias, ``align_corners=False``) with the scale factors
    ``((rows + 0.1) / n, (columns + 0.1) / n)``. The factor, not the output size, sets where
    the new grid samples the old one, so the result is not timm's exact-size resampling.
    (DINO calls the input's height ``w``; its first factor scales the rows all the same.)
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = math.isqrt(patches.shape[1])
    if n * n != patches.shape[1]:
        raise ValueError(f"pos_embed holds {patches.shape[1]} patch positions, not a square grid")
    rows, cols = int(grid[0]), int(grid[1])
    if (rows, cols) == (n, n):
        return pos_embed
    dim = pos_embed.shape[-1]
    resized = F.interpolate(patches.reshape(1, n, n, dim).permute(0, 3, 1, 2),
                            scale_factor=((rows + 0.1) / n, (cols + 0.1) / n), mode="bicubic",
                            align_corners=False)
    if tuple(resized.shape[-2:]) != (rows, cols):  # DINO asserts the same
        raise RuntimeError(f"interpolated grid {tuple(resized.shape[-2:])} != {(rows, cols)}")
    return torch.cat((prefix, resized.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)), dim=1)


def init_linear_and_norm(m: nn.Module) -> None:
    """DINO's per-module init: Linear weight trunc-normal std 0.02 and bias 0, LayerNorm 1/0."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class VisionTransformer(_TimmViT):
    """timm's ViT returning the final-normed CLS token, at any input resolution.

    ``img_size`` only fixes the size of the learned position-embedding grid; inputs of
    other sizes (96 px local crops, 480 px evaluation images) get DINO's interpolation of
    that grid (``interpolate_pos_embed``), computed on the fly. Initialised as DINO's ViT.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, **kwargs):
        kwargs.setdefault("num_classes", 0)
        kwargs.setdefault("global_pool", "token")
        kwargs.setdefault("qkv_bias", True)
        # dynamic_img_size: timm's patch embedding accepts any multiple of the patch size and
        # keeps the (rows, columns) grid for _pos_embed.
        super().__init__(img_size=img_size, patch_size=patch_size, dynamic_img_size=True, **kwargs)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """DINO's initialisation (timm's __init__ calls this in place of its own).

        trunc-normal std 0.02 (cut at +-2, i.e. never in practice) for ``pos_embed``,
        ``cls_token`` and every Linear weight, zero Linear biases, LayerNorm weight 1 and
        bias 0, PyTorch's default init for the patch-embedding Conv2d. ``trunc_normal_`` is
        timm's, the function DINO's code copies.
        """
        # (Checked here: timm's __init__ calls this before returning to ours.)
        if self.cls_token is None or self.reg_token is not None or self.no_embed_class:
            raise ValueError("VisionTransformer needs a CLS token, no register tokens and "
                             "position embeddings that include the CLS token (as DINO's ViT)")
        mode = mode or getattr(self, "weight_init_mode", "")  # timm's weight_init argument
        if mode:
            raise ValueError(f"VisionTransformer uses DINO's initialisation only, not '{mode}'")
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear_and_norm)
        self.patch_embed.proj.reset_parameters()

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """CLS token + patch tokens ``(B, rows, cols, D)``, plus DINO-interpolated embeddings.

        DINO keeps ``pos_embed`` when the input is square with the native patch count; timm's
        patch embedding only takes multiples of the patch size, so that is the native grid.
        """
        B, rows, cols, D = x.shape
        pos_embed = interpolate_pos_embed(self.pos_embed, (rows, cols), self.num_prefix_tokens)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x.reshape(B, rows * cols, D)), dim=1)
        return self.pos_drop(x + pos_embed)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS token + (resampled) position embedding."""
        return self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Outputs of the last ``n`` blocks, each passed through the final norm (as DINO).

        Each item is ``(B, 1 + num_patches, embed_dim)`` with the CLS token at index 0.
        """
        x = self._tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the last block, ``(B, num_heads, N, N)`` with N = 1 + patches."""
        x = self._tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        attn = last.attn
        B, N, C = x.shape
        qkv = attn.qkv(last.norm1(x)).reshape(B, N, 3, attn.num_heads, C // attn.num_heads)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


# name -> (embed_dim, depth, num_heads). vit_pico (about 0.8 M parameters, the quick start's
# CPU model) and vit_nano (about 1.2 M) are our CPU-sized models, the others are the standard
# DeiT/DINO sizes.
VIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_pico": (128, 4, 4),
    "vit_nano": (128, 6, 4),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


def _vit_factory(name: str) -> Callable[..., VisionTransformer]:
    embed_dim, depth, num_heads = VIT_ARCHS[name]

    def build(patch_size: int = 16, **kwargs) -> VisionTransformer:
        return VisionTransformer(
            patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=4.0, **kwargs)

    build.__name__ = name
    build.__doc__ = f"ViT with embed_dim={embed_dim}, depth={depth}, heads={num_heads}, any patch size."
    return build


vit_pico = _vit_factory("vit_pico")
vit_nano = _vit_factory("vit_nano")
vit_tiny = _vit_factory("vit_tiny")
vit_small = _vit_factory("vit_small")
vit_base = _vit_factory("vit_base")
vit_large = _vit_factory("vit_large")


class UnknownArchError(ValueError):
    """Raised for an ``--arch`` that is neither one of ours nor a timm model name."""


def build_backbone(arch: str, patch_size: int = 16, img_size: int = 224,
                   drop_path_rate: float = 0.0) -> tuple[nn.Module, int]:
    """Build a backbone by name; returns ``(model, feature_dim)``.

    ``arch`` is one of ``VIT_ARCHS`` (our ViTs, CLS output) or any timm model name, built
    with ``num_classes=0`` so it returns its pooled feature and never downloads weights.
    """
    if arch in VIT_ARCHS:
        model = _vit_factory(arch)(patch_size=patch_size, img_size=img_size,
                                   drop_path_rate=drop_path_rate)
        return model, model.embed_dim
    check_arch(arch)
    kwargs = {"num_classes": 0, "pretrained": False}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    model = timm.create_model(arch, **kwargs)
    return model, model.num_features


def check_arch(arch: str) -> None:
    """Raise ``UnknownArchError`` unless ``build_backbone`` can build ``arch``."""
    if arch not in VIT_ARCHS and not timm.is_model(arch):
        raise UnknownArchError(
            f"unknown --arch '{arch}': use one of {', '.join(VIT_ARCHS)} or a timm model name "
            "(python -c 'import timm; print(timm.list_models())' lists them)")


class MaSSLHead(nn.Module):
    """Projection head (docs/method.md, "Networks"): MLP to ``bottleneck_dim``, then L2
    normalisation (the embeddings the memory stores; ``--bottleneck_dim``).

    ``Linear(in, hidden) -> GELU -> [Linear(hidden, hidden) -> GELU] * (nlayers - 2) ->
    Linear(hidden, out)``, optional BatchNorm after each hidden linear. There are no
    prototypes: the memory bank plays that role.
    """

    def __init__(self, in_dim: int, bottleneck_dim: int = 256, hidden_dim: int = 2048,
                 nlayers: int = 3, use_bn: bool = False):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(nlayers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = hidden_dim
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(init_linear_and_norm)  # as DINO's head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops.

    Consecutive crops of the same resolution are concatenated and go through the backbone
    in one batch (2 global crops together, all local crops together); the head then runs
    once over every crop. The output is crop-major: all images of crop 0, then crop 1, ...
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(features))
