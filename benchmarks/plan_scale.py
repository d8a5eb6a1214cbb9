"""Planning cost of the data stages at dataset scale: this workflow (one job per shard) against the same stages
written with one job per video (``benchmarks/per_video/Snakefile``), in the same script.

For each manifest size, a manifest of that many videos is written, the ``shards`` checkpoint is run for real (timed:
``snakemake results/shards``, the first thing a real run does), and ``snakemake -n results/features/index.tsv``
(download, transcode, compress and features for every shard) is timed in a fresh process: wall seconds, CPU
seconds (user + system: the figure to compare on a busy machine) and peak memory. The per-video workflow is timed
the same way.

    python benchmarks/plan_scale.py [--ours 100000 1000000] [--per-video 10000 50000 | --per-video]

Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# the rules run `python -m pipeline...`: this interpreter's, with this checkout's package
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}

from pipeline.io import write_table  # noqa: E402
from pipeline.shards import MANIFEST_COLUMNS  # noqa: E402

MEASURE = """
import resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - start
if done.returncode:
    sys.exit(done.stdout[-2000:] + done.stderr[-2000:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
"""


def measure(command: list[str], cwd: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of ``command``, run from a fresh measuring
    process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *command], cwd=cwd, capture_output=True, text=True, env=ENV)
    if out.returncode:
        raise RuntimeError(out.stderr)
    seconds, cpu, rss_kib = out.stdout.split()
    return float(seconds), float(cpu), int(rss_kib) / 1024


def manifest(path: Path, videos: int) -> None:
    write_table(path, [{"video_id": f"v{i:07d}", "source": f"https://videos.invalid/v{i:07d}.mp4"}
                       for i in range(videos)], MANIFEST_COLUMNS)


def jobs(stdout: str) -> int:
    return int(stdout.split("Job stats:")[1].split("total")[1].split()[0])


def plan_ours(videos: int, shard_size: int) -> dict:
    """Jobs, and the wall s, CPU s and MiB of the shards checkpoint (``checkpoint``) and of the dry run (``plan``)."""
    work = Path(tempfile.mkdtemp(prefix="plan_ours_"))
    try:
        # resources/demo: the annotation files the embedded config names, which the Snakefile checks exist
        for name in ("Snakefile", "workflow", "config", "profiles", "envs", "resources/demo"):
            source = REPO / name
            (shutil.copytree if source.is_dir() else shutil.copy)(source, work / name)
        manifest(work / "manifest.tsv", videos)
        config = yaml.safe_load((work / "config" / "config.yaml").read_text())
        config["data"] = {"manifest": "manifest.tsv", "shard_size": shard_size}
        (work / "config" / "config.yaml").write_text(yaml.safe_dump(config))
        snakemake = [sys.executable, "-m", "snakemake", "--cores", "1"]
        checkpoint = measure([*snakemake, "results/shards"], work)
        plan = measure([*snakemake, "results/features/index.tsv", "-n", "--quiet", "rules"], work)
        planned = subprocess.run([*snakemake, "results/features/index.tsv", "-n", "--quiet", "rules"], cwd=work,
                                 capture_output=True, text=True, check=True, env=ENV).stdout
        return {"jobs": jobs(planned), "checkpoint": checkpoint, "plan": plan}
    finally:
        shutil.rmtree(work)


def plan_per_video(videos: int) -> dict:
    """Jobs, and the wall s, CPU s and MiB of the per-video workflow's dry run (``plan``)."""
    work = Path(tempfile.mkdtemp(prefix="plan_per_video_"))
    try:
        manifest(work / "manifest.tsv", videos)
        command = [sys.executable, "-m", "snakemake", "--cores", "1", "-n", "--snakefile",
                   str(REPO / "benchmarks" / "per_video" / "Snakefile"), "--config", "manifest=manifest.tsv",
                   "--quiet", "rules"]
        return {"jobs": 4 * videos + 2, "plan": measure(command, work)}
    finally:
        shutil.rmtree(work)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--per-video", type=int, nargs="*", default=[10_000, 50_000],
                        help="sizes for the per-video workflow; none to skip it")
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    rows = {}
    for videos in args.ours:
        rows.setdefault(videos, {})["ours"] = plan_ours(videos, args.shard_size)
    for videos in args.per_video:
        rows.setdefault(videos, {})["per_video"] = plan_per_video(videos)
    print(f"snakemake -n through download, transcode, compress and features; shard_size {args.shard_size}")
    print("| videos | shards checkpoint s (CPU s) | shards: jobs | s (CPU s) | MiB | per video: jobs | s (CPU s) | MiB "
          "| time ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for videos, found in sorted(rows.items()):
        ours = found.get("ours")
        per = found.get("per_video")
        cells = [f"{videos:,}", f"{ours['checkpoint'][0]:.1f} ({ours['checkpoint'][1]:.1f})" if ours else ""]
        for side in (ours, per):
            cells += ([str(side["jobs"]), f"{side['plan'][0]:.1f} ({side['plan'][1]:.1f})", f"{side['plan'][2]:.0f}"]
                      if side else ["", "", ""])
        cells.append(f"{per['plan'][0] / ours['plan'][0]:.0f}x less with shards" if ours and per else "")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
