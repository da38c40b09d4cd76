"""Find a stage output by its DVC hash: what a pulled checkpoint needs to be used on its own.

A checkpoint's ``stage.json`` names its inputs by DVC hash (``stages/lineage.py``). For
``medsight predict`` / ``medsight eval run`` the base models of a pulled instruct-tune output are
found, in order: at the local path recorded by an in-process chain, in a sibling folder named
after their stage (``outputs/base-models`` of a run-repo clone) holding the same hash, in the
local cache of earlier fetches, and finally in the DVC store (``MEDSIGHT_S3_ENDPOINT`` or the
local platform directory), fetched into ``~/.cache/medsight/outputs/<md5>``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from medsight.io_utils import replace_directory
from medsight.stages.lineage import recorded_input

DEFAULT_WORKDIR = Path("runs/platform")  # where `make pipeline` keeps its store


class ResolveError(RuntimeError):
    """An input could not be found; the message names its hash and how to provide it."""


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "medsight" / "outputs"


def _has_hash(directory: Path, md5: str) -> bool:
    from medsight.stages.content_hash import directory_md5

    try:
        return directory.is_dir() and (not md5 or directory_md5(directory) == md5)
    except (OSError, ValueError):
        return False


def store_configured() -> bool:
    return bool(os.environ.get("MEDSIGHT_S3_ENDPOINT")) or (DEFAULT_WORKDIR / "s3").is_dir()


@contextlib.contextmanager
def open_store(workdir: Path | None = None) -> Iterator[None]:
    """The S3 store from the environment, else the local one of ``workdir`` (default
    ``runs/platform``): the server already serving it, or one started for the duration."""
    from medsight.platform.artifacts import CACHE_ENV, STORE_ENV
    from medsight.platform.local_run import LOCAL_STORE_URL, patched_env
    from medsight.platform.s3_server import SeaweedS3Server

    if os.environ.get("MEDSIGHT_S3_ENDPOINT"):
        yield
        return
    root = Path(workdir or DEFAULT_WORKDIR).resolve()
    if not (root / "s3").is_dir():
        raise ResolveError(f"{root} has no local store (s3/) and MEDSIGHT_S3_ENDPOINT is not set")
    server = SeaweedS3Server(root / "s3")
    port = server.running_elsewhere()
    if port is not None:
        print(f"using the S3 server already serving {root / 's3'} (port {port})", file=sys.stderr)
    else:
        print(f"starting the local S3 server of {root} ...", file=sys.stderr)
    context = contextlib.nullcontext(server.attach(port)) if port is not None else server
    with context as running:
        env = {**running.env(), STORE_ENV: LOCAL_STORE_URL, CACHE_ENV: str(root / "dvc-cache"), "DVC_NO_ANALYTICS": "1"}
        with patched_env(env):
            yield


def fetch_output(md5: str, stage: str = "") -> Path:
    """The output with DVC hash ``md5``, from the local cache or pulled from the store into it."""
    from medsight.platform.artifacts import ArtifactRef, ArtifactStore, ArtifactStoreError
    from medsight.platform.storage import StorageError

    target = cache_root() / md5.removesuffix(".dir")
    if target.is_dir():
        return target
    try:
        with open_store():
            store = ArtifactStore()
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp, store.workspace(Path(tmp) / "ws") as ws:
                pulled = ws.pull(ArtifactRef(md5=md5, stage=stage), "out")
                staged = Path(tmp) / "complete"
                shutil.copytree(pulled, staged)  # copy: the pulled files may be links into the DVC cache
                replace_directory(staged, target)
    except (ArtifactStoreError, StorageError) as error:
        raise ResolveError(f"{stage or 'input'} {md5} is not in the store: {error}") from error
    return target


def resolve_input(checkpoint: Path, name: str) -> Path:
    """The folder of input ``name`` that stage output ``checkpoint`` was made from."""
    checkpoint = Path(checkpoint)
    entry = recorded_input(checkpoint, name)
    if entry is None:
        raise ResolveError(f"{checkpoint}: no stage.json records an input {name!r}; pass it explicitly")
    md5, stage = entry.get("md5", ""), entry.get("stage", "")
    recorded = Path(entry["path"]) if entry.get("path") else None
    if recorded is not None and _has_hash(recorded, md5):
        return recorded
    if stage and _has_hash(checkpoint.parent / stage, md5):
        return checkpoint.parent / stage
    if md5 and (cache_root() / md5.removesuffix(".dir")).is_dir():
        return cache_root() / md5.removesuffix(".dir")
    if md5 and store_configured():
        return fetch_output(md5, stage)
    raise ResolveError(
        f"{checkpoint}: its {name} input ({stage or 'stage output'} {md5 or 'of unknown hash'}) is not here; "
        f"pull it next to the checkpoint (`dvc pull {stage or name}` in the run repository), or set "
        "MEDSIGHT_S3_ENDPOINT and the AWS credentials (`source runs/platform/s3/client.env`) so it is fetched by hash"
    )


def base_for(checkpoint: Path, base: Path | None) -> Path:
    """``base`` when given (a CLI's --base), else the base-models input ``checkpoint`` records."""
    if base is not None:
        return Path(base)
    try:
        return resolve_input(checkpoint, "base")
    except ResolveError as error:
        raise ResolveError(f"{error}; or pass --base DIR (the base-models stage output)") from None
