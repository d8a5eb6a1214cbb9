"""Stage 4, features: sampled frames of every compressed video -> CLIP patch tokens -> pooled video tokens.

DataLoader worker processes decode each video's sampled frames and fit them to the tower (uint8) while the main
process runs the tower on batches of frames (on a GPU in float16 when one is there), so decoding overlaps the
model. One HDF5 file per shard (see :mod:`pipeline.features.store`); per-video results wait in
``<shard>.h5.partial/`` until the shard file is written, so a killed job resumes without redoing finished videos.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline import configure_logging
from pipeline.features.encoder import EncoderConfig, FrameEncoder, FramePrep
from pipeline.features.pooling import POOLINGS, frame_tokens, videochatgpt_pool
from pipeline.features.store import ShardWriter, write_index
from pipeline.shards import (
    STATUS_COLUMNS,
    ItemError,
    ShardTask,
    finish,
    finished_row,
    log_counts,
    ok_rows,
    prepare_partial,
    process_row,
)
from pipeline.video.frames import FrameSampling, read_frames

log = logging.getLogger(__name__)

COLUMNS = STATUS_COLUMNS + ["tokens", "dim", "frames", "duration"]


@dataclass(frozen=True)
class FeatureConfig:
    """The ``features`` section of the config: the encoder (:class:`EncoderConfig`), the frames
    (:class:`FrameSampling`), and the pooling.

    Attributes:
        pooling: ``videochatgpt`` (T temporal + S spatial tokens) or ``frames`` (every frame's tokens).
        temporal_tokens: with ``videochatgpt``, pad the temporal rows to this many (Video-ChatGPT: 100).
        spatial_pool: with ``frames``, average-pool k x k patches (1: none).
        batch_size: frames per forward pass of the tower.
        workers: DataLoader processes decoding videos (0: decode in the main process).
        decode_timeout: seconds a worker may take for one video before it is failed as hung.
    """

    encoder: EncoderConfig
    sampling: FrameSampling
    pooling: str = "videochatgpt"
    temporal_tokens: int | None = None
    spatial_pool: int = 1
    batch_size: int = 32
    workers: int = 2
    decode_timeout: float = 600

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"features.pooling: unknown {self.pooling!r}; known: {POOLINGS}")

    @classmethod
    def from_dict(cls, section: dict) -> FeatureConfig:
        """From the config's flat ``features`` section."""
        encoder = {k: section[k] for k in EncoderConfig.__dataclass_fields__ if k in section}
        sampling = {k: section[k] for k in ("num_frames", "fps", "min_frames", "max_frames") if k in section}
        own = {k: section[k] for k in ("pooling", "temporal_tokens", "spatial_pool", "batch_size", "workers",
                                       "decode_timeout") if k in section}
        return cls(EncoderConfig(**encoder), FrameSampling(method=section.get("sampling", "midpoints"), **sampling),
                   **own)

    def pool(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(T, S, D)`` patch tokens -> the stored ``(N, D)`` float16 tokens."""
        if self.pooling == "videochatgpt":
            return videochatgpt_pool(tokens, self.temporal_tokens)
        return frame_tokens(tokens, grid, self.spatial_pool)


class _Frames(Dataset):
    """One item per video: its sampled frames fitted to the tower, or the reason they could not be read."""

    def __init__(self, rows: list[dict], sampling: FrameSampling, prep: FramePrep):
        self.rows, self.sampling, self.prep = rows, sampling, prep

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        try:
            frames, indices, times = read_frames(self.rows[index]["path"], self.sampling)
            return {"index": index, "pixels": self.prep(frames), "indices": indices, "times": times, "error": ""}
        except ItemError as exc:
            return {"index": index, "error": str(exc)}


def _single_thread(_: int) -> None:
    torch.set_num_threads(1)


def _describe(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as saved:
        features = saved["features"]
        return {"tokens": features.shape[0], "dim": features.shape[1], "frames": len(saved["indices"])}


def _loaded(rows: list[dict], config: FeatureConfig, prep: FramePrep):
    """Yield ``(row, item)`` for every row; a video whose worker hangs past ``decode_timeout`` gets an error item
    and the rest are loaded afresh."""
    start = 0
    while start < len(rows):
        rest = rows[start:]
        loader = DataLoader(_Frames(rest, config.sampling, prep), batch_size=None, num_workers=config.workers,
                            worker_init_fn=_single_thread if config.workers else None,
                            timeout=config.decode_timeout if config.workers else 0)
        position = 0
        try:
            for item in loader:
                yield rest[item["index"]], item
                position += 1
            return
        except RuntimeError as exc:
            if "timed out" not in str(exc):
                raise
            yield rest[position], {"error": f"decode timed out after {config.decode_timeout:g} s"}
            start += position + 1


def extract_shard(rows: list[dict], out: str | Path, config: FeatureConfig, threads: int) -> list[dict]:
    """Extract the features of ``rows`` (``video_id``, ``path``, and ``duration`` in seconds, passed on to the status
    rows) into the shard file ``out``; return status rows.

    Args:
        threads: CPU threads of the tower (on the CPU).
    """
    torch.set_num_threads(max(1, threads))
    out = Path(out)
    current: dict = {}

    def produce(row: dict, tmp: Path) -> dict:
        item, encoder = current["item"], current["encoder"]
        if item["error"]:
            raise ItemError(item["error"])
        tokens = encoder.patch_tokens(item["pixels"], config.batch_size)
        features = config.pool(tokens, encoder.grid)
        if not torch.isfinite(features).all():
            raise ItemError("non-finite features (NaN or beyond float16 range)")
        frames = len(item["indices"])
        per_frame = tokens.shape[1] if config.pooling == "videochatgpt" else len(features) // frames
        np.savez(tmp, features=features.numpy(), indices=item["indices"], times=item["times"],
                 T=len(features) - per_frame if config.pooling == "videochatgpt" else frames, S=per_frame)
        return _describe(tmp)

    task = ShardTask(ext=".npz", produce=produce, describe=_describe, settings={"stage": "features",
                                                                               **repr_config(config)})
    partial = prepare_partial(out, task, rows)
    status = {row["video_id"]: finished_row(task, row, partial) for row in rows}
    pending = [row for row in rows if status[row["video_id"]] is None]
    if pending:
        current["encoder"] = FrameEncoder(config.encoder)
        for row, item in _loaded(pending, config, current["encoder"].prep):
            current["item"] = item
            status[row["video_id"]] = process_row(task, row, partial)
    ordered = [{**status[row["video_id"]], "duration": row.get("duration", "")} for row in rows]
    finished = [row for row in ordered if row["status"] == "ok"]
    dims = {int(row["dim"]) for row in finished} or {0}
    with ShardWriter(out, sum(int(row["tokens"]) for row in finished), max(dims), repr_config(config)) as writer:
        for row in finished:
            with np.load(row["path"], allow_pickle=False) as saved:
                writer.add(row["video_id"], saved["features"], config.pooling, int(saved["T"]), int(saved["S"]),
                           saved["indices"], saved["times"])
    for row in ordered:
        if row["status"] == "ok":
            row["path"] = str(out)
    shutil.rmtree(partial, ignore_errors=True)
    log_counts(ordered, "features")
    return ordered


def repr_config(config: FeatureConfig) -> dict:
    """The settings that shape the features, flat, for the shard file's attributes and the resume stamp."""
    encoder, sampling = config.encoder, config.sampling
    return {
        "backend": encoder.backend, "model": encoder.model, "pretrained": encoder.pretrained, "seed": encoder.seed,
        "layer": encoder.layer, "overrides": json.dumps(encoder.overrides, sort_keys=True), "resize": encoder.resize,
        "precision": encoder.precision, "sampling": sampling.method, "num_frames": sampling.num_frames,
        "fps": sampling.fps, "min_frames": sampling.min_frames, "max_frames": sampling.max_frames,
        "pooling": config.pooling, "temporal_tokens": config.temporal_tokens, "spatial_pool": config.spatial_pool,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.features.extract shard ...`` (the features rule) or ``... index ...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    shard = commands.add_parser("shard", help="extract one shard's features")
    shard.add_argument("--input", required=True, help="the compress stage's status table")
    shard.add_argument("--out", required=True, help="the shard's HDF5 file")
    shard.add_argument("--status", required=True)
    shard.add_argument("--config", required=True, help="the features config section as JSON")
    shard.add_argument("--threads", type=int, default=1)
    shard.add_argument("--strict", action="store_true")
    index = commands.add_parser("index", help="index every shard's features")
    index.add_argument("--out", required=True)
    index.add_argument("status", nargs="+", help="the features stage's status tables")
    args = parser.parse_args(argv)
    if args.command == "index":
        log.info("indexed %d videos", write_index(args.status, args.out))
        return 0
    config = FeatureConfig.from_dict(json.loads(args.config))
    status = extract_shard(ok_rows(args.input), args.out, config, args.threads)
    return finish(status, args.status, COLUMNS, args.strict)


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
