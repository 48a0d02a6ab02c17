"""What does a MaSSL ViT look at? The last block's CLS self-attention, one heat-map per head.

    python visualize_attention.py --pretrained_weights output/checkpoint.pth \
        --image_path photo.jpg --image_size 480 --output_dir attention/

writes into ``--output_dir``:

- ``img.png``: the image as the network saw it (resized, cropped to a multiple of the patch size);
- ``attn-head{i}.png``: head i's attention from the CLS token to every patch, as a heat-map
  over the image (bright = attended);
- ``mask-head{i}.png``: the smallest set of patches holding ``--threshold`` (DINO's 0.6) of
  head i's attention mass, highlighted on the image: the object masks of the DINO paper;
- ``attn-all.png``: the image and all heat-maps side by side (the README figure);
- ``attn-heads-colour.png``: all heads in one picture, the paper's Fig. 2: each pixel in the
  colour of the head attending to it most, as bright as that head's attention (each head's map
  scaled to a maximum of 1).

The architecture and patch size come from the checkpoint (stored args, else read off the
weights). Without ``--pretrained_weights`` the model is randomly initialised, which is only
useful to try the script. Runs on CPU (a ViT-S/16 forward at 480 px takes a second or two);
uses the GPU when there is one. Never downloads anything. Heat-maps use matplotlib's colour maps when
matplotlib is installed, a built-in ramp otherwise.
"""
from __future__ import annotations

import argparse
import colorsys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

import utils
from checkpoints import build_backbone_from_checkpoint
from images import load_rgb_image
from storage import check_writable_dir
from utils import UserError, exit_with_error, user_error_message
from vision_transformer import UnknownArchError, build_backbone

# Fallback colour ramp (black -> purple -> orange -> pale yellow, like "inferno") for when
# matplotlib is not installed.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]],
                 dtype=np.float64)


def colorize(values: np.ndarray, cmap: str = "inferno") -> np.ndarray:
    """Map values in [0, 1] of shape (H, W) to RGB uint8 (H, W, 3)."""
    values = np.clip(values, 0.0, 1.0)
    try:
        import matplotlib

        return (matplotlib.colormaps[cmap](values)[..., :3] * 255).round().astype(np.uint8)
    except ImportError:
        pos = values * (len(_RAMP) - 1)
        low = np.floor(pos).astype(int).clip(0, len(_RAMP) - 2)
        frac = (pos - low)[..., None]
        return (_RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac).round().astype(np.uint8)


def preprocess(image: Image.Image, image_size: list[int], patch_size: int) -> torch.Tensor:
    """Resize (one number: the shorter side, keeping the aspect ratio; two: H W), normalise,
    and crop to a multiple of the patch size. Returns (1, 3, H, W)."""
    size = image_size[0] if len(image_size) == 1 else tuple(image_size)
    transform = transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD),
    ])
    img = transform(image)
    h, w = img.shape[1] - img.shape[1] % patch_size, img.shape[2] - img.shape[2] % patch_size
    if h == 0 or w == 0:
        raise UserError(f"--image_size {image_size} is smaller than one {patch_size}px patch")
    return img[:, :h, :w].unsqueeze(0)


