"""Submission time of 500 shard jobs through ``--profile profiles/slurm``: one job per shard against array jobs.

Needs a running SLURM (``bash tests/slurm/start_slurm.sh``, root). A workflow of 500 independent shard jobs (a rule
with one output per shard, like transcode, compress and features) is submitted twice, once as 500 ``sbatch`` calls
and once with ``--slurm-array-jobs``; the partition is set DOWN meanwhile, so that SLURM queues the jobs without
running them and only submission is timed (from snakemake's start to its 500th submitted job). The jobs are then
cancelled and the partition set UP again. Run: ``python benchmarks/slurm_submit.py [--shards 500]``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEFILE = """
SHARDS = [f"shard-{i:05d}" for i in range(int(config["shards"]))]

rule all:
    input: expand("out/{shard}.txt", shard=SHARDS)

rule shard:
    output: "out/{shard}.txt"
    resources: mem_mb=100, runtime=5
    shell: "echo {wildcards.shard} > {output}"
"""


def partition(state: str) -> None:
    name = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, check=True).stdout.split()[0]
    subprocess.run(["scontrol", "update", f"PartitionName={name}", f"State={state}"], check=True)


def submitted(text: str) -> int:
    """Jobs submitted so far, from snakemake's output (single jobs and array tasks)."""
    single = len(re.findall(r"has been submitted with SLURM jobid", text))
    arrays = sum(len(ids.split(",")) for ids in re.findall(r"Submitted array job with Snakemake IDs ([\d, ]+)", text))
    return single + arrays


def measure(shards: int, arrays: bool, limit: float, timespan: str) -> tuple[float, int, int]:
    """Seconds from snakemake's start until all ``shards`` jobs were submitted (or ``limit`` passed), the jobs
    submitted by then, and the number of sbatch calls."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "Snakefile").write_text(SNAKEFILE)
        out = work / "snakemake.out"
        args = [sys.executable, "-m", "snakemake", "--profile", str(REPO / "profiles/slurm"), "--config",
                f"shards={shards}", "--jobs", str(shards), "--slurm-init-seconds-before-status-checks", "600",
                "--slurm-array-jobs", "shard" if arrays else "none", "--max-jobs-per-timespan", timespan]
        start = time.perf_counter()
        with out.open("w") as sink:
            proc = subprocess.Popen(args, cwd=work, stdout=sink, stderr=subprocess.STDOUT)
        try:
            while submitted(out.read_text()) < shards and time.perf_counter() - start < limit:
                if proc.poll() is not None:
                    raise RuntimeError(out.read_text()[-3000:])
                time.sleep(0.05)
            elapsed = time.perf_counter() - start
            text = out.read_text()
            count = submitted(text)
            calls = len(re.findall(r"has been submitted with SLURM jobid|Submitted array job with Snakemake", text))
        finally:  # cancel first: snakemake would wait for the queued jobs otherwise
            subprocess.run(["scancel", "-u", os.environ.get("USER", "root")], check=False)
            proc.kill()
            proc.wait()
        return elapsed, count, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=500)
    parser.add_argument("--limit", type=float, default=300, help="seconds to wait for all submissions")
    parser.add_argument("--max-jobs-per-timespan", default="100/1s",
                        help="snakemake's rate of handing jobs to the executor (its default: 100/1s)")
    args = parser.parse_args()
    print(f"| {args.shards} shard jobs | submitted | sbatch calls | seconds |\n|---|---|---|---|", flush=True)
    partition("DOWN")
    try:
        for name, arrays in (("one job per shard", False), ("array jobs", True)):
            seconds, count, calls = measure(args.shards, arrays, args.limit, args.max_jobs_per_timespan)
            print(f"| {name}, {args.max_jobs_per_timespan} | {count} | {calls} | {seconds:.1f} |", flush=True)
    finally:
        partition("UP")

if __name__ == "__main__":
    main()
