"""Nothing lost, nothing silently wrong (issue 15): the faults a hostile first week finds.

High-bit-depth images, dataset layouts and symlink loops, concurrent runs, resuming with
another batch, read-only folders, a full disk, a half-started SLURM job, bad --resume files,
file permissions and bad flags. Runs use vit_pico with 7 px patches on 28 px images.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import distributed
import eval_knn
import eval_linear
import images
import main_massl
import storage
import utils
from test_train import _free_port, _read_until, run_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "main_massl.py")
TIMEOUT = 300
DIST_TIMEOUT_ENV = "MASSL_DIST_TIMEOUT_S"

# One epoch of a vit_pico on 28 px images: a step takes a fraction of a second on a CPU core.
PICO = ["--arch", "vit_pico", "--patch_size", "7", "--global_crops_size", "28",
        "--local_crops_size", "14", "--local_crops_number", "1", "--out_dim", "16",
        "--partition_size", "16", "--num_workers", "0", "--print_freq", "1",
        "--warmup_teacher_temp_epochs", "0", "--epochs", "1", "--lr", "0.01", "--seed", "0"]


# --------------------------------------------------------------------------- helpers


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                 "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", DIST_TIMEOUT_ENV):
        env.pop(name, None)
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return env


def run_py(args: list[str], timeout: float = TIMEOUT, env: dict[str, str] | None = None,
           preexec_fn=None) -> subprocess.CompletedProcess:
    """``python ARGS`` from the repository root; a run that outlives ``timeout`` (a hang) fails."""
    try:
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env or _env(),
                              capture_output=True, text=True, timeout=timeout,
                              preexec_fn=preexec_fn)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args[:2])} ... still running after {timeout} s (hung)")


def one_error_line(err: str) -> str:
    """The single ``error: ...`` line a bad input must produce (no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def copy_images(src: Path, dst: Path, count: int) -> Path:
    """The first ``count`` real images under ``src`` (sorted), flat in ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for png in sorted(src.rglob("*.png"))[:count]:
        shutil.copy(png, dst / f"{png.parent.name}_{png.name}")
    return dst


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def flat50(fmnist_folder, tmp_path_factory) -> Path:
    """50 real images, flat (unlabelled data)."""
    return copy_images(fmnist_folder / "train", tmp_path_factory.mktemp("flat50") / "images", 50)


# --------------------------------------------------------------------------- 16-bit images


def _png_16bit(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)  # Pillow writes mode I;16


def _ramp(low: float, high: float) -> np.ndarray:
    return np.linspace(low, high, 28 * 28).reshape(28, 28)


def _pgm_16bit(path: Path, values: np.ndarray) -> None:
    """Binary PGM with maxval 65535 (Pillow opens it as mode I)."""
    path.write_bytes(b"P5\n28 28\n65535\n" + values.astype(">u2").tobytes())


# name, writer, values, expected 8-bit values (computed here, independently of the code)
HIGH_BIT_DEPTH_CASES = {
    "png I;16": (_png_16bit, "x.png", np.rint(_ramp(0, 65535)), lambda v: np.rint(v / 257)),
    "tiff I;16B": (lambda p, v: Image.fromarray(v.astype(">u2")).save(p), "x.tif",
                   np.rint(_ramp(1000, 60000)), lambda v: np.rint(v / 257)),
    "pgm I": (_pgm_16bit, "x.pgm", np.rint(_ramp(0, 65535)), lambda v: np.rint(v / 257)),
    "tiff F in [0, 1]": (lambda p, v: Image.fromarray(v.astype(np.float32)).save(p), "x.tif",
                         _ramp(0.0, 1.0), lambda v: np.rint(v.astype(np.float32) * 255.0)),
    "tiff F out of range": (lambda p, v: Image.fromarray(v.astype(np.float32)).save(p), "x.tif",
                            _ramp(-3.0, 5.0), lambda v: np.rint((v + 3.0) / 8.0 * 255.0)),
    "tiff I beyond 16 bits": (lambda p, v: Image.fromarray(v.astype(np.int32)).save(p), "x.tif",
                              np.rint(_ramp(-100000, 300000)),
                              lambda v: np.rint((v + 100000) / 400000 * 255.0)),
}


@pytest.mark.parametrize("case", sorted(HIGH_BIT_DEPTH_CASES))
def test_high_bit_depth_images_are_scaled_to_8_bits_not_clipped(case, tmp_path):
    write, name, values, expected = HIGH_BIT_DEPTH_CASES[case]
    path = tmp_path / name
    write(path, values)
    rgb = np.asarray(images.load_rgb_image(str(path)))
    assert rgb.shape == (28, 28, 3) and rgb.dtype == np.uint8
    want = expected(values)
    for channel in range(3):
        # +-1: float32 rounding at .5 boundaries
        assert np.abs(rgb[..., channel].astype(int) - want).max() <= 1, case
    assert (rgb == 255).mean() < 0.01, f"{case}: saturated like a clipped 16-bit image"
    assert len(np.unique(rgb[..., 0])) > 200  # the ramp keeps its gradations


def test_training_and_evaluation_read_16bit_images_the_same_scaled_way(tmp_path):
    import data
    import evaluation

    values = np.rint(_ramp(0, 65535))
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            _png_16bit(tmp_path / split / cls / "x.png", values)
    want = np.rint(values / 257)
    pretrain = data.build_pretrain_dataset(str(tmp_path / "train"), transform=None)
    train, val = evaluation.build_train_val(str(tmp_path), np.asarray, np.asarray)
    for image in (np.asarray(pretrain[0][0]), train[0][0], val[1][0]):
        np.testing.assert_array_equal(image[..., 1], want)
    # visualize_attention reads its --image_path with the same loader
    assert "load_rgb_image(args.image_path)" in (ROOT / "visualize_attention.py").read_text()


# --------------------------------------------------------------------------- dataset layouts


def test_eval_layout_as_pretraining_data_is_refused(fmnist_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_main(PICO + ["--batch_size_per_gpu", "16", "--data_path", str(fmnist_folder),
                                    "--output_dir", str(out)], capsys)
    assert code == 2
    line = one_error_line(err)
    assert "train/ and val/" in line and f"--data_path {fmnist_folder / 'train'}" in line, line
    assert not out.exists()


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging the test run) when the block takes longer than ``seconds``."""
    def expire(signum, frame):
        raise AssertionError(f"still running after {seconds} s (hung)")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM")
@pytest.mark.parametrize("links", [["self"], ["a", "b"]], ids=["one loop", "two loops"])
def test_symlink_loops_neither_multiply_the_data_nor_hang(flat50, tmp_path, links):
    import data

    root = tmp_path / "data"
    shutil.copytree(flat50, root)
    for name in links:
        os.symlink(".", root / name, target_is_directory=True)
    with deadline(60):
        dataset = data.build_pretrain_dataset(str(root), transform=None)
    assert len(dataset) == 50 and dataset.classes == []
    assert len({os.path.realpath(p) for p, _ in dataset.samples}) == 50


@pytest.mark.skipif(not hasattr(signal, "SIGALRM"), reason="needs SIGALRM")
def test_symlink_loops_in_class_folders_for_training_and_evaluation(flat50, tmp_path):
    import data
    import evaluation

    root = tmp_path / "data"
    for i, png in enumerate(sorted(flat50.iterdir())):
        cls = root / "train" / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, cls / png.name)
    shutil.copytree(root / "train", root / "val")
    for split in ("train", "val"):
        os.symlink("..", root / split / "a" / "up", target_is_directory=True)
        os.symlink(".", root / split / "b" / "again", target_is_directory=True)
    with deadline(60):
        pretrain = data.build_pretrain_dataset(str(root / "train"), transform=None)
        train, val = evaluation.build_train_val(str(root), None, None)
    assert (len(pretrain), len(train), len(val)) == (50, 50, 50)
    assert pretrain.classes == train.classes == ["a", "b"]
    assert [t for _, t in train.samples] == [0] * 25 + [1] * 25


