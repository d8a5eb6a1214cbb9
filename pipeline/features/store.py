"""The feature store: one HDF5 file per shard holding every video's ``(N, D)`` float16 tokens, and an index.

Layout of a shard file (uncompressed; the per-video datasets grow as videos are appended):

- ``features`` ``(R, D)`` float16, in chunks of about 1 MiB: the videos' rows one after the other;
- ``offsets`` ``(n + 1,)`` int64: video i is ``features[offsets[i]:offsets[i + 1]]``;
- ``video_ids`` ``(n,)`` strings; ``layout``, ``T``, ``S`` ``(n,)``: how each video's rows are laid out
  (``videochatgpt``: N = T + S, T temporal rows, zero-padded when the recipe asks for more than the video has,
  then S spatial rows; ``frames``: N = T * S, the S tokens of each of the T frames in turn);
- ``frame_offsets`` ``(n + 1,)``, ``frame_indices``, ``frame_times`` (seconds): the sampled frames of video i are
  ``frame_indices[frame_offsets[i]:frame_offsets[i + 1]]``;
- ``crc32`` ``(n,)`` uint32: CRC-32 of each video's feature bytes, then its frame indices and times;
- file attributes: the settings that made the features (``settings``, JSON, and one attribute per setting).

Videos are written once, straight into the shard file, and committed one by one (:class:`ShardWriter`): a job
killed mid-shard leaves a file whose committed videos are verified by checksum when the job resumes. Reading is a
slice of a memory map of the file's uncompressed chunks (:class:`FeatureStore`): one HDF5 dataset per video would
cost h5py about 0.3 ms a read, four times a pickle file (``benchmarks/features.py``). The index (``index.tsv``:
``video_id, path, tokens, dim, duration`` in seconds) maps each video to its shard for random access in training.

A damaged shard never passes unnamed: building the index verifies every shard it lists (structure and every
video's checksum, :func:`verify_shard`), and a :class:`FeatureStore` checks each shard against the index when it
opens it; both raise :class:`ShardError` naming the file (and the video).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import zlib
from pathlib import Path

import h5py
import numpy as np

from pipeline import PipelineError
from pipeline.io import read_table, write_table

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["video_id", "path", "tokens", "dim", "duration"]
CHUNK_BYTES = 1 << 20
_PER_VIDEO = ("video_ids", "layout", "T", "S", "crc32")
_STRINGS = ("video_ids", "layout")


class ShardError(PipelineError):
    """A features shard that cannot be used as it is: unreadable, truncated, damaged, or not what the index says.
    The message names the file (and the video) and says how to remake it."""


def _checksum(features: np.ndarray, indices: np.ndarray, times: np.ndarray) -> int:
    crc = zlib.crc32(np.ascontiguousarray(features, dtype=np.float16))
    crc = zlib.crc32(np.ascontiguousarray(indices, dtype=np.int64), crc)
    return zlib.crc32(np.ascontiguousarray(times, dtype=np.float32), crc)


def _intact(features, offsets, frame_offsets, indices, times, crc, i: int) -> bool:
    """Whether video ``i`` of a shard (its tables as read, the frame tables and CRCs whole) matches its CRC-32."""
    frames = slice(frame_offsets[i], frame_offsets[i + 1])
    return _checksum(features[offsets[i]:offsets[i + 1]], indices[frames], times[frames]) == crc[i]


def _open(path: str | Path, mode: str = "r") -> h5py.File:
    try:
        return h5py.File(path, mode)
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path}: not a readable features shard ({str(exc).splitlines()[0]}); delete it and rerun "
                         "the features rule for this shard") from None


class ShardWriter:
    """Appends videos to one shard file, committing each: the file holds every added video as soon as
    :meth:`add` returns, and nothing of one whose :meth:`add` failed.

    Args:
        path: the shard file.
        attrs: file attributes (the settings that made the features); ``None`` values are stored as ``""``.
        resume: reopen an existing file and keep its committed videos (those whose checksums verify, up to the
            first that does not); a file that cannot be opened is started afresh. False: always start afresh.

    Use as a context manager (or call :meth:`close`).
    """

    def __init__(self, path: str | Path, attrs: dict, resume: bool = False):
        self.path = Path(path)
        self.file = None
        if resume and self.path.exists():
            try:
                self.file = h5py.File(self.path, "r+")
                self._recover()
            except (OSError, ValueError, KeyError, ShardError) as exc:
                log.warning("%s: unusable after the killed run (%s), starting the shard afresh", self.path, exc)
                if self.file is not None:
                    self.file.close()
                self.file = None
        if self.file is None:
            self.file = h5py.File(self.path, "w")
            for key, value in attrs.items():
                self.file.attrs[key] = "" if value is None else value
            for name in _PER_VIDEO + ("offsets", "frame_offsets", "frame_indices", "frame_times"):
                dtype = {"crc32": np.uint32, "frame_times": np.float32}.get(name, np.int64)
                dtype = h5py.string_dtype() if name in _STRINGS else dtype
                initial = [0] if name.endswith("offsets") else []
                self.file.create_dataset(name, data=np.asarray(initial, dtype=dtype), maxshape=(None,), chunks=(4096,))
        ids = self.file["video_ids"].asstr()[()]
        self.committed = {video: i for i, video in enumerate(ids)}

    def _recover(self) -> None:
        """Keep the longest prefix of committed videos that is whole and verifies; drop the rest."""
        f = self.file
        n = min(len(f[name]) for name in _PER_VIDEO)
        n = min(n, len(f["offsets"]) - 1, len(f["frame_offsets"]) - 1)
        offsets, frame_offsets = f["offsets"][: n + 1], f["frame_offsets"][: n + 1]
        rows = len(f["features"]) if "features" in f else 0
        indices, times, crc = f["frame_indices"][()], f["frame_times"][()], f["crc32"][()]
        for i in range(n):
            if offsets[i + 1] > rows or frame_offsets[i + 1] > min(len(indices), len(times)):
                n = i
                break
            if not _intact(f["features"], offsets, frame_offsets, indices, times, crc, i):
                log.warning("%s: video %d fails its checksum, redoing it and the ones after", self.path, i)
                n = i
                break
        self._truncate(n, int(offsets[n]), int(frame_offsets[n]))
        log.info("%s: resuming after %d committed videos", self.path, n)

    def _truncate(self, n: int, rows: int, frames: int) -> None:
        f = self.file
        for name in _PER_VIDEO:
            f[name].resize((n,))
        f["offsets"].resize((n + 1,))
        f["frame_offsets"].resize((n + 1,))
        f["frame_indices"].resize((frames,))
        f["frame_times"].resize((frames,))
        if "features" in f:
            f["features"].resize((rows, f["features"].shape[1]))
        f.flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.committed

    def fields(self, video_id: str) -> dict:
        """The status fields of a committed video: ``tokens`` (N), ``dim`` (D), ``frames`` (sampled frames)."""
        f, i = self.file, self.committed[video_id]
        return {"tokens": int(f["offsets"][i + 1] - f["offsets"][i]), "dim": int(f["features"].shape[1]),
                "frames": int(f["frame_offsets"][i + 1] - f["frame_offsets"][i])}

    def add(self, video_id: str, features: np.ndarray, layout: str, t: int, s: int,
            frame_indices: np.ndarray | None = None, frame_times: np.ndarray | None = None) -> None:
        """Append and commit one video's ``(N, D)`` tokens and how they are laid out (see the module docstring).

        Args:
            frame_indices: ``(T,)`` the sampled frames' indices; frame_times: ``(T,)`` their times in seconds.

        Raises:
            ValueError: the tokens are not ``(N, D)`` with the shard's D, or the video is already in the shard.
        """
        features = np.asarray(features)
        f = self.file
        dim = f["features"].shape[1] if "features" in f else None
        if features.ndim != 2 or (dim is not None and features.shape[1] != dim) or video_id in self.committed:
            raise ValueError(f"{self.path}: cannot add {video_id!r}: {features.shape} tokens (shard width {dim}), "
                             f"{'already in the shard' if video_id in self.committed else 'need (N, D)'}")
        if dim is None:
            dim = features.shape[1]
            chunk = max(1, CHUNK_BYTES // max(1, 2 * dim))
            f.create_dataset("features", (0, dim), np.float16, maxshape=(None, dim), chunks=(chunk, dim))
        indices = np.asarray(frame_indices if frame_indices is not None else [], dtype=np.int64)
        times = np.asarray(frame_times if frame_times is not None else [], dtype=np.float32)
        n = len(self.committed)
        start, frames = int(f["offsets"][n]), int(f["frame_offsets"][n])
        try:
            for name, value, at in (("features", features.astype(np.float16, copy=False), start),
                                    ("frame_indices", indices, frames), ("frame_times", times, frames)):
                if len(value):
                    f[name].resize((at + len(value), *f[name].shape[1:]))
                    f[name][at:] = value
            record = {"video_ids": video_id, "layout": layout, "T": t, "S": s,
                      "crc32": _checksum(features, indices, times)}
            for name, value in record.items():
                f[name].resize((n + 1,))
                f[name][n] = value
            for name, value in (("frame_offsets", frames + len(indices)), ("offsets", start + len(features))):
                f[name].resize((n + 2,))
                f[name][n + 1] = value
            f.flush()
        except BaseException:
            self._truncate(n, start, frames)
            raise
        self.committed[video_id] = n

    def close(self) -> None:
        """Close the file (every added video is already committed)."""
        if self.file is not None:
            if "features" not in self.file:  # no video: an empty (0, 0) table
                self.file.create_dataset("features", (0, 0), np.float16)
            self.file.close()
            self.file = None


class FeatureShard:
    """The features stage's output for :func:`pipeline.shards.run_shard`: videos appended to one shard file in
    ``<out>.partial/features.h5``, published as the file ``out``; what an earlier, killed run committed is
    reused.

    Args:
        attrs: the shard file's attributes (the settings).
    """

    FILE = "features.h5"

    def __init__(self, attrs: dict):
        self.attrs = attrs
        self.writer: ShardWriter | None = None

    def open(self, partial: Path) -> None:
        """Open (or resume) the shard file in ``partial``."""
        self.writer = ShardWriter(partial / self.FILE, self.attrs, resume=True)

    def done(self, row: dict) -> dict | None:
        """The fields of ``row``'s video if it is committed, else None."""
        if row["video_id"] not in self.writer:
            return None
        return {"path": str(self.writer.path), **self.writer.fields(row["video_id"])}

    def target(self, row: dict):
        """The writer; :meth:`ShardWriter.add` commits a video whole or not at all."""
        return contextlib.nullcontext(self.writer)

    def path(self, row: dict) -> str:
        """Where every video of the shard is while the job runs."""
        return str(self.writer.path)

    def publish(self, out: Path):
        """Close the shard file and rename it to ``out``; every row's ``path`` becomes ``out``."""
        partial = self.writer.path.parent
        self.writer.close()
        os.replace(partial / self.FILE, out)
        for leftover in partial.iterdir():
            leftover.unlink()
        partial.rmdir()
        return lambda path: str(out)


