"""Manifests, shards, and the per-video loop every data stage runs inside a shard job.

A manifest is a TSV with one row per video: ``video_id``, ``source`` (URL or path), and optional ``sha256``,
``start`` and ``end`` (seconds, to cut a segment out of the source). ``split`` cuts it into shards of
``shard_size`` rows (``shard-00000.tsv``, ...) so that Snakemake plans one job per shard, not per video.

Inside a shard job, :func:`run_shard` processes the videos in parallel threads and returns one status row per
video. Finished per-video files go to ``<out>.partial/`` under their final name only once complete, so a killed
job resumes where it stopped; when every video is done the folder is renamed to ``<out>``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import re
import shutil
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from pipeline import configure_logging
from pipeline.io import atomic_path, fingerprint, publish_dir, read_json, read_table, write_json, write_table

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["video_id", "source", "sha256", "start", "end"]
STATUS_COLUMNS = ["video_id", "status", "reason", "path"]
VIDEO_ID = re.compile(r"^[A-Za-z0-9_=+-][A-Za-z0-9_.=+-]*$")
SHARD_NAME = "shard-{:05d}"
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class JobError(Exception):
    """A failure of the job itself (a missing tool, say): no video of the shard could succeed, so the job fails."""


class ItemError(Exception):
    """A failure that belongs to one video (bad file, decode error, checksum mismatch): its row fails, not the job.

    The message is the row's ``reason`` and should name what the underlying tool said.
    """


def validate_manifest_row(row: dict) -> str | None:
    """Return why a manifest row is unusable, or ``None`` if it is fine.

    Checks: ``video_id`` is a safe file name (letters, digits, ``_ . = + -``, not starting with ``.``),
    ``source`` is present, ``sha256`` is 64 hex digits when given, ``start``/``end`` are numbers (seconds)
    with ``0 <= start < end`` when given.
    """
    vid = row.get("video_id", "")
    if not VIDEO_ID.match(vid):
        return f"video_id: {vid!r} is not a safe file name (letters, digits, _ . = + -)"
    if not row.get("source"):
        return "source: empty"
    sha = row.get("sha256", "")
    if sha and not re.fullmatch(r"[0-9a-fA-F]{64}", sha):
        return f"sha256: {sha!r} is not 64 hex digits"
    bounds = {}
    for key in ("start", "end"):
        value = row.get(key, "")
        if value == "":
            continue
        try:
            bounds[key] = float(value)
        except ValueError:
            return f"{key}: {value!r} is not a number of seconds"
        if not math.isfinite(bounds[key]) or bounds[key] < 0:
            return f"{key}: {value!r} must be a finite number of seconds >= 0"
    if "start" in bounds and "end" in bounds and bounds["end"] <= bounds["start"]:
        return f"end: {bounds['end']} must be greater than start {bounds['start']}"
    return None


def split_manifest(manifest: str | Path, shard_size: int, out_dir: str | Path) -> list[Path]:
    """Cut a manifest into shard tables of at most ``shard_size`` valid rows.

    Rows that fail :func:`validate_manifest_row`, and repeats of a ``video_id`` already seen, go to
    ``<out_dir>/rejected.tsv`` with a ``reason`` naming the manifest, the row number (1 = first data row) and the
    field; the other rows are unaffected. Shards are numbered in manifest order.

    Returns:
        The shard files written, in order.

    Raises:
        ValueError: the manifest lacks the ``video_id`` or ``source`` column, or ``shard_size < 1``.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    table = read_table(manifest)
    missing = {"video_id", "source"} - set(table.columns)
    if missing:
        raise ValueError(f"{manifest}: missing column(s) {sorted(missing)}; a manifest needs {MANIFEST_COLUMNS}")
    table = table.reindex(columns=MANIFEST_COLUMNS, fill_value="")
    kept, rejected, seen = [], [], set()
    for number, row in enumerate(table.to_dict("records"), start=1):
        reason = validate_manifest_row(row)
        if reason is None and row["video_id"] in seen:
            reason = f"video_id: {row['video_id']!r} repeats an earlier row"
        if reason is None:
            seen.add(row["video_id"])
            kept.append(row)
        else:
            rejected.append({**row, "reason": f"{manifest} row {number}: {reason}"})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, first in enumerate(range(0, len(kept), shard_size)):
        path = out_dir / f"{SHARD_NAME.format(index)}.tsv"
        write_table(path, kept[first : first + shard_size], MANIFEST_COLUMNS)
        shards.append(path)
    write_table(out_dir / "rejected.tsv", rejected, MANIFEST_COLUMNS + ["reason"])
    log.info("%s: %d rows in %d shards, %d rejected", manifest, len(kept), len(shards), len(rejected))
    return shards


