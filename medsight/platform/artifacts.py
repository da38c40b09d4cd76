"""DVC-backed artifact store: content hashes, push/pull, run-cache and run lineage.

Every stage output is a directory tracked by DVC (md5 of its ``.dir`` manifest) and pushed to
the DVC remote ``<store>/dvc`` on S3. Next to it, under the same store URL, live two kinds of
small JSON records:

- ``runcache/<stage>/<key>.json``: key = the stage's cache key (``stages/cache_key.py``: config
  view, input md5s, code hash) -> the output reference. A stage whose key is
  present is restored (nothing recomputed, nothing re-uploaded), wherever it runs.
- ``runs/<run_id>/stages/<stage>--<key>.json``: what each run produced (lineage), so any stage's
  checkpoint of any run can be pulled later by (run, stage).

Credentials never enter a DVC config file: boto reads ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` from the environment, and only URL + endpoint are written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from medsight.platform.storage import ENDPOINT_ENV, S3Settings, S3Storage, StorageError, parse_s3_url


logger = logging.getLogger(__name__)

STORE_ENV = "MEDSIGHT_STORE_URL"
DEFAULT_STORE_URL = "s3://medsight/store"
CACHE_ENV = "MEDSIGHT_DVC_CACHE"
REMOTE_NAME = "store"


class ArtifactStoreError(RuntimeError):
    """A DVC or run-cache operation failed; the message names the stage/remote and next step."""


@dataclass(frozen=True)
class ArtifactRef:
    """What a stage hands downstream: the DVC hash of its output directory."""

    md5: str  # "<32 hex>.dir" for a directory
    size: int | None = None
    nfiles: int | None = None
    stage: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> ArtifactRef | None:
        """Accepts a JSON reference, a bare DVC md5 (``abc...dir``) or "" (input absent)."""
        text = (text or "").strip()
        if not text:
            return None
        if text.startswith("{"):
            data = json.loads(text)
            if not data.get("md5"):
                return None
            return cls(md5=data["md5"], size=data.get("size"), nfiles=data.get("nfiles"), stage=data.get("stage", ""))
        hex_part = text.removesuffix(".dir")
        if len(hex_part) == 32 and all(c in "0123456789abcdef" for c in hex_part):
            return cls(md5=text)
        raise ArtifactStoreError(
            f"not a DVC reference: {text!r}; expected a JSON ref, an md5 like 'c518...e.dir', "
            "or run:<run_id>/<stage> where run references are supported"
        )

    def pointer(self, path: str) -> str:
        """The ``.dvc`` file text that makes ``dvc pull`` fetch this output into ``path``."""
        out: dict[str, Any] = {"md5": self.md5}
        if self.size is not None:
            out["size"] = self.size
        if self.nfiles is not None:
            out["nfiles"] = self.nfiles
        out.update({"hash": "md5", "path": path})
        return yaml.safe_dump({"outs": [out]}, sort_keys=False)

    def described_pointer(self, path: str, store_uri: str, remote_url: str) -> str:
        """The pointer a KFP artifact holds: a valid ``.dvc`` file (``dvc pull`` resolves it) that
        also says, for a reader of the KFP UI, where the bytes are and how to fetch them."""
        data = yaml.safe_load(self.pointer(path))
        data["outs"][0]["desc"] = f"{self.stage or path} output, stored in the DVC remote (this file is only its pointer)"
        data["meta"] = {
            "stage": self.stage or path, "dvc_md5": self.md5, "store_uri": store_uri, "dvc_remote": remote_url,
            "pull": [f"medsight platform pull --md5 {self.md5} --dest {path}",
                     f"save this file as {path}.dvc in a DVC repo whose remote is {remote_url}, then: dvc pull {path}.dvc"],
        }
        header = (f"# MedSIGHT {self.stage or path} output: {self.md5} ({self.nfiles or '?'} files, {self.size or '?'} bytes)\n"
                  "# The bytes live in the DVC remote, deduplicated across runs; this is their DVC pointer.\n")
        return header + yaml.safe_dump(data, sort_keys=False)

    @property
    def short(self) -> str:
        return self.md5[:10]


@dataclass(frozen=True)
class StoreConfig:
    url: str  # s3://bucket/prefix holding dvc/, runcache/, runs/
    endpoint: str
    cache_dir: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StoreConfig:
        env = os.environ if env is None else env
        settings = S3Settings.from_env(env)
        cache = env.get(CACHE_ENV)
        return cls(url=env.get(STORE_ENV, DEFAULT_STORE_URL).rstrip("/"), endpoint=settings.endpoint,
                   cache_dir=Path(cache) if cache else None)

    @property
    def bucket(self) -> str:
        return parse_s3_url(self.url)[0]

    @property
    def prefix(self) -> str:
        return parse_s3_url(self.url)[1]

    @property
    def dvc_url(self) -> str:
        return f"{self.url}/dvc"

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p)


def configure_dvc_repo(repo: Any, config: StoreConfig, *, cache_dir: Path | None = None) -> None:
    """Point a DVC repo at the store: URL + endpoint only (credentials stay in the env)."""
    with repo.config.edit() as conf:
        conf["core"]["remote"] = REMOTE_NAME
        conf["core"]["analytics"] = False
        conf["core"]["check_update"] = False
        conf["remote"][REMOTE_NAME] = {"url": config.dvc_url, "endpointurl": config.endpoint, "connect_timeout": 10}
        if cache_dir is not None:
            conf["cache"]["dir"] = str(cache_dir)
            # Inputs are linked, not copied, from a shared cache; DVC makes them read-only.
            conf["cache"]["type"] = "reflink,hardlink,copy"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """DVC's repo API prints progress bars to stdout and logs INFO lines ("Initialized DVC
    repository.") through a handler bound to the real stdout; neither may reach a command's
    stdout, which carries JSON for scripts. Warnings and errors still go through."""
    import logging

    dvc_logger = logging.getLogger("dvc")
    level = dvc_logger.level
    dvc_logger.setLevel(max(level, logging.WARNING))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        dvc_logger.setLevel(level)


# The loggers DVC reports each object that failed to move on (one ERROR line per file).
_TRANSFER_LOGGERS = ("dvc_data.hashfile.transfer", "dvc_objects.fs.generic", "dvc_data.index.fetch",
                     "dvc_data.index.push", "dvc_data.index.checkout")


class TransferErrors(logging.Filter):
    """Holds back DVC's per-object "failed to transfer" errors and counts them: during an outage
    one line per file floods the terminal; the user needs the count and one example."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.first = ""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(("failed to transfer", "failed to create")):
            return True
        self.count += 1
        if not self.first:
            cause = record.exc_info[1] if record.exc_info and record.exc_info[1] else None
            self.first = f"{message} - {cause}" if cause else message
        return False

    def summary(self) -> str:
        return f"{self.count} object(s) failed to transfer (first: {self.first})" if self.count else ""


