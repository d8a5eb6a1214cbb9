"""The feature store: one HDF5 file per shard, one ``(T + S, D)`` float16 dataset per video, and an index.

Layout of a shard file: a dataset named by ``video_id`` per video, with attributes ``T``, ``S``,
``frame_indices`` and ``frame_times`` (seconds); the file's attributes name the encoder, weights, layer, frame
count, sampling and pooling. The index (``index.tsv``: ``video_id, path, tokens, dim``) maps each video to its
shard for random access during training.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from pipeline.io import atomic_path, read_table, write_table

INDEX_COLUMNS = ["video_id", "path", "tokens", "dim"]


def write_shard(path: str | Path, videos: dict[str, tuple[np.ndarray, dict]], attrs: dict) -> None:
    """Write one shard file atomically.

    Args:
        videos: ``video_id -> (features (T + S, D) float16, per-video attributes)``.
        attrs: file attributes (encoder settings); ``None`` values are stored as ``""``.
    """
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for key, value in attrs.items():
                f.attrs[key] = "" if value is None else value
            for video_id, (features, video_attrs) in videos.items():
                dataset = f.create_dataset(video_id, data=features)
                for key, value in video_attrs.items():
                    dataset.attrs[key] = value


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


class FeatureStore:
    """Random access to video features by id through ``index.tsv``.

    HDF5 files are opened lazily and reopened in each process (a DataLoader worker forked after the first read
    gets its own handles, never the parent's).
    """

    def __init__(self, index: str | Path):
        table = read_table(index)
        self.paths: dict[str, str] = dict(zip(table["video_id"], table["path"]))
        self._files: dict[str, h5py.File] = {}
        self._pid = os.getpid()

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.paths

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, video_id: str) -> np.ndarray:
        """The ``(T + S, D)`` float16 features of ``video_id``.

        Raises:
            KeyError: the video is not in the index.
        """
        if os.getpid() != self._pid:
            self._files, self._pid = {}, os.getpid()
        path = self.paths[video_id]
        handle = self._files.get(path)
        if handle is None:
            handle = self._files[path] = h5py.File(path, "r")
        return handle[video_id][()]

    def close(self) -> None:
        """Close the open HDF5 files."""
        for handle in self._files.values():
            handle.close()
        self._files = {}
