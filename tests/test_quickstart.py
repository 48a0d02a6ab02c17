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
    # the plan before training, the progress line after the epoch
    plan_line = re.search(r"^plan: 1 epoch of 9 steps, about \d+\.\d minutes of training \(measured "
                          r"\S+ s/step on this machine\); whole command about \d+\.\d of 10 minutes$",
                          out, re.MULTILINE)
    assert plan_line, out[:3000]
    progress = re.search(r"^progress: epoch 1/1 done at \d+\.\d min; ETA \d+\.\d min more, whole "
                         r"command about \d+\.\d of 10 min$", out, re.MULTILINE)
    assert progress, out
    assert plan_line.start() < out.index("main_massl.py") < out.index("Epoch [1/1] done") \
        < progress.start() < out.index("eval_knn.py")
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
    log = (run_dir / "quickstart.log").read_text()
    assert "Epoch [1/1] done" in log and "\nplan: 1 epoch of 9 steps" in log
    assert "\nprogress: epoch 1/1 done" in log
    # the plan and the speed it was made from
    plan = results["plan"]
    assert (plan["epochs"], plan["steps_per_epoch"], plan["max_epochs"]) == (1, 9, 1)
    assert plan["enforced"] and plan["budget_s"] == 600 and plan["step_s"] > 0
    calibration = results["calibration"]
    assert calibration["steps_per_epoch"] == 9 and calibration["step_s"] == plan["step_s"]
    assert calibration["timed_steps"] >= quickstart.MIN_TIMED_STEPS
    assert json.loads((run_dir / "plan.json").read_text())["plan"] == plan
    # the timing is paid from the budget, and the final minutes are the whole command's
    assert calibration["seconds"] <= plan["elapsed_s"] <= 60 * results["minutes"] + 1
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


def plan(**changes):
    """A plan with round numbers: 600 s budget, 30 s spent, 60 s of start-ups and evaluations,
    40 steps per epoch; (600 - 30 - 60) x (1 - 0.2) = 408 s for the epochs."""
    assert quickstart.SAFETY_FRACTION == 0.2  # the hand-computed numbers below assume it
    settings = dict(budget_s=600.0, elapsed_s=30.0, step_s=0.4, steps_per_epoch=40, fixed_s=60.0,
                    max_epochs=100)
    return quickstart.plan_epochs(**{**settings, **changes})


def test_a_slower_machine_plans_fewer_epochs():
    fast, slow = plan(step_s=0.4), plan(step_s=0.8)
    assert (fast.epochs, slow.epochs) == (25, 12)  # floor(408 / 16), floor(408 / 32)
    for p in (fast, slow):
        assert p.enforced and not p.over_budget and not p.capped
        assert p.total_s <= p.budget_s
        assert p.total_s == pytest.approx(30 + 60 + p.epochs * 40 * p.step_s)
    lines = quickstart.plan_lines(slow)
    assert lines == ["plan: 12 epochs of 40 steps, about 6.4 minutes of training (measured 0.8 "
                     "s/step on this machine); whole command about 7.9 of 10 minutes"]
    # time already spent and the fixed costs come out of the same budget
    assert plan(elapsed_s=30.0 + 160.0).epochs == 17  # floor(280 / 16)
    assert plan(fixed_s=60.0 + 160.0).epochs == 17


def test_per_epoch_evaluation_is_charged_to_every_epoch():
    assert plan(step_s=0.4, epoch_eval_s=16.0).epochs == 12  # epochs of 16 + 16 s
    assert plan(step_s=0.4, epoch_eval_s=16.0).epoch_s == 32.0


def test_too_small_a_budget_still_trains_one_epoch_and_says_it_overruns():
    for tiny in (plan(step_s=20.0), plan(budget_s=60.0)):  # an 800 s epoch; nothing left at all
        assert tiny.epochs == 1 and tiny.fit_epochs == 0 and tiny.over_budget
        lines = quickstart.plan_lines(tiny)
        assert lines[0].startswith("plan: 1 epoch of 40 steps")
        assert lines[1].startswith("warning: even 1 epoch overruns the")


def test_the_presets_cap_holds_on_a_fast_machine():
    fast = plan(step_s=0.01, max_epochs=30)
    assert fast.epochs == 30 and fast.fit_epochs == 1020 and fast.capped  # floor(408 / 0.4)
    assert "capped at the preset's 30 epochs (the budget would fit 1020)" in quickstart.plan_lines(fast)[1]


