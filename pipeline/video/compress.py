"""Stage 3, compress: every transcoded mp4 to ``fps`` frames per second, short side ``size`` pixels, no audio.

E.T. Chat's recipe (E.T. Bench, ``compress_videos.py`` after CLIP4Clip's ``preprocess/compress_video.py``): 3 fps,
short side 224 keeping the aspect ratio, video only. The ``fps`` filter resamples variable frame rates to a
constant one by dropping or repeating frames.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ffmpeg

from pipeline import configure_logging
from pipeline.shards import STATUS_COLUMNS, ShardTask, finish, ok_rows, run_shard, stage_parser
from pipeline.video.ffmpeg import INFO_COLUMNS, add_h264_arguments, h264_output, probe, run

COLUMNS = STATUS_COLUMNS + INFO_COLUMNS


def compress(row: dict, dest: Path, fps: float, size: int, crf: int, preset: str, threads: int,
             timeout_s: float) -> dict:
    """Compress ``row["path"]`` to ``dest``: ``fps`` frames/s, short side ``size`` px (aspect kept), no audio.

    Returns:
        The output's status fields (``INFO_COLUMNS``).

    Raises:
        ItemError: the input cannot be read or ffmpeg fails.
    """
    stream = ffmpeg.input(row["path"]).video.filter("fps", fps=fps)
    stream = stream.filter("scale", f"if(lt(iw,ih),{size},-2)", f"if(lt(iw,ih),-2,{size})")
    run(h264_output(stream, dest, crf, preset, threads, audio=False), timeout_s)
    return probe(dest).fields()


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.video.compress --input STATUS --out-dir D --status T``: the compress rule."""
    parser = stage_parser(__doc__.splitlines()[0], "the transcode stage's status table")
    parser.add_argument("--fps", type=float, default=3.0, help="frames per second")
    parser.add_argument("--size", type=int, default=224, help="short side in pixels")
    add_h264_arguments(parser, crf=23)
    args = parser.parse_args(argv)
    settings = {"stage": "compress", "fps": args.fps, "size": args.size, "crf": args.crf, "preset": args.preset}
    task = ShardTask(
        ext=".mp4",
        produce=lambda row, tmp: compress(row, tmp, args.fps, args.size, args.crf, args.preset, 1, args.timeout),
        describe=lambda path: probe(path).fields(),
        settings=settings,
    )
    status = run_shard(ok_rows(args.input), task, args.out_dir, args.threads, desc="compress")
    return finish(status, args.status, COLUMNS, args.strict)


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
