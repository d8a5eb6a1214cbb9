"""Stage 3, compress: every video to ``fps`` frames per second, short side ``size`` pixels, no audio.

E.T. Chat's recipe (E.T. Bench, ``compress_videos.py`` after CLIP4Clip's ``preprocess/compress_video.py``): 3 fps,
short side 224 keeping the aspect ratio, video only. The ``fps`` filter resamples variable frame rates to a
constant one by dropping or repeating frames; a clip shorter than one output frame keeps its frame.

Two-pass (the default) reads the transcode stage's full-resolution mp4s. Single-pass (``video.single_pass``)
reads the downloaded files directly and cuts segments here, for recipes that do not keep the full-resolution mp4.
"""

from __future__ import annotations

import argparse

from pipeline.cli import run
from pipeline.shards import stage_parser
from pipeline.video.ffmpeg import add_encoding_arguments, encode_shard, encoding_from_args


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.video.compress --input STATUS --out-dir D --status T ...``: the compress rule."""
    parser = stage_parser(__spec__.name, __doc__, "the transcode (or, single-pass, download) status table")
    parser.add_argument("--fps", type=float, default=3.0, help="frames per second")
    parser.add_argument("--size", type=int, default=224, help="short side in pixels")
    add_encoding_arguments(parser, crf=23)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Compress every video of a shard; the exit code of :func:`pipeline.shards.finish`."""
    cli = parser()
    args = cli.parse_args(argv)
    return encode_shard(args, encoding_from_args(cli, args, fps=args.fps, size=args.size, audio=False), "compress")


if __name__ == "__main__":
    run(main)
