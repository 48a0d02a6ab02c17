"""Reading checkpoints: the backbone weights of ours, DINO/iBOT's and exported files (with
``torch.load(weights_only=True)``, never running code from a file), strict loading with a
one-line report of what does not fit, and building the backbone a checkpoint was trained with."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from utils import UserError, first_line

# Parameters that exist only for pretraining and that no evaluation backbone has:
# iBOT's learned mask token. Dropped by name; everything else must match exactly.
TRAINING_ONLY_BACKBONE_KEYS = ("masked_embed",)

# How many key names an error message lists before saying "(+N more)".
_MAX_KEYS_IN_ERROR = 8


def strip_prefix(key: str, prefix: str) -> str:
    """``key`` without ``prefix`` when it starts with it (e.g. DDP's ``module.``)."""
    return key[len(prefix):] if key.startswith(prefix) else key


def checkpoint_file_problem(path: str | os.PathLike) -> str | None:
    """What makes ``path`` no torch.save file, judged from its size and first bytes, or None
    when it could be one (a zip archive, or a pickle of the legacy format)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"cannot be opened ({e.strerror})"
    if not head:
        return "is empty (0 bytes): a copy or a save that was cut short?"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    return f"is not a PyTorch checkpoint (torch.save writes a zip archive; this file starts {head!r})"


def checkpoint_load_error(path: str | os.PathLike, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, in words: what the file is not.

    Never suggests ``weights_only=False``: that would run whatever code the file holds."""
    problem = checkpoint_file_problem(path)
    if problem is not None:
        return f"{path} {problem}"
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f" ({found.group(1)})" if found else ""
        return (f"{path} holds Python objects{what} besides tensors and plain containers; they "
                "are not loaded, since unpickling them could run code: it is not a checkpoint "
                "written by these scripts")
    return (f"{path} is truncated or corrupt: {type(exc).__name__}: "
            f"{first_line(exc).split('. This is')[0]}")


def _torch_load_weights_only(path: Path) -> Any:
    """``torch.load(weights_only=True)`` that also accepts DINO/iBOT checkpoints, whose
    ``args`` is an ``argparse.Namespace`` (a plain attribute bag, safe to rebuild)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5
        return torch.load(path, map_location="cpu", weights_only=True)
    with safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _is_flat_state_dict(obj: Any) -> bool:
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()))


def _plain_args(args: Any) -> dict | None:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, dict):
        return dict(args)
    return None


def _safetensors_args(path: Path) -> dict | None:
    """Training args stored in a ``.safetensors`` header (strings, JSON-decoded when they parse)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "arch" not in metadata:
        return None
    args = {}
    for key, value in metadata.items():
        try:
            args[key] = json.loads(value)
        except (TypeError, ValueError):
            args[key] = value
    return args


def read_checkpoint_backbone(path: str | os.PathLike, checkpoint_key: str = "teacher"
                             ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The backbone state dict in ``path`` and the training ``args`` stored with it, if any.

    Accepts our training checkpoints and DINO/iBOT ones (``checkpoint_key`` picks
    ``teacher`` or ``student``, whose keys are ``backbone.*``/``head.*``, possibly under
    ``module.``), a dict with ``model`` or ``state_dict``, a bare backbone state dict, and
    exported files (``.pth`` flat dict, or ``.safetensors`` whose header may carry the
    args). ``module.`` then ``backbone.`` are stripped only at the start of a key, the
    projection head (``head.*``) and iBOT's ``masked_embed`` are dropped. Never downloads.
    Raises ``UserError`` for a missing or unreadable file or a missing ``checkpoint_key``.
    """
    path = Path(path)
    problem = pretrained_path_problem(path)
    if problem is not None:
        raise UserError(problem)
    args = None
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise UserError(f"{path} is a .safetensors file: pip install safetensors") from e
        try:
            ckpt = load_file(str(path), device="cpu")
            args = _safetensors_args(path)
        except Exception as e:
            raise UserError(f"cannot read {path}: {first_line(e)}") from e
    else:
        try:
            ckpt = _torch_load_weights_only(path)
        except Exception as e:
            raise UserError(f"cannot read checkpoint: {checkpoint_load_error(path, e)}") from e
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict or a state dict")

    if isinstance(ckpt.get(checkpoint_key), dict):
        state = ckpt[checkpoint_key]
    elif _is_flat_state_dict(ckpt):
        state = ckpt  # a bare or exported backbone: there is only one set of weights
    elif isinstance(ckpt.get("model"), dict):
        state = ckpt["model"]
    elif isinstance(ckpt.get("state_dict"), dict):
        state = ckpt["state_dict"]
    else:
        raise UserError(f"{path} has no '{checkpoint_key}' entry; it has: "
                        f"{', '.join(map(str, ckpt)) or 'nothing'} (choose one with --checkpoint_key)")
    if state is not ckpt:
        args = _plain_args(ckpt.get("args"))

    backbone: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue
        key = strip_prefix(strip_prefix(key, "module."), "backbone.")
        if key.startswith("head.") or key in TRAINING_ONLY_BACKBONE_KEYS:
            continue
        backbone[key] = value
    if not backbone:
        raise UserError(f"{path} ('{checkpoint_key}') holds no backbone weights")
    return backbone, args


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: the identity of a set of
    weights, whichever file (training checkpoint, export) they were read from."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def pretrained_path_problem(path: str | os.PathLike) -> str | None:
    """Why ``--pretrained_weights path`` cannot be read as a file, or None."""
    path = Path(path)
    if path.is_dir():
        return (f"--pretrained_weights {path} is a folder, not a weights file: name the file in "
                "it (e.g. checkpoint.pth, or model.safetensors of an export.py folder)")
    if not path.is_file():
        return (f"no such file: {path} (--pretrained_weights must be a local file; nothing is "
                "downloaded)")
    return None


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_IN_ERROR])
    more = len(keys) - _MAX_KEYS_IN_ERROR
    return f"[{shown}{f', ... (+{more} more)' if more > 0 else ''}]"


def load_backbone_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                             source: str = "the checkpoint") -> None:
    """``model.load_state_dict(state_dict, strict=True)``, or a ``UserError`` that lists
    the missing and unexpected keys and the shape mismatches on one line."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys {_listed(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys {_listed(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches {_listed(mismatched)}")
        raise UserError(f"weights in {source} do not fit the {type(model).__name__} that was built: "
                        f"{'; '.join(problems)}. Check --arch and --patch_size "
                        "(and --checkpoint_key)")
    model.load_state_dict(state_dict, strict=True)


def load_pretrained_weights(model: torch.nn.Module, path: str | os.PathLike,
                            checkpoint_key: str = "teacher") -> None:
    """Load the backbone weights found in ``path`` into ``model``, strictly.

    See ``read_checkpoint_backbone`` for the accepted formats. Any missing, unexpected or
    wrongly shaped key is a ``UserError``: a model is never left partly random.
    """
    state_dict, _ = read_checkpoint_backbone(path, checkpoint_key)
    load_backbone_state_dict(model, state_dict, source=str(path))


def _infer_vit_arch(state_dict: dict[str, torch.Tensor], vit_archs: dict) -> str | None:
    """Our ViT whose width and depth match the weights (the head count cannot be read off
    the weights; each width has one standard head count)."""
    if "cls_token" not in state_dict:
        return None
    width = state_dict["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    matches = [name for name, (dim, d, _) in vit_archs.items() if (dim, d) == (width, depth)]
    return matches[0] if len(matches) == 1 else None


def _pos_embed_grid(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Side of the square position-embedding grid (CLS token excluded), if there is one."""
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is None or pos_embed.ndim != 3:
        return None
    side = math.isqrt(pos_embed.shape[1] - 1)
    return side if side * side == pos_embed.shape[1] - 1 else None


def build_backbone_from_checkpoint(path: str | os.PathLike, arch: str | None = None,
                                   patch_size: int | None = None, checkpoint_key: str = "teacher",
                                   img_size: int | None = None
                                   ) -> tuple[torch.nn.Module, int, dict]:
    """Build the backbone a checkpoint was trained with and load its weights strictly.

    ``arch`` and ``patch_size`` default to the checkpoint's stored args; without args
    (a bare or exported state dict) the patch size is read off ``patch_embed`` and the
    arch off the width and depth of the weights. The position-embedding grid is the one
    stored in ``pos_embed`` (= training ``global_crops_size`` / patch size), so the
    weights load unchanged; the ViT resamples it on the fly for other input sizes. An
    explicit ``img_size`` with another grid gets ``pos_embed`` resampled once, with DINO's
    interpolation (``vision_transformer.interpolate_pos_embed``).
    Returns ``(model, feature_dim, info)``; ``info`` says what was used and why.
    """
    import vision_transformer as vits  # here, not at the top: utils must stay import-light

    state_dict, args = read_checkpoint_backbone(path, checkpoint_key)
    stored = args or {}
    notes: list[str] = []
    if arch is None:
        arch = stored.get("arch")
        if arch is None:
            arch = _infer_vit_arch(state_dict, vits.VIT_ARCHS)
            if arch is None:
                raise UserError(f"{path} stores no training args and its weights match none of "
                                f"{', '.join(vits.VIT_ARCHS)}: pass --arch (and --patch_size)")
            notes.append(f"arch {arch} inferred from the weights' width and depth")
    if arch in vits.VIT_ARCHS:
        if patch_size is None:
            patch_size = stored.get("patch_size")
            if patch_size is None and "patch_embed.proj.weight" in state_dict:
                patch_size = int(state_dict["patch_embed.proj.weight"].shape[-1])
                notes.append(f"patch size {patch_size} read off patch_embed")
        patch_size = int(patch_size or 16)
        grid = _pos_embed_grid(state_dict)
        trained_img_size = grid * patch_size if grid else stored.get("global_crops_size")
        if img_size is None:
            img_size = int(trained_img_size or 224)
        elif grid and img_size // patch_size != grid:
            new_grid = img_size // patch_size
            state_dict = dict(state_dict)
            state_dict["pos_embed"] = vits.interpolate_pos_embed(  # DINO's, as in training
                state_dict["pos_embed"], (new_grid, new_grid))
            notes.append(f"pos_embed resampled from {grid}x{grid} to {new_grid}x{new_grid}")
    try:
        model, feature_dim = vits.build_backbone(arch, patch_size or 16, img_size=img_size or 224)
    except vits.UnknownArchError as e:
        raise UserError(str(e)) from e
    try:
        load_backbone_state_dict(model, state_dict, source=f"{path} ('{checkpoint_key}')")
    except UserError as e:
        if "arch" in stored:
            raise UserError(f"{e} The checkpoint was trained with --arch {stored['arch']} "
                            f"--patch_size {stored.get('patch_size', '?')}.") from e
        raise
    info = {"path": str(path), "checkpoint_key": checkpoint_key, "arch": arch,
            "patch_size": patch_size, "img_size": img_size, "feature_dim": feature_dim,
            "weights_sha256": state_dict_sha256(model.state_dict()), "args": args, "notes": notes}
    return model, feature_dim, info
