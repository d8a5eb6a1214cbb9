"""Stage 2, transcode: every downloaded video to an H.264 mp4 (yuv420p, ``+faststart``), cutting segments.

A row's ``start``/``end`` (seconds) cut its segment here. An mp4 that is already H.264 yuv420p and needs no cut is
stream-copied (lossless, fast); anything else (webm VP8/VP9/AV1, mkv, avi, ...) is re-encoded with x264, keeping
the first audio stream as AAC. Used by the Something-Something-v2 recipe of the LLaVA video fork (webm -> mp4)
and by every recipe that cuts long videos into clips.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ffmpeg

from pipeline import configure_logging
from pipeline.shards import STATUS_COLUMNS, ItemError, ShardTask, finish, ok_rows, run_shard, stage_parser
from pipeline.video.ffmpeg import INFO_COLUMNS, add_h264_arguments, h264_output, probe, run

COLUMNS = STATUS_COLUMNS + INFO_COLUMNS
_COPYABLE_CONTAINERS = {".mp4", ".m4v"}


def transcode(row: dict, dest: Path, crf: int, preset: str, threads: int, timeout_s: float) -> dict:
    """Transcode ``row["path"]`` (cut to ``row["start"]``..``row["end"]`` seconds when given) to ``dest``.

    Returns:
        The output's status fields (``INFO_COLUMNS``).

    Raises:
        ItemError: the input has no video stream or cannot be read, ``start`` lies past its end, ffmpeg fails,
            or the output has no frame.
    """
    source = Path(row["path"])
    info = probe(source)
    start = float(row["start"]) if row.get("start") else 0.0
    end = float(row["end"]) if row.get("end") else None
    if start >= info.duration:
        raise ItemError(f"start {start} s lies past the end of the video ({info.duration:.3f} s)")
    cut = start > 0 or (end is not None and end < info.duration)
    if not cut and source.suffix.lower() in _COPYABLE_CONTAINERS and info.codec == "h264" and info.pix_fmt == "yuv420p":
        stream = ffmpeg.output(ffmpeg.input(str(source)), str(dest), c="copy", map="0", movflags="+faststart")
    else:
        options = {"t": round(end - start, 6)} if end is not None else {}
        stream = h264_output(ffmpeg.input(str(source), ss=start), dest, crf, preset, threads, audio=True, **options)
    run(stream, timeout_s)
    return probe(dest).fields()


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.video.transcode --input STATUS --out-dir D --status T``: the transcode rule."""
    parser = stage_parser(__doc__.splitlines()[0], "the download stage's status table")
    add_h264_arguments(parser, crf=18)
    args = parser.parse_args(argv)
    task = ShardTask(
        ext=".mp4",
        produce=lambda row, tmp: transcode(row, tmp, args.crf, args.preset, 1, args.timeout),
        describe=lambda path: probe(path).fields(),
        settings={"stage": "transcode", "crf": args.crf, "preset": args.preset},
    )
    status = run_shard(ok_rows(args.input), task, args.out_dir, args.threads, desc="transcode")
    return finish(status, args.status, COLUMNS, args.strict)


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
