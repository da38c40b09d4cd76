"""S3 object access (MinIO on the cluster, SeaweedFS locally) through the ``minio`` SDK.

Endpoint and credentials come only from the environment (``MEDSIGHT_S3_ENDPOINT``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), which Kubernetes fills from a Secret. Errors
name the endpoint, bucket and key, never a credential, and say what to check.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlparse

T = TypeVar("T")

ENDPOINT_ENV = "MEDSIGHT_S3_ENDPOINT"


class StorageError(RuntimeError):
    """An S3 operation failed; the message names endpoint/bucket/key and the next step."""


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # http(s)://host:port
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    region: str = "us-east-1"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        endpoint = env.get(ENDPOINT_ENV, "").strip()
        missing = [name for name in (ENDPOINT_ENV, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(name)]
        if missing:
            raise StorageError(
                f"S3 storage is not configured: set {', '.join(missing)} "
                "(locally: pass --workdir to the medsight command, or `source runs/platform/s3/client.env` "
                "while `medsight platform s3-serve` runs; on the cluster they come from the ConfigMap "
                "medsight-platform and the Secret medsight-s3-credentials)"
            )
        if not urlparse(endpoint).scheme:
            endpoint = "http://" + endpoint
        return cls(
            endpoint=endpoint.rstrip("/"),
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
        )

    @property
    def secure(self) -> bool:
        return urlparse(self.endpoint).scheme == "https"

    @property
    def host(self) -> str:
        return urlparse(self.endpoint).netloc


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"expected an s3://bucket/prefix URL, got {url!r}")
    return parsed.netloc, parsed.path.strip("/")


# Failures worth another attempt: the server restarting, a dropped connection, a 5xx.
_RETRYABLE_S3_CODES = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "XMinioServerNotInitialized"}


class S3Storage:
    """Small, retrying wrapper over ``minio.Minio`` for JSON records and existence checks."""

    def __init__(self, settings: S3Settings | None = None, *, attempts: int = 4, backoff: float = 0.5) -> None:
        self.settings = settings or S3Settings.from_env()
        self.attempts = attempts
        self.backoff = backoff
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import urllib3
            from minio import Minio

            # Our loop does the retries (with useful messages); urllib3 must not hide them.
            http = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=5.0, read=60.0),
                retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0),
            )
            self._client = Minio(
                self.settings.host,
                access_key=self.settings.access_key,
                secret_key=self.settings.secret_key,
                secure=self.settings.secure,
                region=self.settings.region,
                http_client=http,
            )
        return self._client

    def _call(self, what: str, bucket: str, key: str, fn: Callable[[], T]) -> T:
        from minio.error import S3Error, ServerError

        where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
        last: Exception | None = None
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except S3Error as error:
                if error.code not in _RETRYABLE_S3_CODES:
                    raise StorageError(
                        f"S3 {what} {where} at {self.settings.endpoint} failed: {error.code} ({error.message}); "
                        "check the bucket exists and the credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
                    ) from error
                last = error
            except (ValueError, TypeError) as error:  # e.g. an invalid bucket name: retrying cannot help
                raise StorageError(f"S3 {what} {where} at {self.settings.endpoint}: {error}") from error
            except (ServerError, OSError, Exception) as error:  # urllib3 errors subclass Exception
                if isinstance(error, StorageError):
                    raise
                last = error
            if attempt < self.attempts:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        raise StorageError(
            f"S3 {what} {where} at {self.settings.endpoint} failed after {self.attempts} attempts "
            f"({type(last).__name__}: {_short(last)}); is the S3 server running and {ENDPOINT_ENV} right?"
        ) from last

    # -- buckets -------------------------------------------------------------------------
    def ensure_bucket(self, bucket: str) -> None:
        def make() -> None:
            if not self.client.bucket_exists(bucket):
                try:
                    self.client.make_bucket(bucket)
                except Exception as error:  # another writer created it in between
                    if getattr(error, "code", "") not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                        raise

        self._call("create bucket", bucket, "", make)

    # -- objects -------------------------------------------------------------------------
    def put_bytes(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call(
            "put",
            bucket,
            key,
            lambda: self.client.put_object(bucket, key, io.BytesIO(data), len(data), content_type=content_type),
        )

    def get_bytes(self, bucket: str, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        from minio.error import S3Error

        def get() -> bytes | None:
            try:
                response = self.client.get_object(bucket, key)
            except S3Error as error:
                if error.code in {"NoSuchKey", "NoSuchBucket"}:
                    return None
                raise
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call("get", bucket, key, get)

    def exists(self, bucket: str, key: str) -> bool:
        from minio.error import S3Error

        def stat() -> bool:
            try:
                self.client.stat_object(bucket, key)
            except S3Error as error:
                if error.code in {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"}:
                    return False
                raise
            return True

        return self._call("stat", bucket, key, stat)

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Keys under ``prefix``; none when the bucket does not exist (nothing was stored yet)."""
        from minio.error import S3Error

        def listing() -> list[str]:
            try:
                return sorted(o.object_name for o in self.client.list_objects(bucket, prefix=prefix, recursive=True))
            except S3Error as error:
                if error.code == "NoSuchBucket":
                    return []
                raise

        return self._call("list", bucket, prefix, listing)

    def put_json(self, bucket: str, key: str, data: Any) -> None:
        payload = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
        self.put_bytes(bucket, key, payload, content_type="application/json")

    def get_json(self, bucket: str, key: str) -> Any | None:
        payload = self.get_bytes(bucket, key)
        if payload is None:
            return None
        try:
            return json.loads(payload)
        except json.JSONDecodeError as error:
            raise StorageError(f"s3://{bucket}/{key} at {self.settings.endpoint} is not valid JSON: {error}") from error


def _short(error: Exception | None, limit: int = 300) -> str:
    text = str(error) if error is not None else "unknown error"
    return text if len(text) <= limit else text[:limit] + "..."
