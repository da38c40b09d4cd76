"""A git + DVC repository that records pipeline runs, so anyone can ``git clone`` + ``dvc pull``.

Layout (one commit and one tag per run)::

    .dvc/config          remote "store": the S3 URL only (no endpoint, never credentials)
    dvc.yaml             the run's stage graph: one stage per output, deps = its inputs
    dvc.lock             every output (and input) of the run with its DVC hash, size, file count
    runs/<run_id>.json   lineage: stage -> md5, cached?, seconds, metrics, inputs
    README.md            how to pull

``git checkout <run_id> && dvc pull instruct-tune`` gives that run's bytes in
``outputs/instruct-tune`` on any machine that reaches the store. The endpoint comes from the
environment (``AWS_ENDPOINT_URL``, read by DVC's S3 client), so the same clone works against the
local SeaweedFS on any port and against MinIO on a cluster; credentials come from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``. ``AWS_MAX_ATTEMPTS=1`` makes a pull against a
dead endpoint fail in seconds, naming the endpoint.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from medsight.io_utils import atomic_write_json, atomic_write_text
from medsight.platform.artifacts import REMOTE_NAME, ArtifactStoreError, StoreConfig, quiet

_GIT_IDENTITY = ["-c", "user.name=medsight", "-c", "user.email=medsight@localhost", "-c", "commit.gpgsign=false"]
OUTPUTS = "outputs"
LOCK_SCHEMA = "2.0"
# What a client needs in its environment (client.env holds the local store's values).
CLIENT_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                   "AWS_MAX_ATTEMPTS")

README = """# MedSIGHT pipeline runs

Each run is a commit and a tag (`git tag`); `runs/<run id>.json` holds its lineage. Every stage
output is listed in `dvc.lock` with its DVC hash. To get one:

```bash
export AWS_ENDPOINT_URL=http://127.0.0.1:PORT   # the S3 store (local: see `source client.env`)
export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... AWS_MAX_ATTEMPTS=1
git checkout RUN_ID
dvc pull instruct-tune        # -> outputs/instruct-tune (any stage name in dvc.yaml; `dvc pull` = all)
```

The remote's URL is in `.dvc/config`; its endpoint and credentials only ever come from the
environment. See docs/deploy.md in the MedSIGHT repository (section "Pull a checkpoint").
"""


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(repo), *_GIT_IDENTITY, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ArtifactStoreError(f"git {' '.join(args)} in {repo} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip()


def output_names(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """md5 -> the output's name in the repo: the stage, or ``<stage>-<md5[:8]>`` when an ablation
    produced several outputs of one stage."""
    by_stage: dict[str, list[str]] = {}
    for record in records:
        md5 = record["ref"]["md5"]
        if md5 not in by_stage.setdefault(record["stage"], []):
            by_stage[record["stage"]].append(md5)
    return {md5: stage if len(md5s) == 1 else f"{stage}-{md5[:8]}"
            for stage, md5s in by_stage.items() for md5 in md5s}


def _hash_entry(path: str, ref: Mapping[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": path, "hash": "md5", "md5": ref["md5"]}
    entry.update({key: int(ref[key]) for key in ("size", "nfiles") if ref.get(key) is not None})
    return entry


def render_run_files(records: Sequence[Mapping[str, Any]], commands: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(dvc.yaml, dvc.lock) text for the outputs of one run; deps point at the producing outputs."""
    names = output_names(records)
    refs: dict[str, Mapping[str, Any]] = {}
    for record in records:
        refs.setdefault(record["ref"]["md5"], {**record["ref"], "stage": record["stage"],
                                               "inputs": record.get("inputs", {})})
    graph: dict[str, Any] = {}
    lock: dict[str, Any] = {}
    for md5, ref in refs.items():
        name = names[md5]
        deps_paths = {}
        for input_md5 in ref["inputs"].values():
            source = names.get(input_md5)
            # An input this run did not produce (a registered dataset, a single-stage run's refs)
            # is still recorded by hash, under its md5.
            deps_paths[f"{OUTPUTS}/{source or 'external-' + input_md5[:8]}"] = refs.get(input_md5, {"md5": input_md5})
        cmd = (commands or {}).get(ref["stage"]) or f"medsight stage run {ref['stage']} --out {OUTPUTS}/{name}" + "".join(
            f" --input {input_name}={OUTPUTS}/{names.get(input_md5) or 'external-' + input_md5[:8]}"
            for input_name, input_md5 in sorted(ref["inputs"].items()))
        stage: dict[str, Any] = {"cmd": cmd}
        if deps_paths:
            stage["deps"] = sorted(deps_paths)
        stage["outs"] = [f"{OUTPUTS}/{name}"]
        graph[name] = stage
        locked: dict[str, Any] = {"cmd": cmd}
        if deps_paths:
            locked["deps"] = [_hash_entry(path, dep) for path, dep in sorted(deps_paths.items())]
        locked["outs"] = [_hash_entry(f"{OUTPUTS}/{name}", ref)]
        lock[name] = locked
    dvc_yaml = yaml.safe_dump({"stages": graph}, sort_keys=False)
    dvc_lock = yaml.safe_dump({"schema": LOCK_SCHEMA, "stages": lock}, sort_keys=False)
    return dvc_yaml, dvc_lock


