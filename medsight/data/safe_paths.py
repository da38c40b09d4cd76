"""Paths named inside data files, resolved under the folder they belong to and nowhere else.

A dataset's JSON (BiomedParse annotations, LLaVA conversations, benchmark entries) names image
and mask files relative to a root. A ``../`` prefix, an absolute path or a symlink pointing out
of the root would let a data file make training read any file on the machine (and, through a
decoded "image", leak it into a model or a report). ``resolve_under`` refuses all three with a
message naming the data file's field and the offending value.

Symlinks that stay inside the root are fine (DVC checks data out as links into its cache when
the cache lives under the root); ones that lead elsewhere are refused unless that place is one
of the extra ``allowed`` roots. A prepared dataset names those itself: ``medsight data prepare``
indexes a release in place, so its index points at the release folders it was given
(``prepared_roots``), and only there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

from medsight.data.errors import DataError


class UnsafePathError(DataError):
    """A data file names a path outside its root; the message names the field and the value."""


def _is_absolute(text: str) -> bool:
    return PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or text.startswith("~")


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_under(root: Path, relative: str, what: str, allowed: Iterable[Path] = ()) -> Path:
    """``root / relative``, refused unless it stays inside ``root`` (or an ``allowed`` root).

    ``what`` says where the value came from (``"train.json: images[3].file_name"``); every error
    starts with it. Refused: absolute paths, ``..`` components, and paths whose symlinks resolve
    outside. The returned path is ``root / relative`` as written (not resolved), so messages and
    records keep the names the dataset uses.
    """
    text = str(relative)
    if not text or "\x00" in text:
        raise UnsafePathError(f"{what}: empty or invalid path {text!r}")
    if _is_absolute(text):
        raise UnsafePathError(
            f"{what}: absolute path {text!r} is not allowed; data files name files relative to {root}"
        )
    allowed = tuple(allowed)
    parts = PurePosixPath(text.replace("\\", "/")).parts
    path = Path(root) / text
    if ".." in parts:
        # Only into a root the dataset declares (a release indexed in place), never elsewhere.
        lexical = Path(os.path.normpath(Path(os.path.abspath(root)) / text))
        if not any(_inside(lexical, Path(os.path.abspath(extra))) for extra in allowed):
            raise UnsafePathError(f"{what}: path {text!r} leaves the data folder {root} ('..' is not allowed)")
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if not _inside(real, real_root):
        roots = [Path(os.path.realpath(extra)) for extra in allowed]
        if not any(_inside(real, extra) for extra in roots):
            raise UnsafePathError(
                f"{what}: {text!r} is a symlink to {real}, outside the data folder {root}; "
                "copy the file into the dataset instead"
            )
    return path


def prepared_roots(data_root: Path) -> tuple[Path, ...]:
    """The release folders a prepared dataset indexes in place (``reports/*.json`` "source")."""
    import json

    reports = Path(data_root) / "reports"
    roots = []
    for report in sorted(reports.glob("*.json")) if reports.is_dir() else ():
        try:
            source = json.loads(report.read_text()).get("source")
        except (OSError, ValueError):
            continue
        if isinstance(source, str) and source:
            roots.append(Path(os.path.normpath(Path(os.path.abspath(data_root)) / source)))
    return tuple(roots)
