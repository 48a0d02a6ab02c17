"""The multi-crop augmentation on the training device (``--augment_on device``).

The PIL path (``data.DataAugmentationMaSSL``) makes every crop in the loader workers: ~19 ms
of CPU per image for 2x224 + 10x96 crops, more than a GPU node's cores can feed. Here the
work is split (docs/method.md, "Device augmentation"):

* ``MultiCropPlan`` (loader workers): decode the image and draw every random decision of the
  PIL path with torchvision's own parameter functions, in the PIL path's order, from the
  same per-image generator. For a given seed an image gets the same boxes, flips, factors,
  orders, sigmas and coins in both paths; only the arithmetic moves. The worker hands on the
  uint8 pixels (4x less shared memory than the float32 crops) and a row of numbers per crop.
* ``collate_plans``: a batch of those, the images as one flat uint8 buffer.
* ``DeviceMultiCrop`` (training process): the ops batched over the crops with per-crop
  parameters, each mirroring the integer arithmetic of the PIL op it replaces: crop + PIL's
  antialiased bicubic resize (separable, as two matrix products with PIL's fixed-point
  coefficients), flip, colour jitter in each crop's own order (PIL's blends with truncation,
  contrast around the rounded mean of the "L" image, the HSV hue shift with PIL's uint8
  HSV), grayscale (PIL's fixed-point "L"), PIL's Gaussian blur (three extended box passes
  per axis, 24-bit fixed point), solarization and the normalisation.

No host synchronisation per image or per crop: everything that decides shapes or subsets is
read from the parameters while they are still on the CPU.
"""
from __future__ import annotations

import contextlib
import math
from typing import ContextManager, NamedTuple, Sequence

import numpy as np
import PIL
import torch
from PIL import Image
from torchvision import transforms

from massl_loss import cuda_matmul_tf32

AUGMENT_ON = ("workers", "device")

# One row of numbers per crop (float32: every value is an integer below 2**24 or a factor
# torchvision drew in float32, so nothing is rounded on the way).
PARAMS = ("top", "left", "height", "width", "flip", "jitter", "order0", "order1", "order2",
          "order3", "brightness", "contrast", "saturation", "hue_shift", "grayscale",
          "blur_radius", "blur_ww", "blur_fw", "solarize")
P = {name: i for i, name in enumerate(PARAMS)}
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's op numbers

# PIL's fixed-point precisions: resampling coefficients (Resample.c) and box blur (BoxBlur.c).
RESAMPLE_BITS = 22
BLUR_BITS = 24
# Images with a side above this are cropped one at a time on the device (same arithmetic),
# so one huge photo does not pad a whole batch to its size.
MAX_BATCHED_SIDE = 1024
# Pillow 13 chose the order of the two resize passes by shape (pil_resizes_vertically_first).
PIL_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


# --------------------------------------------------------------------------- worker side


def pil_box_blur_params(sigma: float) -> tuple[int, int, int]:
    """PIL's ``GaussianBlur(radius=sigma)`` as its box-blur passes run it: the integer box
    radius and the 24-bit fixed-point weights of the inner and the two outer taps.

    Mirrors ImagingGaussianBlur (three passes) then ImagingHorizontalBoxBlur, in C ``float``
    where the C code uses float (numpy float32 scalars round after every operation, as C does
    without extended precision)."""
    f32 = np.float32
    radius = f32(sigma)
    sigma2 = f32(radius * radius / f32(3))
    box_length = f32(math.sqrt(12.0 * float(sigma2) + 1.0))
    l = f32(math.floor((float(box_length) - 1.0) / 2.0))
    a = f32(f32(2) * l + f32(1)) * f32(l * (l + f32(1)) - f32(3) * sigma2)
    a = f32(a / f32(f32(6) * f32(sigma2 - (l + f32(1)) * (l + f32(1)))))
    float_radius = f32(l + a)
    r = int(float_radius)
    ww = int(f32(1 << BLUR_BITS) / f32(float_radius * f32(2) + f32(1)))
    fw = ((1 << BLUR_BITS) - (r * 2 + 1) * ww) // 2
    return r, ww, fw


NO_BLUR = (0, 1 << BLUR_BITS, 0)  # radius 0 with all weight on the centre: the identity


