"""A run-cache hit needs every object of the output in the remote; checking that costs few requests.

The S3 behaviour itself is tested against SeaweedFS in test_platform_artifacts.py; here an
in-memory key listing counts the requests each strategy makes.
"""

from __future__ import annotations

import hashlib
import json

from medsight.platform.artifacts import ArtifactRef, ArtifactStore, StoreConfig


class ListingStorage:
    """Just what ``in_remote`` uses: objects by key, and a record of every listing request."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.listings: list[str] = []

    def get_bytes(self, bucket: str, key: str) -> bytes | None:
        return self.objects.get(key)

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        self.listings.append(prefix)
        return sorted(k for k in self.objects if k.startswith(prefix))


def _store_with_output(files: int, other_objects: int) -> tuple[ArtifactStore, ListingStorage, ArtifactRef]:
    storage = ListingStorage()
    store = ArtifactStore(StoreConfig(url="s3://medsight/store", endpoint="http://127.0.0.1:1"), storage=storage)
    md5s = [hashlib.md5(f"file {i}".encode()).hexdigest() for i in range(files)]
    for i in range(other_objects):
        storage.objects[store.object_key(hashlib.md5(f"other {i}".encode()).hexdigest())] = b""
    for md5 in md5s:
        storage.objects[store.object_key(md5)] = b""
    manifest = json.dumps([{"md5": md5, "relpath": f"f{i}"} for i, md5 in enumerate(md5s)]).encode()
    ref = ArtifactRef(md5=hashlib.md5(manifest).hexdigest() + ".dir")
    storage.objects[store.object_key(ref.md5)] = manifest
    return store, storage, ref


def test_a_many_file_output_in_a_small_remote_is_checked_with_one_listing():
    store, storage, ref = _store_with_output(files=3000, other_objects=500)
    assert store.in_remote(ref)
    assert len(storage.listings) == 2  # one shard to estimate the remote's size, then all of it
    del storage.objects[store.object_key(json.loads(storage.objects[store.object_key(ref.md5)])[1234]["md5"])]
    assert not store.in_remote(ref)


def test_a_few_files_in_a_large_remote_are_checked_shard_by_shard():
    store, storage, ref = _store_with_output(files=3, other_objects=60_000)
    assert store.in_remote(ref)
    shards = {store.object_key(e["md5"]).rsplit("/", 1)[0] for e in json.loads(storage.objects[store.object_key(ref.md5)])}
    assert len(storage.listings) == len(shards)  # never a listing of the whole remote
    del storage.objects[store.object_key(json.loads(storage.objects[store.object_key(ref.md5)])[2]["md5"])]
    assert not store.in_remote(ref)


def test_an_empty_output_is_complete_with_its_manifest():
    store, storage, ref = _store_with_output(files=0, other_objects=10)
    assert store.in_remote(ref)
    del storage.objects[store.object_key(ref.md5)]
    assert not store.in_remote(ref)
