"""Stage 2, transcode: every downloaded video to an H.264 mp4 (yuv420p, ``+faststart``), cutting segments.

A row's ``start``/``end`` (seconds) cut its segment here. An mp4 that is already H.264 yuv420p, unrotated and
uncut is stream-copied (lossless, fast); anything else (webm VP8/VP9/AV1, mkv, avi, mov, mpg, ogv, flv, wmv, ...)
is re-encoded with x264, rotation applied, keeping the first audio stream as AAC. The LLaVA video fork's
Something-Something-v2 recipe (``scripts/dataset/webm2mp4.py``: webm -> mp4) is this stage.
"""

from __future__ import annotations

import argparse

from pipeline.cli import run
from pipeline.shards import stage_parser
from pipeline.video.ffmpeg import add_encoding_arguments, encode_shard, encoding_from_args


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.video.transcode --input STATUS --out-dir D --status T ...``: the transcode rule."""
    parser = stage_parser(__spec__.name, __doc__, "the download stage's status table")
    add_encoding_arguments(parser, crf=18)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Transcode every video of a shard; the exit code of :func:`pipeline.shards.finish`."""
    cli = parser()
    args = cli.parse_args(argv)
    return encode_shard(args, encoding_from_args(cli, args, audio=True), "transcode")


if __name__ == "__main__":
    run(main)
