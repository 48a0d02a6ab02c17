"""ViT backbone: timm key compatibility, any input size, attention maps; head and wrapper."""
import pytest
import timm
import torch

import vision_transformer as vits
from vision_transformer import MaSSLHead, MultiCropWrapper, UnknownArchError, build_backbone


def test_state_dict_loads_strict_into_timm_and_gives_same_features():
    torch.manual_seed(0)
    ours = vits.vit_small(patch_size=16).eval()
    theirs = timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=False).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
    expected_prefixes = {"cls_token", "pos_embed", "patch_embed", "blocks", "norm"}
    assert {k.split(".")[0] for k in ours.state_dict()} == expected_prefixes
    assert "blocks.11.attn.qkv.weight" in ours.state_dict()
    assert "blocks.0.mlp.fc2.bias" in ours.state_dict()


@pytest.mark.parametrize("name,dim", [("vit_nano", 128), ("vit_tiny", 192), ("vit_small", 384),
                                      ("vit_base", 768), ("vit_large", 1024)])
def test_arch_sizes(name, dim):
    model, feat_dim = build_backbone(name, patch_size=16)
    assert feat_dim == dim == model.embed_dim


@pytest.mark.parametrize("size", [96, 224, 480])
def test_any_input_size_via_pos_embed_interpolation(size):
    model = vits.vit_tiny(patch_size=16).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 192)
    assert torch.isfinite(out).all()


def test_interpolated_pos_embed_differs_from_native():
    # 96 px must use a resampled 6x6 grid, not silently crop the 14x14 one.
    model = vits.vit_tiny(patch_size=16)
    tokens = model._tokens(torch.zeros(1, 3, 96, 96))
    assert tokens.shape == (1, 1 + 36, 192)


def test_unsupported_token_layouts_are_refused():
    # DINO's interpolation keeps exactly one prefix (CLS) embedding in front of the grid.
    for kwargs in ({"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"},
                   {"no_embed_class": True}):
        with pytest.raises(ValueError, match="CLS token"):
            vits.vit_pico(patch_size=4, img_size=28, **kwargs)


def test_attention_map_shape_and_rows_sum_to_one():
    model = vits.vit_nano(patch_size=8, img_size=64).eval()
    with torch.no_grad():
        attn = model.get_last_selfattention(torch.randn(2, 3, 64, 48))
    assert attn.shape == (2, 4, 1 + 8 * 6, 1 + 8 * 6)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 49))


def test_attention_map_matches_the_sdpa_forward():
    # Recompute the last block's output from the returned attention map and compare with
    # the fused (SDPA) path: both must describe the same attention.
    torch.manual_seed(0)
    model = vits.vit_nano(patch_size=8, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        attn = model.get_last_selfattention(x)
        tokens = model._tokens(x)
        for blk in model.blocks[:-1]:
            tokens = blk(tokens)
        last = model.blocks[-1]
        B, N, C = tokens.shape
        h = last.norm1(tokens)
        v = last.attn.qkv(h).reshape(B, N, 3, 4, C // 4)[:, :, 2].transpose(1, 2)
        manual = (attn @ v).transpose(1, 2).reshape(B, N, C)
        manual = tokens + last.attn.proj(manual)
        manual = manual + last.mlp(last.norm2(manual))
        torch.testing.assert_close(model.norm(manual)[:, 0], model(x), rtol=1e-4, atol=1e-5)


def test_get_intermediate_layers_returns_normed_tokens_of_last_blocks():
    model = vits.vit_nano(patch_size=8, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = model.get_intermediate_layers(x, n=4)
        assert len(outs) == 4 and outs[0].shape == (2, 17, 128)
        torch.testing.assert_close(outs[-1][:, 0], model(x))


def test_drop_path_is_active_in_train_mode_only():
    model = vits.vit_nano(patch_size=8, img_size=32, drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_timm_arch_is_accepted_and_unknown_arch_is_refused():
    model, dim = build_backbone("resnet18")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, dim)
    with pytest.raises(UnknownArchError, match="unknown --arch 'vit_gigantic_typo'"):
        build_backbone("vit_gigantic_typo")


def test_head_outputs_unit_vectors_with_the_spec_layers():
    head = MaSSLHead(384)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(384, 2048), (2048, 2048), (2048, 256)]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules())
    out = head(torch.randn(5, 384))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in MaSSLHead(8, use_bn=True).modules()) == 2


def test_multicrop_wrapper_groups_resolutions_and_keeps_crop_order():
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    wrapper = MultiCropWrapper(Spy(), torch.nn.Identity())
    crops = [torch.full((2, 3, 8, 8), float(i)) for i in range(2)]
    crops += [torch.full((2, 3, 4, 4), float(i)) for i in range(2, 5)]
    out = wrapper(crops)
    assert calls == [(4, 3, 8, 8), (6, 3, 4, 4)]
    assert out[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
