"""visualize_correspondence.py (mutual nearest neighbours), visualize_attention.py's all-heads
picture and visualize_features.py (t-SNE) on hand-made inputs and real images."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import visualize_attention
import visualize_correspondence as vc
from test_eval import assert_clean_exit, run_in_process
from test_eval_protocols import PICO

PICO_BACKBONE = ["--arch", "vit_pico", "--patch_size", "7"]


# --------------------------------------------------------------------------- correspondence


def test_mutual_nearest_neighbours_on_hand_made_tokens():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [1.0, 0.1], [-1.0, 0.0]])
    # Cosines: a0 -> (0, .995, -1), a1 -> (1, .0995, 0), a2 -> (.707, .774, -.707).
    # a0 <-> b1 and a1 <-> b0 are mutual; a2's nearest is b1, whose nearest is a0: no match;
    # b2's nearest is a1, whose nearest is b0: no match. Most similar first.
    idx_a, idx_b, sims = vc.mutual_nearest_neighbours(a, b)
    assert idx_a.tolist() == [1, 0] and idx_b.tolist() == [0, 1]
    assert sims.tolist() == pytest.approx([1.0, 1 / math.sqrt(1.01)])
    # The same tokens match themselves one to one, each with similarity 1.
    idx_a, idx_b, sims = vc.mutual_nearest_neighbours(a, a)
    assert sorted(zip(idx_a.tolist(), idx_b.tolist())) == [(0, 0), (1, 1), (2, 2)]
    assert sims.tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_correspondence_script_draws_one_png_from_views_or_two_images(repo_root, fmnist_folder,
                                                                        tmp_path):
    images = sorted((fmnist_folder / "val").rglob("*.png"))
    code, out, err = run_in_process(repo_root, "visualize_correspondence.py", *PICO_BACKBONE,
                                    "--image_path", images[0], "--image_size", "28",
                                    "--n_matches", "5", "--display_size", "112",
                                    "--output_dir", tmp_path / "views")
    assert code == 0, err
    assert "16 patches per view" in out and "5 most similar drawn" in out
    picture = Image.open(tmp_path / "views" / vc.OUTPUT_FILE)
    # Two 28-px views enlarged 4x (112 px) with a 7-px gap between them.
    assert picture.size == (2 * 112 + 7, 112)
    code, out, err = run_in_process(repo_root, "visualize_correspondence.py", *PICO_BACKBONE,
                                    "--image_path", images[0], images[1], "--image_size", "30",
                                    "--output_dir", tmp_path / "pair")
    assert code == 0, err
    assert Image.open(tmp_path / "pair" / vc.OUTPUT_FILE).size[1] == 28 * 10  # 30 -> 28, x10


def test_correspondence_bad_input(repo_root, fmnist_folder, tmp_path):
    image = next((fmnist_folder / "val").rglob("*.png"))
    out = ["--output_dir", tmp_path]
    assert_clean_exit(run_in_process(repo_root, "visualize_correspondence.py", *PICO_BACKBONE,
                                     "--image_path", image, image, image, *out), "one or two")
    assert_clean_exit(run_in_process(repo_root, "visualize_correspondence.py", *PICO_BACKBONE,
                                     "--image_path", image, "--image_size", "5", *out), "--image_size")
    assert_clean_exit(run_in_process(repo_root, "visualize_correspondence.py", *PICO_BACKBONE,
                                     "--image_path", tmp_path / "none.png", *out), "none.png")


# --------------------------------------------------------------------------- attention, all heads


def test_heads_in_colour_paints_each_pixel_in_its_strongest_head():
    rgb = np.array([[[200.0, 100.0, 0.0]] * 3])  # grey level 100 everywhere
    # Head 0 peaks at pixel 0 (2 -> scaled 1), head 1 at pixel 1 (4 -> 1); pixel 2: head 0
    # scaled 0.5 beats head 1's 0.25; nobody attends to nothing.
    heat = np.array([[[2.0, 0.0, 1.0]], [[0.0, 4.0, 1.0]]])
    colours = visualize_attention.distinct_colours(2)
    assert not np.allclose(colours[0], colours[1])
    out = visualize_attention.heads_in_colour(rgb, heat, alpha=0.5)
    np.testing.assert_allclose(out[0, 0], 0.5 * 100 + 0.5 * colours[0])
    np.testing.assert_allclose(out[0, 1], 0.5 * 100 + 0.5 * colours[1])
    np.testing.assert_allclose(out[0, 2], 0.75 * 100 + 0.25 * colours[0])
    zero = visualize_attention.heads_in_colour(rgb, np.zeros((2, 1, 3)))
    np.testing.assert_allclose(zero, 100.0)  # no attention: the grey image


# --------------------------------------------------------------------------- t-SNE


def test_features_script_writes_a_tsne_png(repo_root, fmnist_folder, tmp_path):
    pytest.importorskip("sklearn")
    code, out, err = run_in_process(repo_root, "visualize_features.py", "--data_path",
                                    fmnist_folder / "val", *PICO, "--max_images", "60",
                                    "--perplexity", "10", "--output_dir", tmp_path)
    assert code == 0, err
    assert "features of 60 images of 10 classes" in out
    picture = Image.open(tmp_path / "tsne.png")
    assert picture.size[0] > 200 and picture.format == "PNG"


def test_features_script_without_scikit_learn_says_how_to_install(repo_root, fmnist_folder,
                                                                   tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    assert_clean_exit(run_in_process(repo_root, "visualize_features.py", "--data_path",
                                     fmnist_folder / "val", *PICO, "--output_dir", tmp_path),
                      "pip install scikit-learn")


def test_features_script_bad_input(repo_root, fmnist_folder, tmp_path):
    pytest.importorskip("sklearn")
    out = ["--output_dir", tmp_path]
    assert_clean_exit(run_in_process(repo_root, "visualize_features.py", "--data_path",
                                     tmp_path / "none", *PICO, *out), "--data_path", "not a folder")
    assert_clean_exit(run_in_process(repo_root, "visualize_features.py", "--data_path",
                                     fmnist_folder / "val", *PICO, "--max_images", "20",
                                     "--perplexity", "30", *out), "--perplexity", "20")