@contextlib.contextmanager
def condensed_transfer_errors() -> Iterator[TransferErrors]:
    errors = TransferErrors()
    loggers = [logging.getLogger(name) for name in _TRANSFER_LOGGERS]
    for each in loggers:
        each.addFilter(errors)
    try:
        yield errors
    finally:
        for each in loggers:
            each.removeFilter(errors)


def _retry(what: str, attempts: int, fn: Any) -> Any:
    last: Exception | None = None
    summary = ""
    for attempt in range(1, attempts + 1):
        with condensed_transfer_errors() as transfer_errors:
            try:
                with quiet():
                    return fn()
            except Exception as error:  # DvcException, botocore/aiohttp connection errors, OSError
                last = error
        # Later attempts may fail before any transfer (server still down): keep the count seen.
        summary = transfer_errors.summary() or summary
        if attempt < attempts:
            pause = min(2.0 * attempt, 6.0)
            logger.warning("%s: attempt %d/%d failed (%s); retrying in %.0f s", what.split(" (")[0], attempt,
                           attempts, transfer_errors.summary() or _one_line(last), pause)
            time.sleep(pause)
    detail = f"{summary}; last error: {_one_line(last)}" if summary else _one_line(last)
    raise ArtifactStoreError(f"{what} failed after {attempts} attempts: {detail}") from last


def _one_line(error: BaseException | None) -> str:
    return " ".join(str(error).split()) if error is not None else "unknown error"


