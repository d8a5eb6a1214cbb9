"""Frame sampling and decoding: only the sampled frames are decoded, so memory does not grow with video length."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.shards import ItemError

SAMPLINGS = ("uniform",)


def sample_indices(total: int, count: int, sampling: str = "uniform") -> np.ndarray:
    """Indices of ``count`` frames out of ``total``.

    ``uniform``: the midpoint frame of each of ``count`` equal segments, ``floor((i + 0.5) * total / count)``
    (TSN-style; frames repeat when ``total < count``, so the result always has ``count`` entries).

    Returns:
        ``(count,)`` int64, non-decreasing, in ``[0, total)``.

    Raises:
        ValueError: ``total < 1``, ``count < 1`` or an unknown ``sampling``.
    """
    if total < 1 or count < 1:
        raise ValueError(f"need total >= 1 and count >= 1, got total={total}, count={count}")
    if sampling != "uniform":
        raise ValueError(f"unknown sampling {sampling!r}; known: {SAMPLINGS}")
    return np.floor((np.arange(count) + 0.5) * total / count).astype(np.int64)


def read_frames(path: str | Path, count: int, sampling: str = "uniform") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode ``count`` sampled frames of a video with decord.

    Returns:
        ``frames`` ``(count, H, W, 3)`` uint8 RGB, ``indices`` ``(count,)`` int64, ``times`` ``(count,)`` float32
        seconds (each frame's start time).

    Raises:
        ItemError: decord cannot open or decode the file, or it has no frame.
    """
    import decord  # imported here: decord loads its native library at import

    try:
        reader = decord.VideoReader(str(path), num_threads=1)  # num_threads=0 fails on some VP9 streams
        total = len(reader)
        if total < 1:
            raise ItemError("no decodable frame")
        indices = sample_indices(total, count, sampling)
        frames = reader.get_batch(indices.tolist()).asnumpy()
        times = reader.get_frame_timestamp(indices.tolist())[:, 0].astype(np.float32)
    except (decord.DECORDError, RuntimeError) as exc:  # decord raises RuntimeError when it cannot open a file
        raise ItemError(f"decode error: {str(exc).splitlines()[0][:300]}") from None
    return frames, indices, times
