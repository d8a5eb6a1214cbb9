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
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.features.encoder import EncoderConfig
from pipeline.features.pooling import POOLINGS
from pipeline.features.store import FeatureShard, settings_attrs, write_index
from pipeline.shards import (
    RUNTIME,
    STATUS_COLUMNS,
    ItemError,
    ShardTask,
    add_strict,
    finish,
    ok_rows,
    run_shard,
    settings_of,
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
        batch_size: frames per forward pass of the tower (runtime).
        workers: DataLoader processes decoding videos (0: decode in the main process; runtime).
        decode_timeout: seconds a worker may take for one video before it is failed as hung (runtime).
    """

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    sampling: FrameSampling = field(default_factory=FrameSampling)
    pooling: str = "videochatgpt"
    temporal_tokens: int | None = None
    spatial_pool: int = 1
    batch_size: int = field(default=32, metadata=RUNTIME)
    workers: int = field(default=2, metadata=RUNTIME)
    decode_timeout: float = field(default=600, metadata=RUNTIME)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"features.pooling: unknown {self.pooling!r}; known: {POOLINGS}")

    @classmethod
    def from_dict(cls, section: dict) -> FeatureConfig:
        """From the config's flat ``features`` section (its ``sampling`` is :attr:`FrameSampling.method`).

        Raises:
            ValueError: a key that is no field of the three dataclasses, or any of their checks.
        """
        groups = {"encoder": set(EncoderConfig.__dataclass_fields__),
                  "sampling": set(FrameSampling.__dataclass_fields__) - {"method"},
                  "own": set(cls.__dataclass_fields__) - {"encoder", "sampling"}}
        unknown = set(section) - set().union(*groups.values()) - {"sampling", "resources"}
        if unknown:
            raise ValueError(f"features: unknown setting(s) {sorted(unknown)}")
        pick = {name: {k: section[k] for k in keys if k in section} for name, keys in groups.items()}
        sampling = FrameSampling(**pick["sampling"], **({"method": section["sampling"]} if "sampling" in section
                                                           else {}))
        return cls(EncoderConfig(**pick["encoder"]), sampling, **pick["own"])

    def pool(self, tokens, grid: tuple[int, int]):
        """``(T, S, D)`` patch tokens -> the stored ``(N, D)`` float16 tokens."""
        from pipeline.features.pooling import frame_tokens, videochatgpt_pool

        if self.pooling == "videochatgpt":
            return videochatgpt_pool(tokens, self.temporal_tokens)
        return frame_tokens(tokens, grid, self.spatial_pool)


def video_tokens(encoder, pixels, config: FeatureConfig):
    """One video's stored tokens and their layout, as the features rule writes them.

    Args:
        encoder: the :class:`pipeline.features.encoder.FrameEncoder` of ``config.encoder``.
        pixels: the sampled frames fitted to the tower (``encoder.prep``'s output).

    Returns:
        ``(features (N, D) float16 tensor, T, S)``: ``videochatgpt`` pooling gives T temporal rows then S spatial
        ones, ``frames`` T frames of S tokens.

    Raises:
        ItemError: the tokens are not finite (NaN, or beyond float16's range).
    """
    import torch

    tokens = encoder.patch_tokens(pixels, config.batch_size)
    features = config.pool(tokens, encoder.grid)
    if not torch.isfinite(features).all():
        raise ItemError("non-finite features (NaN or beyond float16 range)")
    frames = len(tokens)  # the tower's output frames (a multi-channel tower folds 16 frames into 3)
    if config.pooling == "videochatgpt":
        return features, len(features) - tokens.shape[1], tokens.shape[1]
    return features, frames, len(features) // frames


class _Frames:
    """One item per video, for a DataLoader: the row with its sampled frames fitted to the tower, or the reason
    they could not be read."""

    def __init__(self, rows: list[dict], sampling: FrameSampling, prep, multiple: int = 1):
        self.rows, self.sampling, self.prep, self.multiple = rows, sampling, prep, multiple

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        try:
            frames, indices, times = read_frames(row["path"], self.sampling, self.multiple)
            return {**row, "pixels": self.prep(frames), "indices": indices, "times": times, "error": ""}
        except ItemError as exc:
            return {**row, "error": str(exc)}


def _single_thread(_: int) -> None:
    import torch

    torch.set_num_threads(1)


def decoded(rows: list[dict], config: FeatureConfig, prep, multiple: int = 1):
    """Yield every row with its decoded frames (``pixels`` ``(T, 3, H, W)`` uint8, ``indices``, ``times`` in
    seconds; T a multiple of ``multiple``, the tower's clip, unless the video is one frame) or an ``error``,
    decoded by ``config.workers`` DataLoader processes ahead of the tower; a video whose worker hangs past
    ``decode_timeout`` gets an error and the rest are loaded afresh."""
    from torch.utils.data import DataLoader

    start = 0
    while start < len(rows):
        rest = rows[start:]
        loader = DataLoader(_Frames(rest, config.sampling, prep, multiple), batch_size=None, num_workers=config.workers,
                            worker_init_fn=_single_thread if config.workers else None,
                            timeout=config.decode_timeout if config.workers else 0)
        position = 0
        try:
            for item in loader:
                yield item
                position += 1
            return
        except RuntimeError as exc:
            if "timed out" not in str(exc):
                raise
            yield {**rest[position], "error": f"decode timed out after {config.decode_timeout:g} s"}
            start += position + 1


def extract_shard(rows: list[dict], out: str | Path, config: FeatureConfig, threads: int) -> list[dict]:
    """Extract the features of ``rows`` (``video_id``, ``path``, and ``duration`` in seconds, passed on to the status
    rows) into the shard file ``out``; return status rows (``COLUMNS``).

    Each video's tokens go straight into the shard file, committed one by one (:class:`FeatureShard`), so a
    killed job resumes after the last committed video; a change of any setting (:func:`settings_of`) starts the
    shard afresh.

    Args:
        threads: CPU threads of the tower (on the CPU).
    """
    import torch

    from pipeline.features.encoder import FrameEncoder

    torch.set_num_threads(max(1, threads))
    settings = {"stage": "features", **settings_of(config)}
    encoder: list = []  # made only when some video is left to do

    def load(pending: list[dict]):
        if pending:
            encoder.append(FrameEncoder(config.encoder))
            yield from decoded(pending, config, encoder[0].prep, encoder[0].tower.clip_frames)

    def produce(row: dict, writer) -> dict:
        if row["error"]:
            raise ItemError(row["error"])
        features, t, s = video_tokens(encoder[0], row["pixels"], config)
        writer.add(row["video_id"], features.numpy(), config.pooling, t, s, row["indices"], row["times"])
        return writer.fields(row["video_id"])

    task = ShardTask(produce=produce, settings=settings, outputs=FeatureShard(settings_attrs(settings)), load=load)
    status = run_shard(rows, task, out, desc="features")
    return [{**row, "duration": source.get("duration", "")} for row, source in zip(status, rows)]


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.features.extract shard ...`` (the features rule) or ``... index ...``."""
    parser = cli_parser(__spec__.name, __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    shard = commands.add_parser("shard", help="extract one shard's features")
    shard.add_argument("--input", required=True, help="the compress stage's status table")
    shard.add_argument("--out", required=True, help="the shard's HDF5 file")
    shard.add_argument("--status", required=True)
    shard.add_argument("--config", required=True, help="the features config section as JSON")
    shard.add_argument("--threads", type=int, default=1)
    add_strict(shard)
    index = commands.add_parser("index", help="index every shard's features")
    index.add_argument("--out", required=True)
    index.add_argument("status", nargs="+", help="the features stage's status tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Extract one shard, or index them all."""
    args = parser().parse_args(argv)
    if args.command == "index":
        log.info("indexed %d videos", write_index(args.status, args.out))
        return 0
    config = FeatureConfig.from_dict(json.loads(args.config))
    status = extract_shard(ok_rows(args.input), args.out, config, args.threads)
    return finish(status, args.status, COLUMNS, args.strict)


if __name__ == "__main__":
    run(main)
