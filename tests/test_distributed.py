"""distributed.py: set-up without a launcher or from SLURM variables, a job missing its
other tasks, the rendezvous timeout setting."""
from __future__ import annotations

import pytest

import distributed
import utils
from faults import DIST_TIMEOUT_ENV, PICO, SCRIPT, _env, run_py
from test_main_massl import _free_port


# --------------------------------------------------------------------------- set-up


def test_init_distributed_single_process_needs_no_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                 "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    env = distributed.init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    assert not distributed.is_dist()
    assert distributed.all_reduce_mean(3.0, env.device) == 3.0


def test_init_distributed_reads_slurm_variables_and_asks_for_a_master(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(utils.UserError, match="MASTER_ADDR"):
        distributed.init_distributed(device="cpu")


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
