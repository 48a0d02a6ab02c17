"""data.py: dataset layouts (flat or class folders, symlink loops) read by one rule for what
an image is, in training and in evaluation."""
from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager

import pytest

import eval_knn
from faults import PICO, one_error_line
from test_main_massl import run_main


# --------------------------------------------------------------------------- dataset layouts


def test_eval_layout_as_pretraining_data_is_refused(fmnist_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_main(PICO + ["--batch_size_per_gpu", "16", "--data_path", str(fmnist_folder),
                                    "--output_dir", str(out)], capsys)
    assert code == 2
    line = one_error_line(err)
    assert "train/ and val/" in line and f"--data_path {fmnist_folder / 'train'}" in line, line
    assert not out.exists()


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the test run) when the block takes longer than ``seconds``."""
    def expire(signum, frame):
        raise AssertionError(f"still running after {seconds} s (hung)")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM")
@pytest.mark.parametrize("links", [["self"], ["a", "b"]], ids=["one loop", "two loops"])
def test_symlink_loops_neither_multiply_the_data_nor_hang(flat50, tmp_path, links):
    import data

    root = tmp_path / "data"
    shutil.copytree(flat50, root)
    for name in links:
        os.symlink(".", root / name, target_is_directory=True)
    with deadline(60):
        dataset = data.build_pretrain_dataset(str(root), transform=None)
    assert len(dataset) == 50 and dataset.classes == []
    assert len({os.path.realpath(p) for p, _ in dataset.samples}) == 50


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM")
def test_symlink_loops_in_class_folders_for_training_and_evaluation(flat50, tmp_path):
    import data
    import evaluation

    root = tmp_path / "data"
    for i, png in enumerate(sorted(flat50.iterdir())):
        cls = root / "train" / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, cls / png.name)
    shutil.copytree(root / "train", root / "val")
    for split in ("train", "val"):
        os.symlink("..", root / split / "a" / "up", target_is_directory=True)
        os.symlink(".", root / split / "b" / "again", target_is_directory=True)
    with deadline(60):
        pretrain = data.build_pretrain_dataset(str(root / "train"), transform=None)
        train, val = evaluation.build_train_val(str(root), None, None)
    assert (len(pretrain), len(train), len(val)) == (50, 50, 50)
    assert pretrain.classes == train.classes == ["a", "b"]
    assert [t for _, t in train.samples] == [0] * 25 + [1] * 25


def test_eval_and_training_use_one_rule_for_images(tmp_path, flat50):
    import data
    import evaluation

    for split in ("train", "val"):
        for i, png in enumerate(sorted(flat50.iterdir())[:8]):
            cls = tmp_path / split / ("a" if i % 2 else "b")
            cls.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, cls / png.name)
        # macOS resource forks and a notebook's checkpoint folder: never images
        (tmp_path / split / "a" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        hidden = tmp_path / split / "a" / ".ipynb_checkpoints"
        hidden.mkdir()
        shutil.copy(sorted(flat50.iterdir())[0], hidden / "copy.png")
    pretrain = data.build_pretrain_dataset(str(tmp_path / "train"), transform=None)
    train, _ = evaluation.build_train_val(str(tmp_path), None, None)
    assert sorted(p for p, _ in train.samples) == sorted(p for p, _ in pretrain.samples)
    assert len(train) == 8

    args = eval_knn.get_args_parser().parse_args([
        "--data_path", str(tmp_path), "--arch", "vit_pico", "--patch_size", "7",
        "--resize_size", "28", "--crop_size", "28", "--num_workers", "0", "--nb_knn", "3",
        "--output_dir", str(tmp_path / "knn")])
    results = eval_knn.main(args)
    assert (results["num_train"], results["num_val"]) == (8, 8)
