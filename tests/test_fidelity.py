"""The training network and augmentation are the authors' (DINO's): checked against literal
references written here from the formulas (docs/method.md; massl-method.md, "Network and
augmentation details").

* Position embeddings at another grid: DINO's ``interpolate_pos_encoding``, i.e. PyTorch's
  bicubic resize (Keys' cubic, A = -0.75, borders clamped, align_corners=False) driven by
  the scale factors ((rows + 0.1) / n, (cols + 0.1) / n), CLS embedding kept.
* Initialisation: trunc-normal std 0.02 (pos_embed, cls_token, Linear weights), zero
  biases, LayerNorm 1/0, PyTorch's default Conv2d init for the patch embedding.
* Blur: PIL's ``ImageFilter.GaussianBlur(radius=sigma)``, sigma ~ U(0.1, 2), p 1.0 / 0.1 /
  0.5; tensors as ``ToTensor`` + ``Normalize``.
"""
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageFilter
from timm.layers import resample_abs_pos_embed
from torchvision import transforms

import checkpoints
import data
import images
import utils
import vision_transformer as vits

# --------------------------------------------------------------------------- position embeddings


def keys_cubic(t: float, a: float = -0.75) -> list[float]:
    """Weights of the 4 neighbours (offsets -1, 0, 1, 2) at fractional position t."""
    def near(x):  # |x| <= 1
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1

    def far(x):  # 1 < |x| < 2
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def resize_matrix(n_in: int, n_out: int, scale_factor: float) -> torch.Tensor:
    """(n_out, n_in) matrix of a 1-D bicubic resize whose sampling positions come from the
    scale factor: output j reads input position (j + 0.5) / scale_factor - 0.5."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for j in range(n_out):
        src = (j + 0.5) / scale_factor - 0.5
        i0 = math.floor(src)
        for k, w in enumerate(keys_cubic(src - i0)):
            m[j, min(max(i0 - 1 + k, 0), n_in - 1)] += w
    return m


def dino_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Literal DINO interpolation: CLS kept, the n x n grid resized row-wise by
    (rows + 0.1) / n and column-wise by (cols + 0.1) / n."""
    n = math.isqrt(pos_embed.shape[1] - 1)
    grid = pos_embed[0, 1:].reshape(n, n, -1).double()
    r = resize_matrix(n, rows, (rows + 0.1) / n)
    c = resize_matrix(n, cols, (cols + 0.1) / n)
    resized = torch.einsum("in,nmd,jm->ijd", r, grid, c).reshape(1, rows * cols, -1)
    return torch.cat([pos_embed[:, :1].double(), resized], dim=1)


@pytest.mark.parametrize("rows,cols", [(6, 6), (4, 6), (6, 4), (10, 10), (3, 11), (20, 20)])
def test_pos_embed_interpolation_is_dinos(rows, cols):
    g = torch.Generator().manual_seed(rows * 100 + cols)
    pos_embed = torch.randn(1, 1 + 14 * 14, 8, generator=g, dtype=torch.float64)
    ours = vits.interpolate_pos_embed(pos_embed, (rows, cols))
    assert ours.shape == (1, 1 + rows * cols, 8)
    torch.testing.assert_close(ours, dino_pos_embed(pos_embed, rows, cols), rtol=0, atol=1e-12)
    # timm's exact-size antialiased resampling is another embedding: the reference tells them apart.
    theirs = resample_abs_pos_embed(pos_embed, new_size=(rows, cols), old_size=(14, 14),
                                    num_prefix_tokens=1)
    assert (theirs - ours).norm() > 0.05 * ours.norm()


def test_pos_embed_rows_and_columns_are_not_swapped():
    # A grid whose embedding is its row index (channel 0) and column index (channel 1):
    # after any resize, channel 0 must vary down the rows only and channel 1 along them.
    n = 14
    rows_idx, cols_idx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    grid = torch.stack([rows_idx, cols_idx], dim=-1).double().reshape(1, n * n, 2)
    pos_embed = torch.cat([torch.zeros(1, 1, 2, dtype=torch.float64), grid], dim=1)
    out = vits.interpolate_pos_embed(pos_embed, (4, 9))[0, 1:].reshape(4, 9, 2)
    assert torch.allclose(out[:, :1, 0], out[:, :, 0]) and not torch.allclose(out[:1, :, 0], out[:, :, 0])
    assert torch.allclose(out[:1, :, 1], out[:, :, 1]) and not torch.allclose(out[:, :1, 1], out[:, :, 1])
    torch.testing.assert_close(out, dino_pos_embed(pos_embed, 4, 9)[0, 1:].reshape(4, 9, 2))