def ok_rows(status_table: str | Path) -> list[dict]:
    """The rows of a stage's status table whose ``status`` is ``ok``: what the next stage processes."""
    return [row for row in read_table(status_table).to_dict("records") if row["status"] == "ok"]


@dataclass
class ShardTask:
    """What one data stage does to one video.

    Attributes:
        ext: extension of the per-video output file (``.mp4``, ``.npy``), or a function of the row giving it.
        produce: ``(row, tmp_path) -> fields``; writes the video's output to ``tmp_path`` and returns the extra
            status fields (duration, fps, ...). Raises :class:`ItemError` for a failure of this video.
        describe: ``(done_path) -> fields`` for an output finished by an earlier, killed run of the same job.
        settings: every setting that changes the output. A partial folder left by a killed run is reused only
            when these settings and the input rows (and the files they name) are unchanged; otherwise it is
            discarded rather than mixed in.
    """

    ext: str | Callable[[dict], str]
    produce: Callable[[dict, Path], dict]
    describe: Callable[[Path], dict]
    settings: dict


def _failure(row: dict, exc: BaseException) -> dict:
    if isinstance(exc, JobError) or (isinstance(exc, OSError) and exc.errno in _FATAL_ERRNOS):
        raise exc
    if isinstance(exc, ItemError):
        reason = str(exc)
    else:
        reason = f"unexpected {type(exc).__name__}: {exc}"
        log.error("%s: %s", row["video_id"], "".join(traceback.format_exception(exc)))
    return {"video_id": row["video_id"], "status": "failed", "reason": reason.replace("\t", " ").replace("\n", " | ")}


def _input_key(row: dict) -> dict:
    """A row and, when it names an input file, that file's size and modification time: what a resumed job must
    find unchanged to reuse outputs made before it was killed."""
    path = row.get("path")
    if not path or not os.path.exists(path):
        return row
    stat = os.stat(path)
    return {**row, "_input": [stat.st_size, stat.st_mtime_ns]}


def output_path(task: ShardTask, row: dict, partial: Path) -> Path:
    """Where ``task`` writes ``row``'s output in the partial folder: ``<video_id><ext>``."""
    return partial / f"{row['video_id']}{task.ext(row) if callable(task.ext) else task.ext}"


def finished_row(task: ShardTask, row: dict, partial: Path) -> dict | None:
    """The status row of a video an earlier, killed run already finished, or None. An unreadable leftover is
    deleted (it will be redone), never trusted."""
    dest = output_path(task, row, partial)
    if not dest.exists():
        return None
    try:
        fields = task.describe(dest)
    except Exception as exc:
        log.warning("%s: redoing, earlier output unreadable (%s)", dest, exc)
        dest.unlink()
        return None
    return {"video_id": row["video_id"], "status": "ok", "reason": "", "path": str(dest), **fields}


def process_row(task: ShardTask, row: dict, partial: Path) -> dict:
    """Produce ``row``'s output under a temporary name and rename it when complete; return its status row (a
    ``failed`` one for an :class:`ItemError` or unexpected error, see :func:`run_shard`)."""
    try:
        done = finished_row(task, row, partial)
        if done is not None:
            return done
        dest = output_path(task, row, partial)
        with atomic_path(dest) as tmp:
            fields = task.produce(row, tmp)
        return {"video_id": row["video_id"], "status": "ok", "reason": "", "path": str(dest), **fields}
    except Exception as exc:
        return _failure(row, exc)


