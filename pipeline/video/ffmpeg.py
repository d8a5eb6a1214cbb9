"""ffprobe and ffmpeg through ffmpeg-python, with timeouts and errors that name what the tool said."""

from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import ffmpeg

from pipeline.shards import ItemError

INFO_COLUMNS = ["duration", "fps", "width", "height", "codec", "frames"]
# Demuxers that turn non-video files into a "video stream": tty renders any text file as ANSI art, image2 and the
# *_pipe demuxers read still images.
_NOT_VIDEO_CONTAINERS = {"tty", "image2"}


@dataclass
class VideoInfo:
    """What ffprobe says of a file's first video stream.

    Attributes:
        duration: seconds (container duration, else the stream's).
        fps: average frames per second.
        width, height: pixels.
        codec: the stream's codec name (``h264``, ``vp9``, ...).
        frames: frame count from the stream header (0 when the container does not say).
        has_audio: whether the file has an audio stream.
        pix_fmt: the stream's pixel format (``yuv420p``, ...).
    """

    duration: float
    fps: float
    width: int
    height: int
    codec: str
    frames: int
    has_audio: bool
    pix_fmt: str

    def fields(self) -> dict:
        """The status-table fields (``INFO_COLUMNS``), rounded for reading."""
        row = asdict(self)
        row["duration"] = round(self.duration, 3)
        row["fps"] = round(self.fps, 3)
        return {key: row[key] for key in INFO_COLUMNS}


def _tool_message(stderr: bytes | str | None, limit: int = 300) -> str:
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else (stderr or "")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-limit:] or "no message"


def probe(path: str | Path, timeout_s: float = 60) -> VideoInfo:
    """Probe ``path`` with ffprobe.

    Raises:
        ItemError: the file is missing, ffprobe cannot read it (``ffprobe: <its message>``), it is text or a still
            image that ffmpeg would render as video, it has no video stream, or no positive duration.
    """
    if not Path(path).is_file():
        raise ItemError(f"missing file: {path}")
    # ffmpeg.probe has no timeout, and a hung probe would stall the whole shard: run ffprobe directly.
    command = ["ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(path)]
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ItemError(f"ffprobe: no answer within {timeout_s} s") from None
    if done.returncode != 0:
        raise ItemError(f"ffprobe: {_tool_message(done.stderr)}")
    meta = json.loads(done.stdout)
    container = meta.get("format", {}).get("format_name", "")
    if container in _NOT_VIDEO_CONTAINERS or container.endswith("_pipe"):
        raise ItemError(f"not a video: ffprobe reads it as '{container}' (text or a still image)")
    streams = meta.get("streams", [])
    video = next(
        (s for s in streams if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")),
        None,
    )  # cover art of an audio file is a one-picture "video" stream: not a video
    if video is None:
        kinds = sorted({s.get("codec_type", "?") for s in streams}) or ["none"]
        raise ItemError(f"no video stream (streams: {', '.join(kinds)})")
    duration = float(meta.get("format", {}).get("duration") or video.get("duration") or 0)
    rate = video.get("avg_frame_rate") or video.get("r_frame_rate") or "0/1"
    fps = float(Fraction(rate)) if rate not in ("0/0", "") else 0.0
    if duration <= 0:
        raise ItemError(f"no positive duration (ffprobe says {duration})")
    return VideoInfo(
        duration=duration,
        fps=fps,
        width=int(video.get("width", 0)),
        height=int(video.get("height", 0)),
        codec=video.get("codec_name", ""),
        frames=int(video.get("nb_frames") or 0),
        has_audio=any(s.get("codec_type") == "audio" for s in streams),
        pix_fmt=video.get("pix_fmt", ""),
    )


def run(stream: ffmpeg.nodes.OutputStream, timeout_s: float) -> None:
    """Run an ffmpeg-python output stream, overwriting its output.

    Raises:
        ItemError: ffmpeg exits non-zero (``ffmpeg: <last lines of its log>``) or runs past ``timeout_s`` seconds
            (it is killed).
    """
    process = stream.global_args("-nostdin", "-hide_banner", "-loglevel", "error").run_async(
        pipe_stdout=True, pipe_stderr=True, overwrite_output=True
    )
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise ItemError(f"ffmpeg: killed after {timeout_s} s") from None
    if process.returncode != 0:
        raise ItemError(f"ffmpeg: {_tool_message(stderr)}")


def h264_output(stream, dest: str | Path, crf: int, preset: str, threads: int, audio: bool, **options):
    """An ffmpeg-python output node writing H.264 (yuv420p, even dimensions) mp4 with ``+faststart``.

    Args:
        stream: the input node (``ffmpeg.input(...)``), or a filtered video stream when ``audio`` is False.
        crf: x264 constant rate factor (lower is better quality; 18-23 is visually lossless to good).
        preset: x264 speed preset (``veryfast``, ``medium``, ...).
        threads: ffmpeg threads for this one process.
        audio: keep the first audio stream as AAC 128 kbit/s (``stream`` must then be an input node).
        options: further ffmpeg output options (``t=5``, ...).
    """
    video = stream.video if audio else stream
    video = video.filter("scale", "trunc(iw/2)*2", "trunc(ih/2)*2")
    streams = [video, stream["a:0?"]] if audio else [video]
    codec = {"acodec": "aac", "audio_bitrate": "128k"} if audio else {"an": None}
    return ffmpeg.output(
        *streams, str(dest), vcodec="libx264", pix_fmt="yuv420p", crf=crf, preset=preset,
        threads=threads, movflags="+faststart", **codec, **options,
    )


def add_h264_arguments(parser: argparse.ArgumentParser, crf: int) -> None:
    """Add ``--crf`` (default ``crf``), ``--preset`` and ``--timeout`` (seconds per video) to a stage's parser."""
    parser.add_argument("--crf", type=int, default=crf, help="x264 constant rate factor")
    parser.add_argument("--preset", default="veryfast", help="x264 speed preset")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per video")