class DvcWorkspace:
    """A throw-away DVC repo (no git) where a stage's inputs are pulled and its output added."""

    def __init__(self, root: Path, config: StoreConfig, *, attempts: int = 3) -> None:
        from dvc.repo import Repo

        # botocore's default (5 attempts per object, inside s3fs's own retries) turns a dead
        # endpoint into minutes of silence; we retry whole pushes/pulls instead (uploaded
        # objects are skipped), so one retry per request is enough. User settings win.
        os.environ.setdefault("AWS_MAX_ATTEMPTS", "2")
        os.environ.setdefault("AWS_RETRY_MODE", "standard")
        self.root = Path(root).resolve()
        self.config = config
        self.attempts = attempts
        self.root.mkdir(parents=True, exist_ok=True)
        with quiet():
            repo = Repo.init(str(self.root), no_scm=True, force=True)
        configure_dvc_repo(repo, config, cache_dir=config.cache_dir)
        repo.close()
        self.repo = Repo(str(self.root))

    def close(self) -> None:
        self.repo.close()

    def __enter__(self) -> DvcWorkspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, path: Path, stage: str = "") -> ArtifactRef:
        """Hash ``path`` (a directory inside the workspace) into the DVC cache."""
        path = Path(path).resolve()
        if not path.is_dir():
            raise ArtifactStoreError(f"stage {stage or path.name}: output directory {path} does not exist")
        with quiet():
            self.repo.add([str(path)])
        pointer = yaml.safe_load(path.with_name(path.name + ".dvc").read_text())["outs"][0]
        return ArtifactRef(md5=pointer["md5"], size=pointer.get("size"), nfiles=pointer.get("nfiles"), stage=stage)

    def push(self, ref: ArtifactRef, name: str) -> None:
        """Upload ``name``'s objects; already-present objects are skipped, so a rerun resumes."""
        target = str(self.root / f"{name}.dvc")
        _retry(
            f"pushing {ref.stage or name} ({ref.short}) to {self.config.dvc_url} at {self.config.endpoint} "
            "(is the S3 server up? rerun the same command to resume; uploaded objects are kept)",
            self.attempts,
            lambda: self.repo.push(targets=[target], remote=REMOTE_NAME),
        )

    def pull(self, ref: ArtifactRef, name: str) -> Path:
        """Fetch ``ref`` from the cache or remote and check it out as ``<workspace>/<name>``."""
        return self.pull_many({name: ref})[name]

    def pull_many(self, refs: Mapping[str, ArtifactRef]) -> dict[str, Path]:
        """Several outputs in one DVC call (one S3 session, parallel transfers)."""
        pointers = []
        for name, ref in refs.items():
            pointer = self.root / f"{name}.dvc"
            pointer.write_text(ref.pointer(name))
            pointers.append(str(pointer))
        if pointers and not self._checkout_cached(pointers):
            what = ", ".join(f"{ref.stage or name} ({ref.md5})" for name, ref in refs.items())
            _retry(
                f"pulling {what} from {self.config.dvc_url} at {self.config.endpoint} "
                "(is the S3 server up and the object pushed?)",
                self.attempts,
                lambda: self.repo.pull(targets=pointers, remote=REMOTE_NAME),
            )
        return {name: self.root / name for name in refs}

    def _checkout_cached(self, pointers: list[str]) -> bool:
        """Check the outputs out of the local DVC cache when it already holds all of them (the
        shared cache of a one-machine run): no remote status query. False: something is missing,
        and a pull fetches it."""
        from dvc.exceptions import CheckoutError

        try:
            with quiet():
                self.repo.checkout(targets=pointers)
        except CheckoutError:
            return False
        return True