def verify_shard(path: str | Path, expected: dict[str, int] | None = None, checksums: bool = True) -> int:
    """Check a shard file and return its video count.

    Args:
        expected: ``video_id -> N`` the shard must hold with those row counts (what the index or a status table
            says), or None.
        checksums: also read every video and check its CRC-32 (the whole file is read).

    Raises:
        ShardError: the file cannot be opened as HDF5, misses a table, is truncated (its data ends past the end
            of the file), holds other videos or row counts than ``expected`` (shards swapped or rewritten since
            the index was built), or a video fails its checksum; the message names the file and video.
    """
    with _open(path) as f:
        try:
            ids = f["video_ids"].asstr()[()]
            offsets, frame_offsets, crc = f["offsets"][()], f["frame_offsets"][()], f["crc32"][()]
            features = f["features"]
            shape, extent = features.shape, _data_end(features)
        except (KeyError, OSError, ValueError) as exc:
            raise ShardError(f"{path}: not a complete features shard ({str(exc).splitlines()[0]}); delete it and "
                             "rerun the features rule for this shard") from None
        if len(offsets) != len(ids) + 1 or offsets[-1] != shape[0] or len(crc) != len(ids):
            raise ShardError(f"{path}: inconsistent tables ({len(ids)} videos, {len(offsets)} offsets, "
                             f"{shape[0]} rows); delete it and rerun the features rule for this shard")
        size = os.path.getsize(path)
        if extent > size:
            raise ShardError(f"{path}: truncated ({size} bytes, its data ends at byte {extent}); delete it and "
                             "rerun the features rule for this shard")
        rows = {video: int(offsets[i + 1] - offsets[i]) for i, video in enumerate(ids)}
        if expected is not None:
            missing = sorted(set(expected) - set(rows))
            wrong = sorted(v for v in set(expected) & set(rows) if rows[v] != expected[v])
            if missing or wrong:
                video = (missing or wrong)[0]
                detail = (f"has no video {video!r}" if missing else
                          f"holds {rows[video]} rows of {video!r}, not {expected[video]}")
                raise ShardError(f"{path}: {detail} ({len(missing)} missing, {len(wrong)} of other length): not the "
                                 "shard the index was built from (files swapped or rewritten?); rerun the "
                                 "features_index rule, or the features rule for this shard")
        if checksums:
            indices, times = f["frame_indices"][()], f["frame_times"][()]
            for i, video in enumerate(ids):
                try:
                    ok = _intact(features, offsets, frame_offsets, indices, times, crc, i)
                except OSError as exc:
                    raise ShardError(f"{path}: video {video!r} unreadable ({str(exc).splitlines()[0]}); delete the "
                                     "file and rerun the features rule for this shard") from None
                if not ok:
                    raise ShardError(f"{path}: video {video!r} is damaged (checksum mismatch); delete the file and "
                                     "rerun the features rule for this shard")
        return len(ids)


