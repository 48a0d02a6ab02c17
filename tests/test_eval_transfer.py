"""eval_transfer.py end to end on real images: a row per dataset and the mean, a finished
dataset skipped on rerun, bad input refused in one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import evaluation
from test_eval import assert_clean_exit, run_in_process, run_script
from test_eval_protocols import PICO

FAST = ["--max_iter", "50", "--l2_grid", "1e-3", "1e-1"]


@pytest.fixture(scope="module")
def two_datasets(fmnist_folder, tmp_path_factory) -> list[Path]:
    """'shoes': 3 Fashion-MNIST classes; 'tops': 4 others (10 train / 5 val images each)."""
    root = tmp_path_factory.mktemp("transfer")
    classes = sorted(p.name for p in (fmnist_folder / "train").iterdir())
    datasets = []
    for name, picked in (("shoes", classes[:3]), ("tops", classes[3:7])):
        for split, count in (("train", 10), ("val", 5)):
            for c in picked:
                (root / name / split / c).mkdir(parents=True)
                for src in sorted((fmnist_folder / split / c).iterdir())[:count]:
                    shutil.copy(src, root / name / split / c / src.name)
        datasets.append(root / name)
    return datasets


def run_transfer(repo_root, datasets, out, *extra):
    return run_in_process(repo_root, "eval_transfer.py", "--datasets", *datasets, *PICO, *FAST,
                          "--output_dir", out, *extra)


def test_table_names_every_dataset_and_a_rerun_skips_finished_ones(repo_root, two_datasets,
                                                                   tmp_path, monkeypatch):
    out = tmp_path / "out"
    code, stdout, err = run_transfer(repo_root, two_datasets[:1], out)
    assert code == 0, err
    first = json.loads((out / "transfer_results.json").read_text())
    assert [r["dataset"] for r in first["rows"]] == ["shoes"]
    # Second command with both: 'shoes' is read back, only 'tops' is computed.
    monkeypatch.setattr(evaluation, "PROGRESS_INTERVAL_S", 0.0)  # a progress line per batch
    code, stdout, err = run_transfer(repo_root, two_datasets, out, "--batch_size_per_gpu", "16")
    assert code == 0, err
    assert "shoes: done in an earlier run" in stdout and "=== shoes" not in stdout
    assert "=== tops" in stdout
    assert "train features: " in stdout and "images/s" in stdout and "ETA" in stdout
    results = json.loads((out / "transfer_results.json").read_text())
    rows = {r["dataset"]: r for r in results["rows"]}
    assert list(rows) == ["shoes", "tops"]
    assert rows["shoes"] == first["rows"][0]
    assert (rows["shoes"]["num_classes"], rows["tops"]["num_classes"]) == (3, 4)
    assert (rows["tops"]["num_train"], rows["tops"]["num_val"]) == (40, 20)
    for row in rows.values():
        assert 0 <= row["knn_top1"] <= 100 and 0 <= row["linear_top1"] <= 100
        assert row["k"] == 20
    for key in ("knn_top1", "linear_top1"):
        assert results["mean"][key] == pytest.approx((rows["shoes"][key] + rows["tops"][key]) / 2,
                                                     abs=1e-3)
    table = (out / "transfer_results.md").read_text()
    assert "| shoes |" in table and "| tops |" in table and "| **mean** |" in table
    # Features are cached: a third run with a deleted row recomputes it from the cache alone.
    (out / "transfer" / "tops.json").unlink()
    code, stdout, err = run_transfer(repo_root, two_datasets, out)
    assert code == 0, err
    assert "features loaded from" in stdout
    assert json.loads((out / "transfer_results.json").read_text())["rows"] == results["rows"]
    # Another setting is not silently mixed with saved rows.
    assert_clean_exit(run_transfer(repo_root, two_datasets, out, "--knn_k", "5"),
                      "belongs to another run", "knn_k")


def test_bad_input_gives_one_line_errors(repo_root, two_datasets, tmp_path):
    out = tmp_path / "out"
    assert_clean_exit(run_in_process(repo_root, "eval_transfer.py", "--datasets", *PICO,
                                     "--output_dir", out), "--datasets needs at least one")
    assert_clean_exit(run_in_process(repo_root, "eval_transfer.py", *PICO, "--output_dir", out),
                      "--datasets needs at least one")
    noval = tmp_path / "noval"
    shutil.copytree(two_datasets[0] / "train", noval / "train")
    assert_clean_exit(run_transfer(repo_root, [two_datasets[0], noval], out),
                      str(noval), "no val/")
    other = tmp_path / "other" / "shoes"
    shutil.copytree(two_datasets[0], other)
    assert_clean_exit(run_transfer(repo_root, [two_datasets[0], other], out),
                      "two folders named 'shoes'")
    assert_clean_exit(run_transfer(repo_root, [two_datasets[0]], out, "--data_path", other),
                      "--datasets")


def test_two_processes_give_the_one_process_table(repo_root, two_datasets, tmp_path):
    """Two processes: 'shoes' done in an earlier one-process run is skipped by both ranks,
    'tops' computed across them gives the one-process row."""
    code, _, err = run_transfer(repo_root, two_datasets, tmp_path / "one")
    assert code == 0, err
    (tmp_path / "two" / "transfer").mkdir(parents=True)
    shutil.copy(tmp_path / "one" / "transfer" / "shoes.json", tmp_path / "two" / "transfer")
    result = run_script(repo_root, "eval_transfer.py", "--datasets", *two_datasets, *PICO, *FAST,
                        "--output_dir", tmp_path / "two", nproc=2)
    assert result.returncode == 0, result.stderr
    one = json.loads((tmp_path / "one" / "transfer_results.json").read_text())
    two = json.loads((tmp_path / "two" / "transfer_results.json").read_text())
    assert two["world_size"] == 2 and "shoes: done in an earlier run" in result.stdout
    for a, b in zip(one["rows"], two["rows"]):
        assert a["dataset"] == b["dataset"] and a["knn_top1"] == b["knn_top1"]
        assert a["linear_top1"] == b["linear_top1"]
