"""Frame sampling and decoding: only the sampled frames are decoded, so memory does not grow with video length.

decord reads the sampled frames by index; when it cannot (it fails on some streams in the wild), PyAV decodes the
video sequentially and keeps the sampled frames.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.shards import ItemError

log = logging.getLogger(__name__)

SAMPLINGS = ("uniform", "midpoints", "videochatgpt", "fps", "fps_from_start")


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a video are encoded.

    Attributes:
        method: ``uniform`` (``num_frames`` evenly spaced, first and last frame included), ``midpoints`` (the middle
            frame of each of ``num_frames`` equal segments, TSN-style), ``videochatgpt`` (Video-ChatGPT's
            ``get_seq_frames``: at most ``num_frames``, never more than the video has), or ``fps`` (``fps`` frames
            per second of video, between ``min_frames`` and ``max_frames``, as midpoints), or ``fps_from_start``
            (E.T. Chat's ``etchat/utils/io.py:47``: the frames at t = 0, 1 / fps, 2 / fps, ... seconds,
            ``np.arange(0, total, video_fps / fps).round()``; more than ``max_frames``: ``max_frames`` evenly
            spaced, ``uniform``).
        num_frames: frames for ``uniform``, ``midpoints`` and ``videochatgpt``.
        fps: frames per second of video for ``fps`` and ``fps_from_start`` (E.T. Chat: 1).
        min_frames, max_frames: bounds of the ``fps`` count (VideoChat-Flash: 4 to 512); ``max_frames`` bounds
            ``fps_from_start``'s.
    """

    method: str = "midpoints"
    num_frames: int = 100
    fps: float = 1.0
    min_frames: int = 1
    max_frames: int = 512

    def __post_init__(self) -> None:
        if self.method not in SAMPLINGS:
            raise ValueError(f"features.sampling: unknown {self.method!r}; known: {SAMPLINGS}")
        if self.num_frames < 1 or self.fps <= 0 or not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"features: need num_frames >= 1, fps > 0, 1 <= min_frames <= max_frames ({self})")

    def indices(self, total: int, video_fps: float = 0.0, multiple: int = 1,
                rng: np.random.Generator | None = None) -> np.ndarray:
        """Indices of the sampled frames of a video of ``total`` frames at ``video_fps`` frames per second.

        Args:
            multiple: the count is rounded down to a multiple of this, at least one multiple (a tower that reads
                clips of frames: UMT-L's 4, as VideoChat-Flash's ``get_frame_indices`` rounds to
                ``local_num_frames``).
            rng: with ``midpoints`` (or ``fps``), a random frame inside each segment instead of its middle: the SSv2
                fork's training-time sampling (SeHwanJoo/LLaVA ``llava/dataset/video_dataset/dataset.py:153-169``,
                TSN's): segments of ``total // count`` frames from frame 0 (the remainder is never sampled), a
                uniformly random frame in each; a video shorter than ``count`` frames gets the middles (the fork
                gives it frame 0 for every segment). None: the middles (VideoMAE's SSv2 test sampling).

        Returns:
            ``(T,)`` int64, non-decreasing, in ``[0, total)``; frames repeat when the video is shorter than asked
            (except ``videochatgpt``, which then takes every frame once). A one-frame video is a still image:
            ``[0]``, whatever the method.

        Raises:
            ValueError: ``total < 1``.
        """
        if total < 1:
            raise ValueError(f"a video needs at least one frame, got total={total}")
        if total == 1:
            return np.zeros(1, dtype=np.int64)
        if self.method == "fps_from_start":
            step = video_fps / self.fps if video_fps > 0 else 1.0 / self.fps
            found = np.clip(np.round(np.arange(0, total, step)), 0, total - 1).astype(np.int64)
            if len(found) > self.max_frames:
                found = np.round(np.linspace(0, total - 1, self.max_frames)).astype(np.int64)
            return found
        if multiple > 1 and self.method == "fps":
            # VideoChat-Flash's dynamic_fps1 (llava-train_videochat/llava/video_utils.py get_frame_indices, lines
            # 97-164): whole clips of the video's seconds x fps, at most max_frames, at least min_frames; a video
            # of fewer frames than min_frames gets its whole clips instead
            seconds = total / video_fps if video_fps > 0 else float(total)
            count = min(max(multiple, int(seconds * self.fps // multiple) * multiple), self.max_frames)
            low = self.min_frames if total >= self.min_frames else max(multiple, total // multiple * multiple)
            return self._segments(total, max(low, count), rng)
        if multiple > 1:
            count = len(self.indices(total, video_fps))
            return self._segments(total, max(multiple, count // multiple * multiple), rng)
        if self.method == "uniform":
            return np.round(np.linspace(0, total - 1, self.num_frames)).astype(np.int64)
        if self.method == "videochatgpt":
            # Video-ChatGPT scripts/save_spatio_temporal_clip_features.py get_seq_frames (np.round: half to even)
            count = min(total, self.num_frames)
            segment = float(total - 1) / count
            edges = np.round(segment * np.arange(count + 1)).astype(np.int64)
            return (edges[:-1] + edges[1:]) // 2
        count = self.num_frames
        if self.method == "fps":
            seconds = total / video_fps if video_fps > 0 else float(total)
            count = int(np.clip(round(seconds * self.fps), self.min_frames, self.max_frames))
        return self._segments(total, count, rng)

    @staticmethod
    def _segments(total: int, count: int, rng: np.random.Generator | None) -> np.ndarray:
        """One frame of each of ``count`` segments of ``total`` frames: the middle, or a random one (``rng``)."""
        length = total // count
        if rng is None or length == 0:
            return np.floor((np.arange(count) + 0.5) * total / count).astype(np.int64)
        return (np.arange(count) * length + rng.integers(length, size=count)).astype(np.int64)


def _read_with_pyav(path: str | Path, sampling: FrameSampling, multiple: int = 1,
                    rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fallback when decord fails: count the video's packets, then decode it in order with PyAV and keep only
    the sampled frames (memory holds the sampled frames, not the video)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            total = sum(1 for packet in container.demux(stream) if packet.size)
            rate = float(stream.average_rate or 0)
        if total < 1:
            raise ItemError("no decodable frame")
        indices = sampling.indices(total, rate, multiple, rng)
        wanted = set(indices.tolist())
        kept: dict[int, tuple[np.ndarray, float]] = {}
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for ordinal, frame in enumerate(container.decode(stream)):
                if ordinal in wanted:
                    kept[ordinal] = (frame.to_ndarray(format="rgb24"), float(frame.time or 0.0))
                if ordinal >= indices[-1]:
                    break
    except (av.FFmpegError, IndexError) as exc:
        raise ItemError(f"decode error: {exc}") from None
    missing = wanted - kept.keys()
    if missing:
        raise ItemError(f"decode error: frame {min(missing)} of {total} does not decode")
    return (np.stack([kept[i][0] for i in indices]), indices,
            np.array([kept[i][1] for i in indices], dtype=np.float32))


def read_frames(path: str | Path, sampling: FrameSampling, multiple: int = 1,
                rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode the sampled frames of a video (``multiple``, ``rng``: see :meth:`FrameSampling.indices`).

    Returns:
        ``frames`` ``(T, H, W, 3)`` uint8 RGB, ``indices`` ``(T,)`` int64, ``times`` ``(T,)`` float32 seconds (each
        frame's start time).

    Raises:
        ItemError: neither decord nor PyAV can decode the file, or it has no frame.
    """
    import decord  # imported here: decord loads its native library at import

    try:
        reader = decord.VideoReader(str(path), num_threads=1)  # num_threads=0 fails on some VP9 streams
        total = len(reader)
        if total < 1:
            raise ItemError("no decodable frame")
        indices = sampling.indices(total, reader.get_avg_fps(), multiple, rng)
        frames = reader.get_batch(indices.tolist()).asnumpy()
        times = reader.get_frame_timestamp(indices.tolist())[:, 0].astype(np.float32)
    except (decord.DECORDError, RuntimeError) as exc:  # decord raises RuntimeError when it cannot open a file
        log.warning("%s: decord failed (%s), decoding with PyAV", path, str(exc).splitlines()[0][:200])
        return _read_with_pyav(path, sampling, multiple, rng)
    return frames, indices, times
