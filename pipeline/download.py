"""Stage 1, download: fetch every source of a shard, verify its SHA-256, and record one status row per video.

Sources:

- ``file://`` URLs and local paths (absolute, or relative to the working directory), accepted only when the
  file, symlinks followed, lies under one of the allowed roots (``--allowed-root``: folders, or ``package:<name>``
  for an installed package's folder; none given, no local source is accepted). Such a file is hard-linked only
  where that is safe, else copied. A hard link is the source's own inode, not a copy: a later in-place edit of the
  source would change the "downloaded" file behind the SHA-256 recorded for it, and the link keeps the source's
  owner and permissions. So a file is linked only when it is owned by the user running the job and no one may
  write to it (no ``w`` bit: a read-only dataset, ``chmod -R a-w``), and the file system allows the link (same
  file system); every other file is copied, and the copy belongs to the job's user;
- ``http(s)://`` URLs: each attempt bounded by a timeout, retried with exponential backoff, and resumed where it
  broke off with a ``Range`` request (the partial file ``<video_id><ext>.part`` also survives a killed job);
- ``youtube:<id>`` (ActivityNet, Kinetics) through yt-dlp, an optional tool (``pip install yt-dlp``).

Rows that share a source (segments of one long video) share one downloaded file. A missing source, an HTTP error
or a checksum mismatch is a failed row. Each file is probed so the status table describes the raw dataset
(duration, fps, size, codec); a file ffprobe cannot read stays ``ok`` here with empty fields, and transcode gives
the reason it fails.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import logging
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from pipeline.cli import run
from pipeline.io import read_table, sha256_file
from pipeline.shards import (
    MANIFEST_COLUMNS,
    STATUS_COLUMNS,
    ItemError,
    JobError,
    ShardTask,
    finish,
    run_shard,
    stage_parser,
)
from pipeline.video.ffmpeg import INFO_COLUMNS, probe

log = logging.getLogger(__name__)

COLUMNS = STATUS_COLUMNS + ["source", "bytes", "sha256", "start", "end"] + INFO_COLUMNS
YOUTUBE = "youtube:"
PACKAGE = "package:"
_CHUNK = 1 << 20


def _local_path(source: str) -> Path | None:
    """The path a local source names (a ``file://`` URL or a plain path), or None for any other source.

    Raises:
        ItemError: a ``file://`` URL naming another host (``file://host/path``).
    """
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ItemError(f"unsupported source: a file URL on another host ({parsed.netloc!r}): {source}")
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "":
        return Path(source)
    return None


def resolve_roots(entries: Iterable[str | Path]) -> list[Path]:
    """The folders local sources may come from, fully resolved (symlinks followed).

    Each entry is a folder (relative to the working directory) or ``package:<name>``: the folder of the installed
    top-level Python package ``<name>`` (every folder of a namespace package), found without importing it.

    Raises:
        JobError: an entry is neither an existing folder nor an installed package (no local source of the shard
            could be checked against it).
    """
    roots = []
    for entry in map(str, entries):
        if entry.startswith(PACKAGE):
            name = entry[len(PACKAGE):]
            spec = importlib.util.find_spec(name) if name.isidentifier() else None  # a dotted name would import
            if spec is None or not spec.submodule_search_locations:
                raise JobError(f"allowed root {entry!r}: no installed top-level package (a folder) named {name!r}")
            roots += [Path(folder).resolve() for folder in spec.submodule_search_locations]
        elif Path(entry).is_dir():
            roots.append(Path(entry).resolve())
        else:
            raise JobError(f"allowed root {entry!r} is not a folder")
    return roots


def allowed_source(source: str, local: Path, roots: Sequence[str | Path]) -> Path:
    """``local`` (the path source ``source`` names) fully resolved, when it lies under one of ``roots`` (see
    :func:`resolve_roots`).

    Raises:
        ItemError: it resolves to a place outside every root, or no root is given (the reason names the source,
            where it resolves and the roots).
        JobError: a root is neither a folder nor an installed package.
    """
    resolved = local.resolve()
    folders = resolve_roots(roots)
    if not any(resolved.is_relative_to(folder) for folder in folders):
        allowed = ", ".join(map(str, folders)) or "none given"
        raise ItemError(f"local source {source} resolves to {resolved}, outside the allowed roots ({allowed}); "
                        "add its folder to download.allowed_roots (--allowed-root)")
    return resolved


def link_is_safe(source: Path) -> bool:
    """Whether hard-linking ``source`` is safe: it is owned by the user running the job and no one has write
    permission on it, so its bytes cannot change in place behind the checksum recorded for the link (the module
    docstring says why)."""
    info = source.stat()
    return info.st_uid == os.geteuid() and not info.st_mode & 0o222


def _link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link ``source`` to ``dest`` where :func:`link_is_safe` and the file system allows, else copy it (a new
    file of the job's user with default permissions)."""
    dest.unlink(missing_ok=True)
    if link_is_safe(source):
        try:
            os.link(source, dest)
            return
        except OSError:  # another file system, or one without hard links
            pass
    shutil.copyfile(source, dest)


def _attempt(url: str, part: Path, timeout_s: float) -> None:
    """One HTTP attempt, appending to ``part`` from where it ends when the server honours ``Range``."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "video-llm-pipeline", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the part is complete (the checksum will tell)
            return
        raise
    with response:
        resumed = have and response.status == 206
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length is not None else None
        with open(part, "ab" if resumed else "wb") as out:
            shutil.copyfileobj(response, out, _CHUNK)
    size = part.stat().st_size
    if total is not None and size != total:
        raise ConnectionError(f"connection closed at byte {size} of {total}")


def fetch_http(url: str, part: Path, timeout_s: float = 60, retries: int = 3, backoff_s: float = 1.0) -> None:
    """Download ``url`` into ``part``, resuming a partial ``part`` and every broken attempt with ``Range``.

    Attempts: ``retries + 1``, each bounded by ``timeout_s`` seconds without data, waiting
    ``backoff_s * 2**attempt`` seconds (at most 60) between them. Retried: network errors, dropped connections,
    HTTP 429 and 5xx.

    Raises:
        ItemError: HTTP 4xx (but 429), or every attempt failed (the reason names the last error).
    """
    error = "no attempt"
    for attempt in range(retries + 1):
        try:
            _attempt(url, part, timeout_s)
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429:
                raise ItemError(f"HTTP {exc.code} {exc.reason}: {url}") from None
            error = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        if attempt < retries:
            wait = min(60.0, backoff_s * 2**attempt)
            log.warning("%s: %s; retry %d/%d in %.1f s", url, error, attempt + 1, retries, wait)
            time.sleep(wait)
    raise ItemError(f"download failed after {retries + 1} attempts: {error}: {url}")


def youtube_command(video: str, dest: Path) -> list[str]:
    """The yt-dlp command that downloads YouTube video ``video`` (an id) to ``dest`` as mp4, at most 720p.

    ActivityNet and Kinetics list YouTube ids; cluster compute nodes often cannot reach YouTube, which is why
    downloads run on the submitting host by default.
    """
    return ["yt-dlp", "--no-playlist", "--no-progress", "--quiet", "--no-warnings",
            "-f", "bv*[height<=720]+ba/b[height<=720]/bv*+ba/b", "--merge-output-format", "mp4",
            "-o", str(dest), f"https://www.youtube.com/watch?v={video}"]


def fetch_youtube(video: str, dest: Path, timeout_s: float) -> None:
    """Download YouTube video ``video`` to ``dest`` with yt-dlp.

    Raises:
        JobError: yt-dlp is not installed (no video of the shard can be fetched).
        ItemError: yt-dlp fails (its last message) or runs past ``timeout_s`` seconds.
    """
    if shutil.which("yt-dlp") is None:
        raise JobError("youtube: sources need yt-dlp, which is not installed (pip install yt-dlp)")
    try:
        done = subprocess.run(youtube_command(video, dest), capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        raise ItemError(f"yt-dlp: no result within {timeout_s} s") from None
    if done.returncode != 0 or not dest.exists():
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no message"]
        raise ItemError(f"yt-dlp: {lines[-1][:300]}")


def fetch(source: str, dest: Path, sha256: str = "", timeout_s: float = 60, retries: int = 3,
          backoff_s: float = 1.0, part: Path | None = None, allowed_roots: Sequence[str | Path] = ()) -> dict:
    """Link, copy or download ``source`` to ``dest`` and check its SHA-256 when ``sha256`` is given.

    A local source must lie under one of ``allowed_roots`` (folders or ``package:<name>``, see
    :func:`resolve_roots`); it is hard-linked where :func:`link_is_safe`, else copied. An HTTP download goes to
    ``part`` (default ``<dest>.part``) first and is resumed from it (see :func:`fetch_http`), then renamed to
    ``dest``.

    Returns:
        ``{"bytes": size, "sha256": hex digest}`` of what was written.

    Raises:
        ItemError: unsupported scheme, a local source outside the allowed roots, missing local file, HTTP 4xx,
            network failure after ``retries`` retries, yt-dlp failure, or checksum mismatch (``checksum mismatch:
            expected ..., got ...``; a partial download with the wrong bytes is deleted, so the next attempt
            starts afresh).
        JobError: a ``youtube:`` source without yt-dlp, or an allowed root that is neither a folder nor an
            installed package.
    """
    local = _local_path(source)
    if local is not None:
        resolved = allowed_source(source, local, allowed_roots)
        if not resolved.is_file():
            raise ItemError(f"missing source file: {local}")
        _link_or_copy(resolved, dest)
    elif source.startswith(YOUTUBE):
        fetch_youtube(source[len(YOUTUBE):], dest, timeout_s * (retries + 1))
    elif urllib.parse.urlparse(source).scheme in ("http", "https"):
        part = part or dest.with_name(f"{dest.name}.part")
        fetch_http(source, part, timeout_s, retries, backoff_s)
        os.replace(part, dest)
    else:
        raise ItemError(f"unsupported source scheme: {source}")
    digest = sha256_file(dest)
    if sha256 and digest != sha256.lower():
        raise ItemError(f"checksum mismatch: expected {sha256.lower()}, got {digest}")
    return {"bytes": dest.stat().st_size, "sha256": digest}


def source_suffix(source: str) -> str:
    """The file extension a source's name carries (``.webm``), ``.mp4`` for YouTube, else ``.video``."""
    if source.startswith(YOUTUBE):
        return ".mp4"
    path = _local_path(source) or PurePosixPath(urllib.parse.urlparse(source).path)
    suffix = path.suffix.lower()
    return suffix if suffix and len(suffix) <= 6 else ".video"


def _video_fields(path: Path) -> dict:
    """What a downloaded file is (``INFO_COLUMNS``), or nothing when libav cannot read it as a video."""
    try:
        return probe(path).fields()
    except ItemError:
        return {}


def _describe(path: Path) -> dict:
    """Size, digest and video fields of a download finished by an earlier, killed run of the job."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path), **_video_fields(path)}


def download_shard(shard: str | Path, out_dir: str | Path, threads: int, timeout_s: float, retries: int,
                   backoff_s: float = 1.0, allowed_roots: Sequence[str | Path] = ()) -> list[dict]:
    """Download every source of a shard table into ``out_dir`` and return the status rows (``COLUMNS``).

    Local sources must lie under ``allowed_roots`` (see :func:`fetch`); a row outside them fails.

    Raises:
        JobError: an allowed root is neither a folder nor an installed package.
    """
    roots = resolve_roots(allowed_roots)
    rows = read_table(shard).reindex(columns=MANIFEST_COLUMNS, fill_value="").to_dict("records")
    unique: dict[tuple[str, str], dict] = {}
    for row in rows:
        unique.setdefault((row["source"], row["sha256"]), row)

    def produce(row: dict, tmp: Path) -> dict:
        # an HTTP download's part file is named after the final file, so that a rerun after a kill resumes it
        part = tmp.parent / f"{row['video_id']}{source_suffix(row['source'])}.part"
        fetched = fetch(row["source"], tmp, row["sha256"], timeout_s, retries, backoff_s, part, roots)
        return {**fetched, **_video_fields(tmp)}

    task = ShardTask(
        ext=lambda row: source_suffix(row["source"]),
        produce=produce,
        describe=_describe,
        settings={"stage": "download", "allowed_roots": [str(root) for root in roots]},  # other roots: redone
    )
    fetched = run_shard(list(unique.values()), task, out_dir, threads, desc="download")
    for leftover in Path(out_dir).glob("*.part"):  # parts of failed downloads: kept for resuming until now
        leftover.unlink()
    results = dict(zip(unique, fetched))
    status = []
    for row in rows:
        shared = results[(row["source"], row["sha256"])]
        status.append({**shared, "video_id": row["video_id"], "source": row["source"],
                       "start": row["start"], "end": row["end"]})
    return status


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.download --input SHARD --out-dir D --status T ...``: the download rule."""
    parser = stage_parser(__spec__.name, __doc__, "shard table of the manifest")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per HTTP attempt")
    parser.add_argument("--retries", type=int, default=3, help="HTTP retries with exponential backoff")
    parser.add_argument("--allowed-root", action="extend", nargs="+", default=[], metavar="PATH",
                        help="folders or package:<name> that local sources may come from (one or more, repeatable;"
                             " none: no local source)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Download every source of a shard; the exit code of :func:`pipeline.shards.finish`."""
    args = parser().parse_args(argv)
    status = download_shard(args.input, args.out_dir, args.threads, args.timeout, args.retries,
                            allowed_roots=args.allowed_root)
    return finish(status, args.status, COLUMNS, args.strict)


if __name__ == "__main__":
    run(main)