class MultiCropPlan:
    """The worker half of ``--augment_on device``: an image -> ``(pixels, params)``.

    ``pixels`` is the decoded image, ``(H, W, 3)`` uint8; ``params`` is ``(2 + n_local,
    len(PARAMS))`` float32, one row per crop in the order [global 1, global 2, locals...].
    The draws are those of ``data.DataAugmentationMaSSL`` built with the same arguments, in
    the same order, from torch's global generator (the training seeds it per image), made by
    the same torchvision functions: ``RandomResizedCrop.get_params``, the flip coin,
    ``RandomApply``'s coin, ``ColorJitter.get_params``, the grayscale coin, the blur's coin
    and sigma, the solarization coin. A probability of 0 draws nothing, as the PIL path then
    leaves the op out.
    """

    def __init__(self, global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                 local_crops_number: int, global_crops_size: int = 224, local_crops_size: int = 96,
                 color_jitter_prob: float = 0.8, grayscale_prob: float = 0.2,
                 solarization_prob: float = 0.2):
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = local_crops_number
        self.global_crops_size, self.local_crops_size = global_crops_size, local_crops_size
        self.color_jitter_prob = color_jitter_prob
        self.grayscale_prob = grayscale_prob
        self.solarization_prob = solarization_prob
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default, as the PIL path
        self.jitter = transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)

    @property
    def crop_sizes(self) -> list[int]:
        return [self.global_crops_size] * 2 + [self.local_crops_size] * self.local_crops_number

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8))
        rows = [self._draw(image, self.global_crops_scale, blur_p=1.0, solarize=False),
                self._draw(image, self.global_crops_scale, blur_p=0.1, solarize=True)]
        rows += [self._draw(image, self.local_crops_scale, blur_p=0.5, solarize=False)
                 for _ in range(self.local_crops_number)]
        return pixels, torch.tensor(rows, dtype=torch.float32)

    def _draw(self, image: Image.Image, scale: tuple[float, float], blur_p: float,
              solarize: bool) -> list[float]:
        row = [0.0] * len(PARAMS)
        row[P["top"]], row[P["left"]], row[P["height"]], row[P["width"]] = \
            transforms.RandomResizedCrop.get_params(image, scale, self.ratio)
        row[P["flip"]] = float(torch.rand(1) < 0.5)
        row[P["brightness"]] = row[P["contrast"]] = row[P["saturation"]] = 1.0
        row[P["order0"]:P["order3"] + 1] = [0.0, 1.0, 2.0, 3.0]
        if self.color_jitter_prob > 0 and not self.color_jitter_prob < torch.rand(1):
            order, b, c, s, h = self.jitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                                       self.jitter.saturation, self.jitter.hue)
            row[P["jitter"]] = 1.0
            row[P["order0"]:P["order3"] + 1] = [float(i) for i in order]
            row[P["brightness"]], row[P["contrast"]], row[P["saturation"]] = b, c, s
            # torchvision's adjust_hue adds np.int32(h * 255) to PIL's uint8 hue, wrapping
            row[P["hue_shift"]] = float(int(np.int32(h * 255).astype(np.uint8)))
        if self.grayscale_prob > 0:
            row[P["grayscale"]] = float(torch.rand(1) < self.grayscale_prob)
        blur = NO_BLUR
        if not torch.rand((), dtype=torch.float64).item() > blur_p:  # RandomGaussianBlur's draws
            sigma = 0.1 + (2.0 - 0.1) * torch.rand((), dtype=torch.float64).item()
            blur = pil_box_blur_params(sigma)
        row[P["blur_radius"]], row[P["blur_ww"]], row[P["blur_fw"]] = blur
        if solarize and self.solarization_prob > 0:
            row[P["solarize"]] = float(torch.rand(1).item() < self.solarization_prob)
        return row

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(global {self.global_crops_size} px {self.global_crops_scale}"
                f", {self.local_crops_number} local {self.local_crops_size} px "
                f"{self.local_crops_scale})")


class PlannedBatch(NamedTuple):
    """A collated batch of plans: ``pixels`` every image's uint8 bytes end to end, ``shapes``
    ``(B, 3)`` int64 (offset, height, width) of each image in it, ``params`` ``(B, V, P)``."""
    pixels: torch.Tensor
    shapes: torch.Tensor
    params: torch.Tensor


