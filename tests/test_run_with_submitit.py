"""run_with_submitit.py: the SLURM launcher requeues a preempted run, which resumes; local
executor with two ranks; the job it submits; one-line errors, also without submitit."""
import json
import os
import signal
import sys

import pytest
import torch

import run_with_submitit
from fabricated import logged_epochs, needs, tiny_run_argv


@pytest.fixture
def as_a_submitit_task(monkeypatch, tmp_path):
    """This process as task 0 of a one-task submitit job on the local executor; the
    variables the Trainer sets and the signal handlers submitit installs are undone after."""
    folder = tmp_path / "job"
    folder.mkdir()
    for name, value in dict(SUBMITIT_EXECUTOR="local", SUBMITIT_FOLDER=str(folder),
                            SUBMITIT_LOCAL_JOB_ID="4242", SUBMITIT_LOCAL_NTASKS="1",
                            SUBMITIT_LOCAL_GLOBALID="0", SUBMITIT_LOCAL_LOCALID="0",
                            SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_JOB_NUM_NODES="1",
                            RANK="", WORLD_SIZE="", LOCAL_RANK="", MASTER_ADDR="",
                            MASTER_PORT="").items():
        monkeypatch.setenv(name, value)
    signals = [signal.SIGTERM, signal.SIGCONT, signal.SIGUSR1, signal.SIGUSR2]
    saved = {s: signal.getsignal(s) for s in signals}
    yield folder
    for s, handler in saved.items():
        signal.signal(s, handler)


@needs("submitit")
def test_checkpoint_hook_requeues_the_same_run(tmp_path):
    import submitit

    args = run_with_submitit.get_args_parser().parse_args(
        tiny_run_argv(tmp_path / "data", tmp_path / "out", epochs=5))
    trainer = run_with_submitit.Trainer(args)
    delayed = trainer.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, run_with_submitit.Trainer)
    assert delayed.function is not trainer and delayed.args == () and delayed.kwargs == {}
    assert vars(delayed.function.args) == vars(args)  # same output_dir: resumes from there


@needs("submitit")
def test_preemption_saves_mid_run_then_requeues_and_resumes(as_a_submitit_task, tiny_images,
                                                             tmp_path):
    import threading
    import time

    import submitit
    from submitit.core.job_environment import JobEnvironment
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    out = tmp_path / "out"
    args = run_with_submitit.get_args_parser().parse_args(tiny_run_argv(tiny_images, out, 3))
    delayed = submitit.helpers.DelayedSubmission(run_with_submitit.Trainer(args))
    delayed.set_timeout(60, 3)
    env = JobEnvironment()
    env._handle_signals(env.paths, delayed)  # what submitit does before running the job

    def preempt_after_first_epoch():
        deadline = time.monotonic() + 300
        while not (out / "log.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR2)  # what SLURM sends 90 s before the limit

    watcher = threading.Thread(target=preempt_after_first_epoch, daemon=True)
    watcher.start()
    with pytest.raises(SystemExit) as exit_info:
        delayed.result()
    watcher.join()
    assert exit_info.value.code == LOCAL_REQUEUE_RETURN_CODE  # requeued

    # The stop was clean: a checkpoint after epoch 1 and before the end of the run.
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert 2 <= ckpt["global_step"] < 3 * 2
    assert logged_epochs(out) == list(range(1, ckpt["epoch"] + 1))
    # The requeued job is the same run and resumes from that checkpoint, up to the end.
    requeued = submitit.helpers.DelayedSubmission.load(env.paths.submitted_pickle)
    assert vars(requeued.function.args) == vars(args)
    assert requeued.function() == "finished"
    assert logged_epochs(out) == [1, 2, 3]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["global_step"] == 3 * 2


@needs("submitit")
def test_local_executor_runs_two_ranks_from_the_job_environment(tiny_images, tmp_path,
                                                                monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "")  # submit() prepends the repository for the job
    out = tmp_path / "out"
    args = run_with_submitit.get_args_parser().parse_args(
        tiny_run_argv(tiny_images, out, epochs=1, batch=8)
        + ["--cluster", "local", "--ngpus", "2", "--timeout", "10"])
    job = run_with_submitit.submit(args)
    assert job.results() == ["finished", "finished"]
    log = json.loads((out / "log.txt").read_text())
    assert log["epoch"] == 1
    assert len(log["rank_fingerprints"]) == 2  # one process group of 2 ranks
    assert (out / "submitit").is_dir()


@needs("submitit")
def test_slurm_submission_asks_for_the_nodes_gpus_time_and_signal(tmp_path, monkeypatch, capsys,
                                                                  tiny_images):
    import submitit

    # Stand-ins for SLURM's commands: sbatch keeps the script it is given.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncp "$1" "$(dirname "$0")/submitted.sh"\n'
                                    'echo "Submitted batch job 4321"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.chdir(tiny_images.parent)
    run_with_submitit.main(tiny_run_argv("images", "out", epochs=1, batch=4)
                           + ["--nodes", "2", "--ngpus", "4", "--timeout", "600",
                              "--partition", "gpu", "--account", "proj"])
    assert "submitted job 4321" in capsys.readouterr().out
    script = (bin_dir / "submitted.sh").read_text()
    for line in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--time=600",
                 "--partition=gpu", "--account=proj", "--mem=160GB",
                 f"--signal={submitit.JobEnvironment.USR_SIG}@90"]:
        assert f"#SBATCH {line}\n" in script, line
    # The pickled job holds absolute paths: it may start in another directory.
    job_dir = tmp_path / "out" / "submitit"
    pickled = submitit.helpers.DelayedSubmission.load(next(job_dir.glob("*_submitted.pkl")))
    assert pickled.function.args.data_path == str(tiny_images)
    assert pickled.function.args.output_dir == str(tmp_path / "out")


@needs("submitit")
def test_launcher_errors_are_one_line(tmp_path, monkeypatch, capsys, tiny_images):
    argv = tiny_run_argv(tiny_images, tmp_path / "out", epochs=1)
    cases = [
        (["--cluster", "slurm"], "sbatch not found"),
        (["--cluster", "local", "--nodes", "2"], "--nodes 1"),
        (["--cluster", "local", "--ngpus", "3"], "not a multiple of the global batch"),
    ]
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    for extra, message in cases:
        with pytest.raises(SystemExit) as e:
            run_with_submitit.main(argv + extra)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    # A preemption signal the trainer would swallow (SUBMITIT_PREEMPT_SIGNAL=USR1) is refused.
    import submitit
    monkeypatch.setattr(submitit.JobEnvironment, "USR_SIG", "USR1")
    with pytest.raises(SystemExit):
        run_with_submitit.main(argv + ["--cluster", "local"])
    assert "would not be requeued" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing submitted


def test_launcher_without_submitit_says_how_to_get_it(tmp_path, monkeypatch, capsys,
                                                      tiny_images):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        run_with_submitit.main(tiny_run_argv(tiny_images, tmp_path / "out", epochs=1)
                               + ["--cluster", "local"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install submitit" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
