"""Sparse correspondences between two views (the MaSSL paper's Fig. 3): mutual nearest neighbours.

    python visualize_correspondence.py --pretrained_weights output/checkpoint.pth \\
        --image_path photo.jpg --image_size 224 --output_dir corr/
    python visualize_correspondence.py --pretrained_weights output/checkpoint.pth \\
        --image_path left.jpg right.jpg --output_dir corr/     # two images instead of two views

With one image, two views are drawn from it (random resized crops keeping 35-100 % of the
area, seeded by ``--seed``); with two, each is resized to ``--image_size`` square. Both go through the
backbone; the last block's patch tokens (after the final norm) are L2-normalised and matched
by cosine similarity. A pair (i, j) is a match when patch j is i's nearest neighbour in the
other view and i is j's (mutual nearest neighbours); the ``--n_matches`` most similar
matches are drawn as lines between the patch centres, brighter for more similar, in one PNG:
``OUTPUT_DIR/correspondence.png``. Small images are enlarged (nearest neighbour) to at least
``--display_size`` pixels so the lines can be seen. The architecture and patch size come from
the checkpoint; without ``--pretrained_weights`` the weights are random (to try the script).
"""
from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision import transforms

import storage
import utils
from images import load_rgb_image
from utils import UserError, exit_with_error, user_error_message
from visualize_attention import load_model, to_rgb

OUTPUT_FILE = "correspondence.png"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "visualize_correspondence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_weights", default="", help="""Training checkpoint
        (checkpoint.pth) or exported backbone (.pth or .safetensors). Empty: random weights,
        to try the script only.""")
    parser.add_argument("--checkpoint_key", default="teacher",
                        help="Which network of a training checkpoint: teacher (default) or student.")
    parser.add_argument("--arch", default=None,
                        help="Backbone name. Default: the checkpoint's (vit_small without one).")
    parser.add_argument("--patch_size", type=int, default=None,
                        help="Patch size in pixels. Default: the checkpoint's (16 without one).")
    parser.add_argument("--image_path", required=True, nargs="+", help="""One image (two
        augmented views of it are matched) or two images (matched with each other).""")
    parser.add_argument("--image_size", type=int, default=224, help="""Side of each (square)
        view, rounded down to a multiple of the patch size. Default 224.""")
    parser.add_argument("--n_matches", type=int, default=20,
                        help="Mutual nearest neighbours drawn (the most similar ones). Default 20.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the two random views. Default 0.")
    parser.add_argument("--display_size", type=int, default=256, help="""Each view is shown
        at least this many pixels wide (enlarged by a whole factor, nearest neighbour). Default 256.""")
    parser.add_argument("--output_dir", default=".",
                        help="Folder for correspondence.png (created). Default: here.")
    return parser


def mutual_nearest_neighbours(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                          torch.Tensor]:
    """Mutual nearest neighbours between the rows of ``a`` (N, D) and ``b`` (M, D) by cosine
    similarity: (indices in a, indices in b, similarities), most similar first."""
    similarity = F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T
    a_to_b = similarity.argmax(dim=1)
    b_to_a = similarity.argmax(dim=0)
    idx_a = torch.nonzero(b_to_a[a_to_b] == torch.arange(len(a)), as_tuple=True)[0]
    idx_b = a_to_b[idx_a]
    sims = similarity[idx_a, idx_b]
    order = torch.sort(sims, descending=True, stable=True).indices
    return idx_a[order], idx_b[order], sims[order]


def make_views(paths: list[str], size: int, seed: int) -> list[torch.Tensor]:
    """Two normalised (3, size, size) views: random resized crops of one image, or two images."""
    normalise = [transforms.ToTensor(), transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)]
    bicubic = transforms.InterpolationMode.BICUBIC
    images = [load_rgb_image(p) for p in paths]
    if len(images) == 1:
        crop = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.35, 1.0),
                                                                interpolation=bicubic), *normalise])
        torch.manual_seed(seed)
        return [crop(images[0]), crop(images[0])]
    resize = transforms.Compose([transforms.Resize((size, size), interpolation=bicubic), *normalise])
    return [resize(image) for image in images]


@torch.no_grad()
def patch_tokens(model: torch.nn.Module, view: torch.Tensor) -> torch.Tensor:
    """Last block's patch tokens (after the final norm) of one view: (num_patches, D)."""
    return model.get_intermediate_layers(view[None], 1)[0][0, 1:]


def draw_matches(views: list[torch.Tensor], idx_a: torch.Tensor, idx_b: torch.Tensor,
                 sims: torch.Tensor, patch_size: int, display_size: int) -> Image.Image:
    """Both views side by side with a line per match between the patch centres."""
    size = views[0].shape[-1]
    zoom = max(1, -(-display_size // size))
    gap = max(4, size * zoom // 16)
    panels = [Image.fromarray(to_rgb(v).round().astype(np.uint8)).resize(
        (size * zoom, size * zoom), Image.NEAREST) for v in views]
    canvas = Image.new("RGB", (2 * size * zoom + gap, size * zoom), (255, 255, 255))
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (size * zoom + gap, 0))
    draw = ImageDraw.Draw(canvas)
    per_row = size // patch_size
    radius = max(2, zoom)
    span = float(sims.max() - sims.min()) if len(sims) else 0.0
    for n, (i, j, s) in enumerate(zip(idx_a.tolist(), idx_b.tolist(), sims.tolist())):
        hue = n / max(len(sims), 1)
        value = 0.6 + 0.4 * ((s - float(sims.min())) / span if span > 0 else 1.0)
        colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.9, value))
        ends = []
        for k, offset in ((i, 0), (j, size * zoom + gap)):
            y, x = divmod(k, per_row)
            ends.append((offset + (x + 0.5) * patch_size * zoom, (y + 0.5) * patch_size * zoom))
        draw.line(ends, fill=colour, width=max(1, zoom // 2))
        for x, y in ends:
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    return canvas


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        if len(args.image_path) > 2:
            raise UserError(f"--image_path takes one or two images, got {len(args.image_path)}")
        if args.n_matches < 1:
            raise UserError(f"--n_matches must be >= 1, got {args.n_matches}")
        storage.check_writable_dir(args.output_dir)
        model, patch_size, description = load_model(
            args.pretrained_weights or None, args.arch, args.patch_size, args.checkpoint_key)
        size = args.image_size - args.image_size % patch_size
        if size < patch_size:
            raise UserError(f"--image_size {args.image_size} is smaller than one {patch_size}px patch")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device).eval()
        views = make_views(args.image_path, size, args.seed)
        tokens = [patch_tokens(model, v.to(device)).cpu() for v in views]
        idx_a, idx_b, sims = mutual_nearest_neighbours(*tokens)
        found = len(sims)
        idx_a, idx_b, sims = idx_a[:args.n_matches], idx_b[:args.n_matches], sims[:args.n_matches]
        picture = draw_matches(views, idx_a, idx_b, sims, patch_size, args.display_size)
        output = Path(args.output_dir) / OUTPUT_FILE
        with storage.atomic_path(output) as tmp:
            picture.save(tmp, format="PNG")
    except UserError as e:
        exit_with_error(user_error_message(e))
    print(f"model: {description}")
    print(f"{len(tokens[0])} patches per view; {found} mutual nearest neighbours, the "
          f"{len(sims)} most similar drawn (cosine {float(sims.min()):.2f} to {float(sims.max()):.2f})")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
