"""SeaweedFS lifecycle and the S3 storage wrapper, against a real server on loopback."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import psutil
import pytest

from medsight.platform.s3_server import S3ServerError, SeaweedS3Server
from medsight.platform.storage import S3Settings, S3Storage, StorageError, parse_s3_url
from platform_fixtures import make_credentials, s3_server  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


def _listening_addresses(pid: int) -> set[str]:
    process = psutil.Process(pid)
    sockets = [c for p in [process, *process.children(recursive=True)] for c in p.net_connections("inet")]
    return {c.laddr.ip for c in sockets if c.status == psutil.CONN_LISTEN}


def test_server_binds_loopback_without_telemetry_and_keeps_secrets_private(s3_server: SeaweedS3Server) -> None:
    assert s3_server.running
    cmdline = psutil.Process(s3_server.process.pid).cmdline()
    assert "-master.telemetry=false" in cmdline and "-ip.bind=127.0.0.1" in cmdline and "-ip=127.0.0.1" in cmdline
    assert _listening_addresses(s3_server.process.pid) == {"127.0.0.1"}
    identities = s3_server.data_dir / "s3-identities.json"
    assert stat.S_IMODE(identities.stat().st_mode) == 0o600
    # The secret is in the 0600 identities file and nowhere in logs or the process arguments.
    secret = s3_server.credentials.secret_key
    assert secret not in " ".join(cmdline)
    assert secret not in s3_server.log_path.read_text()
    assert secret not in repr(s3_server.credentials)


def test_restart_on_same_dir_keeps_data_and_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with SeaweedS3Server(tmp_path) as server:  # no credentials in env: generated and kept 0600
        creds_file = tmp_path / "credentials.json"
        assert stat.S_IMODE(creds_file.stat().st_mode) == 0o600
        storage = S3Storage(S3Settings.from_env(server.env()))
        storage.ensure_bucket("keep")
        storage.put_json("keep", "a/b.json", {"x": 1})
        port, pid = server.port, server.process.pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with SeaweedS3Server(tmp_path) as again:
        assert again.port == port
        assert S3Storage(S3Settings.from_env(again.env())).get_json("keep", "a/b.json") == {"x": 1}


def test_second_server_on_same_dir_is_refused(s3_server: SeaweedS3Server) -> None:  # noqa: F811
    with pytest.raises(S3ServerError, match="already serving"):
        SeaweedS3Server(s3_server.data_dir).start()


def test_storage_roundtrip_and_missing_keys(s3_server: SeaweedS3Server) -> None:  # noqa: F811
    storage = S3Storage(S3Settings.from_env(s3_server.env()))
    storage.ensure_bucket("roundtrip")
    storage.ensure_bucket("roundtrip")  # idempotent
    storage.put_json("roundtrip", "x/y.json", {"a": [1, 2]})
    assert storage.get_json("roundtrip", "x/y.json") == {"a": [1, 2]}
    assert storage.get_json("roundtrip", "x/missing.json") is None
    assert storage.exists("roundtrip", "x/y.json") and not storage.exists("roundtrip", "x/z.json")
    assert storage.list_keys("roundtrip", "x/") == ["x/y.json"]


def test_errors_name_endpoint_and_bucket_never_the_secret(s3_server: SeaweedS3Server) -> None:  # noqa: F811
    good = S3Settings.from_env(s3_server.env())
    bad = S3Settings(good.endpoint, good.access_key, "wrong-" + make_credentials().secret_key)
    with pytest.raises(StorageError) as info:
        S3Storage(bad, attempts=1).get_json("roundtrip", "k.json")
    message = str(info.value)
    assert good.endpoint in message and "s3://roundtrip/k.json" in message
    assert bad.secret_key not in message and good.secret_key not in message
    # Nothing listening: retried, then a clear error.
    closed = S3Settings("http://127.0.0.1:9", good.access_key, good.secret_key)
    with pytest.raises(StorageError, match=r"failed after 2 attempts.*is the S3 server running"):
        S3Storage(closed, attempts=2, backoff=0.01).put_json("bucket-x", "k.json", {})


def test_settings_from_env_explain_what_is_missing() -> None:
    with pytest.raises(StorageError, match="MEDSIGHT_S3_ENDPOINT"):
        S3Settings.from_env({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "CHANGE_ME"})
    settings = S3Settings.from_env({"MEDSIGHT_S3_ENDPOINT": "127.0.0.1:1234", "AWS_ACCESS_KEY_ID": "a",
                                    "AWS_SECRET_ACCESS_KEY": "CHANGE_ME_SECRET"})
    assert settings.endpoint == "http://127.0.0.1:1234" and "CHANGE_ME_SECRET" not in repr(settings)
    assert parse_s3_url("s3://bucket/a/b") == ("bucket", "a/b")
    with pytest.raises(StorageError):
        parse_s3_url("http://bucket/a")


def test_no_server_left_behind(s3_server: SeaweedS3Server) -> None:  # noqa: F811
    # Only our fixture's server may be running from this module.
    mine = {p.pid for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "weed"
            and any(str(s3_server.data_dir) in part for part in (p.info["cmdline"] or []))}
    assert mine == {s3_server.process.pid}
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") != s3_server.credentials.secret_key


def test_ports_are_picked_below_the_outgoing_connection_range() -> None:
    """A port the kernel may give to a client's outgoing connection can be taken between the
    check and SeaweedFS's bind (it then exits at start-up); blocks are picked below that range."""
    from medsight.platform.s3_server import _COMPONENTS, GRPC_OFFSET, _ephemeral_floor, _pick_port_block

    floor = _ephemeral_floor()
    for _ in range(20):
        base = _pick_port_block()
        assert base + len(_COMPONENTS) + GRPC_OFFSET < floor