def collate_plans(samples: list[tuple[tuple[torch.Tensor, torch.Tensor], int]]
                  ) -> tuple[PlannedBatch, torch.Tensor]:
    """The DataLoader's collate function for ``MultiCropPlan`` samples: ``(batch, labels)``."""
    images = [pixels for (pixels, _), _ in samples]
    sizes = torch.tensor([img.shape[0] * img.shape[1] * 3 for img in images])
    offsets = torch.cumsum(sizes, 0) - sizes
    shapes = torch.stack([offsets, torch.tensor([img.shape[0] for img in images]),
                          torch.tensor([img.shape[1] for img in images])], 1)
    pixels = torch.cat([img.reshape(-1) for img in images])
    params = torch.stack([params for (_, params), _ in samples])
    labels = torch.tensor([label for _, label in samples])
    return PlannedBatch(pixels, shapes, params), labels


# --------------------------------------------------------------------------- device ops
# Every op takes and returns float tensors ``(N, 3, H, W)`` holding integers 0..255 (the uint8
# values PIL would hold after the same op), with per-crop parameters of shape ``(N,)``.


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic filter (a = -0.5), support 2."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_matrix(in_sizes: torch.Tensor, out_size: int, width: int) -> torch.Tensor:
    """PIL's 8-bit bicubic resampling coefficients as ``(N, out_size, width)`` float64 matrices:
    row j of matrix n holds the weights of output pixel j over input pixels 0..width-1 for an
    input of ``in_sizes[n]`` pixels (ImagingResample: precompute_coeffs in double, then
    normalize_coeffs_8bpc's rounding to 22-bit fixed point; the input box starts at 0)."""
    device = in_sizes.device
    in_size = in_sizes.to(torch.float64)[:, None, None]
    scale = in_size / out_size
    filterscale = scale.clamp(min=1.0)
    support = 2.0 * filterscale
    center = (torch.arange(out_size, device=device, dtype=torch.float64)[None, :, None] + 0.5) * scale
    xmin = torch.trunc(center - support + 0.5).clamp(min=0)
    xmax = torch.minimum(torch.trunc(center + support + 0.5), in_size)  # exclusive
    x = torch.arange(width, device=device, dtype=torch.float64)[None, None, :]
    inside = (x >= xmin) & (x < xmax)
    w = torch.where(inside, _bicubic((x - center + 0.5) * (1.0 / filterscale)), 0.0)
    total = w.sum(-1, keepdim=True)
    w = torch.where(total != 0, w / total, w)
    scaled = w * (1 << RESAMPLE_BITS)
    fixed = torch.trunc(torch.where(scaled < 0, scaled - 0.5, scaled + 0.5))
    return fixed / (1 << RESAMPLE_BITS)


def _round_clip(x: torch.Tensor) -> torch.Tensor:
    """PIL's clip8 after a fixed-point sum: round half up, then clamp to 0..255."""
    return torch.floor(x + 0.5).clamp_(0, 255)


def pil_resizes_vertically_first(heights: torch.Tensor, widths: torch.Tensor,
                                 out_size: int) -> torch.Tensor:
    """Which boxes PIL resizes to ``out_size`` x ``out_size`` with the vertical pass first.

    Pillow 13 does the vertical pass first when the height shrinks markedly more than the
    width (measured against Pillow 13.0: ``h / S - 1 > 2 (w / S - 1)`` with ``h > S``);
    earlier versions always start with the horizontal pass. The order matters because the
    intermediate image is rounded to uint8."""
    if not PIL_VERTICAL_FIRST:
        return torch.zeros_like(heights, dtype=torch.bool)
    return (heights > out_size) & (heights > 2 * widths - out_size)


