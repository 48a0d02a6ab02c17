"""quickstart.py: the smoke preset end to end (real Fashion-MNIST images, seconds), and its parts."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import quickstart
from fashion_mnist import EMBEDDED_DIR

FINAL_LINE = re.compile(
    r"^k-NN top-1 \(k=20\): trained (\d+\.\d)% \| random init (\d+\.\d)% \| "
    r"gain ([+-]\d+\.\d) points \| (\d+\.\d) min$")


def run_quickstart(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(repo_root / "quickstart.py"), *args],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def smoke_run(repo_root, tmp_path_factory):
    """One smoke-preset quick start on the 300 + 100 shipped images, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("quickstart")
    run_dir, data_dir = tmp / "run", tmp / "data"
    proc = run_quickstart(repo_root, "--preset", "smoke", "--device", "cpu",
                          "--output_dir", str(run_dir), "--data_dir", str(data_dir),
                          "--fashion_mnist_source", str(EMBEDDED_DIR))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, run_dir, data_dir


def test_smoke_run_ends_with_the_summary_line(smoke_run):
    proc, run_dir, _ = smoke_run
    lines = proc.stdout.rstrip("\n").splitlines()
    match = FINAL_LINE.match(lines[-1])
    assert match, lines[-1]
    trained, random_init, gain, _ = (float(g) for g in match.groups())
    assert gain == pytest.approx(trained - random_init, abs=0.11)
    assert f"run folder: {run_dir.resolve()}" in lines[-2]
    # the scripts' own output was streamed, in order
    out = proc.stdout
    assert out.index("main_massl.py") < out.index("Epoch [1/1] done") < out.index("eval_knn.py")
    assert "RANDOMLY INITIALISED" in proc.stderr + proc.stdout


def test_smoke_run_writes_the_run_folder(smoke_run):
    proc, run_dir, data_dir = smoke_run
    results = json.loads((run_dir / "results.json").read_text())
    trained = json.loads((run_dir / "knn_trained" / "knn_results.json").read_text())
    random_init = json.loads((run_dir / "knn_random" / "knn_results.json").read_text())
    assert results["trained_top1"] == trained["k=20"]["top1"]
    assert results["random_init_top1"] == random_init["k=20"]["top1"]
    assert results["gain_points"] == pytest.approx(results["trained_top1"] - results["random_init_top1"])
    assert results["summary"] == proc.stdout.rstrip("\n").splitlines()[-1]
    assert (results["num_train"], results["num_val"], results["epochs"]) == (300, 100, 1)
    assert trained["num_train"] == 300 and trained["num_val"] == 100
    # the trained run evaluated the checkpoint, the baseline a random backbone of the same arch
    assert trained["checkpoint"] and random_init["checkpoint"] is None
    assert trained["arch"] == random_init["arch"] == results["train_options"]["arch"]
    assert (run_dir / "pretrain" / "checkpoint.pth").is_file()
    assert (run_dir / "pretrain" / "log.txt").is_file()
    assert any((run_dir / "pretrain" / "tensorboard").iterdir())
    assert "Epoch [1/1] done" in (run_dir / "quickstart.log").read_text()
    assert len(list((data_dir / "train").rglob("*.png"))) == 300


def test_bad_source_is_a_one_line_error(repo_root, tmp_path):
    proc = run_quickstart(repo_root, "--preset", "smoke", "--output_dir", str(tmp_path / "run"),
                          "--data_dir", str(tmp_path / "data"),
                          "--fashion_mnist_source", str(tmp_path / "nothing-here"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --fashion_mnist_source") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_failed_step_is_named_and_its_code_kept(tmp_path, capsys):
    with open(tmp_path / "log", "w") as log:
        with pytest.raises(quickstart.StepFailed) as failure:
            quickstart.run_step("pretraining", [sys.executable, "-c",
                                                "import sys; print('partial output'); sys.exit(3)"], log)
    assert (failure.value.step, failure.value.code) == ("pretraining", 3)
    assert "partial output" in capsys.readouterr().out
    assert "partial output" in (tmp_path / "log").read_text()


def test_epochs_from_minutes_and_overrides():
    cpu = quickstart.PRESETS["cpu"]
    base = cpu["train"]["epochs"]
    assert quickstart.epochs_for(cpu, None, None) == base
    assert quickstart.epochs_for(cpu, 7, 1.0) == 7  # --epochs wins over --minutes
    assert quickstart.epochs_for(cpu, None, 2 * cpu["minutes"]) == 2 * base
    assert quickstart.epochs_for(cpu, None, 0.001) == 1
    with pytest.raises(quickstart.utils.UserError):
        quickstart.epochs_for(cpu, 0, None)


def test_flags_are_what_main_massl_parses():
    import main_massl
    flags = quickstart.to_flags(dict(quickstart.PRESETS["cpu"]["train"]))
    args = main_massl.build_cli_parser().parse_args([*flags, "--data_path", "x"])
    for name, value in quickstart.PRESETS["cpu"]["train"].items():
        expected = list(value) if isinstance(value, tuple) else value
        got = list(getattr(args, name)) if isinstance(value, tuple) else getattr(args, name)
        assert got == expected, name
