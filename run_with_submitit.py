"""Submit MaSSL pretraining to SLURM with submitit; preempted or timed-out jobs save and requeue.

    python run_with_submitit.py --nodes 1 --ngpus 2 --timeout 2880 --partition gpu \\
        --arch vit_small --data_path /datasets/imagenet/train --output_dir /checkpoints/massl_vits16

Every ``main_massl.py`` flag is accepted and passed on; the flags below only say where and how
to run. One task per GPU; each task's rank, local rank and world size come from the SLURM job
(``submitit.JobEnvironment``), and the first node is the rendezvous (``MASTER_ADDR``, with a
``MASTER_PORT`` derived from the job id), so ``main_massl.train`` sets itself up as under
torchrun. ``--output_dir`` should be on storage every node sees: checkpoints go there and a
requeued job resumes from its ``checkpoint.pth``. submitit's logs and pickles go to
``--job_dir`` (default ``<output_dir>/submitit``). ``--cluster local`` runs the same job on this
machine (one process per ``--ngpus``), to try the launcher without a cluster.

Needs ``pip install submitit`` (an optional dependency; nothing else in the project uses it).

How preemption and the time limit are handled, and why
------------------------------------------------------
submitit asks SLURM for a signal (SIGUSR2; ``$SUBMITIT_PREEMPT_SIGNAL``) 90 s before the time
limit, and on preemption where the cluster forwards it. Left alone, submitit's handler calls
``Trainer.checkpoint()``, stores the ``DelayedSubmission`` it returns, runs ``scontrol requeue``
and exits wherever the training loop happens to be: with DINO's launcher, the requeued job
restarts from the last end-of-epoch checkpoint and up to an epoch of work (an hour or more on
ImageNet) is lost every time.

Here the signal first stops training cleanly. While ``main_massl.train`` runs, submitit's signal
is passed to the trainer's own SIGTERM/SIGUSR1 handler: every rank finishes the current step,
rank 0 saves ``checkpoint.pth`` mid-epoch (training resumes from any step exactly) and
``train`` returns ``"preempted"``. Only then is submitit's handler called, which takes
``checkpoint()`` (a fresh ``Trainer`` with the same args: restarting is resuming from
``output_dir/checkpoint.pth``), requeues the job (rank 0) and exits. A signal that arrives
before training has started (nothing to save yet) goes straight to submitit. SIGTERM alone
(``scancel``; preemption on clusters that send no user signal) makes the trainer save and stop
without a requeue, as submitit would: SLURM requeues preempted jobs itself where configured.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import types
from pathlib import Path
from typing import Any

import main_massl
from distributed import StopRequest
from utils import UserError, exit_with_error

REPO_DIR = str(Path(__file__).resolve().parent)


def import_submitit() -> types.ModuleType:
    """The submitit module, or a UserError telling how to install it."""
    try:
        import submitit
    except ImportError:
        raise UserError("run_with_submitit.py needs submitit (an optional dependency): "
                        "pip install submitit") from None
    return submitit


def master_port(job_id: str) -> int:
    """A rendezvous port every task of a job agrees on without talking: from the job id, so
    two jobs sharing a node (almost always) differ."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def set_distributed_env(job_env: Any) -> None:
    """The torchrun variables ``distributed.init_distributed`` reads, from a submitit JobEnvironment."""
    os.environ.update(
        MASTER_ADDR=job_env.hostnames[0] if job_env.num_nodes > 1 else "127.0.0.1",
        MASTER_PORT=str(master_port(job_env.job_id)),
        RANK=str(job_env.global_rank),
        LOCAL_RANK=str(job_env.local_rank),
        WORLD_SIZE=str(job_env.num_tasks),
    )