def test_eval_and_training_use_one_rule_for_images(tmp_path, flat50):
    import data
    import evaluation

    for split in ("train", "val"):
        for i, png in enumerate(sorted(flat50.iterdir())[:8]):
            cls = tmp_path / split / ("a" if i % 2 else "b")
            cls.mkdir(parents=True, exist_ok=True)
            shutil.copy(png, cls / png.name)
        # macOS resource forks and a notebook's checkpoint folder: never images
        (tmp_path / split / "a" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        hidden = tmp_path / split / "a" / ".ipynb_checkpoints"
        hidden.mkdir()
        shutil.copy(sorted(flat50.iterdir())[0], hidden / "copy.png")
    pretrain = data.build_pretrain_dataset(str(tmp_path / "train"), transform=None)
    train, _ = evaluation.build_train_val(str(tmp_path), None, None)
    assert sorted(p for p, _ in train.samples) == sorted(p for p, _ in pretrain.samples)
    assert len(train) == 8

    args = eval_knn.get_args_parser().parse_args([
        "--data_path", str(tmp_path), "--arch", "vit_pico", "--patch_size", "7",
        "--resize_size", "28", "--crop_size", "28", "--num_workers", "0", "--nb_knn", "3",
        "--output_dir", str(tmp_path / "knn")])
    results = eval_knn.main(args)
    assert (results["num_train"], results["num_val"]) == (8, 8)


# --------------------------------------------------------------------------- concurrent runs


def test_a_second_run_into_a_locked_output_dir_is_refused_and_a_crash_frees_it(flat50, tmp_path):
    out = tmp_path / "out"
    argv = [*PICO, "--batch_size_per_gpu", "16", "--print_freq", "1000",
            "--data_path", str(flat50), "--output_dir", str(out)]
    long = list(argv)
    long[long.index("--epochs") + 1] = "1000"
    first = subprocess.Popen([sys.executable, SCRIPT, *long], cwd=ROOT, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _read_until(first, r"training from epoch")
        second = run_py([SCRIPT, *argv], timeout=120)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr
        line = one_error_line(second.stderr)
        assert f"pid {first.pid} on host {socket.gethostname()}" in line, line
        assert "in use by another run" in line and str(out) in line
        assert first.poll() is None, "the first run must go on"
    finally:
        first.kill()  # SIGKILL: the lock is released by the kernel, nothing is cleaned up
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    third = run_py([SCRIPT, *argv], timeout=TIMEOUT)
    assert third.returncode == 0, third.stderr
    assert "in use" not in third.stderr


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    lock = storage.FolderLock(tmp_path)
    lock.acquire()
    try:
        text = (tmp_path / ".lock").read_text()
        assert text.startswith(f"pid {os.getpid()} on host {socket.gethostname()}, since ")
        # another open file description of the lock file is refused (as another process is)
        with pytest.raises(utils.UserError, match=f"in use by another run \\(pid {os.getpid()}"):
            storage.FolderLock(tmp_path).acquire()
    finally:
        lock.release()
    again = storage.FolderLock(tmp_path)
    again.acquire()
    again.release()


# --------------------------------------------------------------------------- resume


def test_resume_mid_epoch_with_another_global_batch_continues_at_the_next_image(flat50,
                                                                              tmp_path):
    # 50 images: 6 steps of 8 images an epoch, or 12 of 4
    def argv(batch: int, out: Path) -> list[str]:
        return [SCRIPT, *PICO, "--batch_size_per_gpu", str(batch), "--data_path", str(flat50),
                "--output_dir", str(out)]

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, *argv(8, stopped)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _read_until(proc, r"Epoch \[1/1\] it \[2/6\]")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, stderr
    saved = load(stopped / "checkpoint.pth")
    step = saved["iteration"]
    assert saved["epoch"] == 0 and 2 <= step < 6, (saved["epoch"], step)
    same_batch = tmp_path / "same_batch"
    shutil.copytree(stopped, same_batch)

    # Another batch: 8 * step images are done; the 4-image steps go on from there.
    result = run_py(argv(4, stopped))
    assert result.returncode == 0, result.stderr
    done, left = 8 * step, 12 - 2 * step
    assert (f"was saved after {done} images of epoch 1 at 8 images per step; this run takes 4: "
            f"it goes on from image {done} with the remaining {left} steps of the epoch"
            ) in result.stdout, result.stdout
    steps_run = re.findall(r"Epoch \[1/1\] it \[\s*(\d+)/12\]", result.stdout)
    assert [int(s) for s in steps_run] == list(range(2 * step + 1, 13))
    final = load(stopped / "checkpoint.pth")
    assert (final["epoch"], final["iteration"], final["global_step"]) == (1, 0, 12)
    assert [json.loads(x)["epoch"] for x in (stopped / "log.txt").read_text().splitlines()] == [1]

    # The same batch still resumes exactly: as if never stopped.
    reference = tmp_path / "reference"
    assert run_py(argv(8, reference)).returncode == 0
    resumed = run_py(argv(8, same_batch))
    assert resumed.returncode == 0 and "images per step" not in resumed.stdout, resumed.stdout
    torch.testing.assert_close(load(same_batch / "checkpoint.pth")["teacher"],
                               load(reference / "checkpoint.pth")["teacher"], rtol=0, atol=0)


def _bad_checkpoints(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files that are no checkpoint, with what the message must say about each."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.pth"
    empty.write_bytes(b"")
    text = folder / "notes.pth"
    text.write_text("epoch 3, loss 4.2\n")
    png = folder / "image.pth"
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    truncated = folder / "truncated.pth"
    torch.save({"teacher": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:600])
    pickled = folder / "numpy.pth"
    torch.save({"teacher": np.zeros(3)}, pickled)  # not loadable with weights_only=True
    return {"empty": (empty, r"is empty \(0 bytes\)"),
            "text": (text, r"is not a PyTorch checkpoint .*starts b'epoch 3"),
            "png": (png, r"is not a PyTorch checkpoint .*starts b'\\x89PNG"),
            "truncated": (truncated, r"is truncated or corrupt: RuntimeError: \w"),
            "numpy": (pickled, r"holds Python objects \(numpy\.\S+\) besides tensors")}


def test_a_failed_resume_says_what_the_file_is_and_leaves_no_folder(flat50, tmp_path, capsys):
    cases = _bad_checkpoints(tmp_path / "files")
    cases["missing"] = (tmp_path / "nope.pth", r"--resume \S+nope.pth does not exist")
    for name, (path, pattern) in cases.items():
        out = tmp_path / f"out_{name}"
        code, _, err = run_main(PICO + ["--batch_size_per_gpu", "16", "--data_path", str(flat50),
                                        "--output_dir", str(out), "--resume", str(path)], capsys)
        assert code == 2, (name, err)
        line = one_error_line(err)
        assert re.search(pattern, line), (name, line)
        assert "weights_only" not in line, line  # never advise running a file's code
        assert not out.exists(), f"{name}: the failed start left {out} behind"


def test_the_weights_loader_says_what_the_file_is(tmp_path):
    for name, (path, pattern) in _bad_checkpoints(tmp_path).items():
        with pytest.raises(utils.UserError) as exc:
            checkpoints.read_checkpoint_backbone(path)
        message = str(exc.value)
        assert message.startswith(f"cannot read checkpoint: {path} "), message
        assert re.search(pattern, message), (name, message)
        assert "weights_only" not in message and not message.rstrip().endswith(":"), message


# --------------------------------------------------------------------------- argument checks


def test_non_finite_float_flags_are_refused_at_start(flat50, tmp_path, capsys):
    parser = main_massl.build_cli_parser()
    floats = [a.option_strings[0] for a in parser._actions if a.type is float]
    assert "--weight_decay" in floats and len(floats) >= 10
    for flag in floats:
        nargs = parser._option_string_actions[flag].nargs or 1
        for value in ("nan", "inf"):
            out = tmp_path / "out"
            code, stdout, err = run_main(PICO + ["--batch_size_per_gpu", "16", "--data_path",
                                                 str(flat50), "--output_dir", str(out),
                                                 flag, *[value] * nargs], capsys)
            assert code == 2, (flag, value, err)
            assert flag in one_error_line(err), (flag, err)
            assert "training from" not in stdout and not out.exists()
    code, _, err = run_main(PICO + ["--batch_size_per_gpu", "16", "--data_path", str(flat50),
                                    "--weight_decay", "nan"], capsys)
    assert one_error_line(err) == "error: --weight_decay nan: must be a finite number"


def test_augmentation_probabilities_outside_0_1_are_refused(flat50, tmp_path, capsys):
    for flag in ("--color_jitter_prob", "--grayscale_prob", "--solarization_prob"):
        code, _, err = run_main(PICO + ["--batch_size_per_gpu", "16", "--data_path", str(flat50),
                                        "--output_dir", str(tmp_path / "out"), flag, "1.5"], capsys)
        assert code == 2 and f"{flag} must be in [0, 1]" in one_error_line(err), (flag, err)
        assert not (tmp_path / "out").exists()


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


# --------------------------------------------------------------------------- unwritable folders


_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER = 1, 2, 3
_PR_CAPBSET_DROP = 24


def _drop_root_file_powers() -> None:
    """preexec_fn: drop root's power to write anywhere from the child (Linux capabilities;
    dropped from the bounding set, so the program exec'd next never has them)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _CAP_FOWNER):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture()
def read_only_folder(tmp_path):
    """(a folder its owner cannot write, preexec_fn for a child that obeys that).

    As root, permission bits do not stop writes: the child then runs without the
    capabilities that override them. The fixture proves the folder really is read-only
    for such a child, and skips where that cannot be arranged."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    preexec = _drop_root_file_powers if os.geteuid() == 0 else None
    try:
        probe = run_py(["-c", "import sys; open(sys.argv[1] + '/probe', 'w')", str(folder)],
                       timeout=60, preexec_fn=preexec)
    except subprocess.SubprocessError as e:  # prctl refused (no CAP_SETPCAP)
        pytest.skip(f"cannot run a child without root's file powers: {e}")
    if probe.returncode == 0:
        pytest.skip("chmod 0555 does not stop writes here")
    assert "Permission denied" in probe.stderr
    yield folder, preexec
    folder.chmod(0o755)


def test_read_only_output_dir_fails_at_start_in_every_script(read_only_folder, flat50,
                                                            fmnist_folder):
    folder, preexec = read_only_folder
    small = ["--arch", "vit_pico", "--patch_size", "7", "--resize_size", "28", "--crop_size", "28",
             "--num_workers", "0", "--data_path", str(fmnist_folder)]
    runs = {
        "main_massl.py (existing folder)": [SCRIPT, *PICO, "--batch_size_per_gpu", "16",
                                            "--data_path", str(flat50), "--output_dir", str(folder)],
        "main_massl.py (new folder)": [SCRIPT, *PICO, "--batch_size_per_gpu", "16", "--data_path",
                                       str(flat50), "--output_dir", str(folder / "new")],
        "eval_knn.py": [str(ROOT / "eval_knn.py"), *small, "--nb_knn", "5",
                        "--output_dir", str(folder)],
        "eval_linear.py": [str(ROOT / "eval_linear.py"), *small, "--epochs", "1",
                           "--output_dir", str(folder / "linear")],
    }
    for name, argv in runs.items():
        result = run_py(argv, timeout=120, preexec_fn=preexec)
        assert result.returncode == 2, (name, result.stdout[-2000:], result.stderr[-2000:])
        line = one_error_line(result.stderr)
        assert re.match(r"error: cannot write to --output_dir \S+: Permission denied", line), line
        assert "training from" not in result.stdout and "extracting" not in result.stdout, name
        assert "backbone:" not in result.stdout, name
    assert os.listdir(folder) == []


def test_output_dir_check_needs_a_writable_folder(tmp_path, monkeypatch):
    # Works as any user: a file where the folder should be, and a refused write (simulated).
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for target in (blocker, blocker / "sub"):
        with pytest.raises(utils.UserError, match=f"cannot write to --output_dir {target}: "):
            storage.check_writable_dir(target)

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(Path(dir) / ".write_test"))
    monkeypatch.setattr(storage.tempfile, "mkstemp", refuse)
    with pytest.raises(utils.UserError, match="cannot write to --dump_features .*Permission denied"):
        storage.check_writable_dir(tmp_path / "dump", "--dump_features")


# --------------------------------------------------------------------------- disk full


@pytest.fixture()
def full_disk(tmp_path):
    """A path that fails like a file on a full disk: a link to /dev/full. Its non-ASCII name
    makes torch.save write through Python, whose ENOSPC is then chained inside torch's
    'unexpected pos' RuntimeError (the shape seen on a full cluster disk)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    link = tmp_path / "full_disk_é"
    os.symlink("/dev/full", link)
    return link


def _save_to_full_disk(real_save, link: Path):
    def save(obj, f, *args, **kwargs):
        return real_save(obj, str(link), *args, **kwargs)
    return save


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_previous_file(full_disk, tmp_path,
                                                                            monkeypatch):
    with pytest.raises(RuntimeError, match="unexpected pos") as real:
        torch.save({"w": torch.zeros(10000)}, str(full_disk))
    assert isinstance(real.value.__context__, OSError)
    assert real.value.__context__.errno == errno.ENOSPC

    path = tmp_path / "checkpoint.pth"
    storage.save_atomic({"w": torch.ones(3)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _save_to_full_disk(torch.save, full_disk))
    with pytest.raises(utils.UserError) as exc:
        storage.save_atomic({"w": torch.zeros(10000)}, path)
    assert str(exc.value) == (f"no space left on device while writing {path}; "
                              "the previous checkpoint.pth is intact")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", full_disk.name]
    with pytest.raises(utils.UserError, match="no space left on device while writing .*new.pth; "
                                              "nothing was written"):
        storage.save_atomic({"w": torch.zeros(10000)}, tmp_path / "new.pth")


def test_torch_write_failure_without_errno_is_judged_by_free_space(tmp_path, monkeypatch):
    # An ASCII path: torch's C++ writer fails with no errno at all.
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, "/dev/full"))
    monkeypatch.setattr(utils, "_free_bytes", lambda folder: 4096)
    with pytest.raises(utils.UserError, match="^no space left on device while writing"):
        storage.save_atomic({"w": torch.zeros(10000)}, tmp_path / "a.pth")
    monkeypatch.setattr(utils, "_free_bytes", lambda folder: 10 ** 12)
    with pytest.raises(utils.UserError, match=r"^the write failed part-way \(.*unexpected pos"):
        storage.save_atomic({"w": torch.zeros(10000)}, tmp_path / "a.pth")
    assert os.listdir(tmp_path) == []


def test_training_on_a_full_disk_stops_cleanly_and_logs_no_unsaved_epoch(full_disk, flat50,
                                                                         tmp_path, monkeypatch,
                                                                         capsys):
    out = tmp_path / "out"
    argv = PICO + ["--batch_size_per_gpu", "16", "--data_path", str(flat50), "--output_dir", str(out)]
    old_umask = os.umask(0o022)
    try:
        code, _, err = run_main(argv, capsys)
    finally:
        os.umask(old_umask)
    assert code == 0, err
    assert stat.S_IMODE((out / "checkpoint.pth").stat().st_mode) == 0o644  # the umask's mode
    before = (out / "checkpoint.pth").read_bytes()

    argv[argv.index("--epochs") + 1] = "2"
    monkeypatch.setattr(torch, "save", _save_to_full_disk(torch.save, full_disk))
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert one_error_line(err) == (f"error: no space left on device while writing "
                                   f"{out / 'checkpoint.pth'}; the previous checkpoint.pth is intact")
    assert (out / "checkpoint.pth").read_bytes() == before
    # log.txt gets an epoch only once its checkpoint is saved
    assert [json.loads(x)["epoch"] for x in (out / "log.txt").read_text().splitlines()] == [1]
    assert not list(out.glob(".*.tmp"))


# --------------------------------------------------------------------------- output folder hygiene


def test_saved_files_respect_the_umask(tmp_path):
    def mode(name: str) -> int:
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    old = os.umask(0o027)
    try:
        storage.save_atomic({"w": torch.ones(1)}, tmp_path / "a.pth")
        os.umask(0o002)
        storage.save_atomic({"w": torch.ones(1)}, tmp_path / "b.pth")
        assert (mode("a.pth"), mode("b.pth")) == (0o640, 0o664)  # not mkstemp's 0600
        storage.write_json({"x": 1}, tmp_path / "c.json")
        assert mode("c.json") == 0o664
    finally:
        os.umask(old)


def test_temp_files_of_a_killed_save_are_removed_at_start(flat50, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".checkpoint.pth.k3j2_x.tmp", out / ".checkpoint0050.pth.a1b2c3.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    kept = [out / "notes.txt", out / ".other.tmp"]
    for path in kept:
        path.write_text("mine")
    code, _, err = run_main(PICO + ["--batch_size_per_gpu", "16", "--data_path", str(flat50),
                                    "--output_dir", str(out)], capsys)
    assert code == 0, err
    assert not any(p.exists() for p in stale)
    assert all(p.read_text() == "mine" for p in kept)


# --------------------------------------------------------------------------- distributed start


def test_a_slurm_job_missing_its_other_tasks_says_so_and_times_out(flat50, tmp_path):
    port = _free_port()
    env = _env(SLURM_NTASKS="2", SLURM_PROCID="0", SLURM_LOCALID="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), **{DIST_TIMEOUT_ENV: "4"})
    result = run_py([SCRIPT, *PICO, "--batch_size_per_gpu", "8", "--data_path", str(flat50),
                     "--output_dir", str(tmp_path / "out")], timeout=120, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (f"waiting for 2 processes at 127.0.0.1:{port} (rank 0 of 2); giving up after 4 s "
            f"({DIST_TIMEOUT_ENV})") in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the 2 processes did not meet at 127.0.0.1:{port} "
                           "(this is rank 0 of 2): "), last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_dist_timeout_setting(monkeypatch):
    assert distributed.DIST_TIMEOUT_ENV == DIST_TIMEOUT_ENV
    monkeypatch.delenv(DIST_TIMEOUT_ENV, raising=False)
    assert distributed.dist_timeout_s() == 1800
    monkeypatch.setenv(DIST_TIMEOUT_ENV, "2.5")
    assert distributed.dist_timeout_s() == 2.5
    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv(DIST_TIMEOUT_ENV, bad)
        with pytest.raises(utils.UserError, match=DIST_TIMEOUT_ENV):
            distributed.dist_timeout_s()


def test_a_killed_holders_forked_children_do_not_keep_the_lock(tmp_path):
    """SIGKILL of a run whose data workers live on for seconds: the folder is free at once."""
    script = (
        "import os, signal, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import storage\n"
        f"storage.FolderLock({str(tmp_path)!r}).acquire()\n"
        "if os.fork() == 0:\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print('locked', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.wait(30)
        lock = storage.FolderLock(tmp_path)
        lock.acquire()  # would raise "in use by another run" while the child held the lock
        lock.release()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
