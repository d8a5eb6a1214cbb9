"""Start the processes of a training stage: one per GPU across the job's nodes, or one on the CPU.

- one process: ``python -m pipeline.train.stage`` (on the CPU DeepSpeed runs with gloo);
- one node: ``torchrun --standalone --nproc_per_node <gpus>`` (or ``<processes>`` CPU processes, gloo);
- several nodes (inside a SLURM allocation): ``srun`` starts one ``torchrun`` per node, which starts one process
  per GPU, all meeting at a c10d rendezvous on the allocation's first node.

This replaces the seed READMEs' hand-typed ``torchrun --nproc_per_node=8 ...`` and ``deepspeed ...`` lines.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys

from pipeline import configure_logging

log = logging.getLogger(__name__)

RDZV_PORT = 29500


def build_command(config: str, gpus: int, nodes: int, head_node: str | None = None, job_id: str = "stage",
                  python: str = sys.executable, processes: int | None = None) -> list[str]:
    """The command line that runs stage ``config`` on ``nodes`` nodes with ``gpus`` GPUs each.

    Args:
        gpus: GPUs per node (0: CPU).
        nodes: nodes in the allocation.
        head_node: host of the rendezvous for several nodes (the allocation's first node).
        job_id: rendezvous id (the SLURM job id), shared by all nodes of the job.
        processes: processes per node (default: one per GPU, or one on the CPU; several CPU processes train
            with the gloo backend).

    Raises:
        ValueError: several nodes without ``head_node``, or counts below their minimum.
    """
    stage = ["-m", "pipeline.train.stage", "--config", config]
    processes = processes or max(gpus, 1)
    if gpus < 0 or nodes < 1 or processes < 1:
        raise ValueError(f"need gpus >= 0, nodes >= 1 and processes >= 1, got {gpus}, {nodes}, {processes}")
    if processes == 1 and nodes == 1:
        return [python, *stage]
    torchrun = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    if nodes == 1:
        return [*torchrun[:3], "--standalone", *torchrun[3:], *stage]
    if not head_node:
        raise ValueError("several nodes need the rendezvous host (the allocation's first node)")
    return [
        "srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        *torchrun, "--nnodes", str(nodes), "--rdzv_backend", "c10d",
        "--rdzv_endpoint", f"{head_node}:{RDZV_PORT}", "--rdzv_id", job_id, *stage,
    ]


def slurm_head_node() -> str | None:
    """The first host of the current SLURM allocation (``scontrol show hostnames``), or None outside one."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.train.launch --config STAGE.yaml --gpus G --nodes N``: the training rules' command."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--processes", type=int, default=0, help="processes per node (0: one per GPU, or one)")
    args = parser.parse_args(argv)
    head = slurm_head_node() if args.nodes > 1 else None
    command = build_command(args.config, args.gpus, args.nodes, head, os.environ.get("SLURM_JOB_ID", "stage"),
                            processes=args.processes or None)
    log.info("launching: %s", shlex.join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
