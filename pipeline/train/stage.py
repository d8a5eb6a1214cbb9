"""Run one training stage with the Hugging Face Trainer (and DeepSpeed when the stage names a config).

``python -m pipeline.train.stage --config results/train/<stage>/stage.yaml --train-data ... --init ...
--output-dir ... --features-index ...`` (or ``--videos ...`` for online vision) is what every process of a stage
runs (the settings in ``stage.yaml``, the paths as the training rule gives them); :mod:`pipeline.train.launch`
starts one per GPU (or per CPU process). The stage:

1. builds the model: the base LLM and a new connector, or the previous stage's folder (its adapters merged), and
   for online vision the vision tower (the one an earlier stage trained, else its pretrained weights); then
   freezes everything and unfreezes what the stage's freeze table trains (tower, connector and the embeddings of
   tokens the stage adds, LoRA adapters or the LLM), each group at its own learning rate;
2. trains on the records that fit ``max_length`` with their cached features or, online, their frames decoded by
   the DataLoader workers (a video that does not decode is skipped and listed), logging one line per logging step
   (step, loss, learning rate, grad norm, tokens per second, peak memory, elapsed, ETA) and the same figures to
   ``loss.tsv`` and ``report_to`` (TensorBoard), checkpointing every ``save_steps`` to ``<output_dir>/checkpoints``
   and resuming from the newest checkpoint made with the same settings and inputs; every ``torch.load`` of the
   process (DeepSpeed's included) is restricted to weights and allow-listed types
   (:mod:`pipeline.train.weights_only`);
3. on SIGTERM (a scheduler's preemption) saves a checkpoint and exits with 143 without writing the model, so a
   rerun resumes;
4. writes ``<output_dir>/model`` (a stage folder, :mod:`pipeline.model.checkpoint`), ``<output_dir>/loss.tsv`` and
   ``<output_dir>/train_metrics.json`` (the Trainer's runtime and throughput), then removes the checkpoints, so a
   forced rerun starts afresh.
"""

from __future__ import annotations

import argparse
import os

from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.io import read_yaml
from pipeline.train.config import StageConfig, add_path_arguments, paths_from_args
from pipeline.train.launch import slurm_rank_env


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.train.stage --config STAGE.yaml --train-data D --init I --output-dir O
    (--features-index I | --videos V)``: one process of a training stage."""
    parser = cli_parser(__spec__.name, __doc__)
    parser.add_argument("--config", required=True, help="the stage's settings (stage.yaml)")
    add_path_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher; unused")
    parser.add_argument("--ranks-from-slurm", action="store_true",
                        help="one task of an srun step (pipeline.train.launch): rank and rendezvous from SLURM")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Train the stage (:func:`pipeline.train.trainer.run_stage`); 0 when done, 143 when stopped by SIGTERM."""
    args = parser().parse_args(argv)
    if args.ranks_from_slurm:
        os.environ.update(slurm_rank_env(dict(os.environ)))
    config = StageConfig.from_dict(read_yaml(args.config))
    import torch

    from pipeline.train.trainer import PREEMPTED, run_stage

    try:
        finished = run_stage(config, paths_from_args(args))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0 if finished else PREEMPTED


if __name__ == "__main__":
    run(main)