def _data_end(features: h5py.Dataset) -> int:
    """The byte just past the last stored byte of ``features`` in its file (0 when it holds nothing)."""
    dsid = features.id
    if features.chunks is None:
        offset = dsid.get_offset()
        return 0 if offset is None else offset + dsid.get_storage_size()
    ends = [info.byte_offset + info.size for info in (dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks()))]
    return max(ends, default=0)


def write_index(status_tables: list[str | Path], out: str | Path) -> int:
    """Write ``index.tsv`` from the features stage's status tables (their ``ok`` rows), after verifying every
    shard file they name (:func:`verify_shard`, checksums included); return the video count.

    Raises:
        ValueError: a ``video_id`` appears in two shards.
        ShardError: a shard file is missing, damaged or does not hold what its status table says.
    """
    rows, seen, shards = [], {}, {}
    for table in status_tables:
        for row in read_table(table).to_dict("records"):
            if row["status"] != "ok":
                continue
            if row["video_id"] in seen:
                raise ValueError(f"video_id {row['video_id']!r} is in both {seen[row['video_id']]} and {table}")
            seen[row["video_id"]] = table
            shards.setdefault(row["path"], {})[row["video_id"]] = int(row["tokens"])
            rows.append(row)
    for path, expected in shards.items():
        if not os.path.exists(path):
            raise ShardError(f"{path}: missing (its status table lists {len(expected)} videos); rerun the features "
                             "rule for this shard")
        verify_shard(path, expected)
    write_table(out, rows, INDEX_COLUMNS)
    return len(rows)


