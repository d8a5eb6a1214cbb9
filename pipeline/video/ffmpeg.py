"""Probing (PyAV) and the one H.264 encode (ffmpeg through ffmpeg-python) every video stage runs.

Every failure names what the tool said. A video that ffmpeg "converts" but only partly (a truncated file, a stream
corrupt in the middle, no decodable frame) is an :class:`ItemError` too, never a silently shorter clip. Settings
that cannot work for any video (an unknown x264 preset) fail the job before its first video
(:func:`check_encoding`), rather than every video's row.
"""

from __future__ import annotations

import argparse
import codecs
import math
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
import ffmpeg

from pipeline.shards import (
    RUNTIME,
    STATUS_COLUMNS,
    ItemError,
    JobError,
    ShardTask,
    finish,
    ok_rows,
    run_shard,
    settings_of,
)

INFO_COLUMNS = ["duration", "fps", "width", "height", "codec", "frames"]
COLUMNS = STATUS_COLUMNS + INFO_COLUMNS
# Demuxers that turn non-video files into a "video stream": tty renders any text file as ANSI art, image2 and the
# *_pipe demuxers read still images.
_NOT_VIDEO_CONTAINERS = {"tty", "image2"}
# Files with these extensions that libav reads as one picture are still images: one-frame videos of one second
# (LLaVA's image records train through the same rules, tower and connector as videos).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
STILL_SECONDS = 1.0
# An output shorter than this share of what the input promised (minus half a second) is a truncated input.
TRUNCATION_RATIO = 0.9
_COPYABLE_CONTAINERS = {".mp4", ".m4v"}
# Bytes read to tell a text file: a video container's header has NUL bytes or bytes that are not UTF-8 within these.
_TEXT_SNIFF_BYTES = 4096


av.logging.set_level(av.logging.ERROR)  # libav's own message (e.g. "moov atom not found") joins its exceptions


@dataclass
class VideoInfo:
    """What libav says of a file's first video stream.

    Attributes:
        duration: seconds (container duration, else the stream's).
        fps: average frames per second.
        width, height: pixels, as stored (before any display rotation, see :func:`display_rotation`).
        codec: the stream's codec name (``h264``, ``vp9``, ...).
        frames: frame count from the stream header (0 when the container does not say).
        has_audio: whether the file has an audio stream.
        audio_codec: the first audio stream's codec name (``""`` without audio).
        video_index, audio_index: the streams' indices in the file (-1: no audio stream).
        pix_fmt: the stream's pixel format (``yuv420p``, ...).
        still: a still image (one frame, :data:`STILL_SECONDS` long).
    """

    duration: float
    fps: float
    width: int
    height: int
    codec: str
    frames: int
    has_audio: bool
    audio_codec: str
    video_index: int
    audio_index: int
    pix_fmt: str
    still: bool = False

    def fields(self) -> dict:
        """The status-table fields (``INFO_COLUMNS``), rounded for reading."""
        row = asdict(self)
        row["duration"] = round(self.duration, 3)
        row["fps"] = round(self.fps, 3)
        return {key: row[key] for key in INFO_COLUMNS}


def _tool_message(stderr: bytes | str | None, limit: int = 300) -> str:
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else (stderr or "")
    lines = [line.strip() for line in text.strip().splitlines()
             if line.strip() and not line.strip().startswith("Last message repeated")]
    return " | ".join(lines[-3:])[-limit:] or "no message"


def display_rotation(path: str | Path) -> int:
    """Display rotation in degrees (0, 90, 180, 270) of a video's first frame, from its display matrix (phones
    record upright video as rotated frames plus this matrix; decoders that ignore it, decord among them, read such
    frames sideways). A frame that does not decode counts as unrotated.

    Raises:
        ItemError: libav cannot open the file.
    """
    try:
        with av.open(str(path), metadata_errors="ignore") as container:
            frame = next(container.decode(video=0), None)
    except av.FFmpegError as exc:
        raise ItemError(f"libav: {exc.strerror}") from None
    except (StopIteration, ValueError):
        return 0
    return round(frame.rotation) % 360 if frame is not None else 0


def text_start(path: str | Path) -> str | None:
    """The start of ``path`` (at most 40 characters, whitespace runs as one space) when its first 4 KiB are text:
    UTF-8 without NUL or other control characters but whitespace. None for any other file, a video among them."""
    with open(path, "rb") as file:
        head = file.read(_TEXT_SNIFF_BYTES)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at the 4 KiB mark is fine
    except UnicodeDecodeError:
        return None
    if not text or any(char < " " and char not in "\t\n\r\f" for char in text):
        return None
    return " ".join(text.split())[:40]


