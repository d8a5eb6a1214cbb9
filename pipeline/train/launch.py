"""Start the processes of a training stage, and say what its SLURM job must ask for.

- one process: ``python -m pipeline.train.stage`` (on the CPU DeepSpeed runs with gloo), given the launcher's
  ``--config`` and paths (``--train-data --init --output-dir`` and ``--features-index`` or ``--videos``);
- several processes on one machine outside SLURM: ``torchrun --standalone --nproc_per_node <n>``;
- inside a SLURM allocation with several processes: ``srun`` starts one task per GPU (or per CPU process)
  across the job's nodes; each task takes its rank from SLURM (:func:`slurm_rank_env`) and meets the others at
  ``MASTER_ADDR:MASTER_PORT``, the first node of the step and a port derived from the job id. ``scancel
  --signal=TERM`` and the time-limit warning reach every rank directly, with no torchrun in between.

:func:`slurm_resources` turns a stage's ``resources`` into the Snakemake resources that the SLURM executor
plugin (snakemake-executor-plugin-slurm 2.x, ``mpi``: the rule's command calls ``srun`` itself) submits as
``sbatch --nodes --gres=gpu:<per node> --ntasks-per-node --cpus-per-task --mem --time``.

This replaces the seed READMEs' hand-typed ``torchrun --nproc_per_node=8 ...`` and ``deepspeed ...`` lines.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys

from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.train.config import add_path_arguments, paths_from_args

log = logging.getLogger(__name__)

SIGNAL_BEFORE_END_S = 300  # SLURM sends SIGTERM this long before the time limit: the stage saves and stops


def per_node(gpus: int, processes: int | None) -> int:
    """Training processes per node: ``processes``, else one per GPU, else one (on the CPU)."""
    return processes or max(gpus, 1)


def rendezvous_port(job_id: str) -> int:
    """The rendezvous port of SLURM job ``job_id`` (15000-34999): jobs sharing a node get different ports."""
    return 15000 + int(job_id) % 20000 if job_id.isdigit() else 29500


def build_command(stage_args: list[str], gpus: int, nodes: int, processes: int | None = None, cpus: int = 1,
                  in_slurm: bool = False, python: str = sys.executable) -> list[str]:
    """The command line that runs a stage on ``nodes`` nodes with ``gpus`` GPUs each.

    Args:
        stage_args: the options of every ``pipeline.train.stage`` process (``--config`` and the paths of
            :func:`pipeline.train.config.add_path_arguments`).
        gpus: GPUs per node (0: CPU).
        nodes: nodes of the job.
        processes: processes per node (default: one per GPU, or one on the CPU; several CPU processes train
            with the gloo backend).
        cpus: CPU cores per node, shared out among its processes (``srun --cpus-per-task``).
        in_slurm: inside a SLURM allocation (``SLURM_JOB_ID`` set): several processes start as ``srun`` tasks.

    Raises:
        ValueError: counts below their minimum, or several nodes outside a SLURM allocation.
    """
    stage = [python, "-m", "pipeline.train.stage", *stage_args]
    n = per_node(gpus, processes)
    if gpus < 0 or nodes < 1 or n < 1:
        raise ValueError(f"need gpus >= 0, nodes >= 1 and processes >= 1, got {gpus}, {nodes}, {n}")
    if n * nodes == 1:
        return stage
    if in_slurm:
        return ["srun", f"--nodes={nodes}", f"--ntasks={n * nodes}", f"--ntasks-per-node={n}",
                f"--cpus-per-task={max(1, cpus // n)}", "--kill-on-bad-exit=1", *stage, "--ranks-from-slurm"]
    if nodes > 1:
        raise ValueError(f"{nodes} nodes need a SLURM allocation: run the workflow with --profile slurm")
    return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *stage[1:]]


def slurm_rank_env(env: dict[str, str]) -> dict[str, str]:
    """torch.distributed's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) for one task of an ``srun`` step, from the variables SLURM gives it.

    Raises:
        KeyError: ``env`` is not a SLURM task's environment (no ``SLURM_PROCID``).
    """
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                           check=True).stdout.split()
    return {
        "RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"], "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": env.get("SLURM_NTASKS_PER_NODE") or str(world // nodes), "MASTER_ADDR": hosts[0],
        "MASTER_PORT": env.get("MASTER_PORT") or str(rendezvous_port(env.get("SLURM_JOB_ID", ""))),
    }


def slurm_resources(resources: dict) -> dict:
    """The Snakemake resources of a training job from a stage's ``resources`` (see the config schema).

    One node, one process: the plugin runs the rule inside ``srun -n1`` with ``cpus`` cores. Several processes:
    ``mpi`` (the launcher calls ``srun``) with one task per GPU or CPU process on every node, and ``cpus``
    divided among them. GPUs are asked per node (``gres=gpu[:<gpu_model>]:<gpus>``), so that 4 nodes x 8 GPUs is
    ``--nodes=4 --gres=gpu:8 --ntasks-per-node=8``. Training jobs are requeueable (SLURM's preemption puts them
    back in the queue, and the stage resumes from its checkpoint) and get SIGTERM ``signal_before_end`` seconds
    before their time limit, so that they save a checkpoint before they are killed.
    """
    gpus, nodes = resources["gpus"], resources["nodes"]
    n = per_node(gpus, resources.get("processes"))
    out = {"nodes": nodes, "mem_mb": resources["mem_mb"], "runtime": resources["runtime"],
           "slurm_extra": f"--requeue --signal=TERM@{resources.get('signal_before_end', SIGNAL_BEFORE_END_S)}"}
    if gpus:
        model = resources.get("gpu_model")
        out["gres"] = f"gpu:{model}:{gpus}" if model else f"gpu:{gpus}"
    if n * nodes > 1:
        out["mpi"] = "srun"
        out["cpus_per_task"] = max(1, resources["cpus"] // n)
        if n > 1:
            out["tasks_per_node"] = n
        else:  # one task on each of several nodes; with GPUs, the plugin reads tasks as tasks per GPU otherwise
            out["tasks"] = nodes
            if gpus:
                out["tasks_per_gpu"] = 1
    return out


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.train.launch --config STAGE.yaml --train-data D --init I --output-dir O
    (--features-index I | --videos V) --gpus G --nodes N``: the training rules' command."""
    parser = cli_parser(__spec__.name, __doc__)
    parser.add_argument("--config", required=True, help="the stage's settings (stage.yaml)")
    add_path_arguments(parser)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--processes", type=int, default=0, help="processes per node (0: one per GPU, or one)")
    parser.add_argument("--cpus", type=int, default=1, help="CPU cores per node")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Replace this process with the stage's processes (:func:`build_command`)."""
    args = parser().parse_args(argv)
    job = os.environ.get("SLURM_JOB_ID")
    stage_args = ["--config", args.config, *paths_from_args(args).argv()]
    command = build_command(stage_args, args.gpus, args.nodes, args.processes or None, args.cpus,
                            in_slurm=job is not None)
    if job:
        os.environ.setdefault("MASTER_PORT", str(rendezvous_port(job)))
        log.info("SLURM job %s on %s, CUDA_VISIBLE_DEVICES=%s", job, os.uname().nodename,
                 os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
    log.info("launching: %s", shlex.join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    run(main)
