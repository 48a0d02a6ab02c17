"""``--augment_on device`` (device_augment.py) against the PIL path it replaces.

Three layers, on real images (scikit-image's colour photos, Fashion-MNIST):
* each device op with fixed parameters against torchvision's / PIL's own op: the largest
  difference in uint8 levels is asserted (0 for every op on the CPU; one level at most for the
  resize in float32, the accelerators' arithmetic);
* whole images: the plan drawn in the worker plus the device crops equal the PIL path's crops
  bit for bit for the same per-image seed (so the device applies what the plan says);
* distributions over >= 10,000 crops: the plan's draws against the draws the PIL path makes
  (recorded from torchvision's calls, independent seeds), with tests that are shown to fail
  on a wrong probability, a missing op and an order shared across the batch.
"""
from __future__ import annotations

import itertools
import math
import re
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter

import data
import device_augment as da
import images
import utils

SCALES = ((0.32, 1.0), (0.05, 0.32))


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    skimage_data = pytest.importorskip("skimage.data")
    return [Image.fromarray(skimage_data.astronaut()), Image.fromarray(skimage_data.chelsea()),
            Image.fromarray(skimage_data.coffee())]


@pytest.fixture(scope="module")
def small_photos(photos) -> list[Image.Image]:
    """Colour photos at a few small sizes (portrait and landscape), cheap to crop many times."""
    sizes = [(64, 48), (48, 64), (80, 60), (40, 40), (72, 54)]
    return [photo.resize(size, Image.BICUBIC) for photo in photos for size in sizes]


@pytest.fixture(scope="module")
def fmnist_images(fmnist_folder) -> list[Image.Image]:
    files = sorted((fmnist_folder / "train").glob("*/*.png"))[::15]
    return [images.load_rgb_image(str(f)) for f in files]


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()


