"""Shared helpers: schedules, atomic saves, image loading, distributed set-up without a launcher."""
import os

import numpy as np
import pytest
import torch

import distributed
import images
import storage
import utils


def test_cosine_scheduler_warmup_then_cosine():
    s = utils.cosine_scheduler(1.0, 0.1, epochs=4, niter_per_ep=5, warmup_epochs=1, start_warmup_value=0.0)
    assert len(s) == 20
    np.testing.assert_allclose(s[:5], [0.0, 0.2, 0.4, 0.6, 0.8])
    assert s[5] == pytest.approx(1.0)
    assert s[-1] == pytest.approx(0.1, abs=0.01)
    assert np.all(np.diff(s[5:]) <= 0)


def test_cosine_scheduler_without_warmup_is_constant_when_equal():
    np.testing.assert_allclose(utils.cosine_scheduler(0.5, 0.5, 3, 2), np.full(6, 0.5))


def test_resolve_device_is_the_one_reading_of_the_device_flag(monkeypatch):
    """Training, evaluation, the quick start and the benchmarks read --device through here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert utils.resolve_device(None) == torch.device("cpu")
    assert utils.resolve_device("auto") == torch.device("cpu")
    assert utils.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(utils.UserError, match=r"--device cuda:1, but CUDA is not available here"):
        utils.resolve_device("cuda:1")
    with pytest.raises(utils.UserError, match=r"--device must be cpu or cuda, got 'meta'"):
        utils.resolve_device("meta")
    with pytest.raises(utils.UserError, match=r"^--device gpu: "):
        utils.resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert utils.resolve_device(None) == torch.device("cuda")
    assert utils.resolve_device("cuda:1") == torch.device("cuda", 1)


def test_save_atomic_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pth"
    storage.save_atomic({"a": torch.ones(2)}, path)
    assert torch.load(path, weights_only=True)["a"].sum() == 2

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        storage.save_atomic({"a": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["a"].sum() == 2  # the old one survived
    assert os.listdir(tmp_path) == ["ckpt.pth"]


def test_load_rgb_image_names_the_bad_file(tmp_path, fmnist_folder):
    good = next((fmnist_folder / "train").rglob("*.png"))
    assert images.load_rgb_image(str(good)).mode == "RGB"
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(images.BadImageError, match="broken.jpg"):
        images.load_rgb_image(str(bad))


def test_init_distributed_single_process_needs_no_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                 "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    env = distributed.init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    assert not distributed.is_dist()
    assert distributed.all_reduce_mean(3.0, env.device) == 3.0


def test_init_distributed_reads_slurm_variables_and_asks_for_a_master(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(utils.UserError, match="MASTER_ADDR"):
        distributed.init_distributed(device="cpu")
