"""run_folder: which checkpoints a run resumes from, and the one-line refusals of the others."""
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import main_massl
import run_folder
import utils
from faults import PICO, ROOT, SCRIPT, TIMEOUT, _env, load, one_error_line, run_py
from test_main_massl import _read_until, run_main


def _checkpoint(path, **extra):
    ckpt = {key: {} for key in run_folder.CHECKPOINT_KEYS}
    ckpt.update(epoch=1, images_per_step=16, epoch_images_done=0, **extra)
    torch.save(ckpt, path)
    return path


def _args(*flags):
    return main_massl.build_cli_parser().parse_args(["--data_path", "x", *flags])


@pytest.mark.parametrize("saved_as", ["memory_size", "out_dim"])
def test_a_checkpoint_of_another_memory_size_is_refused_naming_the_flag(tmp_path, saved_as):
    """Args saved under the internal name or (before the rename) under the flag's name."""
    path = _checkpoint(tmp_path / "c.pth", args={saved_as: 32, "arch": "vit_small"})
    with pytest.raises(utils.UserError, match=r"trained with --out_dim 32, this run has --out_dim 64"):
        run_folder.load_checkpoint(path, _args("--out_dim", "64"))
    assert run_folder.load_checkpoint(path, _args("--out_dim", "32"))["epoch"] == 1


def test_a_checkpoint_without_the_resume_position_is_refused(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({key: {} for key in ("student", "teacher", "optimizer", "memory", "epoch")}, path)
    with pytest.raises(utils.UserError,
                       match=r"not a MaSSL training checkpoint \(no images_per_step, epoch_images_done\)"):
        run_folder.load_checkpoint(path, _args())


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
