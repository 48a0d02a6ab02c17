"""eval_retrieval.py's ground-truth reader: the official gnd_*.pkl content loads, a pickle
that would run code is refused without running it."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

import eval_retrieval
import utils


def official_ground_truth() -> dict:
    """The structure of the revisited Oxford/Paris gnd_*.pkl: image name lists, and per query
    int arrays of database indices and a float (x1, y1, x2, y2) box."""
    gnd = []
    for q in range(3):
        gnd.append({"bbx": np.array([10.5, 6.0, 38.0, 34.25]) if q else [1.0, 2.0, 3.0, 4.0],
                    "easy": np.array([q, q + 3], dtype=np.int64),
                    "hard": np.array([6 + q], dtype=np.int32),
                    "junk": np.array([], dtype=np.int64) if q else np.array([9])})
    return {"imlist": [f"all_souls_{i:06d}" for i in range(10)],
            "qimlist": ["q_a", "q_b", "q_c"], "gnd": gnd, "note": (None, True, 3, 2.5, "x"),
            "scalar": np.float64(1.5)}


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_official_structure_loads_exactly(tmp_path, protocol):
    gt = official_ground_truth()
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(gt, protocol=protocol))
    loaded = eval_retrieval.load_ground_truth(path)
    assert loaded["imlist"] == gt["imlist"] and loaded["qimlist"] == gt["qimlist"]
    assert loaded["note"] == gt["note"] and loaded["scalar"] == 1.5
    for a, b in zip(loaded["gnd"], gt["gnd"]):
        for key in ("easy", "hard", "junk"):
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key])
        assert np.array_equal(np.asarray(a["bbx"]), np.asarray(b["bbx"]))


class MakesAFile:
    """What an attacker ships: unpickling calls open(marker, 'w')."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunsAShellCommand:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [MakesAFile, RunsAShellCommand])
def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path, payload):
    marker = tmp_path / "pwned"
    gt = official_ground_truth()
    gt["gnd"][1]["junk"] = payload(marker)  # hidden deep inside the official structure
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(gt))
    with pytest.raises(utils.UserError, match="refused, nothing was run") as info:
        eval_retrieval.load_ground_truth(path)
    assert not marker.exists()
    assert "\n" not in str(info.value)


def test_other_classes_are_refused_even_harmless_ones(tmp_path):
    import collections
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": collections.OrderedDict()}))
    with pytest.raises(utils.UserError, match="collections.OrderedDict"):
        eval_retrieval.load_ground_truth(path)


def test_the_script_refuses_a_malicious_ground_truth_with_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    root = tmp_path / "roxford5k"
    (root / "jpg").mkdir(parents=True)
    gt = official_ground_truth()
    gt["imlist"] = MakesAFile(marker)
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(gt))
    args = eval_retrieval.get_args_parser().parse_args(
        ["--protocol", "revisited", "--dataset", "roxford5k", "--data_path", str(root),
         "--output_dir", str(tmp_path / "out")])
    with pytest.raises(utils.UserError, match="refused, nothing was run"):
        eval_retrieval.main(args)
    assert not marker.exists()
