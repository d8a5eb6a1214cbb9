"""Manifests, shards, and the per-video loop every data stage runs inside a shard job.

A manifest is a TSV with one row per video: ``video_id``, ``source`` (URL or path), and optional ``sha256``,
``start`` and ``end`` (seconds, to cut a segment out of the source). ``split`` cuts it into shards of
``shard_size`` rows (``shard-00000.tsv``, ...) so that Snakemake plans one job per shard, not per video.

Inside a shard job, :func:`run_shard` processes the videos (in parallel threads, or as a loader such as the
features stage's DataLoader yields them) and returns one status row per video. Finished videos are committed to
``<out>.partial/`` only once complete (per-video files under their final name, or the features' shard file), so
a killed job resumes where it stopped; when every video is done the partial output is published as ``<out>``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import re
import shutil
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
from tqdm import tqdm

from pipeline import PipelineError
from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.io import atomic_path, fingerprint, publish_dir, read_json, read_table, write_json, write_table

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["video_id", "source", "sha256", "start", "end"]
STATUS_COLUMNS = ["video_id", "status", "reason", "path"]
VIDEO_ID = re.compile(r"^[A-Za-z0-9_=+-][A-Za-z0-9_.=+-]*$")
SHARD_NAME = "shard-{:05d}"
_FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class JobError(PipelineError):
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
    # Vectorised, so that a million rows take seconds: a row with a safe id, a source and no sha256, start or end
    # is fine as it stands; only the others go through validate_manifest_row, one by one.
    plain = (table["video_id"].str.match(VIDEO_ID) & (table["source"] != "") & (table["sha256"] == "")
             & (table["start"] == "") & (table["end"] == ""))
    reasons = pd.Series(None, index=table.index, dtype=object)
    checked = table[~plain]
    reasons[checked.index] = [validate_manifest_row(row) for row in checked.to_dict("records")]
    valid = reasons.isna()
    repeats = valid & table["video_id"].where(valid).duplicated()
    reasons[repeats] = "video_id: " + table.loc[repeats, "video_id"].map(repr) + " repeats an earlier row"
    failed = reasons.notna()
    kept = table[~failed].reset_index(drop=True)
    rejected = table[failed].assign(reason=[f"{manifest} row {number + 1}: {reason}"
                                            for number, reason in reasons[failed].items()])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, first in enumerate(range(0, len(kept), shard_size)):
        path = out_dir / f"{SHARD_NAME.format(index)}.tsv"
        write_table(path, kept.iloc[first : first + shard_size], MANIFEST_COLUMNS)
        shards.append(path)
    write_table(out_dir / "rejected.tsv", rejected, MANIFEST_COLUMNS + ["reason"])
    log.info("%s: %d rows in %d shards, %d rejected", manifest, len(kept), len(shards), len(rejected))
    return shards


def ok_rows(status_table: str | Path) -> list[dict]:
    """The rows of a stage's status table whose ``status`` is ``ok``: what the next stage processes."""
    return [row for row in read_table(status_table).to_dict("records") if row["status"] == "ok"]


RUNTIME = {"runtime": True}
"""Metadata of a config field that says how fast a job runs, not what it makes: see :func:`settings_of`."""


def settings_of(config) -> dict:
    """The settings stamp of a dataclass config: ``dataclasses.asdict`` of it, nested dataclasses included, minus
    the fields marked ``metadata={"runtime": True}`` (how fast or in how many processes a job runs: such a change
    never redoes finished videos). Every other field is in the stamp, so a new field cannot be forgotten."""

    def walk(value):
        if is_dataclass(value):
            return {f.name: walk(getattr(value, f.name)) for f in fields(value) if not f.metadata.get("runtime")}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    return walk(config)