class Trainer:
    """What each task of the job runs: ``main_massl.train(args)``, stopping cleanly and
    requeueing on preemption/timeout (see the module docstring). Pickled with the job."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> str:
        submitit = import_submitit()
        job_env = submitit.JobEnvironment()
        set_distributed_env(job_env)
        preempt_signal = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        submitit_handler = signal.getsignal(preempt_signal)  # installed before we are called
        requested: list[int] = []

        def stop_training(signum: int, frame: Any) -> None:
            trainer_handler = signal.getsignal(signal.SIGUSR1)
            if callable(trainer_handler):
                requested.append(signum)
                trainer_handler(signum, frame)  # finish the step, save, return "preempted"
            elif callable(submitit_handler):  # training not running: nothing to save
                submitit_handler(signum, frame)

        signal.signal(preempt_signal, stop_training)
        try:
            outcome = main_massl.train(self.args, install_signal_handlers=True)
        finally:
            signal.signal(preempt_signal, submitit_handler)
        print(f"rank {job_env.global_rank}: training {outcome}", flush=True)
        if outcome == "preempted" and requested and callable(submitit_handler):
            # Rank 0: calls self.checkpoint(), requeues the job and exits. Other ranks: no-op.
            submitit_handler(requested[0], None)
        return outcome

    def checkpoint(self) -> Any:
        """submitit's requeue hook: the same run again, which resumes from
        ``output_dir/checkpoint.pth`` (saved by train() before this is called)."""
        submitit = import_submitit()
        print(f"requeueing: the next job resumes from {self.args.output_dir}/checkpoint.pth",
              flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(self.args))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "run_with_submitit.py", parents=[main_massl.get_args_parser()], allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Submit MaSSL pretraining (main_massl.py, all of whose flags apply) to SLURM "
                    "with submitit. Preempted or timed-out jobs save and requeue themselves.")
    group = parser.add_argument_group("SLURM job (submitit)")
    group.add_argument("--nodes", default=1, type=int, help=(
        "Nodes to use. Reference runs: 1 node (2 GPUs for ViT-S, 4 for ViT-B)."))
    group.add_argument("--ngpus", default=2, type=int, help=(
        "GPUs per node; one training process per GPU. The global batch is "
        "batch_size_per_gpu x ngpus x nodes. Reference runs: 2 x 64 (ViT-S), 4 x 32 (ViT-B)."))
    group.add_argument("--timeout", default=2880, type=int, help=(
        "Time limit of each job in minutes. Longer runs are cut into jobs of this length: at the "
        "limit the job saves and requeues itself (see --max_num_timeout)."))
    group.add_argument("--max_num_timeout", default=30, type=int, help=(
        "How many times a run may hit --timeout and be requeued (preemptions do not count). "
        "800 ViT-S epochs take several days."))
    group.add_argument("--partition", default=None,
                       help="SLURM partition; None: the cluster's default partition.")
    group.add_argument("--account", default=None,
                       help="SLURM account, on clusters that need one.")
    group.add_argument("--qos", default=None, help="SLURM quality of service, if any.")
    group.add_argument("--constraint", default=None,
                       help="SLURM node constraint, e.g. a GPU type such as volta32gb.")
    group.add_argument("--cpus_per_task", default=10, type=int, help=(
        "CPU cores per process (GPU): its --num_workers data loaders and the training loop."))
    group.add_argument("--mem_gb", default=None, type=int, help=(
        "Memory per node in GB; None: 40 per GPU."))
    group.add_argument("--job_name", default="massl", help="SLURM job name.")
    group.add_argument("--job_dir", default="", help=(
        "Folder for submitit's logs and job pickles; empty: <output_dir>/submitit."))
    group.add_argument("--cluster", default="slurm", choices=["slurm", "local"], help=(
        "slurm submits with sbatch; local runs the job on this machine (one node, one process "
        "per --ngpus), to try the launcher."))
    return parser


def check_preempt_signal(submitit: types.ModuleType) -> None:
    """submitit's preemption signal must not be one main_massl.train handles itself: the
    trainer would take it, save and stop, and the job would never be requeued."""
    name = "SIG" + submitit.JobEnvironment.USR_SIG  # from $SUBMITIT_PREEMPT_SIGNAL, default USR2
    if name in StopRequest.SIGNALS:
        raise UserError(f"SUBMITIT_PREEMPT_SIGNAL={submitit.JobEnvironment.USR_SIG}: main_massl.py "
                        f"handles {name} itself and the job would not be requeued; use USR2 "
                        "(submitit's default) or HUP")


def submit(args: argparse.Namespace) -> Any:
    """Submit the training job described by ``args``; returns the submitit Job."""
    submitit = import_submitit()
    check_preempt_signal(submitit)
    if args.cluster == "slurm" and shutil.which("sbatch") is None:
        raise UserError("sbatch not found: this machine cannot submit SLURM jobs (use "
                        "--cluster local to run the job here)")
    if args.cluster == "local" and args.nodes != 1:
        raise UserError("--cluster local runs on this machine only: use --nodes 1")
    if args.nodes < 1 or args.ngpus < 1:
        raise UserError("--nodes and --ngpus must be >= 1")
    # Jobs may start in another directory: every path they use is made absolute here.
    args.output_dir = str(Path(args.output_dir).resolve())
    args.data_path = str(Path(args.data_path).resolve())
    if args.resume:
        args.resume = str(Path(args.resume).resolve())
    # Bad flags fail now rather than after hours in the queue. The device is checked on the
    # compute node (this one may have no GPU).
    main_massl.check_args(argparse.Namespace(**{**vars(args), "device": None}),
                          args.nodes * args.ngpus)
    if not Path(args.data_path).exists():
        print(f"warning: --data_path {args.data_path} does not exist here; the job will fail "
              "unless the compute nodes have it", file=sys.stderr)
    job_dir = Path(args.job_dir or Path(args.output_dir) / "submitit").resolve()
    job_dir.mkdir(parents=True, exist_ok=True)
    # The job unpickles Trainer and imports main_massl: let it find this repository wherever
    # it starts (SLURM and the local executor pass the environment on).
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_DIR, os.environ.get("PYTHONPATH", "")) if p)

    executor = submitit.AutoExecutor(folder=job_dir, cluster=args.cluster,
                                     slurm_max_num_timeout=args.max_num_timeout,
                                     local_max_num_timeout=args.max_num_timeout)
    executor.update_parameters(
        name=args.job_name, nodes=args.nodes, tasks_per_node=args.ngpus,
        gpus_per_node=args.ngpus, cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb or 40 * args.ngpus, timeout_min=args.timeout,
        slurm_partition=args.partition, slurm_account=args.account, slurm_qos=args.qos,
        slurm_constraint=args.constraint)
    return executor.submit(Trainer(args))


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    try:
        job = submit(args)
    except UserError as e:
        exit_with_error(str(e))
    print(f"submitted job {job.job_id} ({args.nodes} node(s) x {args.ngpus} GPU(s), "
          f"{args.cluster}); output: {args.output_dir}; logs: {job.paths.stdout.parent}")


if __name__ == "__main__":
    main()
