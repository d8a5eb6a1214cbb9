"""Stage 4, features: sampled frames of every compressed video -> CLIP patch tokens -> pooled video tokens.

One HDF5 file per shard (see :mod:`pipeline.features.store`). Per-video results are kept in
``<shard>.h5.partial/`` until the shard file is written, so a killed job resumes without redoing finished videos.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline import configure_logging
from pipeline.features.encoder import EncoderConfig, FrameEncoder
from pipeline.features.pooling import pool
from pipeline.features.store import write_index, write_shard
from pipeline.shards import STATUS_COLUMNS, ItemError, ShardTask, finish, ok_rows, run_shard
from pipeline.video.frames import read_frames

log = logging.getLogger(__name__)

COLUMNS = STATUS_COLUMNS + ["tokens", "dim", "frames"]


def video_features(encoder: FrameEncoder, path: str | Path, num_frames: int, sampling: str, pooling: str,
                   batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of one video.

    Returns:
        ``features`` ``(T + S, D)`` float16 (T = ``num_frames``, S = patches per frame, for ``videochatgpt``
        pooling), the sampled frame ``indices`` ``(T,)`` int64 and their ``times`` ``(T,)`` float32 seconds.

    Raises:
        ItemError: the video cannot be decoded, or the features are not finite in float16.
    """
    frames, indices, times = read_frames(path, num_frames, sampling)
    features = pool(encoder.patch_tokens(frames, batch_size), pooling).to(torch.float16)
    if not torch.isfinite(features).all():
        raise ItemError("non-finite features (NaN or beyond float16 range)")
    return features.numpy(), indices, times


def _describe(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as saved:
        features = saved["features"]
        return {"tokens": features.shape[0], "dim": features.shape[1], "frames": len(saved["indices"])}


def extract_shard(rows: list[dict], out: str | Path, config: dict, threads: int) -> list[dict]:
    """Extract the features of ``rows`` (``video_id``, ``path``) into the shard file ``out``; return status rows.

    Args:
        config: the ``features`` section of the config: encoder fields of :class:`EncoderConfig` plus
            ``num_frames``, ``sampling``, ``pooling`` and ``batch_size``.
        threads: CPU threads for the encoder.
    """
    torch.set_num_threads(max(1, threads))
    encoder_fields = {key: config[key] for key in EncoderConfig.__dataclass_fields__ if key in config}
    encoder_config = EncoderConfig(**encoder_fields)
    encoder: list[FrameEncoder] = []  # built on first use: a resumed shard with every video done needs no model

    def produce(row: dict, tmp: Path) -> dict:
        if not encoder:
            encoder.append(FrameEncoder(encoder_config, "cuda" if torch.cuda.is_available() else "cpu"))
        features, indices, times = video_features(
            encoder[0], row["path"], config["num_frames"], config["sampling"], config["pooling"], config["batch_size"]
        )
        np.savez(tmp, features=features, indices=indices, times=times)
        return _describe(tmp)

    out = Path(out)
    task = ShardTask(ext=".npz", produce=produce, describe=_describe, settings={"stage": "features", **config})
    status = run_shard(rows, task, out, threads=1, desc="features", publish=False)
    videos = {}
    for row in status:
        if row["status"] != "ok":
            continue
        with np.load(row["path"], allow_pickle=False) as saved:
            features = saved["features"]
            videos[row["video_id"]] = (features, {
                "T": len(saved["indices"]), "S": features.shape[0] - len(saved["indices"]),
                "frame_indices": saved["indices"], "frame_times": saved["times"],
            })
        row["path"] = str(out)
    attrs = {"encoder": f"{encoder_config.backend}:{encoder_config.model}", "pretrained": encoder_config.pretrained,
             "seed": encoder_config.seed, "layer": encoder_config.layer, "num_frames": config["num_frames"],
             "sampling": config["sampling"], "pooling": config["pooling"]}
    write_shard(out, videos, attrs)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    return status


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
    status = extract_shard(ok_rows(args.input), args.out, json.loads(args.config), args.threads)
    return finish(status, args.status, COLUMNS, args.strict)


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