class VideoFiles:
    """Per-video output files ``<video_id><ext>`` in the partial folder, published as the folder ``out``.

    Args:
        ext: the file extension, or a function of the row giving it.
        describe: ``(done_path) -> fields`` of a file finished by an earlier, killed run; an unreadable one is
            deleted and redone, never trusted.
    """

    def __init__(self, ext: str | Callable[[dict], str], describe: Callable[[Path], dict]):
        self.ext, self.describe = ext, describe
        self.partial: Path | None = None

    def _dest(self, row: dict) -> Path:
        return self.partial / f"{row['video_id']}{self.ext(row) if callable(self.ext) else self.ext}"

    def open(self, partial: Path) -> None:
        """Work in ``partial`` (made and stamped by :func:`prepare_partial`)."""
        self.partial = partial

    def done(self, row: dict) -> dict | None:
        """The fields (``path`` included) of ``row``'s file if an earlier run finished it, else None."""
        dest = self._dest(row)
        if not dest.exists():
            return None
        try:
            return {"path": str(dest), **self.describe(dest)}
        except Exception as exc:
            log.warning("%s: redoing, earlier output unreadable (%s)", dest, exc)
            dest.unlink()
            return None

    @contextlib.contextmanager
    def target(self, row: dict) -> Iterator[Path]:
        """A temporary path for ``row``'s file, renamed to its final name when the block ends without error."""
        with atomic_path(self._dest(row)) as tmp:
            yield tmp

    def path(self, row: dict) -> str:
        """Where ``row``'s file is while the job runs."""
        return str(self._dest(row))

    def publish(self, out: Path) -> Callable[[str], str]:
        """Rename the partial folder to ``out``; return how a row's ``path`` maps to its published place."""
        publish_dir(self.partial, out)
        return lambda path: str(out / Path(path).name)


@dataclass
class ShardTask:
    """What one data stage does to one video.

    Attributes:
        produce: ``(row, target) -> fields``; writes the video's output to ``target`` (a temporary file path for
            :class:`VideoFiles`, the shard writer for other outputs) and returns its extra status fields
            (duration, fps, ...). Raises :class:`ItemError` for a failure of this video.
        settings: every setting that changes the output (:func:`settings_of` of the stage's config). A partial
            folder left by a killed run is reused only when these settings and the input rows (and the files
            they name) are unchanged; otherwise it is discarded rather than mixed in.
        ext, describe: the per-video files (:class:`VideoFiles`) when ``outputs`` is not given.
        outputs: where finished videos go (:class:`VideoFiles`, or the features' shard file); it tells which
            videos an earlier run finished.
        load: ``(pending rows) -> iterator of rows`` with what each needs loaded into it (the features stage's
            decoded frames), in any order; ``produce`` then runs in the calling thread as rows arrive, and the
            loader supplies the parallelism. None: ``produce`` gets the rows as they are, ``threads`` at once.
    """

    produce: Callable[[dict, object], dict]
    settings: dict
    ext: str | Callable[[dict], str] = ""
    describe: Callable[[Path], dict] | None = None
    outputs: object = None
    load: Callable[[list[dict]], Iterator[dict]] | None = None

    def __post_init__(self) -> None:
        if self.outputs is None:
            self.outputs = VideoFiles(self.ext, self.describe or (lambda path: {}))


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


def _ok(row: dict, fields: dict) -> dict:
    return {"video_id": row["video_id"], "status": "ok", "reason": "", **fields}


def process_row(task: ShardTask, row: dict) -> dict:
    """Produce ``row``'s output through ``task.outputs`` (committed only when complete); return its status row (a
    ``failed`` one for an :class:`ItemError` or unexpected error, see :func:`run_shard`)."""
    try:
        with task.outputs.target(row) as target:
            fields = task.produce(row, target)
        return _ok(row, {"path": task.outputs.path(row), **fields})
    except Exception as exc:
        return _failure(row, exc)