def _unreadable(path: str | Path, reason: str) -> ItemError:
    """The error of a file libav cannot take as a video: ``not a video: text, starting '...'`` when it is text
    (whatever its extension: a text file named .mp4 makes libav say "moov atom not found"), else ``reason``."""
    start = text_start(path)
    return ItemError(reason if start is None else f"not a video: text, starting {start!r}")


def probe(path: str | Path) -> VideoInfo:
    """Probe ``path`` in-process with PyAV (libav): a few milliseconds, where an ffprobe process takes ~80.

    Raises:
        ItemError: the file is missing, empty (``empty file (0 bytes)``), text (``not a video: text, starting
            '...'``, or ``not a video: libav reads it as 'tty'`` where its extension makes libav render it), a still
            image that ffmpeg would render as video (except a picture named as one, :data:`IMAGE_SUFFIXES`: a
            one-frame video), libav cannot open it (``libav: <its message>``, e.g. ``moov
            atom not found``), it has no video stream, or no positive duration.
    """
    if not Path(path).is_file():
        raise ItemError(f"missing file: {path}")
    if Path(path).stat().st_size == 0:
        raise ItemError("empty file (0 bytes)")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.FFmpegError as exc:
        detail = f" ({exc.log[1]}: {exc.log[2].strip()})" if getattr(exc, "log", None) else ""
        raise _unreadable(path, f"libav: {exc.strerror}{detail}"[:300]) from None
    with container:
        name = container.format.name
        if name in _NOT_VIDEO_CONTAINERS or name.endswith("_pipe"):
            if name != "tty" and Path(path).suffix.lower() in IMAGE_SUFFIXES and container.streams.video:
                return _still(container, path)
            raise ItemError(f"not a video: libav reads it as '{name}' (text or a still image)")
        # cover art of an audio file is a one-picture "video" stream: not a video
        videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
        if not videos:
            kinds = sorted({"cover art" if s.type == "video" else s.type for s in container.streams}) or ["none"]
            raise _unreadable(path, f"no video stream (streams: {', '.join(kinds)})")
        video = videos[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        if container.duration:
            duration = container.duration / av.time_base
        else:
            duration = float(video.duration * video.time_base) if video.duration and video.time_base else 0.0
        if duration <= 0:
            raise _unreadable(path, f"no positive duration (libav says {duration})")
        return VideoInfo(
            duration=duration,
            fps=float(video.average_rate or video.guessed_rate or 0),
            width=video.codec_context.width,
            height=video.codec_context.height,
            codec=video.codec_context.codec.canonical_name,
            frames=video.frames,
            has_audio=audio is not None,
            audio_codec=audio.codec_context.codec.canonical_name if audio else "",
            video_index=video.index,
            audio_index=audio.index if audio else -1,
            pix_fmt=video.codec_context.pix_fmt or "",
        )


def _still(container, path: str | Path) -> VideoInfo:
    """The :class:`VideoInfo` of a still image, its one frame decoded to check it.

    Raises:
        ItemError: the picture does not decode.
    """
    try:
        frame = next(container.decode(video=0))
    except (av.FFmpegError, StopIteration) as exc:
        raise _unreadable(path, f"image does not decode: {exc}"[:300]) from None
    codec = container.streams.video[0].codec_context
    return VideoInfo(duration=STILL_SECONDS, fps=1.0 / STILL_SECONDS, width=frame.width, height=frame.height,
                     codec=codec.codec.canonical_name, frames=1, has_audio=False, audio_codec="", video_index=0,
                     audio_index=-1, pix_fmt=frame.format.name, still=True)


def run(stream: ffmpeg.nodes.OutputStream, timeout_s: float) -> tuple[int, str]:
    """Run an ffmpeg-python output stream (overwriting its output) at log level ``error``.

    Returns:
        ffmpeg's exit code and its log.

    Raises:
        ItemError: ffmpeg runs past ``timeout_s`` seconds (it is killed).
        JobError: ffmpeg is not installed.
    """
    try:
        process = stream.global_args("-nostdin", "-hide_banner", "-loglevel", "error").run_async(
            pipe_stdout=True, pipe_stderr=True, overwrite_output=True
        )
    except FileNotFoundError:
        raise JobError("ffmpeg is not installed (apt-get install ffmpeg)") from None
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise ItemError(f"ffmpeg: killed after {timeout_s} s") from None
    return process.returncode, stderr.decode("utf-8", "replace")


def decode_errors(log: str, info: VideoInfo) -> list[str]:
    """The lines of an ffmpeg log that report a problem with the input's video.

    Not counted: "Last message repeated" lines, the audio decoder's messages (an audio decoder complains about the
    first packet after a seek into MPEG-PS; the video is what this pipeline keeps), and the theora decoder's: ffmpeg
    5.1 reports errors on valid theora streams (iscc-samples' demo.ogv prints about 2,000 and decodes to all of its
    frames), so theora inputs are judged by their output (frames and duration) alone.
    """
    ignored_decoders = {info.audio_codec} | ({"theora"} if info.codec == "theora" else set())
    ignored_streams = {info.audio_index} | ({info.video_index} if info.codec == "theora" else set())
    errors = []
    for line in log.splitlines():
        text = line.strip()
        if not text or text.startswith("Last message repeated"):
            continue
        component = re.match(r"\[(\w+) @ ", text)
        if component and component.group(1) in ignored_decoders:
            continue
        stream = re.match(r"Error while decoding stream #\d+:(\d+)", text)
        if stream and int(stream.group(1)) in ignored_streams:
            continue
        errors.append(text)
    return errors


@dataclass(frozen=True)
class Encoding:
    """How a video stage encodes: x264 settings, limits, and (for compression) frame rate and size.

    Attributes:
        crf: x264 constant rate factor (lower is better; 18-23 is visually lossless to good).
        preset: x264 speed preset (``veryfast``, ``medium``, ...).
        timeout_s: seconds one video may take (runtime: a change redoes no finished video).
        max_decode_errors: input problems ffmpeg may report (:func:`decode_errors`) before the video counts as
            corrupt; 0 fails on the first.
        fps: output frames per second (constant; frames dropped or repeated), or None to keep the input's timing.
        size: output short side in pixels (aspect kept, even dimensions), or None to keep the input's size.
        audio: keep the first audio stream as AAC 128 kbit/s.
        threads: ffmpeg threads of one process (runtime).
    """

    crf: int = 18
    preset: str = "veryfast"
    timeout_s: float = field(default=600, metadata=RUNTIME)
    max_decode_errors: int = 0
    fps: float | None = None
    size: int | None = None
    audio: bool = True
    threads: int = field(default=1, metadata=RUNTIME)

    def __post_init__(self) -> None:
        """Raises ValueError naming the field whose value ffmpeg would reject for every video, or take silently
        for something else (a ``size`` of 0 keeps the input's size, a ``crf`` above 51 acts as 51)."""
        for name, ok, rule in [
            ("crf", 0 <= self.crf <= 51, "0 to 51"),
            ("timeout_s", math.isfinite(self.timeout_s) and self.timeout_s > 0, "finite seconds > 0"),
            ("max_decode_errors", self.max_decode_errors >= 0, ">= 0"),
            ("fps", self.fps is None or (math.isfinite(self.fps) and self.fps > 0), "a finite number > 0, or None"),
            ("size", self.size is None or self.size >= 2, "pixels >= 2, or None"),
            ("threads", self.threads >= 0, ">= 0 (0: auto)"),
        ]:
            if not ok:
                raise ValueError(f"Encoding.{name}: {getattr(self, name)!r} must be {rule}")


def encode(row: dict, dest: str | Path, encoding: Encoding) -> dict:
    """Encode ``row["path"]`` (cut to ``row["start"]``..``row["end"]`` seconds when the row has them) to an H.264
    mp4 at ``dest`` (yuv420p, even dimensions, ``+faststart``, rotation applied).

    An H.264 yuv420p mp4 without rotation that needs no cut, resampling or resizing is stream-copied (lossless).

    Returns:
        The output's status fields (``INFO_COLUMNS``).

    Raises:
        ItemError: the input cannot be read, ``start`` lies past its end, ffmpeg reports more than
            ``max_decode_errors`` problems with the input (a stream corrupt in the middle) or fails, the output has
            no frame, or it is shorter than the input promised (a truncated input).
    """
    source = Path(row["path"])
    info = probe(source)
    start = float(row["start"]) if row.get("start") not in (None, "") else 0.0
    end = float(row["end"]) if row.get("end") not in (None, "") else None
    if start >= info.duration:
        raise ItemError(f"start {start} s lies past the end of the video ({info.duration:.3f} s)")
    cut = start > 0 or (end is not None and end < info.duration)
    expected = min(end if end is not None else info.duration, info.duration) - start
    plain = encoding.fps is None and encoding.size is None and not cut
    copyable = source.suffix.lower() in _COPYABLE_CONTAINERS and (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    if plain and copyable and display_rotation(source) == 0:
        output = ffmpeg.output(ffmpeg.input(str(source)), str(dest), c="copy", map="0", movflags="+faststart")
    else:
        source_node = ffmpeg.input(str(source), ss=start) if start else ffmpeg.input(str(source))
        video = source_node.video
        if encoding.fps is not None:
            video = video.filter("fps", fps=encoding.fps, eof_action="pass")  # a one-frame clip keeps its frame
        if encoding.size is not None:
            size = encoding.size
            video = video.filter("scale", f"if(lt(iw,ih),{size},-2)", f"if(lt(iw,ih),-2,{size})")
        video = video.filter("scale", "trunc(iw/2)*2", "trunc(ih/2)*2")
        streams = [video, source_node["a:0?"]] if encoding.audio else [video]
        audio = {"acodec": "aac", "audio_bitrate": "128k"} if encoding.audio else {"an": None}
        limit = {"t": round(end - start, 6)} if end is not None else {}
        output = ffmpeg.output(*streams, str(dest), vcodec="libx264", pix_fmt="yuv420p", crf=encoding.crf,
                               preset=encoding.preset, threads=encoding.threads, movflags="+faststart",
                               **audio, **limit)
    code, log = run(output, encoding.timeout_s)
    errors = decode_errors(log, info)
    if len(errors) > encoding.max_decode_errors:
        raise ItemError(f"ffmpeg reported {len(errors)} error(s): {errors[0][:200]}")
    try:
        out = probe(dest)
    except ItemError as exc:
        raise ItemError(f"no decodable frame: ffmpeg: {_tool_message(log)}" if code else
                        f"no decodable frame ({exc})") from None
    if out.frames < 1:
        raise ItemError("no decodable frame")
    if not info.still and out.duration < TRUNCATION_RATIO * expected - 0.5:
        raise ItemError(f"truncated: {out.duration:.2f} s decoded of the {expected:.2f} s the input promises")
    return out.fields()


def add_encoding_arguments(parser: argparse.ArgumentParser, crf: int) -> None:
    """Add ``--crf`` (default ``crf``), ``--preset``, ``--timeout`` (seconds per video) and
    ``--max-decode-errors`` to a stage's parser."""
    parser.add_argument("--crf", type=int, default=crf, help="x264 constant rate factor")
    parser.add_argument("--preset", default="veryfast", help="x264 speed preset")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per video")
    parser.add_argument("--max-decode-errors", type=int, default=0,
                        help="ffmpeg error messages tolerated per video before it counts as corrupt")


def encoding_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, **overrides) -> Encoding:
    """The :class:`Encoding` of a stage's parsed ``add_encoding_arguments`` options, with ``overrides``; a value
    out of range is the ``parser``'s error (exit code 2, naming the setting)."""
    try:
        return Encoding(crf=args.crf, preset=args.preset, timeout_s=args.timeout,
                        max_decode_errors=args.max_decode_errors, **overrides)
    except ValueError as exc:
        parser.error(str(exc))


def check_encoding(encoding: Encoding) -> None:
    """Encode a generated clip with ``encoding`` (1 s of ffmpeg's test pattern, 64 x 48 px at 10 fps with a tone,
    FFV1 + FLAC in mkv, so it is always re-encoded), the way :func:`encode` encodes a video. Settings that fail on
    it (an x264 preset this ffmpeg does not know, a frame rate the ``fps`` filter rejects, no libx264) fail on every
    video: the job's fault, not a video's. About 0.2 s.

    Raises:
        JobError: the test clip fails to encode (the message names the settings and what ffmpeg said), or ffmpeg
            cannot make it or is not installed.
    """
    with tempfile.TemporaryDirectory(prefix="check-encoding-") as tmp:
        clip = Path(tmp) / "testsrc.mkv"
        pattern = ffmpeg.input("testsrc=size=64x48:rate=10:duration=1", f="lavfi")
        tone = ffmpeg.input("sine=duration=1", f="lavfi")
        code, log = run(ffmpeg.output(pattern, tone, str(clip), vcodec="ffv1", acodec="flac"), 60)
        if code:
            raise JobError(f"ffmpeg cannot generate a test clip: {_tool_message(log)}")
        try:
            encode({"path": str(clip)}, Path(tmp) / "out.mp4", encoding)
        except ItemError as exc:
            settings = ", ".join(f"{key}={value!r}" for key, value in asdict(encoding).items())
            raise JobError(f"the encoding settings cannot work: a generated test clip fails with them ({settings}): "
                           f"{exc}") from None


def encode_shard(args: argparse.Namespace, encoding: Encoding, stage: str) -> int:
    """Encode every ``ok`` row of ``args.input`` into ``args.out_dir``; write ``args.status``; return the exit code.

    Raises:
        JobError: the settings fail on a generated test clip (:func:`check_encoding`), before any video is tried.
    """
    check_encoding(encoding)
    task = ShardTask(
        ext=".mp4",
        produce=lambda row, tmp: encode(row, tmp, encoding),
        describe=lambda path: probe(path).fields(),
        settings={"stage": stage, **settings_of(encoding)},
    )
    status = run_shard(ok_rows(args.input), task, args.out_dir, args.threads, desc=stage)
    return finish(status, args.status, COLUMNS, args.strict)
