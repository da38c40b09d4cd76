"""Content hashes of stage inputs, in DVC's own format, made cheap by a file-stat index.

A directory's hash is what ``dvc add`` records for it (``<md5>.dir``: the md5 of DVC's sorted
JSON manifest of ``{"md5", "relpath"}`` entries), so the local chain, the KFP components (whose
inputs are DVC references) and ``dvc repro`` key a stage on the same input hashes. An input is
always hashed from its files, never taken from a ``stage.json`` it holds: a dataset edited after
a run must invalidate what was computed from it.

Hashing a file is skipped when its (device, inode, size, mtime_ns) is unchanged since it was
last hashed; that index is a small sqlite file under the user cache directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

INDEX_ENV = "MEDSIGHT_HASH_INDEX"
_CHUNK = 1 << 20


def index_path() -> Path:
    explicit = os.environ.get(INDEX_ENV)
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "medsight" / "file-hashes.sqlite"


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class StatIndex:
    """(path, device, inode, size, mtime_ns) -> md5, shared by every process of this user."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path or index_path())
        self.connection: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.connection = sqlite3.connect(self.path, timeout=30)
            self.connection.execute(
                "CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, dev INTEGER, ino INTEGER,"
                " size INTEGER, mtime_ns INTEGER, md5 TEXT)"
            )
        except (OSError, sqlite3.Error):
            # A read-only home (some pods) only costs speed: every file is hashed again.
            self.connection = None

    def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(sqlite3.Error):
                self.connection.commit()
            self.connection.close()
            self.connection = None

    def md5(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        signature = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if self.connection is not None:
            row = self.connection.execute(
                "SELECT dev, ino, size, mtime_ns, md5 FROM hashes WHERE path = ?", (key,)
            ).fetchone()
            if row is not None and tuple(row[:4]) == signature:
                return row[4]
        value = file_md5(path)
        if self.connection is not None:
            with contextlib.suppress(sqlite3.Error):
                self.connection.execute(
                    "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?)", (key, *signature, value)
                )
        return value


def _files(root: Path) -> Iterator[Path]:
    """Every file below ``root`` (symlinks followed, as DVC does), loops refused by name."""
    seen: set[tuple[int, int]] = set()
    for directory, subdirs, names in os.walk(root, followlinks=True):
        stat = os.stat(directory)
        if (stat.st_dev, stat.st_ino) in seen:
            raise ValueError(f"{directory}: symlink loop inside {root}")
        seen.add((stat.st_dev, stat.st_ino))
        subdirs.sort()
        for name in sorted(names):
            yield Path(directory) / name


def directory_md5(root: Path, index: StatIndex | None = None) -> str:
    """DVC's ``<md5>.dir`` hash of the directory ``root`` (the same value ``dvc add`` writes)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    own = index is None
    index = index or StatIndex()
    try:
        entries = [
            {"md5": index.md5(path), "relpath": path.relative_to(root).as_posix()} for path in _files(root)
        ]
    finally:
        if own:
            index.close()
    entries.sort(key=lambda entry: entry["relpath"])
    manifest = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(manifest, usedforsecurity=False).hexdigest() + ".dir"


def input_hashes(inputs: dict[str, Path]) -> dict[str, str]:
    """Content hash of every input directory (one index connection for all of them)."""
    index = StatIndex()
    try:
        return {name: directory_md5(path, index) for name, path in inputs.items()}
    finally:
        index.close()