def levels(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- single ops


BOXES = [(0, 0, 1.0, 1.0), (0.1, 0.2, 0.5, 0.4), (0.3, 0.05, 0.6, 0.3), (0.05, 0.3, 0.2, 0.6),
         (0.4, 0.4, 0.15, 0.15)]


@pytest.mark.parametrize("size", [96, 224])
def test_resize_equals_pil_bicubic_exactly(photos, size):
    """Crop + PIL's antialiased bicubic resize, downscaling and upscaling, both pass orders."""
    orders = set()
    for photo in photos:
        x = as_tensor(photo)
        H, W = x.shape[2:]
        for ft, fl, fh, fw in BOXES:
            t, l, h, w = int(ft * H), int(fl * W), max(int(fh * H), 1), max(int(fw * W), 1)
            ref = as_tensor(F.resized_crop(photo, t, l, h, w, [size, size],
                                           interpolation=F.InterpolationMode.BICUBIC))
            padded = torch.nn.functional.pad(x[:, :, t:t + h, l:l + w], (0, 7, 0, 5))  # ignored
            vertical = bool(da.pil_resizes_vertically_first(torch.tensor([h]), torch.tensor([w]),
                                                            size))
            orders.add(vertical)
            out = da.resize_boxes(padded, torch.tensor([h]), torch.tensor([w]), size, vertical)
            assert levels(out, ref) == 0, (photo.size, (t, l, h, w), size)
    if da.PIL_VERTICAL_FIRST:
        assert orders == {False, True}  # both of Pillow 13's pass orders were exercised


def test_resize_in_float32_is_within_one_level(photos):
    """The accelerators' float32 arithmetic: at most one level off, and rarely."""
    differing, total = 0, 0
    for photo in photos:
        x = as_tensor(photo)
        H, W = x.shape[2:]
        for ft, fl, fh, fw in BOXES:
            t, l, h, w = int(ft * H), int(fl * W), int(fh * H), int(fw * W)
            ref = as_tensor(F.resized_crop(photo, t, l, h, w, [96, 96],
                                           interpolation=F.InterpolationMode.BICUBIC))
            vertical = bool(da.pil_resizes_vertically_first(torch.tensor([h]), torch.tensor([w]), 96))
            out = da.resize_boxes(x[:, :, t:t + h, l:l + w], torch.tensor([h]), torch.tensor([w]),
                                  96, vertical, dtype=torch.float32)
            assert levels(out, ref) <= 1
            differing += int((out != ref).sum())
            total += ref.numel()
    assert differing / total < 1e-3


FACTORS = [0.6, 0.8137, 1.0, 1.2291, 1.4]


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_blend_ops_equal_pil(photos, fmnist_images, name):
    ours = getattr(da, f"adjust_{name}")
    theirs = getattr(F, f"adjust_{name}")
    for image in [*photos, *fmnist_images[:5]]:
        x = as_tensor(image)
        for factor in FACTORS:
            assert levels(ours(x, torch.tensor([factor])), as_tensor(theirs(image, factor))) == 0


def test_hue_equals_torchvision_pil(photos, fmnist_images):
    for image in [*photos, *fmnist_images[:3]]:
        x = as_tensor(image)
        for hue in [-0.1, -0.0437, 0.0, 0.02, 0.0999]:
            shift = float(int(np.int32(hue * 255).astype(np.uint8)))  # what the plan stores
            assert levels(da.adjust_hue(x, torch.tensor([shift])),
                          as_tensor(F.adjust_hue(image, hue))) == 0, hue


def test_grayscale_and_solarize_equal_pil(photos):
    for image in photos:
        x = as_tensor(image)
        assert levels(da.to_grayscale(x), as_tensor(F.rgb_to_grayscale(image, 3))) == 0
        assert levels(da.solarize(x), as_tensor(F.solarize(image, 128))) == 0


@pytest.mark.parametrize("sigma", [0.1, 0.37, 1.0, 1.4142, 1.7, 2.0])
def test_blur_equals_pil_gaussian_blur(photos, sigma):
    """PIL's GaussianBlur(radius=sigma), i.e. its three extended box passes per axis."""
    r, ww, fw = da.pil_box_blur_params(sigma)
    for image in photos:
        out = da.box_blur(as_tensor(image), torch.tensor([r]), torch.tensor([ww]),
                          torch.tensor([fw]), max_radius=2)
        assert levels(out, as_tensor(image.filter(ImageFilter.GaussianBlur(radius=sigma)))) == 0


def test_ops_apply_per_crop_parameters(photos):
    """A batch with different factors per crop equals the crops done one by one."""
    x = torch.cat([as_tensor(p.resize((50, 40))) for p in photos])
    factors = torch.tensor([0.7, 1.0, 1.3])
    for fn in (da.adjust_brightness, da.adjust_contrast, da.adjust_saturation):
        batched = fn(x, factors)
        for i in range(3):
            assert torch.equal(batched[i:i + 1], fn(x[i:i + 1], factors[i:i + 1]))


# --------------------------------------------------------------------------- whole images


def pil_and_device_crops(images, seeds, global_size, local_size, n_local, **probs):
    pil = data.DataAugmentationMaSSL(*SCALES, n_local, global_size, local_size, **probs)
    plan = da.MultiCropPlan(*SCALES, n_local, global_size, local_size, **probs)
    device = da.DeviceMultiCrop(plan.crop_sizes, utils.IMAGENET_MEAN, utils.IMAGENET_STD, "cpu")
    expected, samples = [], []
    for image, seed in zip(images, seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            expected.append(pil(image))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            samples.append((plan(image), 0))
    batch, _ = da.collate_plans(samples)
    return expected, device(batch)


def assert_same_crops(expected, crops):
    for v, crop_batch in enumerate(crops):
        for i, crops_of_image in enumerate(expected):
            assert torch.equal(crop_batch[i], crops_of_image[v]), (i, v)


def test_device_crops_equal_the_pil_path_bit_for_bit(small_photos, fmnist_images):
    images = small_photos + fmnist_images[:6]
    for round_ in range(3):
        seeds = [1000 * round_ + i for i in range(len(images))]
        assert_same_crops(*pil_and_device_crops(images, seeds, 32, 16, 4))


def test_reference_sizes_bit_for_bit(photos):
    """2 x 224 + 10 x 96 crops of full-size photos (512x512, 451x300, 600x400) in one batch."""
    assert_same_crops(*pil_and_device_crops(photos, [7, 8, 9], 224, 96, 10))


def test_probabilities_zero_and_one(small_photos):
    """Ops off (no draws, as the PIL path leaves them out) and always on."""
    seeds = list(range(len(small_photos)))
    assert_same_crops(*pil_and_device_crops(small_photos, seeds, 24, 12, 2, color_jitter_prob=0.0,
                                            grayscale_prob=0.0, solarization_prob=0.0))
    assert_same_crops(*pil_and_device_crops(small_photos, seeds, 24, 12, 2, color_jitter_prob=1.0,
                                            grayscale_prob=1.0, solarization_prob=1.0))


def test_large_images_are_cropped_apart_with_the_same_result(small_photos, monkeypatch):
    monkeypatch.setattr(da, "MAX_BATCHED_SIDE", 60)  # the 64/72/80 px photos go one by one
    assert_same_crops(*pil_and_device_crops(small_photos, range(len(small_photos)), 32, 16, 3))


def test_crops_depend_only_on_the_image_seed(small_photos):
    """An image's crops are the same whatever batch it is in and wherever."""
    images, seeds = small_photos[:6], [11, 12, 13, 14, 15, 16]
    _, together = pil_and_device_crops(images, seeds, 24, 12, 2)
    _, reversed_ = pil_and_device_crops(images[::-1], seeds[::-1], 24, 12, 2)
    for v in range(4):
        assert torch.equal(together[v], reversed_[v].flip(0))


# --------------------------------------------------------------------------- distributions


class PILRecorder:
    """Records what the PIL path does to each crop, from torchvision's own calls."""

    def __init__(self, monkeypatch):
        self.crops: list[dict] = []
        self.image_area = 1.0

        def wrap(name, record):
            original = getattr(F, name)

            def recorded(img, *args, **kwargs):
                record(img, *args)
                return original(img, *args, **kwargs)
            monkeypatch.setattr(F, name, recorded)

        def new_crop(img, top, left, h, w, *rest):
            self.crops.append({"area": h * w / self.image_area, "ratio": w / h, "order": []})
        wrap("resized_crop", new_crop)
        wrap("hflip", lambda img, *a: self.crops[-1].__setitem__("flip", 1))
        for op, name in enumerate(("adjust_brightness", "adjust_contrast", "adjust_saturation",
                                   "adjust_hue")):
            wrap(name, lambda img, *a, op=op: self.crops[-1]["order"].append(op))
        wrap("rgb_to_grayscale", lambda img, *a: self.crops[-1].__setitem__("gray", 1))
        wrap("solarize", lambda img, *a: self.crops[-1].__setitem__("solarize", 1))
        blur = ImageFilter.GaussianBlur

        def recorded_blur(radius):
            self.crops[-1]["blur"] = 1
            return blur(radius)
        monkeypatch.setattr(data.ImageFilter, "GaussianBlur", recorded_blur)

    def run(self, transform, images, seeds) -> list[dict]:
        for image, seed in zip(images, seeds):
            self.image_area = image.size[0] * image.size[1]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                transform(image)
        return [{"flip": 0, "gray": 0, "blur": 0, "solarize": 0, **c} for c in self.crops]


def plan_draws(plan, images, seeds) -> list[dict]:
    out = []
    for image, seed in zip(images, seeds):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, params = plan(image)
        area = image.size[0] * image.size[1]
        for row in params.tolist():
            p = dict(zip(da.PARAMS, row))
            out.append({"area": p["height"] * p["width"] / area, "ratio": p["width"] / p["height"],
                        "flip": int(p["flip"]), "gray": int(p["grayscale"]),
                        "blur": int(p["blur_ww"] != 1 << da.BLUR_BITS),
                        "solarize": int(p["solarize"]),
                        "order": [int(p[f"order{k}"]) for k in range(4)] if p["jitter"] else []})
    return out


def ks_statistic(a: list[float], b: list[float]) -> float:
    """Two-sample Kolmogorov-Smirnov D: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a)
                        - np.searchsorted(b, grid, "right") / len(b)).max())


def draw_differences(ours: list[dict], theirs: list[dict], crops_per_image: int) -> list[str]:
    """The statistics on which the two sets of draws differ at the 0.1 % level."""
    failures = []
    for key in ("area", "ratio"):
        for pos in (slice(0, 2), slice(2, None)):  # global and local crops
            a = [c[key] for i, c in enumerate(ours) if i % crops_per_image in range(crops_per_image)[pos]]
            b = [c[key] for i, c in enumerate(theirs) if i % crops_per_image in range(crops_per_image)[pos]]
            if ks_statistic(a, b) > 1.95 * math.sqrt((len(a) + len(b)) / (len(a) * len(b))):  # alpha 0.001
                failures.append(f"{key} distribution")
    rates = {"flip": None, "gray": None, "blur": None, "solarize": None,
             "jitter": lambda c: int(bool(c["order"]))}
    for key, get in rates.items():
        get = get or (lambda c, key=key: c[key])
        # by kind of crop (blur and solarization probabilities differ between them)
        for kind, positions in (("global 1", {0}), ("global 2", {1}),
                                ("locals", set(range(2, crops_per_image)))):
            a = [get(c) for i, c in enumerate(ours) if i % crops_per_image in positions]
            b = [get(c) for i, c in enumerate(theirs) if i % crops_per_image in positions]
            pa, pb = sum(a) / len(a), sum(b) / len(b)
            pooled = (sum(a) + sum(b)) / (len(a) + len(b))
            se = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / len(a) + 1 / len(b)))
            if abs(pa - pb) / se > 3.3:  # two-proportion z-test, alpha 0.001
                failures.append(f"{key} rate ({kind})")
    for name, draws in (("ours", ours), ("PIL", theirs)):
        orders = [tuple(c["order"]) for c in draws if c["order"]]
        counts = Counter(orders)
        expected = len(orders) / 24
        chi2 = sum((counts.get(p, 0) - expected) ** 2 / expected
                   for p in itertools.permutations(range(4)))
        if chi2 > 49.7:  # chi-square, 23 degrees of freedom, p = 0.001
            failures.append(f"jitter orders not uniform ({name})")
        same = [a == b for a, b in zip(orders, orders[1:])]
        if sum(same) / max(len(same), 1) > 1 / 24 + 3.3 * math.sqrt((1 / 24) / max(len(same), 1)):
            failures.append(f"jitter order shared between crops ({name})")
    return failures


@pytest.fixture(scope="module")
def draw_images(small_photos) -> list[Image.Image]:
    return small_photos * 56  # 840 images x 12 crops = 10,080 crops


@pytest.fixture(scope="module")
def pil_draws(draw_images) -> list[dict]:
    """What the PIL path draws for the images, seeds independent of the plan's below."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        pil = data.DataAugmentationMaSSL(*SCALES, 10, 16, 8)
        seeds = range(10 ** 6, 10 ** 6 + len(draw_images))
        return PILRecorder(monkeypatch).run(pil, draw_images, seeds)


@pytest.fixture(scope="module")
def plan_draws_840(draw_images) -> list[dict]:
    return plan_draws(da.MultiCropPlan(*SCALES, 10, 16, 8), draw_images, range(len(draw_images)))


def test_draw_distributions_match_the_pil_path(plan_draws_840, pil_draws):
    assert len(plan_draws_840) == len(pil_draws) >= 10_000
    assert draw_differences(plan_draws_840, pil_draws, 12) == []


def test_the_distribution_test_fails_on_real_differences(draw_images, plan_draws_840, pil_draws):
    """A wrong probability, a missing op, an order shared across the batch and a wrong crop
    scale are each caught."""
    rng = np.random.default_rng(0)
    wrong_p = [{**c, "gray": c["gray"] or int(rng.random() < 0.0625)} for c in plan_draws_840]
    assert "gray rate (locals)" in draw_differences(wrong_p, pil_draws, 12)  # 0.25, not 0.2

    no_solarize = [{**c, "solarize": 0} for c in plan_draws_840]
    assert draw_differences(no_solarize, pil_draws, 12) == ["solarize rate (global 2)"]

    first = next(c["order"] for c in plan_draws_840 if c["order"])
    shared = [{**c, "order": first if c["order"] else []} for c in plan_draws_840]
    assert "jitter order shared between crops (ours)" in draw_differences(shared, pil_draws, 12)

    images = draw_images[:240]
    wrong_scale = plan_draws(da.MultiCropPlan((0.4, 1.0), SCALES[1], 10, 16, 8), images,
                             range(len(images)))
    assert draw_differences(wrong_scale, pil_draws, 12) == ["area distribution"]


def channel_stats(crops: list[torch.Tensor]) -> torch.Tensor:
    """``(N, 2, 3)``: each crop's per-channel mean and std."""
    return torch.stack([torch.stack([c.flatten(1).mean(1), c.flatten(1).std(1)]) for c in crops])


def test_output_channel_statistics_match_the_pil_path(small_photos):
    """Per-channel mean and std of 10,080 output crops (half each path, independent seeds)."""
    images = small_photos * 28  # 420 images x 12 crops per path
    pil = data.DataAugmentationMaSSL(*SCALES, 10, 16, 8)
    pil_crops = []
    for seed, image in enumerate(images):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pil_crops.extend(pil(image))
    plan = da.MultiCropPlan(*SCALES, 10, 16, 8)
    device = da.DeviceMultiCrop(plan.crop_sizes, utils.IMAGENET_MEAN, utils.IMAGENET_STD, "cpu")
    samples = []
    for seed, image in enumerate(images, start=10 ** 6):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            samples.append((plan(image), 0))
    device_crops = [c for batch in device(da.collate_plans(samples)[0]) for c in batch]
    ours, theirs = channel_stats(device_crops), channel_stats(pil_crops)
    assert len(ours) + len(theirs) >= 10_000
    limit = 1.95 * math.sqrt(2 / len(ours))  # KS at alpha = 0.001
    for stat in (0, 1):
        for channel in range(3):
            d = ks_statistic(ours[:, stat, channel].tolist(), theirs[:, stat, channel].tolist())
            assert d < limit, (stat, channel, d, limit)


# --------------------------------------------------------------------------- training
# (a run with --augment_on device is the workers run, bit for bit, and resumes exactly:
# tests/test_main_massl.py, next to the reference run it is compared with)


from test_main_massl import _write_bad_image, run_main, small_args  # noqa: E402

_ = small_args  # a fixture used below


def test_an_image_gets_the_same_crops_on_one_or_two_processes(fmnist_folder):
    """The sampler keys an image's draws by (seed, epoch, image): ranks split the images but
    each image's plan, and so its crops, are the ones a single process makes."""
    plan = da.MultiCropPlan(*SCALES, 2, 16, 8)
    dataset = data.build_pretrain_dataset(str(fmnist_folder / "train"), plan)
    keys = {}
    for world in (1, 2):
        for rank in range(world):
            sampler = data.PretrainSampler(dataset, world, rank, seed=3,
                                           samples_per_epoch=len(dataset) // world,
                                           step_samples=1)
            sampler.set_epoch(2)
            for seed, index in sampler:
                keys.setdefault(index, set()).add(seed)
    assert all(len(seeds) == 1 for seeds in keys.values())
    index = next(iter(keys))
    (pixels, first), _ = dataset[(next(iter(keys[index])), index)]
    (_, again), _ = dataset[(next(iter(keys[index])), index)]
    assert torch.equal(first, again)


def test_bad_flag_and_bad_images_on_the_device_path(small_args, tiny_data, tmp_path, capsys):
    import shutil
    code, _, err = run_main(small_args(tiny_data, "--augment_on", "gpu"), capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: --augment_on must be workers or device, got 'gpu'"]
    bad = tmp_path / "data"
    shutil.copytree(tiny_data, bad)
    _write_bad_image(bad / "trouser" / "zz_broken.png")
    code, _, err = run_main(small_args(bad, "--augment_on", "device"), capsys)
    assert code == 2 and re.match(r"error: cannot read image .*zz_broken\.png", err), err
    code, _, err = run_main(small_args(bad, "--augment_on", "device", "--skip_bad_images", "true"),
                            capsys)
    assert code == 0 and "zz_broken.png" in err
