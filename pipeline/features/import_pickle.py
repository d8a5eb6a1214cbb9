"""Import Video-ChatGPT's pickled features (one ``<video_id>.pkl`` per video) into an HDF5 shard.

Video-ChatGPT distributes pre-computed spatio-temporal CLIP features as pickles. Loading a pickle runs whatever
code the file contains, so this tool refuses unless ``--trust-pickle`` says the files come from a source you
trust; nothing else in this project ever loads pickle. Each file must hold one 2-D array of ``temporal_tokens + S``
rows (``(356, 1024)`` for Video-ChatGPT); anything else is a failed row with its reason.

    python -m pipeline.features.import_pickle --features-dir clip_features --out results/features/imported.h5 \\
        --status results/features/imported.tsv --trust-pickle
    python -m pipeline.features.extract index --out results/features/index.tsv results/features/imported.tsv
"""

from __future__ import annotations

import argparse
import logging
import pickle
from pathlib import Path

import numpy as np

from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.features.extract import COLUMNS
from pipeline.features.store import ShardWriter
from pipeline.io import atomic_path, write_table
from pipeline.shards import VIDEO_ID

log = logging.getLogger(__name__)


def import_pickles(folder: str | Path, out: str | Path, trusted: bool, temporal_tokens: int = 100) -> list[dict]:
    """Read every ``*.pkl`` of ``folder`` (sorted) and write the valid ones to the shard file ``out``.

    Returns:
        Status rows (``video_id, status, reason, path, tokens, dim, frames``).

    Raises:
        PermissionError: ``trusted`` is False (pickle executes code when loaded).
    """
    if not trusted:
        raise PermissionError("loading pickle runs any code the file holds: pass --trust-pickle only for feature "
                              "files from a source you trust")
    videos, status = {}, []
    for path in sorted(Path(folder).glob("*.pkl")):
        video_id = path.stem
        try:
            if not VIDEO_ID.match(video_id):
                raise ValueError(f"file name {path.name!r} is not a safe video_id")
            with open(path, "rb") as handle:
                array = np.asarray(pickle.load(handle))  # trusted: the caller passed --trust-pickle
            if array.ndim != 2 or array.shape[0] <= temporal_tokens or not np.issubdtype(array.dtype, np.floating):
                raise ValueError(f"expected a 2-D float array of more than {temporal_tokens} rows, got "
                                 f"{array.dtype} {array.shape}")
            if not np.isfinite(array).all():
                raise ValueError("non-finite values")
        except Exception as exc:  # one bad file costs its own row
            status.append({"video_id": video_id, "status": "failed", "reason": f"{path}: {exc}"})
            continue
        videos[video_id] = array.astype(np.float16)
        status.append({"video_id": video_id, "status": "ok", "reason": "", "path": str(out),
                       "tokens": array.shape[0], "dim": array.shape[1], "frames": temporal_tokens})
    dims = {array.shape[1] for array in videos.values()}
    if len(dims) > 1:
        raise ValueError(f"{folder}: the arrays have different widths {sorted(dims)}")
    attrs = {"imported_from": str(folder), "pooling": "videochatgpt", "temporal_tokens": temporal_tokens}
    with atomic_path(out) as tmp, ShardWriter(tmp, attrs) as writer:
        for video_id, array in videos.items():
            writer.add(video_id, array, "videochatgpt", temporal_tokens, len(array) - temporal_tokens)
    log.info("%s: %d imported, %d failed", folder, len(videos), len(status) - len(videos))
    return status


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.features.import_pickle --features-dir D --out S.h5 --status S.tsv --trust-pickle``."""
    parser = cli_parser(__spec__.name, __doc__)
    parser.add_argument("--features-dir", required=True, help="folder of <video_id>.pkl files")
    parser.add_argument("--out", required=True, help="the HDF5 shard to write")
    parser.add_argument("--status", required=True, help="the status table to write (input of the index)")
    parser.add_argument("--temporal-tokens", type=int, default=100, help="temporal rows of each array")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="the files come from a source you trust (loading pickle runs code)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Import the pickles (:func:`import_pickles`)."""
    cli = parser()
    args = cli.parse_args(argv)
    try:
        status = import_pickles(args.features_dir, args.out, args.trust_pickle, args.temporal_tokens)
    except PermissionError as exc:
        cli.error(str(exc))
    write_table(args.status, status, COLUMNS)
    return 0


if __name__ == "__main__":
    run(main)
