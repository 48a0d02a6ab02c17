"""Image files and decoding: the one rule for what is an image, the recursive listing, and
8-bit RGB loading that names the bad file."""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
from PIL import Image

from utils import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_file(name: str) -> bool:
    """The one rule for what counts as an image, in training and in evaluation: an image
    extension, and not a dot-file (e.g. macOS "._x.jpg" resource forks are never images)."""
    name = os.path.basename(name)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def iter_image_files(folder: str, seen: set[str] | None = None) -> Iterator[str]:
    """Image files (``is_image_file``) under ``folder``, recursively: folders depth-first in
    sorted order, files sorted, dot-folders skipped.

    Symbolic links are followed, but each real folder is entered once: a ``self -> .`` link
    neither multiplies the data nor loops forever. ``seen`` holds the real paths entered so
    far and may be shared between calls (folders listed by an earlier call are skipped).
    """
    seen = set() if seen is None else seen
    top = os.path.realpath(folder)
    if top in seen:
        return
    seen.add(top)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, name))
            if not name.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(name)
        dirnames[:] = kept  # os.walk descends only into these
        yield from (os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))


class BadImageError(UserError):
    """An image file that PIL cannot read."""


# Pillow modes with 16-bit samples: their nominal range is 0..65535.
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def to_8bit(img: Image.Image) -> Image.Image:
    """High-bit-depth grayscale (Pillow modes I;16*, I, F) as 8-bit ``L``, scaled, not clipped.

    ``convert("RGB")`` clips these at 255, which turns 16-bit images black and white.
    * ``I;16*`` (16-bit PNG/TIFF): value / 257, the nominal 16-bit range onto 0..255, so a
      dark image stays dark and all images of a dataset are scaled alike.
    * ``I`` (32-bit integers: Pillow's mode for 16-bit PGM/PPM, and 32-bit TIFFs): values in
      0..65535 are read on the same 16-bit scale; an image with values outside it has no
      nominal range and is stretched from its minimum to its maximum.
    * ``F`` (32-bit floats): values in 0..1 are read as 0..255 (the float convention);
      otherwise stretched from the image's minimum to its maximum. NaN becomes 0.
    Pillow already reduces 16-bit RGB(A) and LA images to 8 bits itself. Other modes are
    returned unchanged.
    """
    if img.mode not in _16BIT_MODES + ("I", "F"):
        return img
    values = np.asarray(img, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if img.mode in _16BIT_MODES or (img.mode == "I" and low >= 0 and high <= 65535):
        low, top = 0.0, 65535.0
    elif img.mode == "F" and low >= 0 and high <= 1:
        low, top = 0.0, 1.0
    else:
        top = high if high > low else low + 1.0  # a constant image becomes black
    scaled = np.nan_to_num((values - low) * (255.0 / (top - low)), nan=0.0)
    return Image.fromarray(np.rint(np.clip(scaled, 0, 255)).astype(np.uint8))  # mode L


def load_rgb_image(path: str) -> Image.Image:
    """Open an image as 8-bit RGB (high bit depths scaled, see ``to_8bit``); raise
    ``BadImageError`` naming the file if it is unreadable.

    Pixels are taken as stored: an EXIF orientation tag (phone photos) is not applied, as in
    DINO's and torchvision's ImageNet pipelines, so our numbers stay comparable with theirs.
    Training and every evaluation read images through here, so they agree. For photos that
    should be upright, rotate them once beforehand (e.g. ``PIL.ImageOps.exif_transpose``)."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return to_8bit(img).convert("RGB")
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadImageError(f"cannot read image {path}: {e}") from e
