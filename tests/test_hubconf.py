"""hubconf.py: the entry points load our checkpoints and exports with the teacher's features,
offline; the URL cache is keyed by the whole URL, with torch.hub's SHA-256 file-name check and a
clear message for a URL that names a folder. file:// URLs take the download path offline."""
import hashlib
import importlib.util
import shutil
import sys
import types

import pytest
import torch

import export
import utils
import vision_transformer as vits
from fabricated import features, fmnist_batch


def tiny_weights(path, seed):
    torch.manual_seed(seed)
    model, _ = vits.build_backbone("vit_tiny", 16, img_size=32)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.state_dict()


def hub(repo_root, url, **kwargs):
    return torch.hub.load(str(repo_root), "massl_vitt16", source="local", pretrained=url,
                          progress=False, **kwargs)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def test_two_urls_with_the_same_file_name_get_their_own_weights(repo_root, tmp_path, torch_home,
                                                                no_network):
    a = tiny_weights(tmp_path / "a" / "model.pth", seed=1)
    b = tiny_weights(tmp_path / "b" / "model.pth", seed=2)
    got_a = hub(repo_root, (tmp_path / "a" / "model.pth").as_uri()).state_dict()
    got_b = hub(repo_root, (tmp_path / "b" / "model.pth").as_uri()).state_dict()
    assert torch.equal(got_a["cls_token"], a["cls_token"])
    assert torch.equal(got_b["cls_token"], b["cls_token"])
    assert len(list(torch_home.glob("hub/checkpoints/massl-*/model.pth"))) == 2


def test_a_sha256_prefix_in_the_file_name_is_checked(repo_root, tmp_path, torch_home, no_network):
    plain = tmp_path / "w.pth"
    weights = tiny_weights(plain, seed=3)
    digest = hashlib.sha256(plain.read_bytes()).hexdigest()
    good = tmp_path / f"massl_vitt16-{digest[:8]}.pth"
    shutil.copy(plain, good)
    assert torch.equal(hub(repo_root, good.as_uri()).state_dict()["cls_token"], weights["cls_token"])
    wrong = "0" * 8 if not digest.startswith("0" * 8) else "1" * 8
    bad = tmp_path / f"massl_vitt16-{wrong}.pth"
    shutil.copy(plain, bad)
    with pytest.raises(ValueError, match="SHA-256 does not start with"):
        hub(repo_root, bad.as_uri())
    assert not list(torch_home.glob(f"hub/checkpoints/massl-*/{bad.name}"))  # nothing cached
    with pytest.raises(ValueError, match="carries no SHA-256 prefix"):
        hub(repo_root, plain.as_uri(), check_hash=True)


def test_a_url_ending_in_a_slash_says_to_name_the_file(repo_root, torch_home, no_network):
    with pytest.raises(ValueError, match="ends in '/'"):
        hub(repo_root, "https://example.org/weights/")


# --------------------------------------------------------------------------- torch.hub entry points


def test_hub_loads_our_checkpoint_and_gives_the_teachers_features(
        vits16_checkpoint, repo_root, fmnist_folder, no_network):
    ckpt_path, teacher = vits16_checkpoint
    model = torch.hub.load(str(repo_root), "massl_vits16", source="local",
                           pretrained=str(ckpt_path))
    x = fmnist_batch(fmnist_folder, 224)
    torch.testing.assert_close(features(model, x), features(teacher, x))
    # Any input size (position embeddings are resampled on the fly).
    assert features(model, fmnist_batch(fmnist_folder, 96)).shape == (2, 384)


def test_hub_loads_an_exported_file_from_a_url(vitt16_checkpoint, repo_root, tmp_path,
                                               monkeypatch, fmnist_folder):
    # A file:// URL takes the download path (cache in torch.hub's dir) without a network.
    # The checkpoint was trained on 64 px crops: the model gets its 4x4 position grid.
    ckpt_path, teacher = vitt16_checkpoint
    exported = tmp_path / "published" / "massl_vitt16.pth"
    export.export(str(ckpt_path), str(exported))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    model = torch.hub.load(str(repo_root), "massl_vitt16", source="local",
                           pretrained=exported.as_uri(), progress=False)
    assert len(list((tmp_path / "torch_home" / "hub" / "checkpoints").glob(f"massl-*/{exported.name}"))) == 1
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 192)
    x = fmnist_batch(fmnist_folder, 64)
    torch.testing.assert_close(features(model, x), features(teacher, x))


def test_hub_without_weights_is_random_and_offline(repo_root, no_network):
    a = torch.hub.load(str(repo_root), "massl_vitt16", source="local", pretrained=None)
    b = torch.hub.load(str(repo_root), "massl_vitt16", source="local")
    assert a.embed_dim == 192 and a.patch_embed.patch_size == (16, 16)
    assert a.pos_embed.shape == (1, 1 + 14 * 14, 192)  # 224 px grid without a checkpoint
    assert not torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="path or URL"):
        torch.hub.load(str(repo_root), "massl_vits16", source="local", pretrained=True)


def test_hubconf_lists_only_the_entry_points(repo_root):
    spec = importlib.util.spec_from_file_location("hubconf_listed", repo_root / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    public = sorted(n for n in dir(hub) if callable(getattr(hub, n)) and not n.startswith("_"))
    assert public == ["massl_vitb16", "massl_vitl16", "massl_vits16", "massl_vitt16"]
    assert hub.dependencies == ["torch", "timm"]


def test_hub_refuses_a_checkpoint_of_another_arch(nano_checkpoint, repo_root):
    ckpt_path, _ = nano_checkpoint  # vit_nano, patch 4
    with pytest.raises(utils.UserError, match="missing keys|shape mismatches"):
        torch.hub.load(str(repo_root), "massl_vitt16", source="local", pretrained=str(ckpt_path))


def test_hub_drop_path_keeps_the_weights(vitt16_checkpoint, repo_root):
    ckpt_path, teacher = vitt16_checkpoint
    model = torch.hub.load(str(repo_root), "massl_vitt16", source="local",
                           pretrained=str(ckpt_path), drop_path_rate=0.1)
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    torch.testing.assert_close(model.state_dict(), teacher.state_dict())


def test_hub_is_not_confused_by_the_callers_own_utils_module(repo_root, monkeypatch,
                                                            nano_checkpoint):
    # A project calling torch.hub usually has a utils.py of its own already imported.
    theirs = types.ModuleType("utils")
    theirs.__file__ = "/their/project/utils.py"
    monkeypatch.setitem(sys.modules, "utils", theirs)
    monkeypatch.delitem(sys.modules, "vision_transformer")
    model = torch.hub.load(str(repo_root), "massl_vitt16", source="local", pretrained=None)
    assert model.embed_dim == 192
    assert sys.modules["utils"] is theirs  # given back untouched
    assert "vision_transformer" not in sys.modules  # ours does not linger under a generic name
