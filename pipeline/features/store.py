"""The feature store: one HDF5 file per shard holding every video's ``(N, D)`` float16 tokens, and an index.

Layout of a shard file (all datasets contiguous, uncompressed):

- ``features`` ``(R, D)`` float16: the videos' rows one after the other;
- ``offsets`` ``(n + 1,)`` int64: video i is ``features[offsets[i]:offsets[i + 1]]``;
- ``video_ids`` ``(n,)`` strings; ``layout``, ``T``, ``S`` ``(n,)``: how each video's rows are laid out
  (``videochatgpt``: N = T + S, T temporal rows, zero-padded when the recipe asks for more than the video has,
  then S spatial rows; ``frames``: N = T * S, the S tokens of each of the T frames in turn);
- ``frame_offsets`` ``(n + 1,)``, ``frame_indices``, ``frame_times`` (seconds): the sampled frames of video i are
  ``frame_indices[frame_offsets[i]:frame_offsets[i + 1]]``;
- file attributes: the encoder, weights, layer, sampling and pooling.

One dataset per video would be the obvious layout, but reading it costs h5py about 0.3 ms a video, four times a
pickle file; one contiguous dataset is memory-mapped by :class:`FeatureStore`, so a random read is a slice copy
(``benchmarks/features.py``). The index (``index.tsv``: ``video_id, path, tokens, dim, duration`` in seconds)
maps each video to its shard for random access during training.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from pipeline.io import atomic_path, read_table, write_table

INDEX_COLUMNS = ["video_id", "path", "tokens", "dim", "duration"]


class ShardWriter:
    """Writes one shard file atomically, video by video, without holding the shard in memory.

    Args:
        path: the shard file.
        rows: total rows R of all the videos to be added.
        dim: width D of the tokens.
        attrs: file attributes (encoder settings); ``None`` values are stored as ``""``.

    Use as a context manager; the file appears under ``path`` only when the block ends without error.
    """

    def __init__(self, path: str | Path, rows: int, dim: int, attrs: dict):
        self.path, self.rows, self.dim, self.attrs = Path(path), rows, dim, attrs
        self.ids: list[str] = []
        self.offsets, self.frame_offsets = [0], [0]
        self.layout: list[str] = []
        self.t: list[int] = []
        self.s: list[int] = []
        self.frame_indices: list[np.ndarray] = []
        self.frame_times: list[np.ndarray] = []

    def __enter__(self) -> ShardWriter:
        self._atomic = atomic_path(self.path)
        self._file = h5py.File(self._atomic.__enter__(), "w")
        self._features = self._file.create_dataset("features", (self.rows, self.dim), dtype=np.float16)
        return self

    def add(self, video_id: str, features: np.ndarray, layout: str, t: int, s: int,
            frame_indices: np.ndarray | None = None, frame_times: np.ndarray | None = None) -> None:
        """Append one video's ``(N, D)`` tokens and how they are laid out (see the module docstring).

        Raises:
            ValueError: the tokens are not ``(N, dim)``, or overflow the rows announced.
        """
        start = self.offsets[-1]
        if features.ndim != 2 or features.shape[1] != self.dim or start + len(features) > self.rows:
            raise ValueError(f"{video_id}: {features.shape} tokens do not fit rows {start}..{self.rows} of width "
                             f"{self.dim}")
        self._features[start:start + len(features)] = features.astype(np.float16, copy=False)
        self.ids.append(video_id)
        self.offsets.append(start + len(features))
        self.layout.append(layout)
        self.t.append(t)
        self.s.append(s)
        indices = np.asarray(frame_indices if frame_indices is not None else [], dtype=np.int64)
        self.frame_indices.append(indices)
        self.frame_times.append(np.asarray(frame_times if frame_times is not None else [], dtype=np.float32))
        self.frame_offsets.append(self.frame_offsets[-1] + len(indices))

    def __exit__(self, kind, error, trace) -> None:
        try:
            if error is None:
                self._finish()
        except BaseException as exc:
            self._file.close()
            self._atomic.__exit__(type(exc), exc, exc.__traceback__)  # removes the temporary file
            raise
        self._file.close()
        self._atomic.__exit__(kind, error, trace)

    def _finish(self) -> None:
        if self.offsets[-1] != self.rows:
            raise ValueError(f"{self.path}: {self.offsets[-1]} rows written of {self.rows} announced")
        f = self._file
        for key, value in self.attrs.items():
            f.attrs[key] = "" if value is None else value
        f["offsets"] = np.asarray(self.offsets, dtype=np.int64)
        f["video_ids"] = np.asarray(self.ids, dtype=h5py.string_dtype())
        f["layout"] = np.asarray(self.layout, dtype=h5py.string_dtype())
        f["T"] = np.asarray(self.t, dtype=np.int64)
        f["S"] = np.asarray(self.s, dtype=np.int64)
        f["frame_offsets"] = np.asarray(self.frame_offsets, dtype=np.int64)
        f["frame_indices"] = np.concatenate(self.frame_indices or [np.zeros(0, np.int64)])
        f["frame_times"] = np.concatenate(self.frame_times or [np.zeros(0, np.float32)])


def write_index(status_tables: list[str | Path], out: str | Path) -> int:
    """Write ``index.tsv`` from the features stage's status tables (their ``ok`` rows); return the video count.

    Raises:
        ValueError: a ``video_id`` appears in two shards.
    """
    rows, seen = [], {}
    for table in status_tables:
        for row in read_table(table).to_dict("records"):
            if row["status"] != "ok":
                continue
            if row["video_id"] in seen:
                raise ValueError(f"video_id {row['video_id']!r} is in both {seen[row['video_id']]} and {table}")
            seen[row["video_id"]] = table
            rows.append(row)
    write_table(out, rows, INDEX_COLUMNS)
    return len(rows)


class _Shard:
    """One shard file opened for reading: its ids and offsets, and its tokens memory-mapped."""

    def __init__(self, path: str):
        self.path = path
        self.file = h5py.File(path, "r")
        self.rows = {video: i for i, video in enumerate(self.file["video_ids"].asstr()[()])}
        self.offsets = self.file["offsets"][()]
        self.per_frame = self.file["layout"].asstr()[()] == "frames"
        self.t, self.s = self.file["T"][()], self.file["S"][()]
        features = self.file["features"]
        offset = features.id.get_offset()
        if offset is None or features.chunks is not None or features.compression is not None:
            self.tokens = features  # not memory-mappable: read through h5py
        else:
            mapped = np.memmap(path, dtype=features.dtype, mode="r", offset=offset, shape=features.shape)
            self.tokens = mapped.view(np.ndarray)  # plain ndarray slices: no memmap bookkeeping per read


class FeatureStore:
    """Random access to video features by id through ``index.tsv``; ``tokens`` maps each video to its row count N.

    Shard files are opened lazily and reopened in each process (a DataLoader worker forked after the first read
    gets its own handles and memory maps, never the parent's).
    """

    def __init__(self, index: str | Path):
        table = read_table(index)
        self.paths: dict[str, str] = dict(zip(table["video_id"], table["path"]))
        self.tokens: dict[str, int] = {video: int(n) for video, n in zip(table["video_id"], table["tokens"])}
        self._shards: dict[str, _Shard] = {}
        self._pid = os.getpid()

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.paths

    def __len__(self) -> int:
        return len(self.paths)

    def _shard(self, video_id: str) -> tuple[_Shard, int]:
        if os.getpid() != self._pid:
            self._shards, self._pid = {}, os.getpid()
        path = self.paths[video_id]
        shard = self._shards.get(path)
        if shard is None:
            shard = self._shards[path] = _Shard(path)
        return shard, shard.rows[video_id]

    def get(self, video_id: str, max_frames: int | None = None) -> np.ndarray:
        """The ``(N, D)`` float16 tokens of ``video_id`` (a copy).

        Args:
            max_frames: with the ``frames`` layout, keep at most this many frames, evenly spaced (a stage that
                trains on fewer frames than were cached: VideoChat-Flash's 4 and 8-frame stages); N becomes
                ``min(T, max_frames) * S``. Other layouts are returned whole.

        Raises:
            KeyError: the video is not in the index.
        """
        shard, row = self._shard(video_id)
        tokens = shard.tokens[shard.offsets[row]:shard.offsets[row + 1]]
        kept = self._kept_frames(shard, row, max_frames)
        if kept is None:
            return np.array(tokens)
        return np.ascontiguousarray(tokens.reshape(int(shard.t[row]), int(shard.s[row]), -1)[kept]).reshape(
            -1, tokens.shape[1])

    def rows(self, video_id: str, max_frames: int | None = None) -> int:
        """N, the rows :meth:`get` returns for ``video_id`` with ``max_frames``.

        Raises:
            KeyError: the video is not in the index.
        """
        if max_frames is None:
            return self.tokens[video_id]
        shard, row = self._shard(video_id)
        kept = self._kept_frames(shard, row, max_frames)
        return self.tokens[video_id] if kept is None else len(kept) * int(shard.s[row])

    @staticmethod
    def _kept_frames(shard: _Shard, row: int, max_frames: int | None) -> np.ndarray | None:
        """The evenly spaced frames kept of a ``frames``-layout video with more than ``max_frames``, else None."""
        if max_frames is None or not shard.per_frame[row] or shard.t[row] <= max_frames:
            return None
        return np.round(np.linspace(0, shard.t[row] - 1, max_frames)).astype(np.int64)

    def info(self, video_id: str) -> dict:
        """How the tokens of ``video_id`` are laid out: ``layout``, ``T``, ``S``, ``frame_indices``,
        ``frame_times`` (seconds)."""
        shard, row = self._shard(video_id)
        f = shard.file
        frames = slice(f["frame_offsets"][row], f["frame_offsets"][row + 1])
        return {"layout": f["layout"].asstr()[row], "T": int(f["T"][row]), "S": int(f["S"][row]),
                "frame_indices": f["frame_indices"][frames], "frame_times": f["frame_times"][frames]}

    def close(self) -> None:
        """Close the open shard files."""
        for shard in self._shards.values():
            shard.file.close()
        self._shards = {}
