"""Where a run's time and memory go: Snakemake's per-job benchmark files summed per rule.

Every rule declares ``benchmark:``, so a finished run leaves ``results/benchmarks/**/*.tsv`` (wall seconds, max
RSS). This prints a Markdown table of wall time per rule (summed over shards), its share of the total, and the
largest max RSS, for docs/benchmarks.md.

    python benchmarks/stage_times.py [results/benchmarks]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def stage_times(folder: Path) -> pd.DataFrame:
    """Per rule: jobs, wall seconds summed, share of the total wall time, and the largest max RSS (MiB)."""
    rows = []
    for path in sorted(folder.rglob("*.tsv")):
        rule = path.relative_to(folder).parts[0].removesuffix(".tsv")
        table = pd.read_csv(path, sep="\t")
        last = table.iloc[-1]
        rows.append({"rule": rule, "seconds": float(last["s"]), "max_rss_mib": float(last["max_rss"])})
    frame = pd.DataFrame(rows).groupby("rule", sort=False).agg(
        jobs=("seconds", "size"), seconds=("seconds", "sum"), max_rss_mib=("max_rss_mib", "max"))
    frame["share"] = frame["seconds"] / frame["seconds"].sum()
    return frame.sort_values("seconds", ascending=False)


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "results/benchmarks")
    frame = stage_times(folder)
    print("| rule | jobs | wall s | share of total | max RSS MiB |")
    print("|---|---|---|---|---|")
    for rule, row in frame.iterrows():
        print(f"| {rule} | {int(row.jobs)} | {row.seconds:.1f} | {row.share:.0%} | {row.max_rss_mib:.0f} |")
    print(f"| total | {int(frame.jobs.sum())} | {frame.seconds.sum():.1f} | 100% | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
