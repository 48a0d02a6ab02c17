"""Export a trained MaSSL backbone alone, for use in other projects: one weights file, or a
timm / Hugging Face Hub model folder.

    python export.py --checkpoint output/checkpoint.pth --out vits16_teacher.pth
    python export.py --checkpoint output/checkpoint.pth --out vits16_teacher.safetensors
    python export.py --checkpoint output/checkpoint.pth --format timm_folder --out massl-vits16 \\
        --knn_results knn_out/knn_results.json --linear_results linear_out/linear_results.json

Both hold the teacher backbone (``--checkpoint_key student`` for the student) with timm's
key names: no projection head, no ``module.``/``backbone.`` prefixes, no optimiser or memory
bank.

``--format file`` (the default) writes a flat ``{name: tensor}`` dict. A ``.pth`` loads with
``torch.load(path, weights_only=True)``; a ``.safetensors`` file (``pip install
safetensors``) also carries the training args in its header. Either loads straight into
timm, which is what the script prints, e.g.

    timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=True,
                      pretrained_cfg_overlay=dict(file="vits16_teacher.pth"))

``--format timm_folder`` writes the folder timm (1.0.16 or later) reads by itself, as the Hugging
Face Hub shares models: ``config.json`` (timm architecture and the arguments that rebuild
the backbone exactly, plus ``pretrained_cfg``: input size, bicubic resize and centre crop,
ImageNet mean/std), ``model.safetensors`` and a ``README.md`` model card (training command
line, epochs done, the k-NN / linear-probe results you pass, citation). Load it with

    timm.create_model("local-dir:massl-vits16", pretrained=True)

and, uploaded (``hf upload USER/massl-vits16 massl-vits16 .``), from anywhere with
``"hf-hub:USER/massl-vits16"``. Both formats load back into this repository's
``hubconf.py``; the files also into the scripts' ``--pretrained_weights``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import PretrainedCfg, get_pretrained_cfg

from checkpoints import build_backbone_from_checkpoint
from storage import atomic_path, respect_umask, save_atomic
from utils import IMAGENET_MEAN, IMAGENET_STD, UserError, exit_with_error, user_error_message
from vision_transformer import VIT_ARCHS

FORMATS = ("file", "timm_folder")
WEIGHTS_NAME = "model.safetensors"  # the name timm and the Hub look for first
# Every file --format timm_folder writes: --force replaces these and nothing else.
FOLDER_FILES = (WEIGHTS_NAME, "README.md", "config.json")
DEFAULT_CROP_PCT = 0.875  # eval_knn.py / eval_linear.py defaults: resize 256, crop 224
# Stored args that describe one process of the launch, not the training recipe.
_LAUNCH_ONLY_ARGS = ("local_rank",)
PAPER = ("Learning from Memory: Non-Parametric Memory Augmented Self-Supervised Learning of "
         "Visual Features")
CITATION = """@inproceedings{silva2024massl,
  title     = {Learning from Memory: Non-Parametric Memory Augmented Self-Supervised Learning of Visual Features},
  author    = {Silva, Thalles and Pedrini, Helio and Ram{\\'\\i}rez Rivera, Ad{\\'\\i}n},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2024}
}"""


def timm_load_line(arch: str, patch_size: int, img_size: int, path: str) -> str:
    """Python that sets ``model`` to the exported backbone, rebuilt with timm from ``path``.

    Our ViTs have timm twins named ``vit_{size}_patch{p}_224`` (img_size passed when the
    training crops were not 224 px); vit_nano and odd patch sizes have none, so they get
    timm's ViT class with our dimensions.
    """
    file_arg = f"pretrained_cfg_overlay=dict(file={str(path)!r})"
    if arch in VIT_ARCHS:
        name = f"{arch}_patch{patch_size}_224"
        if timm.is_model(name):
            size = "" if img_size == 224 else f"img_size={img_size}, "
            return (f'model = timm.create_model("{name}", {size}num_classes=0, pretrained=True, '
                    f"{file_arg})")
        embed_dim, depth, num_heads = VIT_ARCHS[arch]
        if str(path).endswith(".safetensors"):
            read = f"from safetensors.torch import load_file; state_dict = load_file({str(path)!r})"
        else:
            read = f"state_dict = torch.load({str(path)!r}, weights_only=True)"
        return (f"{read}; model = timm.models.VisionTransformer(img_size={img_size}, "
                f"patch_size={patch_size}, embed_dim={embed_dim}, depth={depth}, "
                f"num_heads={num_heads}, num_classes=0); model.load_state_dict(state_dict)")
    return f'model = timm.create_model("{arch}", num_classes=0, pretrained=True, {file_arg})'


def _safetensors_metadata(args: dict | None, arch: str, patch_size: int, img_size: int
                          ) -> dict[str, str]:
    """Header strings: the training args as JSON (what checkpoints.read_checkpoint_backbone reads
    back), with the arch/patch size/image size the weights were built with."""
    metadata = {k: json.dumps(v, default=str) for k, v in (args or {}).items()}
    metadata.update(arch=json.dumps(arch), patch_size=json.dumps(patch_size),
                    global_crops_size=json.dumps(img_size))
    return metadata


def write_backbone(state_dict: dict[str, torch.Tensor], out: Path,
                   metadata: dict[str, str] | None = None) -> None:
    """Write ``state_dict`` to ``out`` atomically: safetensors when the name ends in
    ``.safetensors``, else a ``torch.save`` of the flat dict."""
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}  # safetensors
    if out.suffix != ".safetensors":
        save_atomic(state_dict, out)
        return
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UserError(f"writing {out.name} needs safetensors: pip install safetensors "
                        "(or export to a .pth name)") from None
    with atomic_path(out) as tmp:
        save_file(state_dict, str(tmp), metadata=metadata)


# --------------------------------------------------------------------------- timm model folder


@dataclass
class FolderOptions:
    """What ``--format timm_folder`` adds to the weights: evaluation crop, licence, results."""
    crop_pct: float = DEFAULT_CROP_PCT
    license: str | None = None
    knn_results: str | None = None
    linear_results: str | None = None
    force: bool = False


def timm_architecture(arch: str, patch_size: int) -> str:
    """The timm name a folder of our ViT names: its timm twin ``vit_{size}_patch{p}_224``
    when there is one, else a registered ViT whose builder takes every dimension from
    ``model_args`` (timm passes them as keyword overrides)."""
    for name in (f"{arch}_patch{patch_size}_224", f"{arch}_patch16_224"):
        if timm.is_model(name):
            return name
    return "vit_tiny_patch16_224"  # vit_pico / vit_nano: the smallest standard ViT


def _vit_model_args(model: torch.nn.Module) -> dict:
    """Keyword arguments that make timm build ``model`` (one of our ViTs) exactly: read off
    the built model, so they describe the weights rather than our defaults."""
    block = model.blocks[0]
    return {
        "img_size": list(model.patch_embed.img_size),
        "patch_size": list(model.patch_embed.patch_size),
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / model.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "class_token": model.cls_token is not None,
        "global_pool": model.global_pool,
        "dynamic_img_size": model.dynamic_img_size,  # any input size, as our ViT
        "num_classes": 0,
    }


def _global_pool(model: torch.nn.Module) -> str | None:
    pool = getattr(model, "global_pool", None)
    return pool if isinstance(pool, str) else getattr(pool, "pool_type", None)


def timm_folder_config(model: torch.nn.Module, info: dict, crop_pct: float,
                       license: str | None = None) -> dict:
    """``config.json`` as timm's ``push_to_hf_hub`` writes it, for the exported backbone.

    ``pretrained_cfg`` holds our evaluation transform: resize the shorter side to
    ``size / crop_pct`` (bicubic), centre crop ``size``, ImageNet mean/std, where ``size``
    is the training global-crop size (the ViT's native position grid).
    """
    arch = info["arch"]
    architecture = timm_architecture(arch, info["patch_size"]) if arch in VIT_ARCHS else arch
    base = get_pretrained_cfg(architecture) or PretrainedCfg()  # registry's: size, stem, head
    stored_size = (info["args"] or {}).get("global_crops_size")
    if arch in VIT_ARCHS:
        model_args = _vit_model_args(model)
        size = info["img_size"]
        if stored_size and int(stored_size) // info["patch_size"] == size // info["patch_size"]:
            size = int(stored_size)  # e.g. 28 px crops of a patch-8 ViT: a 3x3 grid built at 24
        fixed_size = False
    else:
        model_args = {"num_classes": 0}
        fixed_size = bool(base.fixed_input_size)  # then only its native size fits
        size = base.input_size[-1] if fixed_size or not stored_size else int(stored_size)
    pretrained_cfg = {
        "input_size": [3, size, size], "fixed_input_size": fixed_size,
        "interpolation": "bicubic", "crop_pct": crop_pct, "crop_mode": "center",
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "num_classes": 0, "first_conv": base.first_conv, "classifier": base.classifier,
        "custom_load": False,
        "paper_name": PAPER,
    }
    if license:
        pretrained_cfg["license"] = license
    config = {"architecture": architecture, "num_classes": 0,
              "num_features": int(getattr(model, "num_features", info["feature_dim"]))}
    if _global_pool(model):
        config["global_pool"] = _global_pool(model)
    config.update(model_args=model_args, pretrained_cfg=pretrained_cfg)
    return config


def _read_json(path: str, flag: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{flag}: no such file: {path}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{flag}: cannot read {path} as JSON: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{flag}: {path} holds no results object")
    return data


def read_results(path: str, kind: str, info: dict) -> dict:
    """``knn_results.json`` (``kind="knn"``) or ``linear_results.json`` (``"linear"``), checked
    to be results of this backbone: same arch and checkpoint key, not a random baseline."""
    flag = f"--{kind}_results"
    results = _read_json(path, flag)
    if kind == "knn" and not any(k.startswith("k=") for k in results):
        raise UserError(f"{flag}: {path} has no 'k=...' entries: not an eval_knn.py results file")
    if kind == "linear" and "top1" not in results:
        raise UserError(f"{flag}: {path} has no 'top1': not an eval_linear.py results file")
    if "checkpoint" in results and results["checkpoint"] is None:
        raise UserError(f"{flag}: {path} evaluated a randomly initialised backbone, not this one")
    for key in ("arch", "checkpoint_key"):
        if results.get(key) is not None and results[key] != info[key]:
            raise UserError(f"{flag}: {path} evaluated {key} {results[key]}, but the export is "
                            f"{key} {info[key]}")
    # The weights' hash, not the file name: the same weights read from a training checkpoint
    # or an export match; another checkpoint of the same architecture does not.
    if "weights_sha256" not in results:
        raise UserError(f"{flag}: {path} does not record which weights it evaluated (written by "
                        "an older version): evaluate this checkpoint again")
    if results["weights_sha256"] != info["weights_sha256"]:
        raise UserError(f"{flag}: {path} holds results of other weights ({results.get('checkpoint')}"
                        f"), not of --checkpoint {info['path']} [{info['checkpoint_key']}]: "
                        "evaluate this checkpoint and pass its results")
    return results


def training_progress(checkpoint: str) -> dict:
    """Epochs (and extra steps) done and the number of training processes, from a training
    checkpoint; empty for files that do not record them (exports, bare state dicts)."""
    if Path(checkpoint).suffix == ".safetensors":
        return {}
    try:  # mmap: only the few small entries read here are paged in
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - e.g. a DINO checkpoint's pickled Namespace: no progress
        return {}
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("epoch"), int):
        return {}
    progress = {"epoch": ckpt["epoch"], "iteration": int(ckpt.get("iteration") or 0)}
    if isinstance(ckpt.get("rank_states"), list) and ckpt["rank_states"]:
        progress["world_size"] = len(ckpt["rank_states"])
    return progress


def _cli_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # main_massl.py's bool flags take a value
    if isinstance(value, (list, tuple)):
        return " ".join(_cli_value(v) for v in value)
    return shlex.quote(str(value))


def training_command(args: dict, world_size: int = 1) -> str:
    """``python main_massl.py --flag value ...`` from the args stored in a checkpoint (every
    stored flag, in the parser's order; unset ones and per-process ones left out)."""
    launcher = (f"torchrun --nproc_per_node={world_size} main_massl.py" if world_size > 1
                else "python main_massl.py")
    parts = [f"--{key} {_cli_value(value)}" for key, value in args.items()
             if key not in _LAUNCH_ONLY_ARGS and value is not None and value != ""]
    lines, line = [], launcher
    for part in parts:
        if len(line) + len(part) > 90:
            lines.append(line)
            line = "    " + part
        else:
            line += " " + part
    return " \\\n".join([*lines, line])


def _card_knn(results: dict) -> list[str]:
    top_n = results.get("top5_is_top", 5)
    rows = [f"| {k[2:]} | {v['top1']:.2f} | {v['top5']:.2f} |" for k, v in results.items()
            if k.startswith("k=") and isinstance(v, dict)]
    setting = ", ".join(f"{label} {results[key]}" for key, label in (
        ("num_train", "train images"), ("num_val", "val images"), ("num_classes", "classes"),
        ("resize_size", "resize"), ("crop_size", "crop"), ("temperature", "T"))
        if key in results)
    return ["### k-NN (eval_knn.py, weighted vote on frozen CLS features)", "",
            f"| k | top-1 (%) | top-{top_n} (%) |", "|---|---|---|", *rows, "",
            f"Measured with {setting}." if setting else ""]


def _card_linear(results: dict) -> list[str]:
    top_n = results.get("top5_is_top", 5)
    rows = [f"| top-1 (%) | {results['top1']:.2f} |",
            f"| top-{top_n} (%) | {results['top5']:.2f} |"]
    if "best_top1" in results:
        rows.append(f"| best top-1 during training (%) | {results['best_top1']:.2f} |")
    setting = ", ".join(f"{key} {results[key]}" for key in (
        "epoch", "n_last_blocks", "avgpool_patchtokens", "num_train", "num_val", "num_classes",
        "protocol") if results.get(key) is not None)
    return ["### Linear probe (eval_linear.py, frozen backbone)", "", "| | |", "|---|---|", *rows,
            "", f"Measured with {setting}." if setting else ""]


def model_card(name: str, config: dict, info: dict, progress: dict, results: dict[str, dict],
               license: str | None = None) -> str:
    """``README.md`` of the folder: YAML front matter the Hub reads, then what the model is,
    how to load it, how it was trained and evaluated, and how to cite MaSSL."""
    front = ["---", "library_name: timm", "pipeline_tag: image-feature-extraction", "tags:",
             "- timm", "- image-feature-extraction", "- self-supervised-learning", "- massl"]
    if license:
        front.append(f"license: {license}")
    front.append("---")
    arch, cfg = info["arch"], config["pretrained_cfg"]
    size = cfg["input_size"][-1]
    patch = f", patch {info['patch_size']}" if arch in VIT_ARCHS else ""
    pooled = ("the CLS token after the final norm" if arch in VIT_ARCHS
              else f"{config.get('global_pool', 'pooled')} pooling")
    if progress:
        total = (info["args"] or {}).get("epochs")
        epochs = f"{progress['epoch']}" + (f" of {total}" if total else "") + " epochs"
        if progress.get("iteration"):
            epochs += f" + {progress['iteration']} steps"
    else:
        epochs = "not recorded in the checkpoint"
    resize = int(size / cfg["crop_pct"])  # what timm computes: floor(size / crop_pct)
    lines = [
        *front, "", f"# {name}", "",
        f"A {arch}{patch} image backbone pretrained without labels with **MaSSL** "
        f"(*{PAPER}*, ICML 2024): the {info['checkpoint_key']} network of a MaSSL run, exported "
        "by the MaSSL repository's `export.py` without its projection head, memory bank or "
        f"optimiser state. It outputs {config['num_features']}-d features, {pooled} "
        "(`num_classes=0`).", "",
        "## Model details", "", "| | |", "|---|---|",
        f"| architecture | `{arch}`{patch} (timm `{config['architecture']}` with this folder's "
        "`model_args`) |",
        f"| parameters | {info['n_params'] / 1e6:.2f} M |",
        f"| features | {config['num_features']}-d, {pooled} |",
        f"| input size | {size} x {size} (the training global-crop size) |",
        f"| evaluation transform | resize the shorter side to {resize} (bicubic), centre crop "
        f"{size}, ImageNet mean/std |",
        f"| pretraining | {epochs} |",
        f"| weights | {info['checkpoint_key']} |", "",
        "## How to use", "", "```python", "import timm, torch", "from PIL import Image", "",
        f"model = timm.create_model({json.dumps(f'local-dir:{name}')}, pretrained=True).eval()"
        "  # this folder",
        f"# model = timm.create_model({json.dumps(f'hf-hub:<user>/{name}')}, pretrained=True)"
        "  # once uploaded",
        "config = timm.data.resolve_data_config({}, model=model)  # the transform above",
        "transform = timm.data.create_transform(**config)",
        "with torch.no_grad():",
        '    features = model(transform(Image.open("photo.jpg").convert("RGB")).unsqueeze(0))',
        "```", "",
        "## Training", "",
    ]
    if info["args"]:
        world = progress.get("world_size", 1)
        lines += ["The MaSSL repository's training command, rebuilt from the arguments stored in "
                  "the checkpoint" + (f" ({world} processes)" if world > 1 else "") + ":", "",
                  "```bash", training_command(info["args"], world), "```"]
    else:
        lines.append("The exported file records no training arguments.")
    if results:
        lines += ["", "## Results", ""]
        if "knn" in results:
            lines += _card_knn(results["knn"])
        if "linear" in results:
            lines += ["", *_card_linear(results["linear"])]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def _check_folder_destination(out: Path, force: bool, checkpoint: Path) -> None:
    """Refuse, before any work, an ``--out`` the folder cannot (or must not) replace."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; --format timm_folder writes a folder: name a "
                        "new folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"--out {out} exists and is not empty: name a new folder, or pass "
                            f"--force to replace the files export.py writes "
                            f"({', '.join(FOLDER_FILES)}; nothing else in it is touched)")
        if not (out / "config.json").is_file():
            raise UserError(f"--out {out} is not a model folder (no config.json): --force only "
                            "replaces a folder export.py wrote")
        if out.resolve() in checkpoint.resolve().parents:
            raise UserError(f"--checkpoint {checkpoint} is inside --out {out}: replacing the "
                            "folder would delete it")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write --out {out}: {parent} is not writable")


def write_folder(out: Path, texts: dict[str, str], state_dict: dict[str, torch.Tensor],
                 metadata: dict[str, str]) -> None:
    """Write the folder next to ``out`` and move it into place: a new ``out`` is renamed in
    whole, never half written. Into an existing ``out`` (empty, or an export replaced with
    --force, see ``_check_folder_destination``) only the files export.py writes are moved, one
    atomic rename each, config.json last (without it the folder is not taken for a finished
    export); every other file there (the user's notes, a .git folder) stays."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write_backbone(state_dict, tmp / WEIGHTS_NAME, metadata)
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        respect_umask(tmp, 0o777)
        if not out.exists():
            os.replace(tmp, out)
        else:
            if (out / "config.json").exists():
                os.unlink(out / "config.json")  # first: a half-replaced folder is no export
            for name in sorted(os.listdir(tmp), key=lambda name: name == "config.json"):
                os.replace(tmp / name, out / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _export_folder(out: Path, model: torch.nn.Module, info: dict, metadata: dict[str, str],
                   options: FolderOptions) -> dict:
    if not 0 < options.crop_pct <= 1:
        raise UserError(f"--crop_pct must be in (0, 1], got {options.crop_pct}")
    if options.license and not re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", options.license):
        raise UserError(f"--license {options.license!r}: use a Hub licence id such as "
                        "apache-2.0, mit or cc-by-nc-4.0")
    results = {kind: read_results(path, kind, info) for kind, path in
               (("knn", options.knn_results), ("linear", options.linear_results)) if path}
    config = timm_folder_config(model, info, options.crop_pct, options.license)
    progress = training_progress(info["path"])
    card = model_card(out.name, config, info, progress, results, options.license)
    texts = {"config.json": json.dumps(config, indent=2) + "\n", "README.md": card}
    write_folder(out, texts, model.state_dict(), metadata)
    return {"config": config, "progress": progress,
            "timm_line": f"model = timm.create_model({json.dumps(f'local-dir:{out}')}, "
                         "pretrained=True)"}


def export(checkpoint: str, out: str, checkpoint_key: str = "teacher", fmt: str = "file",
           folder: FolderOptions | None = None) -> dict:
    """Export the backbone in ``checkpoint`` to ``out`` (``fmt``: ``"file"`` or
    ``"timm_folder"``); returns what was exported.

    The weights are first loaded, strictly, into the backbone they were trained as, so an
    export that succeeds is one that loads.
    """
    out_path = Path(out)
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "file":
        if out_path.resolve() == Path(checkpoint).resolve():
            raise UserError("--out must differ from --checkpoint (it would overwrite the "
                            "checkpoint)")
        if out_path.is_dir():
            raise UserError(f"--out {out} is a folder: name a file, or pass --format "
                            "timm_folder to write a timm model folder")
        if out_path.exists() and not (folder and folder.force):
            raise UserError(f"--out {out} exists: name a new file, or pass --force to "
                            "overwrite it")
    else:
        out_path = Path(os.path.abspath(out))  # "." or "dir/" get a name for the card
        folder = folder or FolderOptions()
        _check_folder_destination(out_path, folder.force, Path(checkpoint))
    model, _, info = build_backbone_from_checkpoint(checkpoint, checkpoint_key=checkpoint_key)
    state_dict = model.state_dict()
    info["n_params"] = sum(v.numel() for v in state_dict.values())
    metadata = _safetensors_metadata(info["args"], info["arch"], info["patch_size"],
                                     info["img_size"])
    try:
        if fmt == "file":
            write_backbone(state_dict, out_path, metadata)
            extra = {"timm_line": timm_load_line(info["arch"], info["patch_size"],
                                                 info["img_size"], str(out_path))}
        else:
            extra = _export_folder(out_path, model, info, metadata, folder)
    except OSError as e:  # read-only folder, full disk: the system's reason, on one line
        raise UserError(f"cannot write --out {out}: {e.strerror or e}") from e
    return {**info, "out": str(out_path), "format": fmt, **extra}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write the teacher backbone of a MaSSL checkpoint alone, with timm's key "
                    "names: as one .pth / .safetensors file, or as a timm / Hugging Face Hub "
                    "model folder (config.json, model.safetensors, README.md model card).")
    parser.add_argument("--checkpoint", required=True,
                        help="Training checkpoint (output_dir/checkpoint.pth or "
                             "checkpointNNNN.pth), or any file --pretrained_weights accepts.")
    parser.add_argument("--checkpoint_key", default="teacher",
                        help="Network to export: teacher (default; the one evaluations report) "
                             "or student.")
    parser.add_argument("--out", required=True,
                        help="What to write. --format file: a name ending in .safetensors "
                             "writes safetensors (needs the safetensors package), anything "
                             "else a torch .pth. --format timm_folder: a new (or empty) folder.")
    parser.add_argument("--format", default="file", choices=FORMATS,
                        help="file (default): one weights file. timm_folder: the folder timm "
                             "loads with timm.create_model('local-dir:OUT', pretrained=True) "
                             "and the Hugging Face Hub serves once uploaded.")
    group = parser.add_argument_group("timm_folder only")
    group.add_argument("--knn_results", metavar="JSON",
                       help="knn_results.json written by eval_knn.py on this checkpoint: its "
                            "accuracies go into the model card. Results of other weights are "
                            "refused (the results record the weights' SHA-256).")
    group.add_argument("--linear_results", metavar="JSON",
                       help="linear_results.json written by eval_linear.py on this checkpoint "
                            "(checked like --knn_results).")
    group.add_argument("--crop_pct", type=float, default=DEFAULT_CROP_PCT,
                       help="Evaluation crop / resize ratio in pretrained_cfg: images are resized "
                            "to input_size / crop_pct, then centre-cropped (default 0.875: 256 "
                            "-> 224 as eval_knn.py; 1.0 for --resize_size = --crop_size).")
    group.add_argument("--license", metavar="ID",
                       help="Hub licence id for the card and config (e.g. apache-2.0, "
                            "cc-by-nc-4.0). Default: none stated; choose what your training "
                            "data allows.")
    parser.add_argument("--force", action="store_true",
                        help="--format file: overwrite an existing --out file. --format "
                             f"timm_folder: replace the files export.py writes ({', '.join(FOLDER_FILES)}) "
                             "in an existing --out folder it wrote; other files there are kept.")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    folder_only = [flag for flag, value in (
        ("--knn_results", args.knn_results), ("--linear_results", args.linear_results),
        ("--crop_pct", args.crop_pct != DEFAULT_CROP_PCT), ("--license", args.license)) if value]
    if args.format == "file" and folder_only:
        exit_with_error(f"{', '.join(folder_only)} only apply to --format timm_folder")
    folder = FolderOptions(args.crop_pct, args.license, args.knn_results, args.linear_results,
                           args.force)
    try:
        result = export(args.checkpoint, args.out, args.checkpoint_key, args.format, folder)
    except UserError as e:
        exit_with_error(user_error_message(e))
    for note in result["notes"]:
        print(f"note: {note}")
    what = result["arch"]
    if result["arch"] in VIT_ARCHS:
        what += (f", patch {result['patch_size']}, position grid for {result['img_size']} px "
                 "inputs")
    print(f"exported the {result['checkpoint_key']} backbone of {args.checkpoint} ({what}, "
          f"{result['n_params'] / 1e6:.1f}M parameters) to {result['out']}")
    if args.format == "file":
        print("load it with timm (reads the file, downloads nothing):")
        print(f"  import timm, torch; {result['timm_line']}")
        return
    print(f"  {WEIGHTS_NAME}, config.json (timm {result['config']['architecture']}), README.md "
          "(the model card: read it before sharing" + ("" if args.license else
                                                       "; --license states a licence") + ")")
    print("load it with timm >= 1.0.16 (reads the folder, downloads nothing):")
    print(f"  import timm; {result['timm_line']}")
    print("share it on the Hugging Face Hub (huggingface_hub comes with timm; log in once with "
          "hf auth login):")
    print(f"  hf upload <user>/{Path(result['out']).name} {shlex.quote(args.out)} .")


if __name__ == "__main__":
    main()