def test_native_grid_keeps_pos_embed_unchanged():
    pos_embed = torch.randn(1, 1 + 7 * 7, 4)
    assert vits.interpolate_pos_embed(pos_embed, (7, 7)) is pos_embed


@pytest.mark.parametrize("height,width", [(24, 24), (16, 24), (40, 40), (56, 56)])
def test_vit_tokens_use_dinos_embedding_at_every_size(height, width):
    # vit_pico with a 14 x 14 native grid (56 px, patch 4); 56 px is the native size.
    torch.manual_seed(0)
    model = vits.vit_pico(patch_size=4, img_size=56).double()
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    rows, cols = height // 4, width // 4
    patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    expected = torch.cat([model.cls_token.expand(2, -1, -1), patches], dim=1)
    if (rows, cols) == (14, 14):
        expected = expected + model.pos_embed
    else:
        expected = expected + dino_pos_embed(model.pos_embed, rows, cols)
    torch.testing.assert_close(model._tokens(x), expected, rtol=0, atol=1e-12)


def test_features_equal_timms_at_native_size_and_dinos_elsewhere():
    # At the native grid, timm (strict load) gives our features. At a 6 x 4 grid our network
    # is timm's at that native size with DINO's interpolated embedding in its state dict.
    torch.manual_seed(0)
    ours = vits.vit_pico(patch_size=4, img_size=28).eval()
    dims = dict(patch_size=4, embed_dim=128, depth=4, num_heads=4, num_classes=0)
    theirs = timm.models.VisionTransformer(img_size=28, **dims).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)
        state = dict(ours.state_dict(), pos_embed=dino_pos_embed(ours.pos_embed, 6, 4).float())
        at_size = timm.models.VisionTransformer(img_size=(24, 16), **dims).eval()
        at_size.load_state_dict(state, strict=True)
        x = torch.randn(2, 3, 24, 16)
        torch.testing.assert_close(ours(x), at_size(x), rtol=1e-5, atol=1e-5)


def test_checkpoint_loaded_at_another_size_uses_dinos_interpolation(tmp_path):
    torch.manual_seed(0)
    backbone = vits.vit_nano(patch_size=4, img_size=28).eval()
    torch.save(backbone.state_dict(), tmp_path / "bare.pth")
    model, _, info = checkpoints.build_backbone_from_checkpoint(tmp_path / "bare.pth", img_size=40)
    assert info["img_size"] == 40
    expected = dino_pos_embed(backbone.pos_embed.detach(), 10, 10).float()
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=1e-6)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():  # same embedding as the on-the-fly one, so the same features
        torch.testing.assert_close(model.eval()(x), backbone(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- initialisation


def fraction_beyond(t: torch.Tensor, k: float) -> float:
    return (t.abs() > k * t.std()).double().mean().item()


def test_initialisation_is_dinos():
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16)
    normal = {"cls_token": model.cls_token, "pos_embed": model.pos_embed}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 12 * 4
    normal.update({f"linear{i}": m.weight for i, m in enumerate(linears)})
    for name, t in normal.items():
        t = t.detach().double()
        tol = 5 / math.sqrt(2 * t.numel())  # 5 standard errors of a sample std
        assert abs(t.std().item() / 0.02 - 1) < tol, name
        assert abs(t.mean().item()) < 5 * 0.02 / math.sqrt(t.numel()), name
        if t.numel() > 10_000:  # normal, not uniform: 4.55 % beyond 2 sigma (uniform: 0 %)
            assert fraction_beyond(t, 2) == pytest.approx(0.0455, abs=0.004), name
    for m in linears:
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1
    for m in norms:
        assert torch.equal(m.weight, torch.ones_like(m.weight)) and m.eps == 1e-6
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    # Patch embedding: PyTorch's default Conv2d init, uniform in +-1/sqrt(fan_in) for both.
    conv = model.patch_embed.proj
    bound = 1 / math.sqrt(3 * 16 * 16)
    for t in (conv.weight.detach(), conv.bias.detach()):
        assert t.abs().max() <= bound and t.abs().max() > 0.97 * bound
        assert t.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_initialisation_is_seeded_and_refuses_other_schemes():
    torch.manual_seed(1)
    a = vits.vit_pico(patch_size=4, img_size=28).state_dict()
    torch.manual_seed(1)
    b = vits.vit_pico(patch_size=4, img_size=28).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="DINO's initialisation"):
        vits.vit_pico(patch_size=4, img_size=28, weight_init="jax")


