"""evaluation.py: feature dumps say what made them (--load_features refuses a dump of other
weights, files replaced or mixed from another dump, and inconsistent shapes, with one line), and
the progress line of feature extraction and linear-probe epochs (``Progress``)."""
import json
import re
import shutil

import pytest
import torch
from torch.utils.data import TensorDataset

import checkpoints
import eval_knn
import eval_linear
import evaluation
import images
import utils
import vision_transformer as vits
from test_eval import assert_clean_exit, run_in_process

PICO = ["--resize_size", "28", "--crop_size", "28", "--num_workers", "0", "--batch_size_per_gpu", "100"]


def pico_weights(path, seed):
    torch.manual_seed(seed)
    model, _ = vits.build_backbone("vit_pico", 7, img_size=28)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def dumps(tmp_path_factory, repo_root, fmnist_folder):
    root = tmp_path_factory.mktemp("dumps")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        weights = pico_weights(root / f"{name}.pth", seed)
        code, _, err = run_in_process(repo_root, "eval_knn.py", "--data_path", fmnist_folder,
                                      "--pretrained_weights", weights, *PICO, "--nb_knn", "5",
                                      "--output_dir", root / f"knn_{name}", "--dump_features",
                                      root / f"dump_{name}")
        assert code == 0, err
        out[name] = (weights, root / f"dump_{name}")
    return out


def test_a_dump_records_what_made_it(dumps):
    weights, folder = dumps["a"]
    meta = json.loads((folder / evaluation.FEATURE_META).read_text())
    info = checkpoints.build_backbone_from_checkpoint(weights)[2]
    assert meta["weights_sha256"] == info["weights_sha256"]
    assert (meta["arch"], meta["patch_size"], meta["feature_dim"]) == ("vit_pico", 7, info["feature_dim"])
    assert (meta["resize_size"], meta["crop_size"], meta["num_train"], meta["num_val"]) == (28, 28, 300, 100)
    assert meta["files_sha256"]["trainfeat.pth"] == checkpoints.file_sha256(folder / "trainfeat.pth")


@pytest.mark.parametrize("script", ["eval_knn.py", "eval_lowshot.py", "eval_cluster.py",
                                    "eval_retrieval.py"])
def test_a_dump_of_other_weights_is_refused(dumps, repo_root, tmp_path, script):
    _, folder_a = dumps["a"]
    weights_b, _ = dumps["b"]
    assert_clean_exit(run_in_process(repo_root, script, "--load_features", folder_a,
                                     "--pretrained_weights", weights_b, "--output_dir", tmp_path),
                      "holds features of", "not of --pretrained_weights")


def test_a_dump_of_the_same_weights_is_used(dumps, repo_root, tmp_path):
    weights_a, folder_a = dumps["a"]
    code, _, err = run_in_process(repo_root, "eval_knn.py", "--load_features", folder_a,
                                  "--pretrained_weights", weights_a, "--nb_knn", "5",
                                  "--output_dir", tmp_path)
    assert code == 0, err
    loaded = json.loads((tmp_path / "knn_results.json").read_text())
    direct = json.loads((folder_a.parent / "knn_a" / "knn_results.json").read_text())
    assert loaded["k=5"] == direct["k=5"] and loaded["weights_sha256"] == direct["weights_sha256"]