def prepare_partial(out_dir: str | Path, task: ShardTask, rows: list[dict]) -> Path:
    """The ``<out_dir>.partial/`` folder of a shard job, ready to resume: a folder left by a killed run with other
    settings or inputs is discarded, temporary files of a killed run are removed, the folder is stamped."""
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    stamp = partial / ".settings.json"
    settings = {"settings": task.settings, "inputs": fingerprint([_input_key(row) for row in rows])}
    if partial.exists() and (not stamp.exists() or read_json(stamp) != settings):
        log.info("%s: discarding partial output made with other settings or inputs", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    for leftover in partial.glob(".*.tmp*"):  # temporary files of a killed run: never complete, never used
        leftover.unlink()
    write_json(stamp, settings)
    return partial


def run_shard(rows: list[dict], task: ShardTask, out_dir: str | Path, threads: int = 1, desc: str = "") -> list[dict]:
    """Run ``task`` on every row, ``threads`` at a time, in ``<out_dir>.partial/``; then publish it as ``out_dir``.

    Per-video outputs are named ``<video_id><ext>``; each row's ``path`` points into ``out_dir``. A row whose
    ``produce`` raises :class:`ItemError` (or any error but a full or read-only disk) becomes a ``failed`` row with
    the reason; :class:`JobError` and ``OSError`` ENOSPC/EDQUOT/EROFS fail the job.

    Returns:
        Status rows in input order: ``video_id, status, reason, path`` plus the task's fields.
    """
    out_dir = Path(out_dir)
    partial = prepare_partial(out_dir, task, rows)
    results: dict[int, dict] = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        futures = {pool.submit(process_row, task, row, partial): i for i, row in enumerate(rows)}
        for future in tqdm(as_completed(futures), total=len(futures), desc=desc, file=sys.stderr, mininterval=2):
            results[futures[future]] = future.result()
    ordered = [results[i] for i in range(len(rows))]
    publish_dir(partial, out_dir)
    for row in ordered:
        if row.get("path"):
            row["path"] = str(out_dir / Path(row["path"]).name)
    log_counts(ordered, desc or str(out_dir))
    return ordered


def log_counts(status: list[dict], what: str) -> None:
    """Log how many rows of ``status`` are ok and failed."""
    failed = sum(row["status"] != "ok" for row in status)
    log.info("%s: %d ok, %d failed", what, len(status) - failed, failed)


def stage_parser(description: str, input_help: str) -> argparse.ArgumentParser:
    """The command line every per-shard video stage shares: ``--input`` (its input table), ``--out-dir`` (the
    shard's folder of per-video files), ``--status`` (the status table to write), ``--threads`` (videos at
    once) and ``--strict`` (fail the job when any video fails)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--input", required=True, help=input_help)
    parser.add_argument("--out-dir", required=True, help="folder of the shard's per-video outputs")
    parser.add_argument("--status", required=True, help="status table to write")
    parser.add_argument("--threads", type=int, default=1, help="videos processed at once")
    parser.add_argument("--strict", action="store_true", help="fail the job when any video fails")
    return parser


def finish(status: list[dict], out_table: str | Path, columns: list[str], strict: bool) -> int:
    """Write a stage's status table and return the job's exit code (1 in strict mode when any row failed)."""
    write_table(out_table, status, columns)
    failed = [row for row in status if row["status"] != "ok"]
    for row in failed:
        log.warning("%s failed: %s", row["video_id"], row["reason"])
    if strict and failed:
        log.error("strict mode: %d video(s) failed, see %s", len(failed), out_table)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.shards --manifest M --shard-size N --out DIR``: cut a manifest into shards."""
    parser = argparse.ArgumentParser(description=split_manifest.__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--shard-size", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    split_manifest(args.manifest, args.shard_size, args.out)
    return 0


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
