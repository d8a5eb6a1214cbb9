"""Stage 1, download: fetch every source of a shard, verify its SHA-256, and record one status row per video.

Sources:

- ``file://`` URLs and local paths (absolute, or relative to the working directory): hard-linked where the file
  system allows (no second copy of a local dataset), else copied;
- ``http(s)://`` URLs: each attempt bounded by a timeout, retried with exponential backoff, and resumed where it
  broke off with a ``Range`` request (the partial file ``<video_id><ext>.part`` also survives a killed job);
- ``youtube:<id>`` (ActivityNet, Kinetics) through yt-dlp, an optional tool (``pip install yt-dlp``).

Rows that share a source (segments of one long video) share one downloaded file. A missing source, an HTTP error
or a checksum mismatch is a failed row. Each file is probed so the status table describes the raw dataset
(duration, fps, size, codec); a file ffprobe cannot read stays ``ok`` here with empty fields, and transcode gives
the reason it fails.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from pipeline import configure_logging
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
_CHUNK = 1 << 20


def _local_path(source: str) -> Path | None:
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "":
        return Path(source)
    return None


def _link_or_copy(source: Path, dest: Path) -> None:
    """Hard-link ``source`` to ``dest`` (no second copy of a local dataset; raw files are never written to), or
    copy it where a link cannot be made (another file system)."""
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
    except OSError:
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
        done = subprocess.run(youtube_command(video, dest), capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ItemError(f"yt-dlp: no result within {timeout_s} s") from None
    if done.returncode != 0 or not dest.exists():
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no message"]
        raise ItemError(f"yt-dlp: {lines[-1][:300]}")


def fetch(source: str, dest: Path, sha256: str = "", timeout_s: float = 60, retries: int = 3,
          backoff_s: float = 1.0, part: Path | None = None) -> dict:
    """Link, copy or download ``source`` to ``dest`` and check its SHA-256 when ``sha256`` is given.

    An HTTP download goes to ``part`` (default ``<dest>.part``) first and is resumed from it (see
    :func:`fetch_http`), then renamed to ``dest``.

    Returns:
        ``{"bytes": size, "sha256": hex digest}`` of what was written.

    Raises:
        ItemError: unsupported scheme, missing local file, HTTP 4xx, network failure after ``retries`` retries,
            yt-dlp failure, or checksum mismatch (``checksum mismatch: expected ..., got ...``; a partial download
            with the wrong bytes is deleted, so the next attempt starts afresh).
        JobError: a ``youtube:`` source without yt-dlp.
    """
    local = _local_path(source)
    if local is not None:
        if not local.is_file():
            raise ItemError(f"missing source file: {local}")
        _link_or_copy(local, dest)
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
                   backoff_s: float = 1.0) -> list[dict]:
    """Download every source of a shard table into ``out_dir`` and return the status rows (``COLUMNS``)."""
    rows = read_table(shard).reindex(columns=MANIFEST_COLUMNS, fill_value="").to_dict("records")
    unique: dict[tuple[str, str], dict] = {}
    for row in rows:
        unique.setdefault((row["source"], row["sha256"]), row)

    def produce(row: dict, tmp: Path) -> dict:
        # an HTTP download's part file is named after the final file, so that a rerun after a kill resumes it
        part = tmp.parent / f"{row['video_id']}{source_suffix(row['source'])}.part"
        return {**fetch(row["source"], tmp, row["sha256"], timeout_s, retries, backoff_s, part), **_video_fields(tmp)}

    task = ShardTask(
        ext=lambda row: source_suffix(row["source"]),
        produce=produce,
        describe=_describe,
        settings={"stage": "download"},
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


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.download --input SHARD --out-dir D --status T``: the download rule."""
    parser = stage_parser(__doc__.splitlines()[0], "shard table of the manifest")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per HTTP attempt")
    parser.add_argument("--retries", type=int, default=3, help="HTTP retries with exponential backoff")
    args = parser.parse_args(argv)
    status = download_shard(args.input, args.out_dir, args.threads, args.timeout, args.retries)
    return finish(status, args.status, COLUMNS, args.strict)


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
