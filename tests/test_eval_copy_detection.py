"""eval_copy_detection.py: Holidays' AP from ranks against hand-computed cases, the Copydays
layout rules, and the script end to end on a tiny Copydays set built from real images."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import eval_copy_detection as cd
from test_eval import assert_clean_exit, run_in_process, run_script
from test_eval_protocols import PICO, supervised_pico

ORIGINALS = 12


# --------------------------------------------------------------------------- metric


def test_ap_from_ranks_on_hand_computed_rankings():
    # Positives at 0-based ranks 0 and 2 of 2: trapezoids (1 + 1)/2 and (1/2 + 2/3)/2, each
    # of width 1/2: AP = (1 + 7/12) / 2 = 19/24.
    assert cd.score_ap_from_ranks_1([0, 2], 2) == pytest.approx(19 / 24)
    # One positive at rank 3: (0/3 + 1/4)/2 = 1/8. A positive never retrieved adds nothing.
    assert cd.score_ap_from_ranks_1([3], 1) == pytest.approx(1 / 8)
    assert cd.score_ap_from_ranks_1([3], 2) == pytest.approx(1 / 16)
    assert cd.score_ap_from_ranks_1([], 1) == 0.0
    assert cd.score_ap_from_ranks_1([0, 1, 2], 3) == pytest.approx(1.0)


def test_map_ranks_by_similarity_and_stops_at_max_rank():
    # Query 0 ranks the database 2 0 1 3 with positives {0, 1}: ranks 1, 2 ->
    #   [(0/1 + 1/2)/2 + (1/2 + 2/3)/2] / 2 = (1/4 + 7/12) / 2 = 5/12.
    # Query 1 ranks 3 1 0 2 with positive {2}: rank 3 -> 1/8; with max_rank 2 it is unseen: 0.
    similarity = torch.tensor([[3.0, 2.0, 4.0, 1.0], [2.0, 3.0, 1.0, 4.0]])
    positives = [[0, 1], [2]]
    assert cd.mean_average_precision(similarity, positives, 0) == pytest.approx(100 * (5 / 12 + 1 / 8) / 2)
    assert cd.mean_average_precision(similarity, positives, 20) == pytest.approx(100 * (5 / 12 + 1 / 8) / 2)
    # Top 2 only: query 0 keeps its rank-1 positive: (0 + 1/2)/2 / 2 = 1/8.
    assert cd.mean_average_precision(similarity, positives, 2) == pytest.approx(100 * (1 / 8 + 0) / 2)


def test_gem_featurizer_is_cls_and_power_mean_of_patch_tokens():
    tokens = torch.tensor([[[9.0, -1.0], [1.0, 2.0], [3.0, -5.0]]])  # CLS, then 2 patches

    class Fake(torch.nn.Module):
        def get_intermediate_layers(self, images, n):
            return [tokens]

    out = cd.cls_gem_featurizer(Fake())(torch.zeros(1))
    # GeM p=4 per channel, negatives clamped to 1e-6: ((1 + 81)/2)^(1/4), ((16 + 0)/2)^(1/4).
    expected = torch.tensor([[9.0, -1.0, (82 / 2) ** 0.25, (16 / 2 + 1e-24 / 2) ** 0.25]])
    assert torch.allclose(out, expected)


def test_whitening_makes_the_learning_set_white():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=generator) @ torch.tensor(
        [[3.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0.5, 0], [0, 2, 0, 0.1]]) + 5
    mean, projection = cd.learn_whitening(x)
    white = (x - mean) @ projection
    assert torch.allclose(white.T @ white / len(x), torch.eye(4), atol=1e-3)


# --------------------------------------------------------------------------- tiny Copydays


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def copydays(fmnist_folder, tmp_path_factory) -> Path:
    """12 real val images as originals (names 1000_.. to 1011_..), two strong attacks of
    each (rotated, cropped, blurred, darkened, inverted patch), JPEG quality 10 and 50,
    centre crops keeping 50% and 80% of the side; 30 train images as distractors."""
    root = tmp_path_factory.mktemp("copydays")
    sources = sorted((fmnist_folder / "val").glob("*/*"))[::8][:ORIGINALS]
    for folder in ("original", "strong", "jpegqual/10", "jpegqual/50", "crops/50", "crops/80"):
        (root / folder).mkdir(parents=True)
    for i, src in enumerate(sources):
        image = Image.open(src).convert("RGB").resize((56, 56), Image.BICUBIC)
        name = f"{1000 + i}"
        image.save(root / "original" / f"{name}00.jpg", quality=95)
        strong1 = image.rotate(20, fillcolor=(40, 40, 40)).filter(ImageFilter.GaussianBlur(1.5))
        strong1.crop((6, 4, 52, 54)).save(root / "strong" / f"{name}01.jpg", quality=60)
        strong2 = image.transpose(Image.FLIP_LEFT_RIGHT).point(lambda v: int(v * 0.6) + 30)
        strong2.paste((255, 255, 255), (0, 40, 56, 56))
        strong2.save(root / "strong" / f"{name}02.jpg", quality=60)
        for quality in (10, 50):
            _jpeg(image, quality).save(root / f"jpegqual/{quality}" / f"{name}00.jpg", quality=100)
        for percent in (50, 80):
            side = round(56 * percent / 100)
            start = (56 - side) // 2
            image.crop((start, start, start + side, start + side)).save(
                root / f"crops/{percent}" / f"{name}00.jpg", quality=95)
    distractors = root.parent / "distractors"
    distractors.mkdir()
    for i, src in enumerate(sorted((fmnist_folder / "train").glob("*/*"))[::10][:30]):
        Image.open(src).convert("RGB").save(distractors / f"d{i}.jpg", quality=95)
    return root


def run_copydays(repo_root: Path, data: Path, out: Path, *extra) -> dict:
    code, stdout, err = run_in_process(repo_root, "eval_copy_detection.py", "--data_path", data,
                                       *PICO, "--imsize", "28", "--output_dir", out, *extra)
    assert code == 0, err
    assert "headline (strong)" in stdout
    return json.loads((out / cd.RESULTS_FILE).read_text())


def test_layout_lists_blocks_in_order_with_positives(copydays):
    data = cd.read_copydays(str(copydays))
    assert list(data.blocks) == ["original", "strong", "jpegqual/10", "jpegqual/50",
                                 "crops/50", "crops/80"]
    assert len(data.blocks["strong"]) == 2 * ORIGINALS
    # Strong images 1003_01 and 1003_02 both point at original 3.
    assert data.positives["strong"][6] == data.positives["strong"][7] == [3]
    assert data.positives["crops/80"] == [[i] for i in range(ORIGINALS)]


def test_script_end_to_end_with_distractors_whitening_and_feature_round_trip(repo_root, copydays,
                                                                              tmp_path):
    distractors = copydays.parent / "distractors"
    res = run_copydays(repo_root, copydays, tmp_path / "a", "--distractors_path", distractors,
                       "--whitening_path", distractors, "--dump_features", tmp_path / "f")
    assert res["num_database"] == ORIGINALS + 30 and res["num_distractors"] == 30
    assert res["num_queries"] == 5 * ORIGINALS + 2 * ORIGINALS
    assert set(res["blocks"]) == {"original", "strong", "jpegqual/10", "jpegqual/50", "crops/50",
                                  "crops/80"}
    assert res["strong"] == res["blocks"]["strong"]
    assert res["blocks"]["original"] == 100.0  # an original finds itself first
    assert all(0 <= v <= 100 for v in res["blocks"].values())
    again = run_copydays(repo_root, copydays, tmp_path / "b", "--load_features", tmp_path / "f")
    assert again["blocks"] == res["blocks"] and again["whitening"] == str(distractors)


def test_one_and_two_processes_give_the_same_numbers(repo_root, copydays, tmp_path):
    one = run_copydays(repo_root, copydays, tmp_path / "one")
    result = run_script(repo_root, "eval_copy_detection.py", "--data_path", copydays, *PICO,
                        "--imsize", "28", "--output_dir", tmp_path / "two", nproc=2)
    assert result.returncode == 0, result.stderr
    two = json.loads((tmp_path / "two" / cd.RESULTS_FILE).read_text())
    assert two["world_size"] == 2 and two["num_queries"] == one["num_queries"]
    assert two["blocks"] == pytest.approx(one["blocks"], abs=1e-3)


def test_trained_backbone_detects_copies_better_than_random_init(repo_root, fmnist_folder, copydays,
                                                                 tmp_path):
    """The seed-0 vit_pico/7 trained a few seconds with labels (test_eval_protocols'
    stand-in for a trained checkpoint) against itself untrained, on the strong attacks."""
    checkpoint = supervised_pico(fmnist_folder, tmp_path / "supervised.pth")
    random_init = run_copydays(repo_root, copydays, tmp_path / "random", "--max_rank", "0")
    trained = run_copydays(repo_root, copydays, tmp_path / "trained", "--max_rank", "0",
                           "--pretrained_weights", checkpoint)
    print(f"strong mAP: trained {trained['strong']} | random {random_init['strong']}")
    assert trained["strong"] > random_init["strong"] + 5, (trained["blocks"], random_init["blocks"])


def test_quickstart_checkpoint_detects_copies_better_than_random_init(repo_root, copydays, tmp_path):
    """Opt-in (minutes of training first): MASSL_TRAINED_CHECKPOINT=<run>/pretrain/checkpoint.pth
    of ``python quickstart.py`` (cpu preset: vit_pico/7) must beat a random vit_pico/7."""
    checkpoint = os.environ.get("MASSL_TRAINED_CHECKPOINT")
    if not checkpoint:
        pytest.skip("set MASSL_TRAINED_CHECKPOINT to a quick-start checkpoint.pth to run")
    random_init = run_copydays(repo_root, copydays, tmp_path / "random", "--max_rank", "0")
    trained = run_copydays(repo_root, copydays, tmp_path / "trained", "--max_rank", "0",
                           "--pretrained_weights", checkpoint)
    print(f"strong mAP: trained {trained['strong']} | random {random_init['strong']}")
    assert trained["strong"] > random_init["strong"], (trained["blocks"], random_init["blocks"])


def test_bad_input_gives_one_line_errors(repo_root, copydays, tmp_path):
    out = ["--output_dir", tmp_path / "o"]
    broken = tmp_path / "broken"
    shutil.copytree(copydays, broken)
    shutil.rmtree(broken / "strong")
    assert_clean_exit(run_in_process(repo_root, "eval_copy_detection.py", "--data_path", broken,
                                     *PICO, *out), "no Copydays block folder", "strong")
    shutil.copytree(copydays / "strong", broken / "strong")
    (broken / "crops" / "50" / "100300.jpg").unlink()
    assert_clean_exit(run_in_process(repo_root, "eval_copy_detection.py", "--data_path", broken,
                                     *PICO, *out), "crops/50", "11 .jpg", "12")
    shutil.rmtree(broken / "crops" / "50")
    Image.new("RGB", (8, 8)).save(broken / "strong" / "9999x.jpg")
    assert_clean_exit(run_in_process(repo_root, "eval_copy_detection.py", "--data_path", broken,
                                     *PICO, *out), "9999x.jpg", "'9999'")
    assert_clean_exit(run_in_process(repo_root, "eval_copy_detection.py", "--data_path", copydays,
                                     "--distractors_path", tmp_path / "none", *PICO, *out),
                      "--distractors_path")
    assert_clean_exit(run_in_process(repo_root, "eval_copy_detection.py", "--data_path",
                                     tmp_path / "missing", *PICO, *out), "does not exist")
    evaluation_dump = tmp_path / "other"
    import evaluation
    evaluation.dump_features(evaluation_dump, torch.eye(3), torch.eye(3), torch.arange(3),
                             torch.arange(3), {"classes": ["a", "b", "c"]})
    assert_clean_exit(run_in_process(repo_root, "eval_copy_detection.py", "--load_features",
                                     evaluation_dump, *out), "no Copydays features")
