"""torch.hub entry points: MaSSL ViT backbones, random or with your trained weights.

    import torch
    model = torch.hub.load("/path/to/massl", "massl_vits16", source="local",
                           pretrained="output/checkpoint.pth")
    features = model(images)  # (B, 384) CLS features, any input size

``pretrained`` is a local file (a training checkpoint, an ``export.py`` output, ``.pth`` or
``.safetensors``, a DINO-style checkpoint), a timm model folder (``export.py --format
timm_folder``: ``config.json`` + ``model.safetensors``) or an ``http(s)://`` (or ``file://``)
URL of a file.
Nothing is downloaded unless you pass a URL; a URL's file is cached in
``torch.hub.get_dir()/checkpoints/massl-<sha256 of the URL, 16 hex>/<file name>`` (keyed by
the whole URL: two URLs with the same file name never share an entry), then read by the same
strict loader as a local file. torch.hub's integrity convention holds: a file named
``<name>-<8+ hex digits>.<ext>`` must have a SHA-256 starting with those digits, checked on
download (``check_hash=True`` makes such a name compulsory). Weights load strictly: a
checkpoint of another architecture raises an error that lists the mismatched keys, never a half-random model.
With ``pretrained=None`` the backbone is randomly initialised.

Keyword options of every entry point: ``checkpoint_key`` (``"teacher"``, the default, or
``"student"``), ``img_size`` (position-embedding grid; default: the checkpoint's, else 224;
any input size works at run time), ``drop_path_rate`` (for fine-tuning; default 0),
``progress`` (download progress bar for URLs), ``check_hash`` (URLs: require and check
the SHA-256 prefix in the file name).
"""
from __future__ import annotations

# Module imports only: every public callable here would be listed as a hub entry point.
import contextlib
import hashlib
import os
import pathlib
import re
import sys
import typing
import urllib.parse

import torch

dependencies = ["torch", "timm"]

_REPO_DIR = str(pathlib.Path(__file__).resolve().parent)
# This repository's modules that the entry points import. Their names are generic, so a
# project calling torch.hub may already have its own ``utils`` or ``checkpoints`` imported
# (or DINO's ``vision_transformer``, from an earlier torch.hub.load).
_REPO_MODULES = ("utils", "checkpoints", "vision_transformer")


def _is_ours(module: object, name: str) -> bool:
    file = getattr(module, "__file__", None)
    return (file is not None
            and pathlib.Path(file).resolve() == pathlib.Path(_REPO_DIR, f"{name}.py"))


@contextlib.contextmanager
def _repo_modules() -> typing.Iterator[None]:
    """Let ``import checkpoints`` / ``import vision_transformer`` mean this repository's files
    inside the block, and put back whatever the caller had under those names afterwards."""
    before = {name: sys.modules.get(name) for name in _REPO_MODULES}
    for name, module in before.items():
        if module is not None and not _is_ours(module, name):
            del sys.modules[name]
    sys.path.insert(0, _REPO_DIR)
    try:
        yield
    finally:
        sys.path.remove(_REPO_DIR)  # removes the first entry: the one inserted above
        for name, module in before.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _local_copy(url: str, progress: bool, check_hash: bool) -> str:
    """Download ``url`` once into torch.hub's checkpoint cache; returns the cached path.

    The cache path holds a digest of the whole URL (``checkpoints/massl-<sha256(url)[:16]>/
    <file name>``), so two URLs whose files share a name never share a cache entry. As in
    torch.hub, a file named ``<name>-<hex>.<ext>`` (at least 8 hex digits) is checked on
    download: its SHA-256 must start with ``<hex>``. ``check_hash=True`` makes that prefix
    compulsory."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise ValueError(f"pretrained={url!r} ends in '/': give the URL of the weights file "
                         "itself (e.g. .../checkpoint.pth), not of a folder")
    hash_prefix = _hash_prefix(name)
    if check_hash and hash_prefix is None:
        raise ValueError(f"check_hash=True but {name!r} carries no SHA-256 prefix: name the file "
                         "<name>-<first 8+ hex digits of its sha256>.<ext> (torch.hub's convention)")
    url_digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints", f"massl-{url_digest}")
    os.makedirs(cache_dir, exist_ok=True)
    cached = os.path.join(cache_dir, name)
    if not os.path.exists(cached):
        print(f'Downloading "{url}" to {cached}', file=sys.stderr)
        try:
            torch.hub.download_url_to_file(url, cached, hash_prefix=hash_prefix, progress=progress)
        except RuntimeError as e:
            if "invalid hash value" not in str(e):
                raise
            raise ValueError(f"{url}: the download's SHA-256 does not start with {hash_prefix}, "
                             "as its file name promises; nothing was cached (a corrupt or "
                             "replaced file?)") from None
    return cached


def _hash_prefix(file_name: str) -> str | None:
    """torch.hub's ``check_hash`` convention: the hex digits after the last '-' of the stem."""
    found = re.search(r"-([a-f0-9]{8,64})\.", file_name)
    return found.group(1) if found else None


