"""Stage 1, download: fetch every source of a shard, verify its SHA-256, and record one status row per video.

Sources are ``file://`` URLs, local paths (absolute, or relative to the working directory) and ``http(s)://``
URLs (retried with exponential backoff, each attempt bounded by a timeout). Rows that share a source (segments of
one long video) share one downloaded file. A missing source, an HTTP error or a checksum mismatch is a failed row.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from pipeline import configure_logging
from pipeline.io import read_table, sha256_file
from pipeline.shards import MANIFEST_COLUMNS, STATUS_COLUMNS, ItemError, ShardTask, finish, run_shard, stage_parser

log = logging.getLogger(__name__)

COLUMNS = STATUS_COLUMNS + ["source", "bytes", "sha256", "start", "end"]
_CHUNK = 1 << 20


def _local_path(source: str) -> Path | None:
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    if parsed.scheme == "":
        return Path(source)
    return None


def _fetch_http(url: str, dest: Path, timeout_s: float, retries: int) -> None:
    for attempt in range(retries + 1):
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "video-llm-pipeline"})
            with urllib.request.urlopen(request, timeout=timeout_s) as response, open(dest, "wb") as out:
                shutil.copyfileobj(response, out, _CHUNK)
            return
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429:
                raise ItemError(f"HTTP {exc.code} {exc.reason}: {url}") from None
            error = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            error = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        if attempt < retries:
            wait = 2**attempt
            log.warning("%s: %s; retry %d/%d in %d s", url, error, attempt + 1, retries, wait)
            time.sleep(wait)
    raise ItemError(f"download failed after {retries + 1} attempts: {error}: {url}")


def fetch(source: str, dest: Path, sha256: str = "", timeout_s: float = 60, retries: int = 3) -> dict:
    """Copy or download ``source`` to ``dest`` and check its SHA-256 when ``sha256`` is given.

    Returns:
        ``{"bytes": size, "sha256": hex digest}`` of what was written.

    Raises:
        ItemError: unsupported scheme, missing local file, HTTP 4xx, network failure after ``retries`` retries,
            or checksum mismatch (``checksum mismatch: expected ..., got ...``).
    """
    local = _local_path(source)
    if local is not None:
        if not local.is_file():
            raise ItemError(f"missing source file: {local}")
        shutil.copyfile(local, dest)
    elif urllib.parse.urlparse(source).scheme in ("http", "https"):
        _fetch_http(source, dest, timeout_s, retries)
    else:
        raise ItemError(f"unsupported source scheme: {source}")
    digest = sha256_file(dest)
    if sha256 and digest != sha256.lower():
        raise ItemError(f"checksum mismatch: expected {sha256.lower()}, got {digest}")
    return {"bytes": dest.stat().st_size, "sha256": digest}


def source_suffix(source: str) -> str:
    """The file extension a source's name carries (``.webm``), or ``.video`` when it has none."""
    path = _local_path(source) or PurePosixPath(urllib.parse.urlparse(source).path)
    suffix = path.suffix.lower()
    return suffix if suffix and len(suffix) <= 6 else ".video"


def download_shard(shard: str | Path, out_dir: str | Path, threads: int, timeout_s: float, retries: int) -> list[dict]:
    """Download every source of a shard table into ``out_dir`` and return the status rows (``COLUMNS``)."""
    rows = read_table(shard).reindex(columns=MANIFEST_COLUMNS, fill_value="").to_dict("records")
    unique: dict[tuple[str, str], dict] = {}
    for row in rows:
        unique.setdefault((row["source"], row["sha256"]), row)
    task = ShardTask(
        ext=lambda row: source_suffix(row["source"]),
        produce=lambda row, tmp: fetch(row["source"], tmp, row["sha256"], timeout_s, retries),
        describe=lambda path: {"bytes": path.stat().st_size, "sha256": sha256_file(path)},
        settings={"stage": "download"},
    )
    fetched = run_shard(list(unique.values()), task, out_dir, threads, desc="download")
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
