"""hubconf's URL cache: keyed by the whole URL, torch.hub's SHA-256 file-name check, and a
clear message for a URL that names a folder. file:// URLs take the download path offline."""
import hashlib
import shutil

import pytest
import torch

import vision_transformer as vits


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
