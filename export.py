"""Export a trained MaSSL backbone alone, with timm's key names, for use in other projects.

    python export.py --checkpoint output/checkpoint.pth --out vits16_teacher.pth
    python export.py --checkpoint output/checkpoint.pth --out vits16_teacher.safetensors

The file holds the teacher backbone (``--checkpoint_key student`` for the student) as a flat
``{name: tensor}`` dict: no projection head, no ``module.``/``backbone.`` prefixes, no
optimiser or memory bank. A ``.pth`` loads with ``torch.load(path, weights_only=True)``;
a ``.safetensors`` file (``pip install safetensors``) also carries the training args in its
header. Either loads straight into timm, which is what the script prints, e.g.

    timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=True,
                      pretrained_cfg_overlay=dict(file="vits16_teacher.pth"))

and back into this repository's scripts (``--pretrained_weights``) and ``hubconf.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import timm
import torch

from utils import (UserError, build_backbone_from_checkpoint, exit_with_error, save_atomic,
                   user_error_message)
from vision_transformer import VIT_ARCHS


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
    """Header strings: the training args as JSON (what utils.read_checkpoint_backbone reads
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
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state_dict, tmp, metadata=metadata)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export(checkpoint: str, out: str, checkpoint_key: str = "teacher") -> dict:
    """Export the backbone in ``checkpoint`` to ``out``; returns what was exported.

    The weights are first loaded, strictly, into the backbone they were trained as, so an
    export that succeeds is one that loads.
    """
    out_path = Path(out)
    if out_path.resolve() == Path(checkpoint).resolve():
        raise UserError("--out must differ from --checkpoint (it would overwrite the checkpoint)")
    model, _, info = build_backbone_from_checkpoint(checkpoint, checkpoint_key=checkpoint_key)
    state_dict = model.state_dict()
    metadata = _safetensors_metadata(info["args"], info["arch"], info["patch_size"],
                                     info["img_size"])
    write_backbone(state_dict, out_path, metadata)
    n_params = sum(v.numel() for v in state_dict.values())
    return {**info, "out": str(out_path), "n_params": n_params,
            "timm_line": timm_load_line(info["arch"], info["patch_size"], info["img_size"],
                                        str(out_path))}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write the teacher backbone of a MaSSL checkpoint alone, with timm's key "
                    "names, as .pth or .safetensors.")
    parser.add_argument("--checkpoint", required=True,
                        help="Training checkpoint (output_dir/checkpoint.pth or "
                             "checkpointNNNN.pth), or any file --pretrained_weights accepts.")
    parser.add_argument("--checkpoint_key", default="teacher",
                        help="Network to export: teacher (default; the one evaluations report) "
                             "or student.")
    parser.add_argument("--out", required=True,
                        help="File to write. A name ending in .safetensors writes safetensors "
                             "(needs the safetensors package); anything else a torch .pth.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        result = export(args.checkpoint, args.out, args.checkpoint_key)
    except UserError as e:
        exit_with_error(user_error_message(e))
    for note in result["notes"]:
        print(f"note: {note}")
    what = result["arch"]
    if result["patch_size"]:
        what += (f", patch {result['patch_size']}, position grid for {result['img_size']} px "
                 "inputs")
    print(f"exported the {result['checkpoint_key']} backbone of {args.checkpoint} ({what}, "
          f"{result['n_params'] / 1e6:.1f}M parameters) to {result['out']}")
    print("load it with timm (reads the file, downloads nothing):")
    print(f"  import timm, torch; {result['timm_line']}")


if __name__ == "__main__":
    main()