class ArtifactStore:
    """The store's S3 records (run-cache, lineage) and workspaces bound to its DVC remote."""

    def __init__(self, config: StoreConfig | None = None, storage: S3Storage | None = None) -> None:
        self.config = config or StoreConfig.from_env()
        self.storage = storage or S3Storage()

    def ensure_ready(self) -> None:
        self.storage.ensure_bucket(self.config.bucket)

    def workspace(self, root: Path) -> DvcWorkspace:
        return DvcWorkspace(root, self.config)

    def object_key(self, md5: str) -> str:
        # DVC 3 layout: files/md5/<first two hex>/<rest>, ".dir" kept for manifests.
        return self.config.key("dvc", "files", "md5", md5[:2], md5[2:])

    def object_uri(self, md5: str) -> str:
        """Where the output's DVC manifest lives in the store (what the KFP UI shows)."""
        return f"s3://{self.config.bucket}/{self.object_key(md5)}"

    def in_remote(self, ref: ArtifactRef) -> bool:
        """Whether the remote has the manifest and every file it lists (no half-pushed outputs)."""
        manifest = self.storage.get_bytes(self.config.bucket, self.object_key(ref.md5))
        if manifest is None:
            return False
        if not ref.md5.endswith(".dir"):
            return True
        wanted = {self.object_key(entry["md5"]) for entry in json.loads(manifest)}
        shards = sorted({key.rsplit("/", 1)[0] for key in wanted})
        if not shards:
            return True  # an empty folder: the manifest is all there is
        # One listing per two-hex-digit shard touched, unless listing the whole remote takes fewer
        # requests (DVC's own estimate: objects are spread evenly over the 256 shards; a listing
        # page holds 1,000 keys). A 3,000-file output in a small remote: 4 requests, not 256.
        present = set(self.storage.list_keys(self.config.bucket, shards[0] + "/"))
        if len(present) * 256 / 1000 + 1 < len(shards) - 1:
            present = set(self.storage.list_keys(self.config.bucket, shards[0].rsplit("/", 1)[0] + "/"))
        else:
            for shard in shards[1:]:
                present.update(self.storage.list_keys(self.config.bucket, shard + "/"))
        return wanted <= present

    def read_file(self, ref: ArtifactRef, relpath: str) -> bytes | None:
        """One file of a stored output, read from the DVC remote through its manifest: no DVC
        import, no copy of the rest (an evaluation's report without its predictions). None when
        the output has no such file; an object whose content does not hash to its name is refused."""
        if not ref.md5.endswith(".dir"):
            return None
        manifest = self.storage.get_bytes(self.config.bucket, self.object_key(ref.md5))
        md5 = next((e["md5"] for e in json.loads(manifest or b"[]") if e.get("relpath") == relpath), None)
        if md5 is None:
            return None
        data = self.storage.get_bytes(self.config.bucket, self.object_key(md5))
        if data is not None and hashlib.md5(data).hexdigest() != md5:
            raise ArtifactStoreError(f"{self.object_uri(md5)} ({relpath} of {ref.md5}) does not match its hash")
        return data

    # -- run-cache -----------------------------------------------------------------------
    def cache_lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        entry = self.storage.get_json(self.config.bucket, self.config.key("runcache", stage, f"{key}.json"))
        if entry is None:
            return None
        ref = ArtifactRef.parse(json.dumps(entry.get("ref", {})))
        # An entry whose objects were garbage-collected is a miss, not a broken restore.
        if ref is None or not self.in_remote(ref):
            return None
        return entry

    def cache_record(self, stage: str, key: str, entry: dict[str, Any]) -> None:
        self.storage.put_json(self.config.bucket, self.config.key("runcache", stage, f"{key}.json"), entry)

    # -- lineage -------------------------------------------------------------------------
    def record_lineage(self, run_id: str, record: dict[str, Any]) -> None:
        # Keyed by stage and cache key: an ablation run executes a stage once per variant.
        name = f"{record['stage']}--{record['cache_key'][:16]}.json"
        self.storage.put_json(self.config.bucket, self.config.key("runs", run_id, "stages", name), record)

    def load_lineage(self, run_id: str) -> list[dict[str, Any]]:
        """Every stage execution recorded for ``run_id``, in the order they finished."""
        prefix = self.config.key("runs", run_id, "stages") + "/"
        records = [self.storage.get_json(self.config.bucket, key) for key in self.storage.list_keys(self.config.bucket, prefix)]
        return sorted((r for r in records if r), key=lambda r: (r.get("finished_at", ""), r["stage"]))

    def put_run_file(self, run_id: str, name: str, text: str) -> None:
        self.storage.put_bytes(self.config.bucket, self.config.key("runs", run_id, name), text.encode(), "text/plain")

    def get_run_file(self, run_id: str, name: str) -> str | None:
        data = self.storage.get_bytes(self.config.bucket, self.config.key("runs", run_id, name))
        return None if data is None else data.decode()

    def resolve(self, text: str) -> ArtifactRef | None:
        """Like ``ArtifactRef.parse`` plus ``run:<run_id>/<stage>`` looked up in the lineage."""
        text = (text or "").strip()
        if not text.startswith("run:"):
            return ArtifactRef.parse(text)
        run_id, _, stage = text[4:].partition("/")
        found = {r["ref"]["md5"]: r for r in self.load_lineage(run_id) if r["stage"] == stage}
        if not found:
            raise ArtifactStoreError(
                f"no lineage record for stage {stage!r} in run {run_id!r} under {self.config.url}; "
                "list runs with `medsight platform runs`"
            )
        if len(found) > 1:
            raise ArtifactStoreError(
                f"run {run_id!r} has {len(found)} outputs of {stage!r} (an ablation); pass one md5: {', '.join(found)}"
            )
        return ArtifactRef.parse(json.dumps(next(iter(found.values()))["ref"]))

    def list_runs(self) -> list[str]:
        prefix = self.config.key("runs") + "/"
        keys = self.storage.list_keys(self.config.bucket, prefix)
        return sorted({k[len(prefix):].split("/", 1)[0] for k in keys})


__all__ = [
    "ArtifactRef",
    "ArtifactStore",
    "ArtifactStoreError",
    "DvcWorkspace",
    "ENDPOINT_ENV",
    "StorageError",
    "StoreConfig",
    "configure_dvc_repo",
]
