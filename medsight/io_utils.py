"""Atomic file writes (a crash never leaves a half-written file under the final name), JSON
reads whose errors name the file, and names from data files made safe to use as path parts."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; a written file should get the mode any other new file gets here.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Build a directory under a temp name, then swap it in as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        replace_directory(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def replace_directory(new: Path, target: Path) -> None:
    """Put the complete directory ``new`` at ``target``; the old ``target`` survives until then.

    The old directory is renamed aside (``.<name>.old-*``), the new one renamed in, and only then
    is the old one removed: a crash at any point leaves a complete copy under one of the names.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    aside.rmdir()
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)


class OutputPathError(ValueError):
    """An output folder cannot be created or written; the message names it and the reason."""


def ensure_writable_dir(path: Path, option: str = "--out") -> None:
    """Refuse, before any work, an output folder that cannot be created or written.

    Finds the nearest existing folder on the way to ``path`` and creates (then removes) a probe
    folder in it: permission bits, read-only mounts, a file where a folder is needed and a full
    disk are all caught the way the real write would meet them. Nothing is left behind.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and not existing.is_symlink():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"is below {existing}, which is a file"
        raise OutputPathError(f"{option} {path} {where}; choose a folder")
    if not existing.exists():
        raise OutputPathError(f"{option} {path}: {existing} {missing_reason(existing)}")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".medsight-write-probe-", dir=existing))
    except OSError as error:
        reason = (error.strerror or str(error)).lower()
        raise OutputPathError(f"{option} {path}: cannot write in {existing} ({reason})") from None
    probe.rmdir()


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def missing_reason(path: Path) -> str:
    """Why ``path`` cannot be opened, in words: a symlink loop and a dangling link are not
    "does not exist" (the user sees a file there and needs to be told what is wrong with it)."""
    path = Path(path)
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symlink loop"
        if os.path.islink(path):
            return f"is a broken symlink (to {os.readlink(path)})"
        if error.errno in (errno.EACCES, errno.EPERM):
            return "cannot be read (permission denied)"
        if error.errno == errno.ENOTDIR:
            return "does not exist (a part of its path is a file, not a folder)"
        return "does not exist"
    if path.is_dir():
        return "is a folder"
    return "is not a regular file"


# Characters a name from a data file may keep when it becomes one path component.
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str, fallback: str = "item", limit: int = 80) -> str:
    """``name`` (a benchmark, sample id or token from a data file) as ONE safe path component.

    Separators, ``..`` and anything outside ``[A-Za-z0-9_.-]`` are replaced by ``_``; leading
    dots (and the underscores left of a ``../``) are dropped: never ``.``, ``..`` or a hidden file. A data file can
    therefore never make a writer leave its output folder.
    """
    cleaned = _UNSAFE_NAME.sub("_", str(name)).lstrip("._")[:limit].rstrip(".")
    return cleaned or fallback


def read_json(path: Path, error: type[Exception], missing: str) -> Any:
    """Parsed JSON of ``path``; a missing file (``missing`` says what it is) or malformed JSON
    raises ``error`` with the file name first, so every reader reports bad input the same way."""
    path = Path(path)
    if not path.is_file():
        reason = missing_reason(path)
        raise error(f"{path}: {missing if reason == 'does not exist' else reason}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: invalid JSON ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from exc
