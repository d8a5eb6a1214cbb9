"""Where a run's time and memory go: Snakemake's per-job benchmark files summed per rule.

Every rule declares ``benchmark:``, so a finished run leaves ``results/benchmarks/**/*.tsv`` (wall seconds, max
RSS). This prints the table the report's summary page shows (:func:`pipeline.report.job_stats`: wall time per rule
summed over its jobs, its share of the total, the largest max RSS, CPU time) as Markdown, for docs/benchmarks.md.

    python benchmarks/stage_times.py [results]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.report import job_stats  # noqa: E402

DATA_STAGES = ("download", "transcode", "compress", "features")


def main() -> int:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "results")
    tables = {stage: sorted(str(p) for p in (results / stage).glob("shard-*.tsv")) for stage in DATA_STAGES}
    frame = job_stats(results / "benchmarks", tables, sorted((results / "train").glob("*/train_metrics.json")))
    print("| " + " | ".join(frame.columns) + " |")
    print("|" + "---|" * len(frame.columns))
    for row in frame.itertuples(index=False):
        print("| " + " | ".join(str(value) for value in row) + " |")
    print(f"| total | {frame['jobs'].sum()} | {frame['wall s'].sum():.1f} | 100% | | {frame['CPU s'].sum():.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