def test_epochs_flag_overrides_the_budget():
    forced = plan(step_s=0.8, epochs=40)  # 40 x 32 s: far over the budget, as asked
    assert forced.epochs == 40 and not forced.enforced and not forced.capped
    assert forced.fit_epochs == 12 and forced.total_s == pytest.approx(30 + 60 + 1280)
    lines = quickstart.plan_lines(forced)
    assert lines[0].startswith("plan: 40 epochs of 40 steps, about 21.3 minutes of training")
    assert lines[1] == "      --epochs 40 given: the 10-minute budget is not enforced"
    assert plan(epochs=500, max_epochs=30).epochs == 500  # the cap is the budget's, not --epochs'


def test_bad_budget_flags_are_user_errors():
    parser = quickstart.get_args_parser()
    assert parser.parse_args([]).minutes == 10.0 and parser.parse_args([]).epochs is None
    for bad in (["--minutes", "0"], ["--minutes", "-3"], ["--minutes", "nan"], ["--epochs", "0"]):
        with pytest.raises(quickstart.utils.UserError):
            quickstart.check_budget_args(parser.parse_args(bad))


def test_progress_line_projects_the_whole_command(monkeypatch):
    """ETA = epochs left x epoch time (the script's own for the first, then the wall clock
    between epochs) + the evaluations still to run."""
    clock = {"now": 0.0}
    monkeypatch.setattr(quickstart.time, "time", lambda: clock["now"])
    progress = quickstart.Progress(start=0.0, plan=plan(), evals_s=60.0)
    assert progress("Epoch [1/10] it [13/40]  loss 6.0 ...") is None
    clock["now"] = 90.0
    assert progress("Epoch [1/10] done: loss 5.2000, 30.0 s, checkpoint saved\n") == (
        "progress: epoch 1/10 done at 1.5 min; ETA 5.5 min more, whole command about 7.0 of 10 min")
    clock["now"] = 126.0  # 9 x 30 + 60 = 330 s left above; now 8 x 36 + 60 = 348 s
    assert progress("Epoch [2/10] done: loss 5.1000, 31.0 s, checkpoint saved\n") == (
        "progress: epoch 2/10 done at 2.1 min; ETA 5.8 min more, whole command about 7.9 of 10 min")
    unenforced = quickstart.Progress(start=0.0, plan=plan(epochs=3), evals_s=0.0)
    assert unenforced("Epoch [3/3] done: loss 5.0, 30.0 s, checkpoint saved") == (
        "progress: epoch 3/3 done at 2.1 min; ETA 0.0 min more, whole command about 2.1 min")


def test_resumed_run_keeps_its_first_plan(tmp_path):
    """A run folder with plan.json is resumed with its epochs (its schedules are fixed),
    without timing the machine again; --epochs still overrides."""
    first = plan(step_s=0.8)
    quickstart.storage.write_json({"plan": first.as_dict(), "calibration": None},
                                tmp_path / "plan.json")
    args = quickstart.get_args_parser().parse_args(["--minutes", "1"])
    with open(tmp_path / "log", "w") as log:
        again, calibration = quickstart.make_plan(args, quickstart.PRESETS["cpu"], {}, tmp_path,
                                                  "cpu", 0, tmp_path, 0.0, log)
    assert again == first and calibration is None
    assert "resuming this run folder's plan of 12 epochs" in (tmp_path / "log").read_text()


def assert_parsed_as(options: dict) -> None:
    """main_massl.py's own parser reads the flags quickstart.to_flags writes as ``options``."""
    import main_massl
    parser = main_massl.build_cli_parser()
    args = parser.parse_args([*quickstart.to_flags(dict(options)), "--data_path", "x"])
    for name, value in options.items():
        dest = parser._option_string_actions[f"--{name}"].dest  # --out_dim: args.memory_size
        expected = list(value) if isinstance(value, tuple) else value
        got = list(getattr(args, dest)) if isinstance(value, tuple) else getattr(args, dest)
        assert got == expected, name


@pytest.mark.parametrize("preset", sorted(quickstart.PRESETS))
def test_flags_are_what_main_massl_parses(preset):
    assert_parsed_as(quickstart.PRESETS[preset]["train"])


def test_sweep_variants_are_main_massl_flags(repo_root, monkeypatch):
    monkeypatch.syspath_prepend(str(repo_root / "benchmarks"))
    from sweep_quickstart import VARIANTS
    assert VARIANTS["preset"] == {}
    # The preset trains without KoLeo; the sweep's KoLeo rows are the only ones with it.
    assert quickstart.PRESETS["cpu"]["train"]["koleo_loss_weight"] == 0.0
    for name, changes in VARIANTS.items():
        assert_parsed_as({**quickstart.PRESETS["cpu"]["train"], **changes})
        assert ("koleo" in name) == (changes.get("koleo_loss_weight", 0.0) > 0), name
