"""The compressed videos' index: one row per video that compressed, ``video_id``, ``path``, ``frames``, ``fps``
and ``duration`` (seconds), from every shard's compress status table. Stages with online vision read their frames
through it (:class:`pipeline.data.frames.OnlineVisuals`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.io import write_table
from pipeline.shards import ok_rows

log = logging.getLogger(__name__)

VIDEO_COLUMNS = ["video_id", "path", "frames", "fps", "duration"]


def write_videos_index(status_tables: list[str | Path], out: str | Path) -> int:
    """Write the index of the ``ok`` rows of ``status_tables`` (:data:`VIDEO_COLUMNS`); returns the videos listed.

    Raises:
        ValueError: a video id appears in two tables (two shards claim it).
    """
    rows, seen = [], {}
    for table in status_tables:
        for row in ok_rows(table):
            if row["video_id"] in seen:
                raise ValueError(f"{table}: video {row['video_id']!r} is also in {seen[row['video_id']]}")
            seen[row["video_id"]] = table
            rows.append(row)
    write_table(out, rows, VIDEO_COLUMNS)
    return len(rows)


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.video.index --out INDEX STATUS...``: the videos_index rule."""
    parser = cli_parser(__spec__.name, __doc__)
    parser.add_argument("--out", required=True, help="the index.tsv to write")
    parser.add_argument("status", nargs="+", help="the compress stage's status tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the index."""
    args = parser().parse_args(argv)
    log.info("indexed %d compressed videos", write_videos_index(args.status, args.out))
    return 0


if __name__ == "__main__":
    run(main)
