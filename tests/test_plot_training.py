"""plot_training.py: training curves and health metrics drawn from log.txt; bad logs are one
line. matplotlib is optional: the tests that need it are skipped without it."""
import json
import sys

import pytest
from PIL import Image

import plot_training
from fabricated import needs


def write_log(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


@needs("matplotlib")
def test_plot_training_from_a_log(tmp_path, capsys):
    records = []
    for epoch in range(12):
        r = {"epoch": epoch, "train_loss": 9 - 0.2 * epoch, "train_lr": 1e-4 * (epoch + 1),
             "train_wd": 0.04, "train_teacher_temp": 0.04, "time": 3.0}
        if epoch % 4 == 3:
            r["knn_top1"] = 20.0 + epoch
        records.append(r)
    # A resumed run logs epoch 10 again; a killed job leaves half a line.
    records.append(dict(records[10], train_loss=1.0))
    log = tmp_path / "log.txt"
    write_log(log, records, tail='{"epoch": 12, "train_lo')
    out = tmp_path / "plots" / "curves.png"
    plot_training.main(["--log", str(log), "--out", str(out)])
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.out and "k-NN" in captured.out
    assert "skipped 1 line" in captured.err
    assert Image.open(out).size[0] > 3 * Image.open(out).size[1] / 2  # three panels side by side

    parsed, skipped = plot_training.read_log(log)
    assert skipped == 1 and [r["epoch"] for r in parsed] == list(range(12))
    assert parsed[10]["train_loss"] == 1.0  # the resumed run's record wins
    groups = dict(plot_training.group_keys(parsed))
    assert groups == {"loss": ["train_loss"], "learning rate": ["train_lr"],
                      "k-NN / accuracy": ["knn_top1"]}


@needs("matplotlib")
def test_plot_training_default_out_and_no_knn(tmp_path, capsys):
    log = tmp_path / "log.txt"
    write_log(log, [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_lr": 0.1} for e in range(3)])
    plot_training.main(["--log", str(log)])
    assert (tmp_path / "curves.png").is_file()
    assert "panels: loss, learning rate" in capsys.readouterr().out


def test_plot_training_bad_logs_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty.txt").write_text("")
    write_log(tmp_path / "odd.txt", [{"epoch": 0, "speed": 3.0}])
    write_log(tmp_path / "good.txt", [{"epoch": 0, "train_loss": 3.0}])
    cases = [(tmp_path / "missing.txt", "no log file"),
             (tmp_path / "empty.txt", "no JSON records"),
             (tmp_path / "odd.txt", "nothing to plot"),
             (tmp_path / "good.txt", "pip install matplotlib")]  # last: hides matplotlib
    for log, message in cases:
        if message.startswith("pip"):
            monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
        with pytest.raises(SystemExit) as e:
            plot_training.main(["--log", str(log)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "curves.png").exists()