class RunRepo:
    def __init__(self, path: Path) -> None:
        self.path = Path(path).resolve()

    def ensure(self, store: StoreConfig) -> None:
        """Create the repo (or update its remote): committing the remote URL, never an endpoint."""
        from dvc.repo import Repo

        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / ".git").is_dir():
            _git(self.path, "init", "-q", "-b", "main")
        if not (self.path / ".dvc").is_dir():
            with quiet():
                Repo.init(str(self.path)).close()
        repo = Repo(str(self.path))
        try:
            with repo.config.edit() as conf:
                conf["core"]["remote"] = REMOTE_NAME
                conf["core"]["analytics"] = False
                conf["core"]["check_update"] = False
                # No endpointurl: a stored loopback port would break every clone elsewhere.
                conf["remote"][REMOTE_NAME] = {"url": store.dvc_url, "connect_timeout": 5, "read_timeout": 60}
        finally:
            repo.close()
        (self.path / "runs").mkdir(exist_ok=True)
        for stale in (self.path / OUTPUTS).glob("*.dvc"):  # the earlier pointer-file layout
            stale.unlink()
        atomic_write_text(self.path / "README.md", README)
        self._commit_if_changed("medsight: DVC remote definition")

    def _commit_if_changed(self, message: str) -> bool:
        _git(self.path, "add", "-A")
        if not _git(self.path, "status", "--porcelain"):
            return False
        _git(self.path, "commit", "-q", "-m", message)
        return True

    def record_run(self, run_id: str, records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
                   commands: Mapping[str, str] | None = None) -> str:
        """Write dvc.yaml + dvc.lock + lineage for ``run_id``, commit, tag; returns the commit id."""
        dvc_yaml, dvc_lock = render_run_files(records, commands)
        atomic_write_text(self.path / "dvc.yaml", dvc_yaml)
        atomic_write_text(self.path / "dvc.lock", dvc_lock)
        names = sorted(set(output_names(records).values()))
        # DVC writes these entries itself on checkout; written now, so a clone's `git status` stays clean.
        atomic_write_text(self.path / OUTPUTS / ".gitignore", "".join(f"/{name}\n/.{name}.md5\n" for name in names))
        atomic_write_json(self.path / "runs" / f"{run_id}.json", {"run_id": run_id, **summary, "stages": list(records)})
        self._commit_if_changed(f"run {run_id}")
        _git(self.path, "tag", "-f", run_id)
        return _git(self.path, "rev-parse", "HEAD")

    def pull(self, name: str) -> Path:
        """``dvc pull <name>`` into the repo's workspace (uses the repo's own cache)."""
        from dvc.repo import Repo

        if name not in self.stages():
            raise ArtifactStoreError(f"{self.path}/dvc.yaml has no stage {name!r}; recorded: {', '.join(self.stages()) or 'none'}")
        repo = Repo(str(self.path))
        try:
            with quiet():
                # Addressed through dvc.yaml: a bare stage name would be resolved against the cwd.
                repo.pull(targets=[f"{self.path / 'dvc.yaml'}:{name}"])
        except Exception as error:
            raise ArtifactStoreError(f"dvc pull {name} in {self.path} failed: {error}; is the S3 server up?") from error
        finally:
            repo.close()
        md5 = self.locked_md5(name)
        if md5:
            atomic_write_text(self.path / OUTPUTS / f".{name}.md5", md5 + "\n")
        return self.path / OUTPUTS / name

    def locked_md5(self, name: str) -> str | None:
        try:
            lock = yaml.safe_load((self.path / "dvc.lock").read_text())
        except OSError:
            return None
        outs = lock.get("stages", {}).get(name, {}).get("outs", [])
        return outs[0]["md5"] if outs else None

    def checkout_dir(self, name: str, md5: str) -> Path | None:
        """The workspace copy of ``name`` if the last pull there fetched ``md5`` (saves a pull)."""
        marker = self.path / OUTPUTS / f".{name}.md5"
        target = self.path / OUTPUTS / name
        if target.is_dir() and marker.is_file() and marker.read_text().strip() == md5:
            return target
        return None

    def stages(self) -> list[str]:
        try:
            graph = yaml.safe_load((self.path / "dvc.yaml").read_text()) or {}
        except OSError:
            return []
        return sorted(graph.get("stages", {}))

    def runs(self) -> list[str]:
        return sorted(p.stem for p in (self.path / "runs").glob("*.json"))


def client_env_file(s3_dir: Path, env: Mapping[str, str]) -> Path:
    """``export`` lines for S3 clients (dvc, aws, mlflow), written 0600 so only the owner reads it."""
    path = Path(s3_dir) / "client.env"
    lines = [f"export {key}={value}" for key, value in env.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path