def prepare_partial(out: str | Path, task: ShardTask, rows: list[dict]) -> Path:
    """The ``<out>.partial/`` folder of a shard job, ready to resume: a folder left by a killed run with other
    settings or inputs is discarded, temporary files of a killed run are removed, the folder is stamped."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    stamp = partial / ".settings.json"
    settings = {"settings": task.settings, "inputs": fingerprint([_input_key(row) for row in rows])}
    if partial.exists() and (not stamp.exists() or read_json(stamp) != json.loads(json.dumps(settings))):
        log.info("%s: discarding partial output made with other settings or inputs", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    for leftover in partial.glob(".*.tmp*"):  # temporary files of a killed run: never complete, never used
        leftover.unlink()
    write_json(stamp, settings)
    return partial


def run_shard(rows: list[dict], task: ShardTask, out: str | Path, threads: int = 1, desc: str = "") -> list[dict]:
    """Run ``task`` on every row in ``<out>.partial/``, then publish it as ``out``.

    Rows an earlier, killed run of the same job finished (same settings and inputs) are not redone. Without a
    loader, ``threads`` rows run at once; with ``task.load``, rows run in the calling thread as the loader
    yields them. A row whose ``produce`` raises :class:`ItemError` (or any error but a full or read-only disk)
    becomes a ``failed`` row with the reason; :class:`JobError` and ``OSError`` ENOSPC/EDQUOT/EROFS fail the job
    and leave the partial folder for the rerun.

    Returns:
        Status rows in input order: ``video_id, status, reason, path`` (into ``out``) plus the task's fields.
    """
    out = Path(out)
    task.outputs.open(prepare_partial(out, task, rows))
    status: list[dict | None] = []
    for row in rows:
        done = task.outputs.done(row)
        status.append(None if done is None else _ok(row, done))
    position = {row["video_id"]: i for i, row in enumerate(rows)}
    pending = [row for row, done in zip(rows, status) if done is None]
    progress = tqdm(total=len(pending), desc=desc, file=sys.stderr, mininterval=2)
    if task.load is not None:
        for row in task.load(pending):
            status[position[row["video_id"]]] = process_row(task, row)
            progress.update()
    else:
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            futures = {pool.submit(process_row, task, row): position[row["video_id"]] for row in pending}
            for future in as_completed(futures):
                status[futures[future]] = future.result()
                progress.update()
    progress.close()
    final = task.outputs.publish(out)
    for row in status:
        if row.get("path"):
            row["path"] = final(row["path"])
    log_counts(status, desc or str(out))
    return status


def log_counts(status: list[dict], what: str) -> None:
    """Log how many rows of ``status`` are ok and failed."""
    failed = sum(row["status"] != "ok" for row in status)
    log.info("%s: %d ok, %d failed", what, len(status) - failed, failed)


def boolean(text: str) -> bool:
    """A command-line truth value: ``true``/``false`` (also ``yes``/``no``, ``1``/``0``), any case.

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def add_strict(parser: argparse.ArgumentParser) -> None:
    """``--strict [true|false]``: fail the job when any video fails (bare ``--strict`` is true)."""
    parser.add_argument("--strict", type=boolean, nargs="?", const=True, default=False,
                        help="fail the job when any video fails (true or false; bare --strict: true)")


def stage_parser(module: str, doc: str, input_help: str) -> argparse.ArgumentParser:
    """The command line every per-shard video stage shares (:func:`pipeline.cli.parser` of ``module`` and its
    ``doc``): ``--input`` (its input table), ``--out-dir`` (the shard's folder of per-video files), ``--status``
    (the status table to write), ``--threads`` (videos at once) and ``--strict`` (fail the job when any video
    fails)."""
    parser = cli_parser(module, doc)
    parser.add_argument("--input", required=True, help=input_help)
    parser.add_argument("--out-dir", required=True, help="folder of the shard's per-video outputs")
    parser.add_argument("--status", required=True, help="status table to write")
    parser.add_argument("--threads", type=int, default=1, help="videos processed at once")
    add_strict(parser)
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


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.shards --manifest M --shard-size N --out DIR``: the shards rule."""
    parser = cli_parser(__spec__.name, __doc__)
    parser.add_argument("--manifest", required=True, help="the manifest (TSV: video_id, source, ...)")
    parser.add_argument("--shard-size", type=int, required=True, help="videos per shard")
    parser.add_argument("--out", required=True, help="folder of the shard tables and rejected.tsv")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Cut a manifest into shards (:func:`split_manifest`)."""
    args = parser().parse_args(argv)
    split_manifest(args.manifest, args.shard_size, args.out)
    return 0


if __name__ == "__main__":
    run(main)
