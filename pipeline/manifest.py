"""Build a manifest (``video_id, source, sha256, start, end``) from what datasets ship instead of one.

- ``packages``: files shipped in Python packages, listed in a YAML spec (the demo's ``resources/demo/sources.yaml``),
  optionally cut into consecutive segments;
- ``ids``: a list of ids (Video-ChatGPT's ``train_video_ids.txt``, ActivityNet, VideoChat-Flash annotations) and a
  source template such as ``https://host/videos/{id}.mp4``, ``/data/anet/{id}.mp4`` or ``youtube:{id}``;
- ``folder``: every video file under a folder, recursively (the class-folder layout of action datasets such as the
  Video-LLaMA guide's ``<root>/<class>/<file>``).

Invalid rows are not dropped here: the ``shards`` step rejects them with reasons.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import re
from pathlib import Path

from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.io import read_yaml, sha256_file, write_table
from pipeline.shards import MANIFEST_COLUMNS
from pipeline.video.ffmpeg import probe

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".mpg", ".mpeg", ".m4v", ".ogv", ".flv", ".wmv",
                    ".3gp", ".ts", ".vob")


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


def rows_from_ids(ids: list[str], template: str) -> list[dict]:
    """One row per id (blank lines and ``#`` comments skipped), its source ``template`` with ``{id}`` filled in.

    Raises:
        ValueError: the template has no ``{id}``.
    """
    if "{id}" not in template:
        raise ValueError(f"source template {template!r} has no {{id}}")
    ids = [line.strip() for line in ids if line.strip() and not line.lstrip().startswith("#")]
    return [{"video_id": video, "source": template.replace("{id}", video), "sha256": "", "start": "", "end": ""}
            for video in ids]


def folder_video_id(relative: Path) -> str:
    """A safe ``video_id`` for a file at ``relative`` inside a dataset folder: its folders and stem joined by
    ``__``, other characters than letters, digits and ``_ . = + -`` replaced by ``_`` (``Fall Down/v 1.avi`` ->
    ``Fall_Down__v_1``)."""
    parts = [*relative.parent.parts, relative.stem]
    return "__".join(re.sub(r"[^A-Za-z0-9_.=+-]", "_", part).lstrip(".") or "_" for part in parts)


def rows_from_folder(root: str | Path, extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
                     checksums: bool = False) -> list[dict]:
    """One row per video file under ``root`` (recursively, sorted by path), ids from :func:`folder_video_id`.

    Two files whose ids would collide get a suffix from their path's hash, so both are kept.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"no folder at {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    rows, seen = [], set()
    for path in files:
        relative = path.relative_to(root)
        video = folder_video_id(relative)
        if video in seen:
            video = f"{video}-{hashlib.sha1(str(relative).encode()).hexdigest()[:8]}"
        seen.add(video)
        rows.append({"video_id": video, "source": str(path), "sha256": sha256_file(path) if checksums else "",
                     "start": "", "end": ""})
    return rows


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.manifest {packages,ids,folder} ... --out MANIFEST.tsv``."""
    parser = cli_parser(__spec__.name, __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    packages = commands.add_parser("packages", help="files in Python packages, from a YAML spec")
    packages.add_argument("--spec", required=True)
    ids = commands.add_parser("ids", help="a list of ids and a source template")
    ids.add_argument("--ids", required=True, help="text file, one id per line")
    ids.add_argument("--template", required=True, help="source with {id}, e.g. https://host/{id}.mp4, youtube:{id}")
    folder = commands.add_parser("folder", help="every video file under a folder, recursively")
    folder.add_argument("--root", required=True)
    folder.add_argument("--extensions", default=",".join(VIDEO_EXTENSIONS), help="comma-separated, with dots")
    folder.add_argument("--sha256", action="store_true", help="record each file's checksum (reads every file)")
    for command in (packages, ids, folder):
        command.add_argument("--out", required=True, help="the manifest to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the manifest the subcommand builds."""
    args = parser().parse_args(argv)
    if args.command == "packages":
        rows = rows_from_spec(read_yaml(args.spec))
    elif args.command == "ids":
        rows = rows_from_ids(Path(args.ids).read_text(encoding="utf-8").splitlines(), args.template)
    else:
        extensions = tuple(e.strip().lower() for e in args.extensions.split(",") if e.strip())
        rows = rows_from_folder(args.root, extensions, args.sha256)
    write_table(args.out, rows, MANIFEST_COLUMNS)
    return 0


if __name__ == "__main__":
    run(main)