def _folder_weights(folder: str) -> str:
    """``model.safetensors`` of a timm model folder (what ``export.py --format timm_folder``
    writes); its header carries the training args, so it loads like an exported file."""
    config, weights = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    if not (os.path.isfile(config) and os.path.isfile(weights)):
        raise ValueError(f"pretrained={folder!r} is a folder but not a timm model folder: it "
                         "needs config.json and model.safetensors (export.py --format "
                         "timm_folder writes one)")
    return weights


def _massl_vit(arch: str, patch_size: int, pretrained: str | os.PathLike | None = None, *,
               checkpoint_key: str = "teacher", img_size: int | None = None,
               drop_path_rate: float = 0.0, progress: bool = True,
               check_hash: bool = False) -> torch.nn.Module:
    if pretrained is True:
        raise ValueError("pretrained=True: MaSSL publishes no default weights here; pass the path "
                         "or URL of a checkpoint (or export.py output)")
    with _repo_modules():
        import checkpoints
        from vision_transformer import build_backbone

        if not pretrained:
            model, _ = build_backbone(arch, patch_size, img_size=img_size or 224,
                                      drop_path_rate=drop_path_rate)
            return model
        path = str(pretrained)
        if urllib.parse.urlparse(path).scheme in ("http", "https", "file"):
            path = _local_copy(path, progress, check_hash)
        elif os.path.isdir(path):
            path = _folder_weights(path)
        model, _, info = checkpoints.build_backbone_from_checkpoint(
            path, arch=arch, patch_size=patch_size, checkpoint_key=checkpoint_key,
            img_size=img_size)
        if drop_path_rate:
            # build_backbone_from_checkpoint builds for inference (no drop-path); move the
            # loaded weights into a twin that has it, strictly.
            trained = model.state_dict()
            model, _ = build_backbone(arch, patch_size, img_size=info["img_size"],
                                      drop_path_rate=drop_path_rate)
            model.load_state_dict(trained, strict=True)
        return model


def massl_vitt16(pretrained: str | os.PathLike | None = None, **kwargs) -> torch.nn.Module:
    """ViT-Tiny/16 (192-d features). ``pretrained``: checkpoint path, model folder or URL,
    None = random."""
    return _massl_vit("vit_tiny", 16, pretrained, **kwargs)


def massl_vits16(pretrained: str | os.PathLike | None = None, **kwargs) -> torch.nn.Module:
    """ViT-Small/16 (384-d features), the paper's main model (800 epochs on ImageNet-1k).
    ``pretrained``: checkpoint path, model folder or URL, None = random."""
    return _massl_vit("vit_small", 16, pretrained, **kwargs)


def massl_vitb16(pretrained: str | os.PathLike | None = None, **kwargs) -> torch.nn.Module:
    """ViT-Base/16 (768-d features; the paper trains it 400 epochs). ``pretrained``:
    checkpoint path, model folder or URL, None = random."""
    return _massl_vit("vit_base", 16, pretrained, **kwargs)


def massl_vitl16(pretrained: str | os.PathLike | None = None, **kwargs) -> torch.nn.Module:
    """ViT-Large/16 (1024-d features). ``pretrained``: checkpoint path, model folder or URL,
    None = random."""
    return _massl_vit("vit_large", 16, pretrained, **kwargs)