# --------------------------------------------------------------------------- augmentation


@pytest.fixture(scope="module")
def real_image(fmnist_folder):
    """A real Fashion-MNIST picture (RGB), upscaled to a local-crop size."""
    path = sorted((fmnist_folder / "train").rglob("*.png"))[3]
    return images.load_rgb_image(str(path)).resize((96, 96), Image.BICUBIC)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_blur_is_pils_gaussian_blur(real_image, sigma):
    blurred = data.RandomGaussianBlur(p=1.0, sigma=(sigma, sigma))(real_image)
    expected = real_image.filter(ImageFilter.GaussianBlur(radius=sigma))
    assert np.array_equal(np.asarray(blurred), np.asarray(expected))
    if sigma > 0.5:  # (PIL's radius 0.1 leaves an image as it is)
        assert not np.array_equal(np.asarray(blurred), np.asarray(real_image))


def test_blur_probability_and_sigma_distribution(monkeypatch):
    radii = []

    class Spy:
        def __init__(self, radius):
            radii.append(radius)

    monkeypatch.setattr(data.ImageFilter, "GaussianBlur", Spy)

    class Image_:
        def filter(self, f):
            return "blurred"

    torch.manual_seed(0)
    n = 4000
    applied = sum(data.RandomGaussianBlur(p=0.5)(Image_()) == "blurred" for _ in range(n))
    assert applied == len(radii) and applied / n == pytest.approx(0.5, abs=0.03)
    r = np.array(radii)
    assert r.min() >= 0.1 and r.max() <= 2.0
    # U(0.1, 2): quartiles at 0.575, 1.05, 1.525
    np.testing.assert_allclose(np.quantile(r, [0.25, 0.5, 0.75]), [0.575, 1.05, 1.525], atol=0.06)


def augmentation_steps(aug):
    return {name: list(getattr(aug, name).transforms)
            for name in ("global_transfo1", "global_transfo2", "local_transfo")}


def test_pipeline_blurs_pil_images_with_the_spec_probabilities():
    aug = data.DataAugmentationMaSSL((0.32, 1.0), (0.05, 0.32), 2, 32, 16)
    steps = augmentation_steps(aug)
    probabilities = {}
    for name, seq in steps.items():
        kinds = [type(t) for t in seq]
        blur = kinds.index(data.RandomGaussianBlur)
        assert blur < kinds.index(data.ToNormalizedTensor) == len(seq) - 1  # on the PIL image
        probabilities[name] = seq[blur].p
        assert seq[blur].sigma == (0.1, 2.0)
    assert probabilities == {"global_transfo1": 1.0, "global_transfo2": 0.1, "local_transfo": 0.5}
    solarize = [t for seq in steps.values() for t in seq if isinstance(t, transforms.RandomSolarize)]
    assert [(t.threshold, t.p) for t in solarize] == [(128, 0.2)]
    assert solarize[0] in steps["global_transfo2"]


