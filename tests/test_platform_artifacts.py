"""DVC artifact store against a real S3 server: push/pull, fresh-clone pulls, run-cache, failures."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from medsight.platform.artifacts import ArtifactRef, ArtifactStore, ArtifactStoreError
from medsight.platform.run_repo import RunRepo
from medsight.platform.s3_server import SeaweedS3Server
from platform_fixtures import s3_server, store_env, tree_hashes, write_tree  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow
DVC = str(Path(sys.executable).parent / "dvc")


def _add_and_push(store: ArtifactStore, root: Path, name: str = "stage-out", **tree: int) -> tuple[ArtifactRef, dict]:
    ws = store.workspace(root)
    hashes = write_tree(root / name, **tree)
    ref = ws.add(root / name, stage=name)
    ws.push(ref, name)
    ws.close()
    return ref, hashes


def test_push_then_pull_into_fresh_cache_gives_identical_bytes(store_env: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore()
    store.ensure_ready()
    ref, hashes = _add_and_push(store, tmp_path / "a")
    assert ref.md5.endswith(".dir") and ref.nfiles == len(hashes)
    assert store.in_remote(ref)
    monkeypatch.setenv("MEDSIGHT_DVC_CACHE", str(tmp_path / "other-cache"))  # nothing cached locally
    with ArtifactStore().workspace(tmp_path / "b") as ws:
        pulled = ws.pull(ArtifactRef.parse(ref.md5), "again")
        assert tree_hashes(pulled) == hashes


def test_one_file_is_read_from_the_remote_without_pulling_the_output(store_env: dict, tmp_path: Path) -> None:
    """What a restored component shows as its card: one file, read through the DVC manifest."""
    store = ArtifactStore()
    store.ensure_ready()
    ref, _ = _add_and_push(store, tmp_path / "a")
    assert json.loads(store.read_file(ref, "metrics.json")) == {"val_dice": 0.5}
    assert store.read_file(ref, "part1/file1.bin") == (tmp_path / "a" / "stage-out" / "part1" / "file1.bin").read_bytes()
    assert store.read_file(ref, "report.html") is None
    # An object whose bytes no longer match its name is refused, with the object named.
    manifest = json.loads(store.storage.get_bytes(store.config.bucket, store.object_key(ref.md5)))
    md5 = next(e["md5"] for e in manifest if e["relpath"] == "metrics.json")
    store.storage.put_bytes(store.config.bucket, store.object_key(md5), b'{"val_dice": 0.9}')
    with pytest.raises(ArtifactStoreError, match=re.escape(md5[2:])):
        store.read_file(ref, "metrics.json")


def test_fresh_clone_pulls_with_plain_dvc_from_another_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """git clone -> dvc pull STAGE with the dvc CLI, the store on another port than at push time."""
    from platform_fixtures import make_credentials

    server = SeaweedS3Server(tmp_path / "s3", credentials=make_credentials())
    try:
        server.start()
        for key, value in {**server.env(), "MEDSIGHT_STORE_URL": "s3://clone/store",
                           "MEDSIGHT_DVC_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(key, value)
        store = ArtifactStore()
        store.ensure_ready()
        data, _ = _add_and_push(store, tmp_path / "ws", name="synth-data", files=3)
        ckpt, hashes = _add_and_push(store, tmp_path / "ws2", name="perceiver-pretrain", files=7)
        repo = RunRepo(tmp_path / "repo")
        repo.ensure(store.config)
        records = [
            {"stage": "synth-data", "ref": json.loads(data.to_json()), "cache_key": "a" * 64, "inputs": {}},
            {"stage": "perceiver-pretrain", "ref": json.loads(ckpt.to_json()), "cache_key": "k" * 64,
             "inputs": {"data": data.md5}},
        ]
        repo.record_run("run-1", records, {"preset": "tiny"})
        push_port = server.port
        server.stop()
    finally:
        server.stop()
    # The lock records every output (and the inputs of each) by hash.
    lock = yaml.safe_load((repo.path / "dvc.lock").read_text())
    assert lock["stages"]["perceiver-pretrain"]["outs"][0]["md5"] == ckpt.md5
    assert lock["stages"]["perceiver-pretrain"]["deps"][0] == {
        "path": "outputs/synth-data", "hash": "md5", "md5": data.md5, "size": data.size, "nfiles": data.nfiles}
    # Another machine: no workspace copy, no cache; only git, the S3 remote and the environment.
    shutil.rmtree(tmp_path / "ws2")
    shutil.rmtree(tmp_path / "cache")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo.path), str(clone)], check=True)
    config = (clone / ".dvc" / "config").read_text()
    assert "endpointurl" not in config and str(push_port) not in config
    moved = SeaweedS3Server(tmp_path / "s3", port=push_port + 7, credentials=server.credentials)
    with moved:
        assert moved.port != push_port
        env = {key: value for key, value in os.environ.items() if not key.startswith(("MEDSIGHT_", "AWS_"))}
        env.update({"DVC_NO_ANALYTICS": "1", "AWS_ENDPOINT_URL": moved.endpoint, "AWS_MAX_ATTEMPTS": "1",
                    "AWS_ACCESS_KEY_ID": server.credentials.access_key,
                    "AWS_SECRET_ACCESS_KEY": server.credentials.secret_key, "AWS_DEFAULT_REGION": "us-east-1"})
        result = subprocess.run([DVC, "pull", "perceiver-pretrain"], cwd=clone, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert tree_hashes(clone / "outputs" / "perceiver-pretrain") == hashes
        assert not (clone / "outputs" / "synth-data").exists()  # only the stage asked for
        status = subprocess.run(["git", "-C", str(clone), "status", "--porcelain"], capture_output=True, text=True)
        assert status.stdout == ""  # pulled outputs are git-ignored
    assert subprocess.run(["git", "-C", str(clone), "tag"], capture_output=True, text=True).stdout.split() == ["run-1"]
    # The store is down now: the pull fails within seconds and names the endpoint it tried.
    shutil.rmtree(clone / "outputs" / "perceiver-pretrain")
    shutil.rmtree(clone / ".dvc" / "cache", ignore_errors=True)
    started = time.monotonic()
    failed = subprocess.run([DVC, "pull", "perceiver-pretrain"], cwd=clone, capture_output=True, text=True, env=env)
    assert failed.returncode != 0
    assert time.monotonic() - started < 20
    assert moved.endpoint in failed.stderr, failed.stderr


def test_run_cache_records_only_complete_outputs(store_env: dict, tmp_path: Path) -> None:
    store = ArtifactStore()
    store.ensure_ready()
    ref, _ = _add_and_push(store, tmp_path / "ws")
    store.cache_record("perceiver-pretrain", "abc", {"ref": json.loads(ref.to_json()), "metrics": {"val_dice": 0.5}})
    assert store.cache_lookup("perceiver-pretrain", "abc")["metrics"] == {"val_dice": 0.5}
    assert store.cache_lookup("perceiver-pretrain", "other") is None
    # An entry whose objects vanished (e.g. `dvc gc -c`) is a miss, never a broken restore.
    manifest = json.loads(store.storage.get_bytes(store.config.bucket, store.object_key(ref.md5)))
    store.storage.client.remove_object(store.config.bucket, store.object_key(manifest[0]["md5"]))
    assert store.cache_lookup("perceiver-pretrain", "abc") is None


def test_lineage_resolves_run_references(store_env: dict) -> None:
    store = ArtifactStore()
    store.ensure_ready()
    ref = {"md5": "0" * 32 + ".dir", "size": 1, "nfiles": 1, "stage": "synth-data"}
    store.record_lineage("run-7", {"stage": "synth-data", "ref": ref, "cache_key": "a" * 64})
    assert store.resolve("run:run-7/synth-data").md5 == ref["md5"]
    assert store.list_runs() == ["run-7"]
    with pytest.raises(ArtifactStoreError, match="no lineage record for stage 'base-models'"):
        store.resolve("run:run-7/base-models")
    store.record_lineage("run-7", {"stage": "synth-data", "ref": {**ref, "md5": "1" * 32 + ".dir"}, "cache_key": "b" * 64})
    with pytest.raises(ArtifactStoreError, match="2 outputs"):
        store.resolve("run:run-7/synth-data")
    with pytest.raises(ArtifactStoreError, match="not a DVC reference"):
        ArtifactRef.parse("not-a-hash")


def test_server_killed_mid_push_then_rerun_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    from platform_fixtures import make_credentials

    server = SeaweedS3Server(tmp_path / "s3", credentials=make_credentials())
    try:
        server.start()
        for key, value in {**server.env(), "MEDSIGHT_STORE_URL": "s3://crash/store",
                           "MEDSIGHT_DVC_CACHE": str(tmp_path / "cache")}.items():
            monkeypatch.setenv(key, value)
        store = ArtifactStore()
        store.ensure_ready()
        ws = store.workspace(tmp_path / "ws")
        hashes = write_tree(tmp_path / "ws" / "big", files=240, size=256 * 1024)
        ref = ws.add(tmp_path / "ws" / "big", stage="big")
        outcome: dict[str, BaseException | float] = {}

        def push() -> None:
            started = time.monotonic()
            try:
                ws.push(ref, "big")
            except BaseException as error:  # noqa: BLE001 - examined below
                outcome["error"] = error
            outcome["seconds"] = time.monotonic() - started

        thread = threading.Thread(target=push)
        thread.start()
        prefix = store.config.key("dvc", "files") + "/"
        deadline = time.monotonic() + 60
        while len(store.storage.list_keys("crash", prefix)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        server.kill()  # SIGKILL in the middle of the upload
        thread.join(timeout=180)
        assert not thread.is_alive()
        error = outcome.get("error")
        assert isinstance(error, ArtifactStoreError), f"push should fail clearly, got {error!r}"
        message = str(error)
        assert server.endpoint in message and "rerun the same command" in message
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message
        assert outcome["seconds"] < 120
        # DVC's one error line per object is condensed: a count and one example, not a flood.
        printed = capfd.readouterr().err
        assert "failed to transfer '" not in printed, printed[:2000]
        assert re.search(r"\d+ object\(s\) failed to transfer \(first: failed to transfer '[0-9a-f]{32}'", message), message

        server.start()  # same directory, same port
        keys = store.storage.list_keys("crash", prefix)
        assert not store.in_remote(ref)  # the manifest goes last: a half push is never "complete"
        for key in keys:  # every object present is whole: its content hashes to its name
            data = store.storage.get_bytes("crash", key)
            name = "".join(key.split("/")[-2:])
            if not name.endswith(".dir"):
                assert hashlib.md5(data).hexdigest() == name
        ws.push(ref, "big")  # rerun after restart completes
        assert store.in_remote(ref)
        ws.close()
        monkeypatch.setenv("MEDSIGHT_DVC_CACHE", str(tmp_path / "fresh-cache"))
        with ArtifactStore().workspace(tmp_path / "ws2") as fresh:
            assert tree_hashes(fresh.pull(ref, "copy")) == hashes
    finally:
        server.stop()
