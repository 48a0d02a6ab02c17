"""storage.py: atomic writes, the output folder lock (also after SIGKILL, with forked
children), read-only folders, a full disk, file permissions."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import storage
import utils
from faults import PICO, ROOT, SCRIPT, TIMEOUT, _env, one_error_line, run_py
from test_main_massl import _read_until, run_main


# --------------------------------------------------------------------------- atomic writes


def test_save_atomic_leaves_no_temp_and_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pth"
    storage.save_atomic({"a": torch.ones(2)}, path)
    assert torch.load(path, weights_only=True)["a"].sum() == 2

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        storage.save_atomic({"a": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["a"].sum() == 2  # the old one survived
    assert os.listdir(tmp_path) == ["ckpt.pth"]


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
