"""utils.py: the schedules and the one reading of the --device flag."""
import numpy as np
import pytest
import torch

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
