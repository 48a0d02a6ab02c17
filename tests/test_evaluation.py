"""evaluation.Progress: the progress line of feature extraction and linear-probe epochs."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

import evaluation


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