def cls_attention(model: torch.nn.Module, img: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Last-block attention of the CLS token to each patch: (heads, H/patch, W/patch)."""
    with torch.no_grad():
        attn = model.get_last_selfattention(img)  # (1, heads, 1 + N, 1 + N), CLS first
    h, w = img.shape[-2] // patch_size, img.shape[-1] // patch_size
    return attn[0, :, 0, 1:].reshape(-1, h, w).float()


def mass_threshold_masks(attentions: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per head, the smallest set of patches whose attention adds up to ``threshold`` of the
    head's total (DINO's masks). ``attentions``: (heads, h, w) -> bool (heads, h, w)."""
    heads, h, w = attentions.shape
    flat = attentions.reshape(heads, -1)
    values, order = torch.sort(flat, dim=1, descending=True)
    mass = torch.cumsum(values, dim=1) / values.sum(dim=1, keepdim=True)
    # Keep a patch while the mass before it is still short of the threshold, so the patch
    # that crosses the threshold is included.
    keep_sorted = (mass - values / values.sum(dim=1, keepdim=True)) < threshold
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    return keep.reshape(heads, h, w)


def _to_pixels(maps: torch.Tensor, patch_size: int) -> np.ndarray:
    """(heads, h, w) patch maps -> (heads, H, W) numpy, one block of pixels per patch."""
    return F.interpolate(maps[None].float(), scale_factor=patch_size, mode="nearest")[0].numpy()


def to_rgb(img: torch.Tensor) -> np.ndarray:
    """A normalised (3, H, W) image tensor back to float RGB in [0, 255], (H, W, 3)."""
    mean = torch.tensor(utils.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(utils.IMAGENET_STD).view(3, 1, 1)
    return (img.detach().cpu().float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255


def distinct_colours(n: int) -> np.ndarray:
    """``n`` saturated colours evenly spaced in hue, (n, 3) in [0, 255]."""
    return np.array([colorsys.hsv_to_rgb(i / max(n, 1), 0.9, 1.0) for i in range(n)]) * 255


def heads_in_colour(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.8) -> np.ndarray:
    """All heads over a grey copy of ``rgb`` in one picture: each pixel takes the colour of
    the head that attends to it most (each head's map scaled to a maximum of 1), blended in
    as strongly as that head attends (``heat``: (heads, H, W) attention, >= 0)."""
    peak = heat.reshape(len(heat), -1).max(axis=1)
    scaled = heat / np.where(peak > 0, peak, 1)[:, None, None]
    strength = alpha * scaled.max(axis=0)[..., None]
    colour = distinct_colours(len(heat))[scaled.argmax(axis=0)]
    grey = np.repeat(rgb.mean(axis=2, keepdims=True), 3, axis=2)
    return (1 - strength) * grey + strength * colour


def render(img: torch.Tensor, attentions: torch.Tensor, masks: torch.Tensor, patch_size: int,
           output_dir: Path, alpha: float = 0.6) -> list[Path]:
    """Write img.png, attn-head{i}.png, mask-head{i}.png, attn-all.png and
    attn-heads-colour.png; returns the paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    rgb = to_rgb(img[0])
    written = [output_dir / "img.png"]
    Image.fromarray(rgb.round().astype(np.uint8)).save(written[0])

    heat = _to_pixels(attentions.cpu(), patch_size)
    mask = _to_pixels(masks.cpu(), patch_size) > 0.5
    highlight = np.array([255, 64, 32], dtype=np.float64)
    panels = [rgb]
    for i in range(heat.shape[0]):
        span = heat[i].max() - heat[i].min()
        normed = (heat[i] - heat[i].min()) / span if span > 0 else np.zeros_like(heat[i])
        overlay = (1 - alpha) * rgb + alpha * colorize(normed)
        panels.append(overlay)
        written.append(output_dir / f"attn-head{i}.png")
        Image.fromarray(overlay.round().astype(np.uint8)).save(written[-1])
        # Masked patches keep the image and get a red tint; the rest is dimmed.
        masked = np.where(mask[i][..., None], 0.55 * rgb + 0.45 * highlight, 0.35 * rgb)
        written.append(output_dir / f"mask-head{i}.png")
        Image.fromarray(masked.round().astype(np.uint8)).save(written[-1])
    gap = np.full((rgb.shape[0], max(2, rgb.shape[1] // 50), 3), 255.0)
    strip = np.concatenate([p for panel in panels for p in (panel, gap)][:-1], axis=1)
    written.append(output_dir / "attn-all.png")
    Image.fromarray(strip.round().astype(np.uint8)).save(written[-1])
    written.append(output_dir / "attn-heads-colour.png")
    Image.fromarray(heads_in_colour(rgb, heat).round().astype(np.uint8)).save(written[-1])
    return written


def load_model(pretrained_weights: str | None, arch: str | None, patch_size: int | None,
               checkpoint_key: str) -> tuple[torch.nn.Module, int, str]:
    """The backbone to inspect and its patch size; the last item describes the weights."""
    if pretrained_weights:
        model, _, info = build_backbone_from_checkpoint(
            pretrained_weights, arch=arch, patch_size=patch_size, checkpoint_key=checkpoint_key)
        arch, patch_size = info["arch"], info["patch_size"]
        source = f"{pretrained_weights} ('{checkpoint_key}')"
    else:
        arch, patch_size = arch or "vit_small", patch_size or 16
        try:
            model, _ = build_backbone(arch, patch_size)
        except UnknownArchError as e:
            raise UserError(str(e)) from e
        source = "random initialisation (no --pretrained_weights given)"
    if not hasattr(model, "get_last_selfattention"):
        raise UserError(f"--arch {arch} has no self-attention to show: use one of our ViTs "
                        "(vit_tiny, vit_small, vit_base, ...)")
    return model, int(patch_size), f"{arch}/{patch_size} from {source}"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Save the last layer's CLS self-attention of a MaSSL ViT for one image, "
                    "per head, as heat-maps and DINO-style thresholded masks.")
    parser.add_argument("--pretrained_weights", default="",
                        help="Training checkpoint (checkpoint.pth) or exported backbone (.pth or "
                             ".safetensors). Empty: random weights, to try the script only.")
    parser.add_argument("--checkpoint_key", default="teacher",
                        help="Which network of a training checkpoint to show: teacher (default, "
                             "the one evaluations use) or student.")
    parser.add_argument("--arch", default=None,
                        help="Backbone name. Default: the arch stored in the checkpoint "
                             "(vit_small without a checkpoint).")
    parser.add_argument("--patch_size", type=int, default=None,
                        help="Patch size in pixels. Default: the checkpoint's (16 without one); "
                             "each heat-map pixel block is one patch.")
    parser.add_argument("--image_path", required=True,
                        help="The image to look at (any format PIL reads). Required: nothing is "
                             "downloaded.")
    parser.add_argument("--image_size", type=int, nargs="+", default=[480],
                        help="One number: resize the shorter side to it, keeping the aspect "
                             "ratio; two numbers: H W. Larger images give finer maps; DINO's "
                             "figures use 480. Default 480.")
    parser.add_argument("--output_dir", default=".", help="Folder for the PNGs (created).")
    parser.add_argument("--threshold", type=float, default=0.6,
                        help="Masks keep the fewest patches holding this fraction of a head's "
                             "attention mass (DINO's figures: 0.6). Between 0 and 1.")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        if not 0.0 < args.threshold <= 1.0:
            raise UserError(f"--threshold must be in (0, 1], got {args.threshold}")
        if len(args.image_size) > 2 or min(args.image_size) <= 0:
            raise UserError("--image_size takes one or two positive numbers, got "
                            f"{args.image_size}")
        image = load_rgb_image(args.image_path)
        model, patch_size, description = load_model(
            args.pretrained_weights or None, args.arch, args.patch_size, args.checkpoint_key)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device).eval()
        img = preprocess(image, args.image_size, patch_size).to(device)
        attentions = cls_attention(model, img, patch_size)
        masks = mass_threshold_masks(attentions, args.threshold)
        check_writable_dir(args.output_dir)  # once the input is known good: no folder otherwise
        written = render(img, attentions, masks, patch_size, Path(args.output_dir))
    except UserError as e:
        exit_with_error(user_error_message(e))
    except OSError as e:  # the folder became unwritable or full while the PNGs were written
        exit_with_error(f"cannot write to --output_dir {args.output_dir}: {e.strerror or e}")
    print(f"model: {description}")
    print(f"image {args.image_path} at {img.shape[-1]}x{img.shape[-2]} px (W x H), "
          f"{attentions.shape[0]} heads, {attentions.shape[2]}x{attentions.shape[1]} patches")
    print(f"wrote {len(written)} PNGs to {args.output_dir} (attn-all.png shows them all, "
          "attn-heads-colour.png all heads in colour)")


if __name__ == "__main__":
    main()