class _Shard:
    """One shard file opened for reading: its tables in memory, its tokens memory-mapped chunk by chunk."""

    def __init__(self, path: str):
        self.path = path
        self.file = _open(path)
        f = self.file
        try:
            self.rows = {video: i for i, video in enumerate(f["video_ids"].asstr()[()])}
            self.offsets, self.frame_offsets = f["offsets"][()], f["frame_offsets"][()]
            self.layout = f["layout"].asstr()[()]
            self.per_frame = self.layout == "frames"
            self.t, self.s = f["T"][()], f["S"][()]
            self.frame_indices, self.frame_times = f["frame_indices"][()], f["frame_times"][()]
            features = f["features"]
        except (KeyError, OSError, ValueError) as exc:
            self.file.close()
            raise ShardError(f"{path}: not a complete features shard ({str(exc).splitlines()[0]})") from None
        self.features = features
        self.segments = self._map(path, features)
        self.starts = [first for first, _ in self.segments or ()]

    @staticmethod
    def _map(path: str, features: h5py.Dataset) -> list[tuple[int, np.ndarray]] | None:
        """The rows of ``features`` as views of one memory map of the file: ``(first row, (n, D) array)`` for every
        run of chunks that lie one after the other in the file (appended chunks mostly do: a 250-video shard of
        (356, 1024) tokens is 174 chunks in about 7 runs). None: read through h5py (compressed data, or an empty
        or contiguous table)."""
        rows, dim = features.shape
        if features.compression is not None or features.chunks is None or not rows:
            return None
        height, dsid = features.chunks[0], features.id
        chunks = sorted(((info.chunk_offset[0], info.byte_offset) for info in
                         (dsid.get_chunk_info(i) for i in range(dsid.get_num_chunks()))))
        if [first for first, _ in chunks] != list(range(0, rows, height)):
            return None  # a chunk never written: not this writer's file
        whole = np.memmap(path, dtype=np.uint8, mode="r")
        step, runs = height * dim * 2, []
        for first, offset in chunks:
            if runs and offset == runs[-1][1] + runs[-1][2] * step:
                runs[-1][2] += 1
            else:
                runs.append([first, offset, 1])
        return [(first, whole[offset:offset + count * step].view(np.float16).reshape(-1, dim).view(np.ndarray))
                for first, offset, count in runs]

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Rows ``[start, end)`` of ``features`` as a new ``(end - start, D)`` float16 array."""
        if self.segments is None or end <= start:
            return self.features[start:end]
        i = bisect.bisect_right(self.starts, start) - 1
        first, rows = self.segments[i]
        if end - first <= len(rows):
            return np.array(rows[start - first:end - first])
        parts = []
        while start < end:
            first, rows = self.segments[i]
            parts.append(rows[start - first:min(end - first, len(rows))])
            start, i = first + len(rows), i + 1
        return np.concatenate(parts)


class FeatureStore:
    """Random access to video features by id through ``index.tsv``; ``tokens`` maps each video to its row count N.

    Every shard the index names is checked against it when the store is made (:func:`verify_shard` without
    checksums: it opens, is whole, and holds those videos with those row counts). Shard files are then opened
    lazily and reopened in each process (a DataLoader worker forked after the first read gets its own handles and
    memory maps, never the parent's).

    Args:
        index: the ``index.tsv``.
        verify: check the shards when the store is made.

    Raises:
        ShardError: a shard is missing, unreadable, truncated or not what the index says (names the file).
    """

    def __init__(self, index: str | Path, verify: bool = True):
        table = read_table(index)
        self.index = str(index)
        self.paths: dict[str, str] = dict(zip(table["video_id"], table["path"]))
        self.tokens: dict[str, int] = {video: int(n) for video, n in zip(table["video_id"], table["tokens"])}
        self.dims = {int(d) for d in table["dim"]} if "dim" in table else set()
        self._shards: dict[str, _Shard] = {}
        self._pid = os.getpid()
        if verify:
            by_shard: dict[str, dict[str, int]] = {}
            for video, path in self.paths.items():
                by_shard.setdefault(path, {})[video] = self.tokens[video]
            for path, expected in by_shard.items():
                if not os.path.exists(path):
                    raise ShardError(f"{path}: missing, but {index} lists {len(expected)} of its videos; rerun the "
                                     "features rule for this shard")
                verify_shard(path, expected, checksums=False)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.paths

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        """D, the width of every video's tokens.

        Raises:
            ValueError: the index holds videos of several widths, or none.
        """
        if len(self.dims) != 1:
            raise ValueError(f"{self.index}: need features of one width, found {sorted(self.dims)}")
        return next(iter(self.dims))

    def _shard(self, video_id: str) -> tuple[_Shard, int]:
        if os.getpid() != self._pid:
            self._shards, self._pid = {}, os.getpid()
        path = self.paths[video_id]
        shard = self._shards.get(path)
        if shard is None:
            shard = self._shards[path] = _Shard(path)
        if video_id not in shard.rows:
            raise ShardError(f"{path}: has no video {video_id!r}, which {self.index} places there (shard rewritten "
                             "since the index was built?); rerun the features_index rule")
        return shard, shard.rows[video_id]

    def get(self, video_id: str, max_frames: int | None = None) -> np.ndarray:
        """The ``(N, D)`` float16 tokens of ``video_id`` (a copy).

        Args:
            max_frames: with the ``frames`` layout, keep at most this many frames, evenly spaced (a stage that
                trains on fewer frames than were cached: VideoChat-Flash's 4 and 8-frame stages); N becomes
                ``min(T, max_frames) * S``. Other layouts are returned whole.

        Raises:
            KeyError: the video is not in the index.
            ShardError: its shard does not hold it.
        """
        shard, row = self._shard(video_id)
        tokens = shard.tokens(int(shard.offsets[row]), int(shard.offsets[row + 1]))
        kept = self._kept_frames(shard, row, max_frames)
        if kept is None:
            return tokens
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
        frames = slice(shard.frame_offsets[row], shard.frame_offsets[row + 1])
        return {"layout": str(shard.layout[row]), "T": int(shard.t[row]), "S": int(shard.s[row]),
                "frame_indices": shard.frame_indices[frames], "frame_times": shard.frame_times[frames]}

    def close(self) -> None:
        """Close the open shard files."""
        for shard in self._shards.values():
            shard.file.close()
        self._shards = {}


def settings_attrs(settings: dict) -> dict:
    """A shard file's attributes from the features' settings stamp: ``settings`` (all of it, JSON) and one
    attribute per setting, nested names joined by ``.`` (``encoder.backend``), values JSON where not a number
    or string."""
    flat = {"settings": json.dumps(settings, sort_keys=True)}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str)) else json.dumps(value)

    walk("", settings)
    return flat