def resize_boxes(boxes: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor,
                 out_size: int, vertical_first: bool = False,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """PIL's ``resize((out_size, out_size), BICUBIC)`` of each box ``boxes[n, :, :heights[n],
    :widths[n]]`` (float, integer values; padding beyond each box is ignored): one pass per
    axis, the intermediate image rounded to uint8 values as PIL's is, in PIL's order
    (``pil_resizes_vertically_first``).

    Computed (unless ``dtype`` says otherwise) in float64 on the CPU, exactly PIL's integer
    sums, and in float32 on accelerators, where float64 is slow on most cards: sums within
    ~1e-5 of PIL's, so a value may differ by one level at a rounding tie (tests measure it)."""
    if dtype is None:
        dtype = torch.float64 if boxes.device.type == "cpu" else torch.float32
    _, _, h, w = boxes.shape
    wx = resample_matrix(widths, out_size, w).to(dtype).transpose(1, 2)[:, None]  # (N,1,w,S)
    wy = resample_matrix(heights, out_size, h).to(dtype)[:, None]  # (N, 1, S, h)
    x = boxes.to(dtype)
    with _ieee_matmul(x.device):
        if vertical_first:
            out = _round_clip(torch.matmul(_round_clip(torch.matmul(wy, x)), wx))
        else:
            out = _round_clip(torch.matmul(wy, _round_clip(torch.matmul(x, wx))))
    return out.float()


def _ieee_matmul(device: torch.device) -> ContextManager[None]:
    """float32 matmuls without TF32 here, whatever the process chose: TF32's 10-bit inputs
    would move the resize's sums by up to ~0.1 level instead of ~1e-5."""
    return cuda_matmul_tf32(False) if device.type == "cuda" else contextlib.nullcontext()


def _blend(base: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(base, image, factor)`` on 8-bit bands: ``base + factor * (image -
    base)`` in C float, truncated to an integer and clipped (Blend.c)."""
    out = base + factor.view(-1, 1, 1, 1).float() * (image - base)
    return torch.floor(out.clamp_(0, 255))


def grayscale_l(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")``: ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``, ``(N, 1, H, W)``.
    The sum stays below 2**24, so float32 holds it exactly."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 0x8000) / 65536)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Brightness``: a blend with black."""
    return _blend(torch.zeros_like(x), x, factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Contrast``: a blend with a flat image at the rounded mean of the "L" image
    (the mean in double, as ImageStat computes it)."""
    mean = grayscale_l(x).to(torch.float64).mean(dim=(1, 2, 3), keepdim=True)
    degenerate = torch.floor(mean + 0.5).float().expand_as(x)
    return _blend(degenerate, x, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Color``: a blend with the "L" image."""
    return _blend(grayscale_l(x).expand_as(x), x, factor)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Round a float64 tensor to C float, as an assignment to a ``float`` variable does."""
    return x.float().double()


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> HSV (Convert.c, rgb2hsv_row), uint8 values in float64 ``(N, 3, H, W)``."""
    x = x.double()
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, minc = x.max(1).values, x.min(1).values
    flat = maxc == minc
    cr = torch.where(flat, 1.0, maxc - minc)
    s = _f32(cr / torch.where(maxc == 0, 1.0, maxc))
    rc, gc, bc = _f32((maxc - r) / cr), _f32((maxc - g) / cr), _f32((maxc - b) / cr)
    h = torch.where(r == maxc, _f32(bc - gc),
                    torch.where(g == maxc, _f32(2.0 + rc - bc), _f32(4.0 + gc - rc)))
    h = _f32(torch.fmod(h / 6.0 + 1.0, 1.0))
    uh = torch.where(flat, 0.0, torch.trunc(h * 255.0).clamp(0, 255))
    us = torch.where(flat, 0.0, torch.trunc(s * 255.0).clamp(0, 255))
    return torch.stack([uh, us, maxc], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """PIL's HSV -> RGB (Convert.c, hsv2rgb), float64 uint8 values -> float32 ``(N, 3, H, W)``."""
    h, s, v = hsv[:, 0], hsv[:, 1], hsv[:, 2]
    h6 = _f32(h) * 6.0 / 255.0
    i = torch.floor(h6)
    f = _f32(h6 - i)
    fs = _f32(s / 255.0)
    p = torch.floor(v * (1.0 - fs) + 0.5).clamp(0, 255)  # C round(): half away from zero
    q = torch.floor(v * (1.0 - _f32(fs * f)) + 0.5).clamp(0, 255)
    t = torch.floor(v * (1.0 - fs * (1.0 - f)) + 0.5).clamp(0, 255)
    sector = torch.remainder(i, 6)
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    channels = []
    for c in range(3):
        out = table[0][c]
        for k in range(1, 6):
            out = torch.where(sector == k, table[k][c], out)
        channels.append(torch.where(s == 0, v, out))
    return torch.stack(channels, 1).float()


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's PIL ``adjust_hue``: PIL's uint8 HSV, H + shift modulo 256, back to RGB."""
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1).double(), 256)
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], 1))


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """``RandomGrayscale``'s op: PIL's "L" copied to the three channels."""
    return grayscale_l(x).expand_as(x).contiguous()


def box_blur(x: torch.Tensor, radius: torch.Tensor, ww: torch.Tensor, fw: torch.Tensor,
             max_radius: int, passes: int = 3) -> torch.Tensor:
    """PIL's ``GaussianBlur``: ``passes`` extended box blurs along the width, then as many along
    the height (BoxBlur.c), each ``(ww * inner sum + fw * outer pair + 2**23) >> 24`` with
    the edge pixels repeated; radius, ww, fw per crop from ``pil_box_blur_params``.
    float64 holds the fixed-point sums exactly."""
    n = x.shape[0]
    pad = max_radius + 1
    offsets = torch.arange(-pad, pad + 1, device=x.device, dtype=torch.float64).abs()
    r = radius.double().view(n, 1)
    taps = torch.where(offsets <= r, ww.double().view(n, 1),
                       torch.where(offsets == r + 1, fw.double().view(n, 1), 0.0))
    taps = taps.view(n, 1, 1, -1)
    y = x.double()
    for axis in (3, 2):
        if axis == 2:
            y = y.transpose(2, 3)
        width = y.shape[3]
        for _ in range(passes):
            padded = torch.nn.functional.pad(y, (pad, pad, 0, 0), mode="replicate")  # edges repeat
            acc = torch.full_like(y, 1 << (BLUR_BITS - 1))
            for k in range(2 * pad + 1):
                acc += taps[..., k:k + 1] * padded[..., k:k + width]
            y = torch.floor(acc / (1 << BLUR_BITS))
        if axis == 2:
            y = y.transpose(2, 3)
    return y.float()


def solarize(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.solarize(threshold=128)``: values >= 128 become 255 - value."""
    return torch.where(x >= 128, 255 - x, x)


# --------------------------------------------------------------------------- device side


class DeviceImages(NamedTuple):
    """A batch's images on the device: ``padded`` ``(B, H, W, 3)`` uint8 (zeros for the large
    ones), ``large`` the images with a side above MAX_BATCHED_SIDE, by batch position."""
    padded: torch.Tensor
    large: dict[int, torch.Tensor]


class DeviceMultiCrop:
    """The device half of ``--augment_on device``: a ``PlannedBatch`` -> the list of crop
    batches ``[global 1, global 2, locals...]``, each ``(B, 3, S, S)`` float32 normalised on
    ``device``, as ``data.DataAugmentationMaSSL`` would have made them in the workers.

    Transfers are non-blocking from pinned memory; shapes and the subsets each op applies to
    are read from the parameters on the CPU, so nothing waits for the device."""

    def __init__(self, crop_sizes: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 device: torch.device):
        self.crop_sizes = list(crop_sizes)
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    def __call__(self, batch: PlannedBatch) -> list[torch.Tensor]:
        if self.device.type != "cpu":
            return self._crops(batch)
        # On the CPU, one thread: the ~300 small ops each wait for the whole thread pool, which
        # stalls when other processes share the cores (measured, 2 cores under load: a batch
        # of 128 at 28 px took 5.4 s on 2 threads, 0.26 s on 1).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._crops(batch)
        finally:
            torch.set_num_threads(threads)

    def _crops(self, batch: PlannedBatch) -> list[torch.Tensor]:
        params = batch.params  # stays on the CPU: the host-side decisions read it
        if params.shape[1] != len(self.crop_sizes):
            raise ValueError(f"the batch plans {params.shape[1]} crops, expected "
                             f"{len(self.crop_sizes)}")
        pixels = batch.pixels.to(self.device, non_blocking=True)
        images = self._images(pixels, batch.shapes)
        crops: list[torch.Tensor] = []
        start = 0
        for size in dict.fromkeys(self.crop_sizes):  # the crop sizes in order, once each
            views = [v for v, s in enumerate(self.crop_sizes) if s == size]
            assert views == list(range(start, start + len(views))), "crops of a size are adjacent"
            start += len(views)
            # rows view-major: row v * B + b is crop v of image b
            rows = params[:, views].transpose(0, 1).reshape(-1, len(PARAMS))
            x = torch.cat([self._resize(images, params[:, v], size) for v in views])
            x = self._color(x, rows)
            x = x.div_(255).sub_(self.mean).div_(self.std)  # ToNormalizedTensor's arithmetic
            crops.extend(x.chunk(len(views)))
        return crops

    def _images(self, pixels: torch.Tensor, shapes: torch.Tensor) -> DeviceImages:
        """The batch's images on the device: ordinary ones padded into one ``(B, H, W, 3)``
        tensor, those with a side above MAX_BATCHED_SIDE kept apart, one tensor each."""
        shapes = shapes.tolist()  # CPU
        small = [i for i, (_, h, w) in enumerate(shapes) if max(h, w) <= MAX_BATCHED_SIDE]
        height = max((shapes[i][1] for i in small), default=1)
        width = max((shapes[i][2] for i in small), default=1)
        padded = torch.zeros(len(shapes), height, width, 3, dtype=torch.uint8, device=self.device)
        large = {}
        for i, (offset, h, w) in enumerate(shapes):
            image = pixels[offset:offset + h * w * 3].view(h, w, 3)
            if max(h, w) <= MAX_BATCHED_SIDE:
                padded[i, :h, :w] = image
            else:
                large[i] = image
        return DeviceImages(padded, large)

    def _resize(self, images: DeviceImages, p: torch.Tensor, size: int) -> torch.Tensor:
        """Crop v of every image (``p``: its ``(B, P)`` parameters), resized to ``size``."""
        padded, large = images
        p_dev = p.to(self.device, non_blocking=True)
        top, left = p_dev[:, P["top"]].long(), p_dev[:, P["left"]].long()
        heights, widths = p_dev[:, P["height"]], p_dev[:, P["width"]]
        batched = [i for i in range(p.shape[0]) if i not in large]
        box_h = int(p[batched, P["height"]].max()) if batched else 1
        box_w = int(p[batched, P["width"]].max()) if batched else 1
        B, H, W, _ = padded.shape
        rows = (top[:, None] + torch.arange(box_h, device=self.device)).clamp_(max=H - 1)
        cols = (left[:, None] + torch.arange(box_w, device=self.device)).clamp_(max=W - 1)
        boxes = torch.gather(padded, 1, rows.view(B, box_h, 1, 1).expand(B, box_h, W, 3))
        boxes = torch.gather(boxes, 2, cols.view(B, 1, box_w, 1).expand(B, box_h, box_w, 3))
        boxes = boxes.permute(0, 3, 1, 2)
        vertical_first = pil_resizes_vertically_first(p[:, P["height"]], p[:, P["width"]], size)
        out = torch.empty(B, 3, size, size, device=self.device)
        for order in (False, True):  # PIL's pass order, per crop
            index = self._subset(vertical_first == order)
            if index is not None:
                out[index] = resize_boxes(boxes[index], heights[index], widths[index], size, order)
        for i, image in large.items():  # rare: one crop at a time, the same arithmetic
            t, l, h, w = (int(p[i, P[k]]) for k in ("top", "left", "height", "width"))
            box = image[t:t + h, l:l + w].permute(2, 0, 1)[None]
            out[i] = resize_boxes(box, heights[i:i + 1], widths[i:i + 1], size,
                                  bool(vertical_first[i]))[0]
        return out

    def _subset(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The indices (on the device) of the rows where the CPU ``mask`` holds, or None."""
        index = mask.nonzero().view(-1)
        return index.to(self.device, non_blocking=True) if len(index) else None

    def _color(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Flip, colour jitter, grayscale, blur and solarization of ``x`` ``(N, 3, S, S)`` with
        the per-crop parameters ``rows`` ``(N, P)`` (CPU), each op on its crops only."""
        rows_dev = rows.to(self.device, non_blocking=True)
        flip = self._subset(rows[:, P["flip"]] > 0)
        if flip is not None:
            x[flip] = x[flip].flip(-1)
        jitter = rows[:, P["jitter"]] > 0
        for step in range(4):  # each crop's own order of the four ops
            op_at_step = rows[:, P["order0"] + step]
            for op, column, fn in ((BRIGHTNESS, "brightness", adjust_brightness),
                                   (CONTRAST, "contrast", adjust_contrast),
                                   (SATURATION, "saturation", adjust_saturation),
                                   (HUE, "hue_shift", adjust_hue)):
                index = self._subset(jitter & (op_at_step == op))
                if index is not None:
                    x[index] = fn(x[index], rows_dev[index, P[column]])
        gray = self._subset(rows[:, P["grayscale"]] > 0)
        if gray is not None:
            x[gray] = to_grayscale(x[gray])
        blurred = rows[:, P["blur_ww"]] != (1 << BLUR_BITS)
        index = self._subset(blurred)
        if index is not None:
            max_radius = int(rows[blurred, P["blur_radius"]].max())
            x[index] = box_blur(x[index], rows_dev[index, P["blur_radius"]],
                                rows_dev[index, P["blur_ww"]], rows_dev[index, P["blur_fw"]],
                                max_radius)
        solar = self._subset(rows[:, P["solarize"]] > 0)
        if solar is not None:
            x[solar] = solarize(x[solar])
        return x
