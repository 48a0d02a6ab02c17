"""main_massl.py: Ctrl-C saves and stops (a second one at once), bad settings refused up front,
another optimizer's state and a full disk at the log write as one line."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import main_massl
import distributed
from test_train import ROOT, SCRIPT, TIMEOUT, TINY, _env, _read_until, run_main, tiny_data  # noqa: F401


def args_for(tiny_data, out, *extra):
    return [*TINY, "--batch_size_per_gpu", "16", "--epochs", "1", "--lr", "0.01",
            "--data_path", str(tiny_data), "--output_dir", str(out), *extra]


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def start_in_own_group(argv):
    return subprocess.Popen([sys.executable, SCRIPT, *argv], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def group_gone(pid):
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    return False


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups")
def test_ctrl_c_saves_mid_epoch_and_the_same_command_resumes(tiny_data, tmp_path, capsys):
    # A terminal's Ctrl-C reaches the whole foreground group: the run and its data workers.
    argv = args_for(tiny_data, tmp_path / "out", "--num_workers", "2")
    argv[argv.index("--epochs") + 1] = "3"
    proc = start_in_own_group(argv)
    _read_until(proc, r"Epoch \[1/3\] it \[2/6\]")
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert "interrupted (Ctrl-C): state saved in" in stderr and "run the same command" in stderr
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] >= 2  # mid-epoch, not lost
    assert group_gone(proc.pid)  # no data worker left behind
    argv[argv.index("--num_workers") + 1] = "0"
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    assert "resumed from" in out


def test_a_second_ctrl_c_stops_at_once(capsys):
    stop = distributed.StopRequest()
    assert stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the first: recorded, the run goes on to save
        assert stop.signal_name == "SIGINT"
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode
        assert exc.value.code == 130
    finally:
        stop.restore()
    err = capsys.readouterr().err
    assert "Ctrl-C again to stop at once" in err and "second Ctrl-C: stopping now" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("flags, fragment", [
    (["--warmup_epochs", "5"], "--warmup_epochs 5 is more than --epochs 1"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0"),
    (["--weight_decay_end", "-0.1"], "--weight_decay_end must be >= 0"),
    (["--seed", "-1"], "--seed must be in 0..4294967295"),
    (["--seed", "99999999999"], "--seed must be in 0..4294967295"),
    (["--out_dim", "2000000000", "--partition_size", "16"], "--out_dim 2000000000 needs at least"),
])
def test_bad_settings_are_refused_up_front(tmp_path, capsys, flags, fragment):
    argv = args_for(tmp_path / "no_data", tmp_path / "out", *flags)
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert fragment in one_error_line(err)
    assert not (tmp_path / "out").exists()


def test_memory_need_is_a_lower_bound_of_the_bank_and_logits():
    args = main_massl.get_args_parser().parse_args(["--data_path", "x", "--out_dim", "65536", "--bottleneck_dim", "256",
                                                    "--batch_size_per_gpu", "64",
                                                    "--local_crops_number", "10"])
    assert main_massl.memory_need_bytes(args) == 4 * 65536 * (256 + 3 * 64 * 12)


def test_resuming_another_optimizers_state_is_one_line(tiny_data, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_main(args_for(tiny_data, out), capsys)
    assert code == 0, err
    argv = args_for(tiny_data, out, "--optimizer", "sgd")
    argv[argv.index("--epochs") + 1] = "2"
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert "holds the state of --optimizer adamw, not of --optimizer sgd" in one_error_line(err)


def test_a_full_disk_at_the_log_write_is_one_line_and_the_checkpoint_is_kept(tiny_data, tmp_path,
                                                                              capsys, monkeypatch):
    import builtins
    import errno

    real_open = builtins.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith("log.txt") and "a" in mode:  # the disk fills exactly here
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    out = tmp_path / "out"
    code, _, err = run_main(args_for(tiny_data, out), capsys)
    assert code == 2
    line = one_error_line(err)
    assert f"no space left on device while appending to {out / 'log.txt'}" in line
    assert "run the same command again" in line
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_stop_request_ignores_signals_in_forked_children():
    stop = distributed.StopRequest()
    stop._pid = os.getpid() + 1  # as seen from a forked data worker
    stop._handle(signal.SIGINT, None)
    stop._handle(signal.SIGINT, None)
    assert stop.signal_name is None


def test_a_lost_rank_gives_one_line_naming_the_rank_and_how_to_resume(tiny_data, tmp_path):
    from test_eval import free_port

    argv = args_for(tiny_data, tmp_path / "out", "--batch_size_per_gpu", "8")
    argv[argv.index("--epochs") + 1] = "20"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "MASSL_DIST_TIMEOUT_S": "60",
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, SCRIPT, *argv], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _read_until(procs[0], r"Epoch \[1/20\] it \[2/")
        procs[1].kill()  # SIGKILL: the rank vanishes mid-step
        _, stderr = procs[0].communicate(timeout=120)
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    assert procs[0].returncode == 1, stderr
    line = one_error_line(stderr)
    assert "rank 0 of 2: lost contact with the other processes" in line
    assert "run the same command again to resume" in line
