"""Shared fixtures for platform tests: a real SeaweedFS S3 server on loopback, always stopped."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from medsight.platform.s3_server import S3Credentials, SeaweedS3Server


def make_credentials() -> S3Credentials:
    return S3Credentials("test" + secrets.token_hex(6), secrets.token_urlsafe(24))


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3Server]:
    server = SeaweedS3Server(tmp_path_factory.mktemp("s3"), credentials=make_credentials())
    server.start()
    try:
        yield server
    finally:
        server.stop()  # also after a failed test: never leave a server running


@pytest.fixture
def store_env(s3_server: SeaweedS3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment of a component: S3 endpoint + credentials, a fresh bucket, a private DVC cache."""
    env = {
        **s3_server.env(),
        "MEDSIGHT_STORE_URL": f"s3://t{secrets.token_hex(5)}/store",
        "MEDSIGHT_DVC_CACHE": str(tmp_path / "dvc-cache"),
        "DVC_NO_ANALYTICS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KFP_RUN_ID", raising=False)
    return env


def tree_hashes(root: Path) -> dict[str, str]:
    """relative path -> md5 of every file under ``root`` (DVC's own file hash)."""
    return {
        path.relative_to(root).as_posix(): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(Path(root).rglob("*"))
        if path.is_file()
    }


def write_tree(root: Path, files: int = 5, size: int = 4096, seed: int = 0) -> dict[str, str]:
    rng = __import__("random").Random(seed)
    for index in range(files):
        path = root / f"part{index % 3}" / f"file{index}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    (root / "metrics.json").write_text('{"val_dice": 0.5}\n')
    return tree_hashes(root)