def test_a_dump_mixing_two_dumps_is_refused(dumps, repo_root, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(dumps["a"][1], mixed)
    shutil.copy(dumps["b"][1] / "valfeat.pth", mixed / "valfeat.pth")  # same sizes, other weights
    for script in ("eval_knn.py", "eval_lowshot.py"):
        assert_clean_exit(run_in_process(repo_root, script, "--load_features", mixed,
                                         "--output_dir", tmp_path / "o"),
                          "valfeat.pth are not the files", "--dump_features")


def test_inconsistent_feature_sizes_are_one_line(tmp_path, repo_root):
    evaluation.dump_features(tmp_path / "d", torch.zeros(6, 8), torch.zeros(4, 16),
                             torch.zeros(6, dtype=torch.long), torch.zeros(4, dtype=torch.long), {})
    for script in ("eval_knn.py", "eval_lowshot.py", "eval_cluster.py", "eval_retrieval.py"):
        assert_clean_exit(run_in_process(repo_root, script, "--load_features", tmp_path / "d",
                                         "--output_dir", tmp_path / "o"),
                          "inconsistent shapes")


def test_an_exif_rotated_photo_is_read_as_stored_everywhere(fmnist_folder, tmp_path):
    """The documented choice (images.load_rgb_image): EXIF orientation is not applied, as in
    DINO's ImageNet pipeline; training (data.py) and evaluation (ImageFolder) agree."""
    from PIL import Image

    import data

    stored = Image.new("RGB", (40, 20), (200, 30, 30))
    stored.paste((30, 30, 200), (0, 0, 10, 20))  # a blue left edge: any rotation moves it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    root = tmp_path / "photos"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        stored.save(root / split / "a" / "p.jpg", exif=exif, quality=100)
    assert Image.open(root / "train" / "a" / "p.jpg").getexif()[0x0112] == 6
    loaded = images.load_rgb_image(str(root / "train" / "a" / "p.jpg"))
    assert loaded.size == (40, 20)  # not (20, 40): not rotated
    assert loaded.getpixel((2, 10))[2] > 150 and loaded.getpixel((35, 10))[0] > 150
    train, _ = evaluation.build_train_val(str(root), lambda img: img, lambda img: img)
    assert train[0][0].size == (40, 20)
    pretrain = data.build_pretrain_dataset(str(root / "train"), None)
    assert pretrain.load(0)[0].size == (40, 20)


# --------------------------------------------------------------------------- progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_prints_every_interval_with_rate_and_eta(capsys):
    clock = FakeClock()
    progress = evaluation.Progress("train features", 1000, interval=10.0, clock=clock, enabled=True)
    clock.now += 4
    progress.update(100)  # 4 s since the start: under the interval, silent
    assert capsys.readouterr().out == ""
    clock.now += 6
    progress.update(100)  # 200 images in 10 s: 20 images/s, 800 left -> 40 s
    assert capsys.readouterr().out == \
        "train features: 200/1000 images (20%)  20.0 images/s  ETA 0:00:40\n"
    clock.now += 5
    progress.update(300)  # 5 s after the last line: silent, however many images
    assert capsys.readouterr().out == ""
    clock.now += 5
    progress.update(300)  # 800 in 20 s: 40 images/s, 200 left -> 5 s
    assert capsys.readouterr().out == \
        "train features: 800/1000 images (80%)  40.0 images/s  ETA 0:00:05\n"
    clock.now += 3600
    progress.update(500)  # the end is never a progress line; the count stops at the total
    assert capsys.readouterr().out == "" and progress.done == 1000


def test_progress_is_silent_off_rank_0_and_before_any_image(capsys):
    clock = FakeClock()
    quiet = evaluation.Progress("x", 10, interval=0.0, clock=clock, enabled=False)
    clock.now += 1
    quiet.update(5)
    assert capsys.readouterr().out == ""
    loud = evaluation.Progress("x", 10, interval=0.0, clock=clock, enabled=True)
    assert loud.line(clock.now) == "x: 0/10 images (0%)  0.0 images/s  ETA ?"


def test_extract_features_prints_progress_lines(capsys, monkeypatch):
    monkeypatch.setattr(evaluation, "PROGRESS_INTERVAL_S", 0.0)
    data = TensorDataset(torch.arange(10.0).view(10, 1), torch.zeros(10))
    features = evaluation.extract_features(lambda x: x * 2, data, 1, batch_size=4, num_workers=0,
                                           device=torch.device("cpu"), progress_label="demo")
    assert torch.equal(features, torch.arange(10.0).view(10, 1) * 2)
    lines = capsys.readouterr().out.splitlines()
    # Batches of 4, 4, 2: lines after the first two (the last batch ends the loop silently).
    assert [line.split("  ")[0] for line in lines] == ["demo: 4/10 images (40%)",
                                                       "demo: 8/10 images (80%)"]
    assert all("images/s" in line and "ETA" in line for line in lines)


def test_linear_probe_epoch_prints_progress(capsys):
    import eval_linear
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(12, 3), torch.randint(0, 2, (12,)))
    head = eval_linear.LinearClassifier(3, 2)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    progress = evaluation.Progress("epoch 1/5", len(data), interval=0.0, enabled=True)
    eval_linear.train_one_epoch(head, torch.nn.Identity(), DataLoader(data, batch_size=5), optimizer,
                                torch.device("cpu"), progress)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["epoch 1/5: 5/12 images (42%)",
                                                       "epoch 1/5: 10/12 images (83%)"]


# --------------------------------------------------------------------------- argument checks of the eval scripts


@pytest.mark.parametrize("script, argv, pattern", [
    (eval_knn, ["--temperature", "0"], "--temperature must be > 0"),
    (eval_knn, ["--temperature", "-0.07"], "--temperature must be > 0"),
    (eval_knn, ["--temperature", "nan"], "--temperature must be > 0"),
    (eval_knn, ["--nb_knn", "20", "0"], "--nb_knn values must be >= 1, got 0"),
    (eval_knn, ["--batch_size_per_gpu", "0"], "--batch_size_per_gpu must be at least 1"),
    (eval_knn, ["--pretrained_weights", "no_such.pth"], "no such file: no_such.pth"),
    (eval_linear, ["--lr", "0"], "--lr must be > 0"),
    (eval_linear, ["--lr", "inf"], "--lr inf: must be a finite number"),
    (eval_linear, ["--n_last_blocks", "0"], "--n_last_blocks must be at least 1"),
    (eval_linear, ["--epochs", "0"], "--epochs must be at least 1"),
    (eval_linear, ["--crop_size", "0"], "--crop_size must be at least 1"),
], ids=lambda x: x.__name__ if hasattr(x, "__name__") else None)
def test_eval_scripts_check_arguments_before_any_work(script, argv, pattern, tmp_path):
    # The data folder does not exist: a check made after the work starts would name it instead.
    args = script.get_args_parser().parse_args(
        ["--data_path", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o"), *argv])
    with pytest.raises(utils.UserError, match=re.escape(pattern)):
        script.main(args)
