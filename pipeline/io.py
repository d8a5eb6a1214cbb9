"""Atomic file output and the small table/JSON helpers every stage shares.

Nothing a stage writes is ever visible under its final name until it is complete: files are written to a temporary
sibling and renamed (``os.replace`` is atomic on POSIX within one file system), so a killed job never leaves a
half-written file that a rerun or a downstream stage would take as done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import yaml


def umask() -> int:
    """The process's file mode creation mask (``0o022`` for most users), read without changing it.

    Linux reports it in ``/proc/self/status``; elsewhere it is read off the mode of a file created with
    ``0o666`` in a temporary folder (its execute bits taken to follow its read bits).
    """
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    with tempfile.TemporaryDirectory() as folder:
        probe = os.path.join(folder, "probe")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        masked = 0o666 & ~os.stat(probe).st_mode
    return masked | (masked & 0o444) >> 2


def follow_umask(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes a plain ``open``/``mkdir`` would: files
    ``0o666 & ~umask``, folders ``0o777 & ~umask``.

    For what libraries write with modes of their own (safetensors writes ``0o600``), so that a group can read a
    stage's weights on a shared file system when the user's umask lets it.
    """
    mask = umask()
    root = Path(root)
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _create_beside(path: Path, suffix: str) -> Path:
    """A new empty file ``.<stem>.<random>.tmp<suffix>`` beside ``path``, mode ``0o666 & ~umask``."""
    while True:
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block ends without error.

    Args:
        path: the final file name.
        suffix: the temporary file's extension (defaults to ``path``'s, so tools that pick a format from the
            extension, such as ffmpeg, still do).

    The file gets the mode a plain ``open`` would give it (``0o666 & ~umask``), also when the writer replaces the
    temporary file with one of another mode (safetensors writes ``0o600``). On an exception the temporary file is
    removed and the exception propagates; ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    tmp = _create_beside(path, suffix)
    mode = os.stat(tmp).st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a UTF-8 JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as block-style YAML to ``path`` atomically."""
    write_text(path, yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def read_yaml(path: str | os.PathLike) -> Any:
    """Read a YAML file with the safe loader (no arbitrary objects)."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def write_table(path: str | os.PathLike, rows: list[dict] | pd.DataFrame, columns: list[str] | None = None) -> None:
    """Write rows as a tab-separated table with a header, atomically.

    Args:
        rows: a list of dicts or a DataFrame.
        columns: the column order; columns missing from a row are written empty.
    """
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows, columns=columns, dtype=object)
    if columns is not None:
        frame = frame.reindex(columns=columns)
    frame = frame.astype(object).where(frame.notna(), "")
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False)


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by :func:`write_table`; every column is a string, empty cells are ``""``."""
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def publish_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move the finished directory ``src`` to ``dst``, replacing any old ``dst``.

    ``dst`` either keeps its old complete content or gets the new complete content: the old one is moved aside
    first and removed only after the new one is in place.
    """
    src, dst = Path(src), Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def fingerprint(obj: Any) -> str:
    """A short stable hash (16 hex digits) of a JSON-serialisable object, for telling settings apart."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: str | os.PathLike, chunk_mib: int = 4) -> str:
    """Hex SHA-256 of a file, read in ``chunk_mib`` MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_mib << 20):
            digest.update(chunk)
    return digest.hexdigest()