def test_pipeline_steps_are_dinos(repo_root, monkeypatch):
    # Ours against the DINO pipeline of benchmarks/bench_data.py (written from DINO's
    # description): the same torchvision steps with the same parameters, in the same order.
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    from bench_data import DataAugmentationDINO, DinoGaussianBlur, DinoSolarization

    def flatten(seq):
        for t in seq:
            yield from flatten(t.transforms) if isinstance(t, transforms.Compose) else [t]

    def describe(t):
        if isinstance(t, (data.RandomGaussianBlur, DinoGaussianBlur)):
            return f"blur p={t.p}"
        if isinstance(t, (transforms.RandomSolarize, DinoSolarization)):
            return f"solarize p={t.p}"
        if isinstance(t, (transforms.ToTensor, transforms.Normalize, data.ToNormalizedTensor)):
            return "to normalized tensor"
        return repr(t)

    ours = augmentation_steps(data.DataAugmentationMaSSL((0.32, 1.0), (0.05, 0.32), 3))
    dino = augmentation_steps(DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3))
    for name in ours:
        mine = [describe(t) for t in flatten(ours[name])]
        theirs = [describe(t) for t in flatten(dino[name])]
        assert theirs[-2:] == ["to normalized tensor"] * 2
        assert mine == theirs[:-1], name


def test_tensor_conversion_is_totensor_then_normalize_bit_for_bit(real_image):
    reference = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)])
    ours = data.ToNormalizedTensor(utils.IMAGENET_MEAN, utils.IMAGENET_STD)
    every_value = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), -1)
    every_value = np.concatenate([every_value, every_value[..., :1]], -1).astype(np.uint8)
    for image in (real_image, Image.fromarray(every_value)):
        out = ours(image)
        assert out.dtype == torch.float32 and out.is_contiguous()
        assert torch.equal(out, reference(image))


def test_augmentation_is_seeded_by_torchs_generator(real_image):
    aug = data.DataAugmentationMaSSL((0.32, 1.0), (0.05, 0.32), 2, 32, 16)
    crops = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        crops.append(aug(real_image))
    assert [tuple(c.shape) for c in crops[0]] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert all(torch.equal(a, b) for a, b in zip(crops[0], crops[1]))
    assert not any(torch.equal(a, b) for a, b in zip(crops[0], crops[2]))


def test_photometric_probabilities_are_flags_with_the_authors_defaults():
    # Defaults: jitter 0.8 and grayscale 0.2 on every crop, solarization 0.2 on global crop 2.
    def probabilities(aug):
        found = {}
        for name, seq in augmentation_steps(aug).items():
            for t in seq:
                if isinstance(t, transforms.RandomApply):
                    assert isinstance(t.transforms[0], transforms.ColorJitter)
                    found[(name, "jitter")] = t.p
                elif isinstance(t, transforms.RandomGrayscale):
                    found[(name, "gray")] = t.p
                elif isinstance(t, transforms.RandomSolarize):
                    found[(name, "solarize")] = t.p
        return found

    default = probabilities(data.DataAugmentationMaSSL((0.32, 1.0), (0.05, 0.32), 2, 32, 16))
    crops = ("global_transfo1", "global_transfo2", "local_transfo")
    assert default == {**{(c, "jitter"): 0.8 for c in crops}, **{(c, "gray"): 0.2 for c in crops},
                       ("global_transfo2", "solarize"): 0.2}
    changed = probabilities(data.DataAugmentationMaSSL((0.32, 1.0), (0.05, 0.32), 2, 32, 16,
                                                       color_jitter_prob=0.5, grayscale_prob=0.0,
                                                       solarization_prob=1.0))
    assert changed == {**{(c, "jitter"): 0.5 for c in crops}, ("global_transfo2", "solarize"): 1.0}


def test_without_photometric_changes_views_differ_only_by_crop_flip_and_blur():
    # A flat grey image: crops, flips and blur leave it as it is; jitter/solarize would not.
    grey = Image.new("RGB", (40, 40), (200, 200, 200))
    expected = data.ToNormalizedTensor(utils.IMAGENET_MEAN, utils.IMAGENET_STD)(
        Image.new("RGB", (16, 16), (200, 200, 200)))
    off = data.DataAugmentationMaSSL((0.32, 1.0), (0.05, 0.32), 4, 16, 16, color_jitter_prob=0.0,
                                     grayscale_prob=0.0, solarization_prob=0.0)
    on = data.DataAugmentationMaSSL((0.32, 1.0), (0.05, 0.32), 4, 16, 16)
    torch.manual_seed(0)
    for _ in range(5):
        assert all(torch.allclose(c, expected, atol=1e-6) for c in off(grey))
    torch.manual_seed(0)
    assert not all(torch.allclose(c, expected, atol=1e-6) for _ in range(5) for c in on(grey))
